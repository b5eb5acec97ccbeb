"""Node.js for the tests that drive real JavaScript clients: a recent enough
`node` (or a skip saying why), and a package's dependencies installed once
from its lock file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: The oldest Node.js major the clients run on.
MIN_NODE_MAJOR = 20


def node_or_skip(needed_for: str) -> str:
    """The `node` binary, or a skip naming what it was needed for."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.skip(f"node and npm are needed to run {needed_for}")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        pytest.skip(
            f"node {version.stdout.strip()} is older than {MIN_NODE_MAJOR}, which the SDK needs"
        )
    return node


def npm_ci(package: Path, timeout: float) -> None:
    """`npm ci` in `package`, skipped while its lock file is older than the last install."""
    stamp = package / "node_modules" / ".stamp"
    lock = package / "package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
        cwd=package,
        check=True,
        timeout=timeout,
    )
    stamp.touch()
