"""The throughput benchmark's in-process drivers on the tiny demo chat model: the batch-1
baseline loop and transformers' continuous-batching manager (the GPU sweep's engine), so an
API change in transformers breaks a test here rather than a GPU run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import cb_direct
from bench.baseline_loop import Batch1Model, Params, chat_prompt_ids, closed_loop
from bench.sweep import summarize_point

pytestmark = pytest.mark.integration

TOKENS = 6


@pytest.fixture(scope="module")
def chat(demo_models: Path) -> tuple[Batch1Model, list[int]]:
    import torch

    torch.set_num_threads(1)
    m = Batch1Model.load(demo_models.parent / "tiny-chat")
    return m, chat_prompt_ids(m.tokenizer, [{"role": "user", "content": "Tell me about GPU fleets."}])


def test_baseline_loop_runs_one_sequence_per_client(chat: tuple[Batch1Model, list[int]]) -> None:
    m, prompt = chat
    records = closed_loop(m, prompt, Params(TOKENS), concurrency=3, stop_at=time.perf_counter() + 60, max_requests=5)
    assert len(records) == 5
    assert all(r.ok and 0 < r.tokens <= TOKENS and r.first is not None and r.sent <= r.first <= r.done for r in records)


def test_cb_manager_sized_explicitly_serves_a_closed_loop(chat: tuple[Batch1Model, list[int]]) -> None:
    m, prompt = chat
    mgr = cb_direct.start_manager(
        m.model, max_new_tokens=TOKENS, max_concurrency=4, prompt_tokens=len(prompt), eos_token_id=-1
    )
    try:
        assert mgr.num_blocks == cb_direct.blocks_for(4, len(prompt) + TOKENS)
        t0 = time.perf_counter()
        records = cb_direct.closed_loop(
            mgr, prompt, concurrency=4, max_new_tokens=TOKENS, stop_at=t0 + 60, max_requests=10, eos_token_id=-1
        )
    finally:
        cb_direct.stop_manager(mgr)
    assert len(records) == 10
    assert all(r.ok and r.tokens == TOKENS and r.first is not None for r in records)  # EOS off: every token
    p = summarize_point(records, t0, max(r.done for r in records), 4)
    assert p["completion_tokens_in_window"] == pytest.approx(10 * TOKENS)
    assert p["errors"] == 0
