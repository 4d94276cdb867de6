"""Every request field of the OpenAI endpoints, and what gpufleet does with it: one table.

The table drives three things: the check that refuses, by name, any field we do not know or
do not implement (``check_fields``, run before a body is parsed), the OpenAPI schema of the
refused fields (only their accepted default values are valid), and the README's support table
(``support_table``; tests/unit/test_docs.py keeps the two equal). A field is either honoured,
accepted as metadata that cannot change the answer, refused unless it has its default value,
or a gpufleet extension. No field is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import PydanticCustomError

Endpoint = Literal["chat", "completion", "embedding"]
Support = Literal["honoured", "metadata", "refused", "extension"]

CHAT: frozenset[Endpoint] = frozenset({"chat"})
COMPLETION: frozenset[Endpoint] = frozenset({"completion"})
GENERATION: frozenset[Endpoint] = frozenset({"chat", "completion"})
EMBEDDING: frozenset[Endpoint] = frozenset({"embedding"})
ALL: frozenset[Endpoint] = frozenset({"chat", "completion", "embedding"})

ENDPOINT_PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


@dataclass(frozen=True)
class FieldRule:
    name: str
    endpoints: frozenset[Endpoint]
    support: Support
    note: str
    # Refused fields only: the values accepted because they mean what we do anyway (the defaults).
    accepted: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        return any(_same(value, a) for a in self.accepted)


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: 0 == 0.0, but True is not 1."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    if isinstance(value, int | float) and isinstance(accepted, int | float):
        return value == accepted
    return type(value) is type(accepted) and bool(value == accepted)


def _refused(name: str, endpoints: frozenset[Endpoint], note: str, *accepted: Any) -> FieldRule:
    return FieldRule(name, endpoints, "refused", note, (None, *accepted))


FIELDS: tuple[FieldRule, ...] = (
    # --- honoured ---
    FieldRule("model", ALL, "honoured", "names the model, and so its group"),
    FieldRule("messages", CHAT, "honoured", "roles system, developer, user, assistant; text content parts"),
    FieldRule("prompt", COMPLETION, "honoured", "one string (or a list of one)"),
    FieldRule("input", EMBEDDING, "honoured", "a string, a list of strings, token ids, or a list of token-id lists"),
    FieldRule("encoding_format", EMBEDDING, "honoured", "`float` or `base64` (little-endian float32)"),
    FieldRule("max_tokens", GENERATION, "honoured", "up to the model's context"),
    FieldRule("max_completion_tokens", CHAT, "honoured", "as `max_tokens`; wins when both are set"),
    FieldRule("temperature", GENERATION, "honoured", "0 is greedy"),
    FieldRule("top_p", GENERATION, "honoured", ""),
    FieldRule(
        "seed",
        GENERATION,
        "honoured",
        "the draws are the seed's alone; the text is the same in the same batch, and across batches unless"
        " rounding tips a near tie (README: how a pod server runs requests)",
    ),
    FieldRule("n", GENERATION, "honoured", "up to 16 choices; choice i is seeded with `seed + i`"),
    FieldRule("stop", GENERATION, "honoured", "up to 4 strings; the text before the stop is returned"),
    FieldRule("stream", GENERATION, "honoured", "server-sent events ending with `data: [DONE]`"),
    FieldRule("stream_options", GENERATION, "honoured", "`include_usage` adds a usage chunk"),
    # --- accepted: they describe the caller or hint at caching, and cannot change the answer ---
    FieldRule("user", ALL, "metadata", "accepted; identifies the end user, no effect on the answer"),
    FieldRule("safety_identifier", CHAT, "metadata", "accepted, as `user`"),
    FieldRule("prompt_cache_key", CHAT, "metadata", "accepted; a caching hint with no effect on the answer"),
    FieldRule("metadata", CHAT, "metadata", "accepted (up to 16 string pairs); nothing is stored"),
    FieldRule("service_tier", CHAT, "metadata", "`auto` or `default`: there is one tier"),
    FieldRule("parallel_tool_calls", CHAT, "metadata", "accepted; tools are refused, so it cannot matter"),
    # --- refused unless they hold their default value ---
    _refused("logprobs", CHAT, "no log-probabilities from the batching engine", False),
    _refused("logprobs", COMPLETION, "no log-probabilities from the batching engine"),
    _refused("top_logprobs", CHAT, "no log-probabilities from the batching engine", 0),
    _refused("logit_bias", GENERATION, "the engine applies no logit processors", {}),
    _refused("presence_penalty", GENERATION, "the engine applies no penalties", 0),
    _refused("frequency_penalty", GENERATION, "the engine applies no penalties", 0),
    _refused("tools", CHAT, "no tool calling", []),
    _refused("tool_choice", CHAT, "no tool calling", "none"),
    _refused("functions", CHAT, "no function calling", []),
    _refused("function_call", CHAT, "no function calling", "none"),
    _refused("response_format", CHAT, "no constrained (JSON) decoding", {"type": "text"}),
    _refused("store", CHAT, "nothing is stored", False),
    _refused("modalities", CHAT, "text only", ["text"]),
    _refused("audio", CHAT, "text only"),
    _refused("prediction", CHAT, "no predicted outputs"),
    _refused("reasoning_effort", CHAT, "the models do not reason"),
    _refused("verbosity", CHAT, "no verbosity control"),
    _refused("web_search_options", CHAT, "no web search"),
    _refused("echo", COMPLETION, "the prompt is not echoed", False),
    _refused("best_of", COMPLETION, "no server-side best-of selection", 1),
    _refused("suffix", COMPLETION, "no insertion", ""),
    _refused("dimensions", EMBEDDING, "only the model's native dimension (checked per model)"),
    # --- gpufleet's own ---
    FieldRule("exclusive_gpu", ALL, "extension", "serve only on this device, pod or node"),
    FieldRule("lease", ALL, "extension", "serve on the devices this lease holds (consumed by the router)"),
    # vLLM's extensions, under vLLM's names, so its benchmark clients (``vllm bench serve``) drive us
    FieldRule(
        "ignore_eos",
        GENERATION,
        "extension",
        "vLLM's name: never stop at an end token; exactly `max_tokens` tokens unless a stop string ends it",
    ),
    FieldRule(
        "min_tokens",
        GENERATION,
        "extension",
        "vLLM's name: no end token and no stop string before this many tokens; at most `max_tokens`",
    ),
)

# dimensions is refused per model (its native value is fine), so the body models declare it.
DECLARED_REFUSED = frozenset({"dimensions"})


def rules(endpoint: Endpoint) -> dict[str, FieldRule]:
    return {r.name: r for r in FIELDS if endpoint in r.endpoints}


def check_fields(endpoint: Endpoint, body: Any) -> Any:
    """Refuse unknown fields, and refused fields with a value other than their default, by name.

    Accepted defaults of refused fields are dropped here: they change nothing. Meant as a
    pydantic ``mode="before"`` model validator, so errors are pydantic errors whose ``ctx``
    carries the field (gpufleet.web.errors turns them into OpenAI's 400).
    """
    if not isinstance(body, Mapping):
        return body
    known = rules(endpoint)
    out = dict(body)
    for name, value in body.items():
        rule = known.get(name)
        if rule is None:
            raise PydanticCustomError(
                "unknown_parameter",
                "unknown parameter for {path}",
                {"param": name, "path": ENDPOINT_PATHS[endpoint]},
            )
        if rule.support != "refused" or name in DECLARED_REFUSED:
            continue
        if not rule.accepts(value):
            raise PydanticCustomError(
                "unsupported_parameter",
                "not supported by this server ({note}){allowed}",
                {"param": name, "note": rule.note, "allowed": _allowed(rule)},
            )
        del out[name]
    return out


def _allowed(rule: FieldRule) -> str:
    values = [a for a in rule.accepted if a is not None]
    return f"; only {_json(values[0])} is accepted" if values else ""


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def refused_schema(endpoint: Endpoint) -> dict[str, Any]:
    """JSON-schema properties of the refused fields: only their accepted values validate."""
    return {
        r.name: {"enum": list(r.accepted), "description": f"Refused unless default: {r.note}."}
        for r in rules(endpoint).values()
        if r.support == "refused" and r.name not in DECLARED_REFUSED
    }


def support_table() -> str:
    """The README's table of request fields (kept equal to the README by a unit test)."""
    lines = ["| field | endpoints | support | notes |", "|---|---|---|---|"]
    order = {"chat": 0, "completion": 1, "embedding": 2}
    for r in FIELDS:
        where = ", ".join(sorted(r.endpoints, key=order.__getitem__))
        note = r.note
        if r.support == "refused":
            values = [_json(a) for a in r.accepted if a is not None]
            note += f"; accepted: {' or '.join(values)}" if values else ""
        lines.append(f"| `{r.name}` | {where} | {r.support} | {note} |")
    return "\n".join(lines) + "\n"
