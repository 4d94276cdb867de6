"""The official openai SDK against ``gpufleet up``, through the router: chat and completions,
streaming or not, embeddings in the SDK's default encoding and as floats, models, and each error
type (400 naming the field, 404, 429 with Retry-After, 503 with Retry-After)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import BROKEN_MODEL, Fleet
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.router_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_chat_streams_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_completion_streams(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings_in_the_default_encoding(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="minilm", input=["a cat", "a dog"])  # the SDK asks for base64
    assert [len(d.embedding) for d in result.data] == [384, 384]
    norm = sum(x * x for x in result.data[0].embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-3


def test_models_and_not_found(client: openai.OpenAI) -> None:
    assert "tiny-chat" in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


def test_chat(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, user="team-a", seed=7, n=2
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert result.usage is not None and result.usage.completion_tokens <= 10
    assert result.system_fingerprint and result.choices[0].message.role == "assistant"


def test_completion(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=0)
    assert result.choices[0].finish_reason in ("stop", "length") and result.usage is not None
    again = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=0)
    assert again.choices[0].text == result.choices[0].text


def test_vllms_ignore_eos_and_min_tokens_through_extra_body(client: openai.OpenAI) -> None:
    # As vLLM's benchmark clients send them: every choice runs to max_tokens, streamed or not.
    result = client.completions.create(
        model="tiny-chat", prompt="Hello", max_tokens=24, n=8, seed=1, extra_body={"ignore_eos": True}
    )
    assert result.usage is not None and result.usage.completion_tokens == 8 * 24
    assert {c.finish_reason for c in result.choices} == {"length"}
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    chat = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        n=4,
        extra_body={"min_tokens": 12},
    )
    assert chat.usage is not None and chat.usage.completion_tokens >= 4 * 12
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=2, extra_body={"min_tokens": 3})
    assert info.value.param == "min_tokens"


def test_embeddings_as_floats_and_from_token_ids(client: openai.OpenAI) -> None:
    text = client.embeddings.create(model="minilm", input="a cat", encoding_format="float").data[0].embedding
    assert len(text) == 384
    via_default = client.embeddings.create(model="minilm", input="a cat").data[0].embedding
    assert max(abs(a - b) for a, b in zip(text, via_default, strict=True)) < 1e-6
    from transformers import AutoTokenizer

    from gpufleet.pod_server.demo_models import minilm_dir

    ids = AutoTokenizer.from_pretrained(minilm_dir())("a cat", add_special_tokens=False)["input_ids"]
    from_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(text, from_ids, strict=True)) < 1e-4


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve("tiny-chat")
    assert model.id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_request_names_the_field(client: openai.OpenAI, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=2, extra_body=extra
        )
    assert info.value.param == param
    assert info.value.code in ("unknown_parameter", "unsupported_parameter")


def test_refused_dimensions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert info.value.param == "dimensions"
    assert len(client.embeddings.create(model="minilm", input="x", dimensions=384).data[0].embedding) == 384


def test_unavailable_model_is_503_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=BROKEN_MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_overload_is_429_with_retry_after(client: openai.OpenAI, fleet: Fleet) -> None:
    def queue() -> dict[str, int]:
        d = next(iter(httpx.get(fleet.pod_url + "/api/queue", timeout=5).json()["devices"].values()))
        return {"running": d["running_sequences"], "queued": d["queue_size"]}

    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}
    # One stream of n=2 holds both slots (until its last choice ends); one request waits; the next is refused.
    stream = client.chat.completions.create(**chat, n=2, stream=True)  # type: ignore[call-overload]
    waiting: list[object] = []
    try:
        next(iter(stream))
        behind = threading.Thread(target=lambda: waiting.append(client.chat.completions.create(**chat)))
        behind.start()
        wait_until(lambda: queue() == {"running": 2, "queued": 1}, 30, "one request to wait behind the stream")
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**chat)
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        stream.close()
    behind.join(60)
    assert waiting, "the waiting request was answered once the stream left"
