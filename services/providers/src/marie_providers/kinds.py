"""Every kind of provider Marie can talk to, by the `type` the configuration names.

Adding a kind of upstream is one package (a `Provider` with a `from_config`),
one line here and its name in `config.PROVIDER_TYPE_NAMES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from marie_providers.anthropic.client import AnthropicProvider
from marie_providers.config import PROVIDER_TYPE_NAMES, ProviderConfig
from marie_providers.huggingface.client import HuggingFaceProvider
from marie_providers.ollama.client import OllamaProvider
from marie_providers.openai_compatible.client import OpenAICompatibleProvider
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.provider import Provider

ProviderBuilder = Callable[[str, ProviderConfig, ProvidersSettings], Provider]

PROVIDER_TYPES: Mapping[str, ProviderBuilder] = {
    "ollama": OllamaProvider.from_config,
    "openai": OpenAICompatibleProvider.from_config,
    "huggingface": HuggingFaceProvider.from_config,
    "anthropic": AnthropicProvider.from_config,
}
# config.py validates `type` against its own tuple of names (it cannot import this
# table, whose providers import it); the two must say the same.
if tuple(PROVIDER_TYPES) != PROVIDER_TYPE_NAMES:
    raise ImportError(
        f"provider kinds {tuple(PROVIDER_TYPES)} differ from config.PROVIDER_TYPE_NAMES"
        f" {PROVIDER_TYPE_NAMES}"
    )


def build(name: str, config: ProviderConfig, settings: ProvidersSettings) -> Provider:
    """The provider one configuration entry describes."""
    provider = PROVIDER_TYPES[config.type](name, config, settings)
    provider.embedding_input_type = config.embedding_input_type
    if config.embedding_prefixes is not None:
        prefixes = config.embedding_prefixes
        provider.embedding_prefixes = (prefixes.query, prefixes.document)
    return provider
