"""What every part shares: progress lines, machine facts, result files and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
MODELS_CACHE = Path(os.environ.get("GPUFLEET_BENCH_MODELS", Path.home() / ".cache" / "gpufleet" / "bench-models"))

_T0 = time.monotonic()


def progress(msg: str) -> None:
    """One timestamped line on stderr, flushed, so a long run shows where it is."""
    el = time.monotonic() - _T0
    print(f"[bench {int(el // 60):02d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """The facts a figure depends on: processor, cores, memory, library versions, devices."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    kinds = ["cpu"]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_devices"] = names
            info["cuda_runtime"] = torch.version.cuda
            kinds.append("cuda")
    except ImportError:
        info["torch"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["device_kinds"] = kinds
    return info


def _clean(obj: Any) -> Any:
    """JSON has no infinity or NaN: write them as null."""
    if isinstance(obj, float):
        return None if (math.isinf(obj) or math.isnan(obj)) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_result(name: str, doc: dict[str, Any], *, quick: bool, command: str, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    full = {**doc, "quick": quick, "command": command, "machine": machine_info(), "written_unix": round(time.time())}
    path = out / f"{name}.json"
    path.write_text(json.dumps(_clean(full), indent=2, sort_keys=False) + "\n")
    progress(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def read_result(name: str, out: Path = RESULTS) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except json.JSONDecodeError:
        return None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); infinities sort last; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def rounded(x: float | None, digits: int = 4) -> float | None:
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return round(x, digits)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, name: str, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout(rect=(0, 0.05 if fig.legends else 0, 1, 1))
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    progress(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
