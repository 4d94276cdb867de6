"""Reading the JSON log lines gpufleet processes write (``gpufleet.logs``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def lines_by_request(log: Path, msg: str) -> dict[str, dict[str, Any]]:
    """request id -> its structured log line ``msg`` (the last one): the router's ``route`` lines,
    a pod's ``dispatch`` lines."""
    out: dict[str, dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("msg") == msg:
            out[str(doc.get("request_id"))] = doc
    return out
