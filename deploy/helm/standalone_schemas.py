"""Standalone Kubernetes JSON schemas for kubeconform, from kubernetes-validate's.

kubernetes-validate ships each kind's schema with `$ref`s into a shared
`/api/_definitions.json`, which kubeconform cannot follow from local files.
This inlines them: `python3 standalone_schemas.py SRC DEST kind-file...`
writes DEST/<kind-file> with every reference replaced by its definition
(a definition that refers to itself, as CRD schemas do, stays open: {}),
and without its `$id`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: How a kind's schema refers to a definition, and how definitions refer to
#: each other.
PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def inline(node: Any, defs: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        prefix = next((p for p in PREFIXES if isinstance(ref, str) and ref.startswith(p)), None)
        if prefix is not None:
            assert isinstance(ref, str)
            name = ref[len(prefix) :]
            if name in stack:
                return {}
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**inline(defs[name], defs, (*stack, name)), **inline(rest, defs, stack)}
        return {k: inline(v, defs, stack) for k, v in node.items()}
    if isinstance(node, list):
        return [inline(v, defs, stack) for v in node]
    return node


def main() -> None:
    src, dest, *kinds = sys.argv[1:]
    defs = json.loads((Path(src) / "_definitions.json").read_text())["$defs"]
    Path(dest).mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        schema = json.loads((Path(src) / kind).read_text())
        # Its $id (a kubernetes.io URL) would make a validator look refs up there.
        schema.pop("$id", None)
        standalone = json.dumps(inline(schema, defs))
        if '"$ref"' in standalone:
            raise SystemExit(f"{kind}: a reference is left")
        (Path(dest) / kind).write_text(standalone)


if __name__ == "__main__":
    main()
