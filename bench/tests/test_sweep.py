"""The concurrency sweep's arithmetic (bench/sweep.py): tokens in a window, ratios, targets."""

from __future__ import annotations

import math

import pytest

from bench.cb_direct import blocks_for
from bench.sweep import Record, add_ratios, library_targets, summarize_point, targets, tokens_in_window

pytestmark = pytest.mark.unit


def test_tokens_spread_from_first_token_to_end() -> None:
    r = Record(sent=0.0, first=1.0, done=3.0, tokens=20)
    assert tokens_in_window(r, 0.0, 10.0) == 20
    assert tokens_in_window(r, 2.0, 10.0) == pytest.approx(10.0)  # half its generation time
    assert tokens_in_window(r, 0.0, 1.5) == pytest.approx(5.0)
    assert tokens_in_window(r, 3.5, 9.0) == 0


def test_failed_or_instant_requests() -> None:
    assert tokens_in_window(Record(0.0, 1.0, 2.0, 20, ok=False), 0.0, 5.0) == 0
    instant = Record(sent=0.0, first=None, done=2.0, tokens=7)  # no first token seen: all at the end
    assert tokens_in_window(instant, 1.0, 3.0) == 7
    assert tokens_in_window(instant, 2.5, 3.0) == 0


def test_point_counts_window_and_ttft_of_requests_sent_in_it() -> None:
    records = [
        Record(sent=0.0, first=0.5, done=2.0, tokens=30),  # warm-up request: half its tokens fall in [1.25, 4]
        Record(sent=2.0, first=2.1, done=3.0, tokens=18),
        Record(sent=3.0, first=3.4, done=4.0, tokens=12),
        Record(sent=3.5, first=None, done=3.6, tokens=0, ok=False, error="HTTP 429"),
    ]
    p = summarize_point(records, start=1.25, end=4.0, concurrency=2)
    assert p["completion_tokens_in_window"] == pytest.approx(15 + 18 + 12)
    assert p["tokens_per_s"] == pytest.approx(45 / 2.75, rel=1e-3)
    assert p["requests_sent_in_window"] == 3
    assert p["errors"] == 1 and p["error_sample"] == "HTTP 429"
    assert p["p50_ttft_s"] == pytest.approx(0.1) and p["p99_ttft_s"] == pytest.approx(0.4)
    assert p["latency_of"] == "sent in window"


def test_point_where_requests_outlast_the_window_uses_all_requests() -> None:
    records = [Record(sent=0.0, first=0.2, done=6.0, tokens=32), Record(sent=0.0, first=0.3, done=6.2, tokens=32)]
    p = summarize_point(records, start=1.0, end=3.0, concurrency=2)
    assert p["latency_of"].startswith("all requests")
    assert p["p99_ttft_s"] == pytest.approx(0.3)
    assert p["tokens_per_s"] > 0


def test_ratios_against_the_same_lines_c1() -> None:
    pts = add_ratios([{"concurrency": 1, "tokens_per_s": 100.0}, {"concurrency": 32, "tokens_per_s": 850.0}])
    assert [p["vs_c1"] for p in pts] == [1.0, 8.5]
    assert add_ratios([{"concurrency": 8, "tokens_per_s": 5.0}])[0]["vs_c1"] is None  # no c=1 measured


def _line(c1: float, c32: float, ttft: float | None, errors: int = 0) -> list[dict[str, object]]:
    return add_ratios(
        [
            {"concurrency": 1, "tokens_per_s": c1, "p99_ttft_s": 0.01, "errors": 0},
            {"concurrency": 32, "tokens_per_s": c32, "p99_ttft_s": ttft, "errors": errors},
        ]
    )


def test_targets_per_served_line() -> None:
    lines = {
        "serve": _line(100.0, 900.0, 0.5),
        "up": _line(100.0, 700.0, 2.5),
        "baseline": _line(100.0, 100.0, 0.1),  # not served: no target
    }
    got = {t.target: t for t in targets(lines, ["serve", "up"])}
    assert len(got) == 4
    assert got["serve: tokens/s at c=32 >= 8x c=1"].met and got["serve: tokens/s at c=32 >= 8x c=1"].figure == 9.0
    assert got["serve: p99 time to first token at c=32 < 2 s"].met
    assert not got["up: tokens/s at c=32 >= 8x c=1"].met
    assert not got["up: p99 time to first token at c=32 < 2 s"].met
    assert got["up: p99 time to first token at c=32 < 2 s"].as_dict() == {
        "target": "up: p99 time to first token at c=32 < 2 s",
        "figure": 2.5,
        "limit": 2.0,
        "met": False,
    }


def test_a_missing_point_or_errors_miss_the_target() -> None:
    got = targets({"serve": _line(100.0, 900.0, 0.5, errors=3)}, ["serve", "up"])
    by = {t.target: t for t in got}
    assert not by["serve: p99 time to first token at c=32 < 2 s"].met  # fast 429s do not pass for first tokens
    assert by["up: tokens/s at c=32 >= 8x c=1"].figure is None and not by["up: tokens/s at c=32 >= 8x c=1"].met


def test_kv_blocks_cover_every_sequence() -> None:
    assert blocks_for(1, 60) >= 2
    assert blocks_for(64, 60) >= 64  # one 256-token page each
    assert blocks_for(256, 600, page_size=256) >= 256 * math.ceil(600 / 256)


def test_the_served_line_is_measured_against_the_library_at_c1_and_c32() -> None:
    lines = {
        "serve": [{"concurrency": 1, "tokens_per_s": 45.0}, {"concurrency": 32, "tokens_per_s": 400.0}],
        "cb_direct": [{"concurrency": 1, "tokens_per_s": 50.0}, {"concurrency": 32, "tokens_per_s": 500.0}],
    }
    got = [(t.target, t.figure, t.met) for t in library_targets(lines)]
    assert got == [
        ("serve: tokens/s at c=1 >= 0.9x cb_direct's", 0.9, True),
        ("serve: tokens/s at c=32 >= 0.9x cb_direct's", 0.8, False),
    ]
    assert library_targets({"serve": lines["serve"]}) == []  # the library's line was not run
