"""How facts about a model read in listings, whichever upstream told them:
sizes on disk and parameter counts."""

from __future__ import annotations

SIZE_UNITS = ("KB", "MB", "GB", "TB", "PB")


def human_size(size_bytes: int) -> str:
    """Size in decimal units with one decimal, as Ollama's CLI shows it: 2019393189 → "2.0GB"."""
    if size_bytes <= 0:
        return ""
    if size_bytes < 1000:
        return f"{size_bytes}B"
    value = float(size_bytes)
    for unit in SIZE_UNITS:
        value /= 1000
        if value < 999.95 or unit == SIZE_UNITS[-1]:
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")


def parameter_count(count: int) -> str:
    """A parameter count as model names say it: 134515008 → "135M", 3212749888 → "3.2B"."""
    if count <= 0:
        return ""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}M"
    if count >= 1_000:
        return f"{count / 1e3:.0f}K"
    return str(count)
