"""The router profile's summary: py-spy's collapsed stacks summed by the innermost frame's part."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.router_overhead.profile import part_of, summarise

pytestmark = pytest.mark.unit


def test_a_sample_belongs_to_its_innermost_frame() -> None:
    stack = "run (gpufleet/router/proxy.py:10);request (aiohttp/client.py:819)"
    assert part_of(stack) == "aiohttp (upstream HTTP client)"
    assert part_of("x (asyncio/base_events.py:1);_handle (gpufleet/router/proxy.py:293)") == "gpufleet proxy"
    assert part_of("x (gpufleet/router/app.py:137)") == "gpufleet other"
    assert part_of("x (asyncio/base_events.py:1);") == "other (native, idle)"


def test_shares_are_percent_of_all_samples_largest_first(tmp_path: Path) -> None:
    raw = tmp_path / "router.raw"
    raw.write_text(
        "a (aiohttp/client.py:1) 3\n"
        "a (uvicorn/protocols/http/httptools_impl.py:2) 1\n"
        "a (aiohttp/streams.py:3) 3\n"
        "a (uuid.py:4) 1\n"
    )
    assert summarise(raw) == {"aiohttp (upstream HTTP client)": 75.0, "uvicorn (HTTP server)": 12.5,
                              "request ids (uuid)": 12.5}  # fmt: skip
