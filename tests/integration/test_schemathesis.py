"""schemathesis (every check) against the OpenAPI documents of the router and of a pod server.

Two runs per document, each bounded in examples: negative data against the document as served
(all of it must be refused with a 4xx), and positive data against the same document with only
the cost of generation bounded (the real model names, at most 4 tokens and 2 choices), so valid
requests reach real inference and must be answered as documented.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

MODELS = {"ChatCompletionRequest": "tiny-chat", "CompletionRequest": "tiny-chat", "EmbeddingRequest": "minilm"}
BOUNDED = {
    "max_tokens": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 4}, {"type": "null"}]},
    "max_completion_tokens": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 4}, {"type": "null"}]},
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    # vLLM's min_tokens may not exceed max_tokens (a 400 naming it): within the bound above, always valid.
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 1},
}
# Which device or lease serves a request is a property of the fleet, not of the schema.
ROUTING_FIELDS = ("exclusive_gpu", "lease")
MINILM_VOCAB = 30522
# Prompts that fit the models' contexts (tiny-chat: 256 tokens; one character may be 4 byte tokens):
# every string and list a request schema reaches is short, so a valid prompt is never too long.
PROMPT_BOUNDS = {"string": ("maxLength", 8), "array": ("maxItems", 2)}
# Examples per operation: 4 keeps CI's run short; GPUFLEET_SCHEMATHESIS_EXAMPLES=20 is the deeper check.
EXAMPLES = os.environ.get("GPUFLEET_SCHEMATHESIS_EXAMPLES", "4")


def positive_document(doc: dict[str, Any]) -> dict[str, Any]:
    """Valid requests that are cheap to serve: real model names, bounded tokens and choices."""
    out = copy.deepcopy(doc)
    for name, model in MODELS.items():
        props = out["components"]["schemas"][name]["properties"]
        props["model"] = {"enum": [model]}
        for field, schema in BOUNDED.items():
            if field in props:
                props[field] = schema
        for field in ROUTING_FIELDS:
            props.pop(field, None)
    for name in MODELS:
        _bound_prompts(out["components"]["schemas"][name], out["components"]["schemas"], set())
    # Like the names, a model's embedding size and vocabulary are the fleet's, not the schema's.
    embedding = out["components"]["schemas"]["EmbeddingRequest"]["properties"]
    embedding["dimensions"] = {"enum": [None, 384]}
    for option in embedding["input"]["anyOf"]:
        items = option.get("items", {})
        for ints in (items, items.get("items", {})):
            if ints.get("type") == "integer":
                ints["maximum"] = MINILM_VOCAB - 1
    out["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["schema"] = {"enum": ["tiny-chat", "minilm"]}
    # The lease header, like the field, names a lease of the fleet; so does a lease target a device.
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        op = out["paths"][route]["post"]
        op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "x-gpufleet-lease"]
    # Valid lease requests would take the fleet's only device away from every later request: the
    # lease API's positive cases are its own tests' (tests/unit/test_router_leases_inprocess.py).
    for path in [p for p in out["paths"] if p.startswith("/api/leases")]:
        del out["paths"][path]
    return out


def _bound_prompts(schema: Any, components: dict[str, Any], seen: set[str]) -> None:
    """Bound every string's length and list's size reachable from ``schema`` (in place)."""
    if isinstance(schema, list):
        for item in schema:
            _bound_prompts(item, components, seen)
        return
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        target = ref.rsplit("/", 1)[-1]
        if target not in seen:
            seen.add(target)
            _bound_prompts(components[target], components, seen)
    kind = schema.get("type")
    bound = PROMPT_BOUNDS.get(kind) if isinstance(kind, str) else None  # else a property named "type"
    if bound and "enum" not in schema and "const" not in schema:
        key, most = bound
        least = schema.get("minLength" if key == "maxLength" else "minItems", 0)
        schema[key] = max(least, min(schema.get(key, most), most))
    for value in schema.values():
        _bound_prompts(value, components, seen)


def schemathesis(document: dict[str, Any], url: str, mode: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    path = tmp / f"{mode}.json"
    path.write_text(json.dumps(document))
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "run", str(path), "--url", url, "--checks", "all", "--mode", mode]
    argv += ["--max-examples", EXAMPLES, "--workers", "1", "--seed", "11", "--phases", "coverage,fuzzing"]
    argv += ["--request-timeout", "30", "--generation-database", "none", "--no-color", "--warnings", "off"]
    # In tmp: schemathesis keeps a cache of crashes in its working directory.
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=tmp)


@pytest.mark.parametrize("target", ["router", "pod"])
def test_schemathesis_finds_nothing(fleet: Fleet, target: str, tmp_path: Path) -> None:
    url = fleet.router_url if target == "router" else fleet.pod_url
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    for mode, document in (("negative", doc), ("positive", positive_document(doc))):
        run = schemathesis(document, url, mode, tmp_path)
        assert run.returncode == 0, f"schemathesis ({mode}) against the {target}:\n{run.stdout[-6000:]}{run.stderr}"
