"""The official openai SDK against ``gpufleet up``, through the router: streaming chat and
completions, embeddings in the SDK's default encoding, models, and an error type."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.processes import ServerProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("sdk")
    port = free_port()
    env = {
        "DEVICES": "cpu:0",
        "MODEL_GROUPS": str(demo_models),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "UP_LOG_DIR": str(tmp / "pods"),
        "TORCH_THREADS": "1",
        "STATUS_INTERVAL_S": "0.5",
    }
    up = ServerProcess(["up"], env, tmp / "up.log", f"http://127.0.0.1:{port}")
    try:
        up.wait_ready(180)
        with openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            yield c
    finally:
        up.stop()


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
