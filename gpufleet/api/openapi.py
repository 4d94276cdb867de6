"""The OpenAPI description of what the pod server and the router answer, written once.

The router proxies the three OpenAI POST routes as raw ASGI, so its framework sees none of
them; the pod server's framework sees them but knows neither our error format nor our
statuses. Both documents are finished here from the framework's draft: the POST routes get
the same request and response schemas (the body models of gpufleet.api.openai and
gpufleet.api.responses), every operation lists the statuses it really answers with OpenAI's
error body, ``Retry-After`` on 429 and 503, and ``/metrics`` is text. Plain dicts, no framework.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gpufleet.api.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gpufleet.api.responses import ChatCompletion, Completion, EmbeddingList, ErrorBody

LEASE_HEADER = "x-gpufleet-lease"
LEASE_PRECEDENCE = (
    "When a request carries both the header and the body field `lease`, the header's lease is the one used."
)
REF = "#/components/schemas/{model}"

# path -> (summary, request body, 200 body, streams)
OPENAI_ROUTES: dict[str, tuple[str, type[BaseModel], type[BaseModel], bool]] = {
    "/v1/chat/completions": ("Chat completion (OpenAI-compatible)", ChatCompletionRequest, ChatCompletion, True),
    "/v1/completions": ("Text completion (OpenAI-compatible)", CompletionRequest, Completion, True),
    "/v1/embeddings": ("Embeddings (OpenAI-compatible)", EmbeddingRequest, EmbeddingList, False),
}

ERRORS: dict[int, str] = {
    400: "Malformed JSON; an unknown field, or a refused one, named in `param`; a bad value; a prompt over "
    "the context; an unknown `exclusive_gpu`.",
    401: "Missing or wrong API key (when the server has one).",
    404: "Unknown model.",
    409: "The lease named by `lease` or `x-gpufleet-lease` conflicts with this request (another holder, or "
    "not its model's group).",
    413: "Request body over MAX_BODY_BYTES.",
    429: "Every eligible device queue is full: retry after `Retry-After` seconds.",
    500: "A bug: reported, never a dropped connection.",
    502: "The pod server chosen failed before answering (router only).",
    503: "The model's group failed to load, the target device is down, no device came to serve the group within "
    "the router's scale-from-zero wait, or the server is starting or stopping: retry after `Retry-After` seconds.",
}
POST_STATUSES = (400, 401, 404, 409, 413, 429, 500, 503)
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (at least 1).",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


# Before OpenAPI 3.2, the schema of an event stream describes one event.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "description": "Each event's data is a JSON chunk (an error document if generation fails mid-stream); "
    "the last is `[DONE]`.",
}


LEASE_ERRORS = {
    400: "A bad body: an unknown or ambiguous target, a TTL out of range, an unknown field.",
    404: "No live lease has this id.",
    409: "A device of the target is held by another live lease (or the lease has expired).",
}


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": description or ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
    }
    if status in (429, 503):
        doc["headers"] = copy.deepcopy(RETRY_AFTER)
    return doc


def _schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [(ErrorBody, "serialization")]
    for _, request, response, _ in OPENAI_ROUTES.values():
        models += [(request, "validation"), (response, "serialization")]
    _, doc = models_json_schema(models, ref_template=REF)
    schemas: dict[str, Any] = doc.get("$defs", {})
    return schemas


def _openai_operation(path: str, router: bool) -> dict[str, Any]:
    summary, request, response, streams = OPENAI_ROUTES[path]
    ok: dict[str, Any] = {"application/json": {"schema": {"$ref": REF.format(model=response.__name__)}}}
    if streams:
        ok["text/event-stream"] = {"schema": SSE_EVENT}
    statuses = (*POST_STATUSES, 502) if router else POST_STATUSES
    return {
        "summary": summary,
        "operationId": path.strip("/").replace("/", "_"),
        "parameters": [
            {
                "name": LEASE_HEADER,
                "in": "header",
                "required": False,
                "description": "gpufleet extension: the lease to serve this request under (as the `lease` field). "
                + LEASE_PRECEDENCE,
                "schema": {"type": "string", "minLength": 1, "pattern": "\\S"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=request.__name__)}}},
        },
        "responses": {
            "200": {"description": "The answer" + ("; events with `stream: true`." if streams else "."), "content": ok},
            **{str(s): error_response(s) for s in sorted(statuses)},
        },
    }


def complete_document(draft: dict[str, Any], *, router: bool, open_paths: Iterable[str] = ()) -> dict[str, Any]:
    """The framework's draft made true (see the module docstring); ``open_paths`` need no API key."""
    open_paths = frozenset(open_paths)
    doc = copy.deepcopy(draft)
    paths: dict[str, Any] = doc.setdefault("paths", {})
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # we answer 400 in OpenAI's format, never 422
        schemas.pop(name, None)
    for path, item in paths.items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path not in open_paths:
                responses["401"] = error_response(401)
            if method == "get" and path.startswith("/v1/models/"):
                responses["404"] = error_response(404)
            if path.startswith("/api/leases"):
                # The router's lease API (gpufleet.router.lease_api): bad bodies, unknown ids, conflicts.
                if method == "post":
                    responses["400"] = error_response(400, LEASE_ERRORS[400])
                    responses["409"] = error_response(409, LEASE_ERRORS[409])
                if "{" in path:
                    responses["404"] = error_response(404, LEASE_ERRORS[404])
    for path in OPENAI_ROUTES:
        paths[path] = {"post": _openai_operation(path, router)}
    schemas.update(_schemas())
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"] = {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    for path in ("/ready", "/v2/health/ready"):
        if path in paths:
            paths[path]["get"]["responses"]["503"] = {
                "description": "Not ready; the body says why.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
    return doc
