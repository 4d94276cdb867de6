"""Keep full garbage collections short: the heap's long-lived objects leave the collector's view.

torch and transformers leave some 400,000 tracked objects behind at import, and every full
collection walks them all. The continuous-batching manager collects twice when it stops, so each
group switch cost about 0.7 s of held GIL on a CPU pod (0.18-0.27 s frozen: bench/results/
switch_cost.json, ``engine``), and every
automatic full collection paused decoding as long. Frozen objects are never collected, so this
runs once, before any model is loaded: a model's module tree holds reference cycles and must
stay collectable for an evicted group's memory to come back.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def startup_heap_frozen() -> Iterator[int]:
    """Collect once, then keep every object alive now out of later collections (how many: the
    value) until the block ends, so an app run in-process leaves its host's collector as it was."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("startup heap frozen", extra={"objects": frozen})
    try:
        yield frozen
    finally:
        gc.unfreeze()
