"""Every OpenAI request field is honoured, accepted as metadata, refused by name, or ours: the
table in gpufleet.api.fields, the body models and both OpenAPI documents agree."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from gpufleet.api.fields import DECLARED_REFUSED, FIELDS, rules
from gpufleet.api.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gpufleet.api.openapi import LEASE_PRECEDENCE, OPENAI_ROUTES, complete_document
from gpufleet.router.app import create_app as create_router
from gpufleet.router.settings import load_router_settings
from gpufleet.web.errors import validation_error

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "hi"}]
MODELS: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (ChatCompletionRequest, {"model": "m", "messages": MESSAGES}),
    (CompletionRequest, {"model": "m", "prompt": "p"}),
    (EmbeddingRequest, {"model": "m", "input": "x"}),
]


def _error(cls: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return validation_error(RequestValidationError(errors)).to_openai()["error"]


@pytest.mark.parametrize(("cls", "base"), MODELS)
def test_the_table_and_the_body_models_agree(cls: type[BaseModel], base: dict[str, Any]) -> None:
    table = rules(cls.endpoint)  # type: ignore[attr-defined]
    declared = {n for n, r in table.items() if r.support != "refused" or n in DECLARED_REFUSED}
    assert set(cls.model_fields) == declared


@pytest.mark.parametrize(("cls", "base"), MODELS)
def test_unknown_fields_are_refused_by_name(cls: type[BaseModel], base: dict[str, Any]) -> None:
    err = _error(cls, {**base, "frobnicate": 1})
    assert (err["param"], err["code"]) == ("frobnicate", "unknown_parameter")


@pytest.mark.parametrize(("cls", "base"), [m for m in MODELS if m[0] is not EmbeddingRequest])
def test_refused_fields_pass_only_with_their_default(cls: type[BaseModel], base: dict[str, Any]) -> None:
    refused = [r for r in rules(cls.endpoint).values() if r.support == "refused"]  # type: ignore[attr-defined]
    assert refused
    for rule in refused:
        for value in rule.accepted:
            cls.model_validate({**base, rule.name: value})  # the default changes nothing: accepted
        err = _error(cls, {**base, rule.name: "something else"})
        assert (err["param"], err["code"]) == (rule.name, "unsupported_parameter"), rule.name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logit_bias", {"50256": -100}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("store", True),
        ("reasoning_effort", "low"),
    ],
)
def test_what_chat_refuses(field: str, value: Any) -> None:
    err = _error(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, field: value})
    assert err["param"] == field and err["code"] == "unsupported_parameter" and field in err["message"]


def test_what_chat_accepts() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}],
            "user": "u-1",
            "metadata": {"k": "v"},
            "service_tier": "auto",
            "response_format": {"type": "text"},
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "tool_choice": "none",
            "stream_options": {"include_usage": True},
            "exclusive_gpu": "cuda:0",
            "lease": "lease-1",
        }
    )
    assert body.user == "u-1" and body.lease == "lease-1" and body.messages[0].text() == "hi"


def test_nested_fields_are_named_with_their_path() -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    err = _error(ChatCompletionRequest, {"model": "m", "messages": [image]})
    assert (err["param"], err["code"]) == ("messages.0.content.0.type", "unsupported_parameter")
    tool = {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert _error(ChatCompletionRequest, {"model": "m", "messages": [tool]})["param"] == "messages.0.tool_calls"


def test_completions_refuse_echo_best_of_and_suffix() -> None:
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "end"), ("logprobs", 1)):
        err = _error(CompletionRequest, {"model": "m", "prompt": "p", field: value})
        assert err["param"] == field and err["code"] == "unsupported_parameter"


def test_types_are_strict_as_documented() -> None:
    err = _error(CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": "5"})
    assert err["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("value", "inputs"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_embedding_inputs(value: Any, inputs: list[Any]) -> None:
    assert EmbeddingRequest.model_validate({"model": "m", "input": value}).inputs() == inputs


@pytest.mark.parametrize("value", [[], [""], [[]], [[-1]], ["a", 1]])
def test_bad_embedding_inputs_name_input(value: Any) -> None:
    assert _error(EmbeddingRequest, {"model": "m", "input": value})["param"] == "input"


def test_every_field_has_one_rule_per_endpoint() -> None:
    seen = [(r.name, e) for r in FIELDS for e in r.endpoints]
    assert len(seen) == len(set(seen))


def _pod_document() -> dict[str, Any]:
    from gpufleet.api.model_groups import ModelGroupsFile
    from gpufleet.pod_server.app import create_app
    from gpufleet.pod_server.settings import load_settings

    groups = ModelGroupsFile.model_validate(
        {"default_group": "g", "groups": {"g": {"models": [{"id": "m", "source": "/nowhere", "task": "chat"}]}}}
    )
    return create_app(load_settings(devices=["cpu:0"]), groups).openapi()


def _router_document() -> dict[str, Any]:
    app: Any = create_router(load_router_settings(pod_urls=["http://127.0.0.1:1"]))
    while not hasattr(app, "api"):  # the middleware around RouterApp
        app = app.app
    return app.api.openapi()  # type: ignore[no-any-return]


def test_both_documents_describe_the_openai_routes_alike() -> None:
    pod, router = _pod_document(), _router_document()
    for path in OPENAI_ROUTES:
        p, r = pod["paths"][path]["post"], router["paths"][path]["post"]
        assert p["requestBody"] == r["requestBody"]
        assert p["responses"]["200"] == r["responses"]["200"]
        statuses = set(p["responses"])
        assert {"200", "400", "404", "409", "413", "429", "503"} <= statuses and "422" not in statuses
        for status in ("429", "503"):
            assert p["responses"][status]["headers"]["Retry-After"]["required"]
        header = next(param for param in r["parameters"] if param["name"] == "x-gpufleet-lease")
        assert LEASE_PRECEDENCE in header["description"]  # the router serves a request carrying two (proxy)
        assert any(param["name"] == "x-gpufleet-lease" for param in p["parameters"])
    schemas = pod["components"]["schemas"]
    assert schemas == {k: v for k, v in router["components"]["schemas"].items() if k in schemas}
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"exclusive_gpu", "lease", "user"} <= set(chat) and chat["logit_bias"]["enum"] == [None, {}]
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    for request in ("ChatCompletionRequest", "CompletionRequest"):  # vLLM's extensions, for SDK users too
        props = schemas[request]["properties"]
        assert props["ignore_eos"]["type"] == "boolean" and "vLLM" in props["ignore_eos"]["description"]
        assert (props["min_tokens"]["type"], props["min_tokens"]["minimum"]) == ("integer", 0)


@pytest.mark.parametrize("document", [_pod_document, _router_document])
def test_no_operation_documents_422_and_metrics_is_text(document: Any) -> None:
    doc = document()
    for item in doc["paths"].values():
        for op in item.values():
            assert "422" not in op["responses"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_completion_of_a_document_is_pure() -> None:
    draft: dict[str, Any] = {"paths": {}}
    complete_document(draft, router=True)
    assert draft == {"paths": {}}


async def test_wrong_methods_are_405_with_allow() -> None:
    import httpx

    from gpufleet.api.model_groups import ModelGroupsFile
    from gpufleet.pod_server.app import create_app
    from gpufleet.pod_server.settings import load_settings

    groups = ModelGroupsFile.model_validate(
        {"default_group": "g", "groups": {"g": {"models": [{"id": "m", "source": "/nowhere", "task": "chat"}]}}}
    )
    pod = create_app(load_settings(devices=["cpu:0"]), groups)  # no lifespan: routing alone answers these
    router = create_router(load_router_settings(pod_urls=["http://127.0.0.1:1"]))
    for app, path, allow in (
        (pod, "/v1/chat/completions", "POST"),
        (pod, "/v1/models", "GET"),
        (router, "/v1/embeddings", "POST"),  # a raw proxy path
        (router, "/api/queue", "GET"),
    ):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            r = await client.delete(path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (path, r.status_code, r.headers)
        assert r.json()["error"]["code"] == "method_not_allowed"
