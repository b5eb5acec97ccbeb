"""Hugging Face Inference Providers: the OpenAI-compatible router at router.huggingface.co.

Model ids are hub ids with an optional routing suffix (`:fastest`, `:cheapest`
or a provider such as `:groq`). The original design's curated models are
always listed, with descriptions; with a token the router's live listing is
merged in (context length, tool support, per-provider status). Without a
token the provider is listed as unavailable, which is never an error at start.
"""

from __future__ import annotations

import logging
from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError

from marie_providers.errors import model_not_found
from marie_providers.openai_compatible.client import OpenAICompatibleProvider
from marie_providers.upstream.provider import Provider

log = logging.getLogger("marie.providers.huggingface")

DEFAULT_HF_BASE_URL = "https://router.huggingface.co/v1"

# The original design's list: always shown, so a fresh install has something to pick.
CURATED: tuple[tuple[str, str, str, int], ...] = (
    (
        "meta-llama/Llama-2-7b-chat-hf",
        "Llama 2 7B Chat: Meta's 7B dialogue model, a solid small generalist.",
        "7B",
        4096,
    ),
    (
        "meta-llama/Llama-2-13b-chat-hf",
        "Llama 2 13B Chat: Meta's 13B dialogue model, better reasoning than 7B.",
        "13B",
        4096,
    ),
    (
        "mistralai/Mistral-7B-Instruct-v0.2",
        "Mistral 7B Instruct: fast instruction-following model with a 32k context.",
        "7B",
        32768,
    ),
    (
        "tiiuae/falcon-7b-instruct",
        "Falcon 7B Instruct: TII's instruction-tuned 7B model.",
        "7B",
        2048,
    ),
    (
        "HuggingFaceH4/zephyr-7b-beta",
        "Zephyr 7B: a Mistral fine-tune aligned for helpful chat.",
        "7B",
        32768,
    ),
)


def hub_id(name: str) -> str:
    """The hub id of a model name, without its routing suffix."""
    base, colon, _ = name.rpartition(":")
    return base if colon and "/" in base else name


def _curated() -> dict[str, pb.ModelInfo]:
    out = {}
    for model_id, description, parameters, context in CURATED:
        info = pb.ModelInfo(
            name=model_id,
            description=description,
            parameters=parameters,
            context_length=context,
            family=model_id.split("/", 1)[1].split("-", 1)[0].lower(),
            capabilities=[pb.MODEL_CAPABILITY_CHAT],
        )
        info.metadata["curated"] = "true"
        out[model_id] = info
    return out


class HuggingFaceProvider(OpenAICompatibleProvider):
    """The Hugging Face router with a token (`HF_TOKEN`), or listed as unavailable without one."""

    kind = "huggingface"
    default_base_url = DEFAULT_HF_BASE_URL
    default_api_key_env = "HF_TOKEN"
    supports_embeddings = False
    accepts_token_inputs = False
    serves_any_hub_id = True
    # The router serves chat only: no legacy `/completions`.
    stream_completion = Provider.stream_completion

    def missing_credentials(self) -> str:
        if not self._api_key:
            env = self.api_key_env or "HF_TOKEN"
            return f"{self.name} has no token: set the environment variable {env}"
        return ""

    def enrich(self, info: pb.ModelInfo, entry: dict[str, Any]) -> None:
        providers = entry.get("providers")
        capabilities = {pb.MODEL_CAPABILITY_CHAT}
        if isinstance(providers, list):
            live = []
            for item in providers:
                if not isinstance(item, dict) or not isinstance(item.get("provider"), str):
                    continue
                name = item["provider"]
                status = item.get("status")
                live.append(f"{name}={status}" if isinstance(status, str) else name)
                context = item.get("context_length")
                if isinstance(context, int) and 0 < context < 2**31:
                    info.context_length = max(info.context_length, context)
                if item.get("supports_tools") is True:
                    capabilities.add(pb.MODEL_CAPABILITY_TOOLS)
            if live:
                info.metadata["providers"] = ",".join(live)
        architecture = entry.get("architecture")
        if isinstance(architecture, dict):
            inputs = architecture.get("input_modalities")
            if isinstance(inputs, list) and "image" in inputs:
                capabilities.add(pb.MODEL_CAPABILITY_VISION)
        info.capabilities[:] = sorted(capabilities)
        info.details_loaded = True

    async def list_models(self) -> list[pb.ModelInfo]:
        models = _curated()
        live_models: list[pb.ModelInfo] = []
        if not self.missing_credentials():
            try:
                live_models = await self._listing()
            except ServiceError as exc:
                # The curated list is always shown; health says the router is down.
                log.warning("hugging face router listing failed: %s", exc.message)
            for live in live_models:
                curated = models.get(live.name)
                if curated is not None:
                    live.description = curated.description
                    live.parameters = live.parameters or curated.parameters
                    live.metadata["curated"] = "true"
                models[live.name] = live
        out = []
        for name in sorted(models):
            info = models[name]
            info.id = self.model_id(name)
            info.provider = self.name
            out.append(info)
        return out

    async def model_details(self, name: str) -> pb.ModelInfo:
        wanted = hub_id(name)
        for info in await self.list_models():
            if info.name == wanted:
                if wanted != name:
                    info.name, info.id = name, self.model_id(name)
                info.details_loaded = True
                return info
        raise model_not_found(name, self.name)

    async def probe(self) -> pb.ProviderHealth:
        return await self.probe_path("models")
