"""Where the router's CPU goes: ``py-spy`` (when installed; never a project dependency) samples the
router process during one case, and the samples are summed by the package of the innermost frame.

The summary says which part of the request path a missed throughput target sits in (the HTTP
client, the HTTP server, the event loop, or gpufleet's own code) without reading a flame graph.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The first match wins: gpufleet's modules before the catch-all "gpufleet".
PARTS = (
    ("aiohttp", "aiohttp (upstream HTTP client)"),
    ("yarl", "aiohttp (upstream HTTP client)"),
    ("multidict", "aiohttp (upstream HTTP client)"),
    ("uvicorn", "uvicorn (HTTP server)"),
    ("httptools", "uvicorn (HTTP server)"),
    ("asyncio", "asyncio (event loop)"),
    ("gpufleet/router/proxy", "gpufleet proxy"),
    ("gpufleet/router/decide", "gpufleet routing decision"),
    ("gpufleet/routing", "gpufleet routing decision"),
    ("gpufleet/router/fleet_index", "gpufleet routing decision"),
    ("gpufleet/router/state", "gpufleet fleet state"),
    ("gpufleet/router/tickets", "gpufleet fleet state"),
    ("gpufleet/web", "gpufleet middleware"),
    ("logging", "logging"),
    ("uuid", "request ids (uuid)"),
    ("gpufleet", "gpufleet other"),
)
_FILE = re.compile(r"\(([^:()]+):\d+\)")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` for ``seconds`` into ``out`` (py-spy's raw, collapsed-stack format)."""
    binary = py_spy()
    if binary is None:
        return None
    cmd = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
           "--format", "raw", "--nonblocking", "-o", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def part_of(stack: str) -> str:
    innermost = stack.rsplit(";", 1)[-1]
    found = _FILE.search(innermost)
    path = found.group(1) if found else ""
    return next((name for key, name in PARTS if key in path), "other (native, idle)" if not path else "other")


def summarise(raw: Path) -> dict[str, float]:
    """Per part, its share of the samples in percent (largest first)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[part_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {part: round(100 * n / total, 1) for part, n in counts.most_common()}
