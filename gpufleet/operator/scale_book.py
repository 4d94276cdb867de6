"""What the scaler decided last, read by the reconciler (``gpufleet.operator.scaler`` writes it).

Kept in memory: a restarted operator starts afresh, and until its first round the reconciler
keeps each StatefulSet at the replicas it has (never back to ``spec.replicas``) and each pool's
placement at its ``minResident`` floors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from gpufleet.operator.scaling import ScaleMemory

Key = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True)
class PoolFigures:
    """A pool's last round, for its status: per group (current, desired, demand)."""

    groups: dict[str, tuple[int, int, float]] = field(default_factory=dict)


class ScaleBook:
    """The scaler's latest results, read by the reconciler (another thread): desired replicas
    per object, desired residency per pool, and the rules' memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[Key, int] = {}
        self._residency: dict[tuple[str, str], dict[str, int]] = {}
        self._figures: dict[tuple[str, str], PoolFigures] = {}
        self._last_scale: dict[Key, str] = {}
        self.memory: dict[Key, ScaleMemory] = {}

    def replicas(self, key: Key) -> int | None:
        with self._lock:
            return self._replicas.get(key)

    def residency(self, namespace: str, pool: str) -> dict[str, int]:
        with self._lock:
            return dict(self._residency.get((namespace, pool), {}))

    def figures(self, namespace: str, pool: str) -> PoolFigures | None:
        with self._lock:
            return self._figures.get((namespace, pool))

    def last_scale(self, key: Key) -> str | None:
        with self._lock:
            return self._last_scale.get(key)

    def set_replicas(self, key: Key, replicas: int, when: str) -> bool:
        with self._lock:
            changed = self._replicas.get(key) != replicas
            if changed and key in self._replicas:
                self._last_scale[key] = when
            self._replicas[key] = replicas
            return changed

    def set_residency(self, namespace: str, pool: str, desired: dict[str, int], figures: PoolFigures) -> bool:
        with self._lock:
            changed = self._residency.get((namespace, pool)) != desired
            self._residency[(namespace, pool)] = dict(desired)
            self._figures[(namespace, pool)] = figures
            return changed

    def memory_for(self, key: Key) -> ScaleMemory:
        return self.memory.setdefault(key, ScaleMemory())

    def forget(self, keys: set[Key]) -> None:
        """Drop what belongs to objects that are gone."""
        with self._lock:
            for key in [k for k in self._replicas if k not in keys]:
                del self._replicas[key]
            for key in [k for k in self.memory if k not in keys]:
                del self.memory[key]
            pools = {(ns, name) for kind, ns, name in keys if kind == "GpuPool"}
            for pk in [k for k in self._residency if k not in pools]:
                del self._residency[pk]
                self._figures.pop(pk, None)
