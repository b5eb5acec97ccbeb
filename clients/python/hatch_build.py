"""Refuse to build a package without its generated code.

The modules under src/marie/ come from protos/ through `buf generate`
(`make clients-python` at the repository root); a wheel without them would
import-fail on first use, so the build stops with the command to run.
"""

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GeneratedCodeCheck(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        marker = Path(self.root, "src/marie/providers/v1/provider_service_pb2.py")
        if not marker.exists():
            raise RuntimeError(
                "marie-client: generated code missing; run `make clients-python` "
                "at the repository root first"
            )
