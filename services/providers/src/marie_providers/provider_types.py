"""Every kind of provider Marie can talk to, by the `type` the configuration names.

Adding a kind of upstream is one module (a `Provider` with a `from_config`)
and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from marie_providers.anthropic.client import AnthropicProvider
from marie_providers.config import ProviderConfig
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


def build(name: str, config: ProviderConfig, settings: ProvidersSettings) -> Provider:
    """The provider one configuration entry describes."""
    return PROVIDER_TYPES[config.type](name, config, settings)
