"""What pods report about themselves, folded into their records, and how fresh each figure is.

Three sources, each dated on arrival (the router's clock): the status document (residency,
health; polled, or a Kubernetes annotation), the load report every answer carries (counts per
device), and the queue document (counts, and which groups wait; polled from idle pods only). A
figure is trusted for ``stale_after_s`` after the latest source that carries it arrived
(``gpufleet.api.device_report`` says which carries what), so a busy pod's answers keep its counts
fresh but never the groups an old queue document listed. Polls are asked for only where nothing
else brings the figures: ``due_status`` and ``due_queue``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpufleet.api.device_report import QueueDocument
from gpufleet.api.load_report import LoadReport
from gpufleet.api.pod_status import PodStatus
from gpufleet.router.registry import PodRecord


class Freshness:
    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s

    def fresh(self, at: float | None, now: float) -> bool:
        return at is not None and now - at < self.stale_after_s

    def signature(self, rec: PodRecord, now: float) -> tuple[bool, bool, bool, bool]:
        """What makes a pod's devices change with time alone: cool-downs ending, figures going stale."""
        return (
            rec.routable,
            self.fresh(rec.contact_at, now),
            self.fresh(rec.load_at, now),
            self.fresh(rec.groups_at, now),
        )

    def state(self, rec: PodRecord, now: float) -> str:
        """ready, ejected, unknown (no status yet), not_ready or stale (not heard from in time)."""
        if not rec.outlier.admitted:
            return "ejected"
        if rec.status is None:
            return "unknown"
        if not rec.ready:
            return "not_ready"
        if not self.fresh(rec.contact_at, now):
            return "stale"
        return "ready"


def note_status(rec: PodRecord, doc: PodStatus, now: float, *, contact: bool) -> None:
    """A status document arrived (a poll, or a Kubernetes annotation when ``contact`` is False)."""
    rec.status, rec.status_at, rec.confirmed = doc, now, True
    rec.status_due = False
    rec.annotated = rec.annotated or not contact


def note_load(rec: PodRecord, report: LoadReport, now: float, inflight: Mapping[str, int]) -> set[str]:
    """The counts of a load report or a queue document (``inflight``: this router's, by device key);
    the devices whose figures changed."""
    changed = set()
    for device, d in report.devices.items():
        # What the pod holds beyond what this router sent there: other routers' traffic.
        others = max(0, d.running + d.waiting - inflight.get(f"{rec.name}/{device}", 0))
        if rec.others.get(device) != others or rec.waiting.get(device) != d.waiting:
            rec.others[device], rec.waiting[device] = others, d.waiting
            changed.add(device)
        if d.waiting == 0 and rec.waiting_groups.get(device):
            rec.waiting_groups[device] = frozenset()  # nothing queued there now: no group waits
            changed.add(device)
    for device in [k for k in rec.others if k not in report.devices]:
        del rec.others[device]
        rec.waiting.pop(device, None)
        changed.add(device)
    rec.load_at = now
    note_status_version(rec, report.status_version)
    return changed


def note_queue(rec: PodRecord, doc: QueueDocument, now: float, inflight: Mapping[str, int]) -> None:
    """A queue document arrived: the counts, and which groups wait on each device."""
    rec.waiting_groups = {device: frozenset(q.waiting_groups) for device, q in doc.devices.items()}
    rec.groups_at = now
    note_load(rec, doc.load(), now, inflight)


def note_status_version(rec: PodRecord, version: int | None) -> None:
    """A load report or queue document announcing a newer status makes the document due."""
    held = rec.status.status_version if rec.status is not None else None
    if version is not None and held is not None and version > held:
        rec.status_due = True


def probing(rec: PodRecord) -> bool:
    """An ejected or unconfirmed pod is polled at every check: a poll that succeeds is what brings
    it back, and no traffic goes there to tell."""
    return not rec.outlier.admitted or not rec.confirmed


def due_status(records: Iterable[PodRecord], now: float, idle_poll_s: float) -> list[PodRecord]:
    """Pods whose status document should be fetched now: none yet, announced newer, or idle too long."""
    return [
        rec
        for rec in records
        if rec.url
        and (
            rec.status is None
            or rec.status_due
            or rec.status_at is None
            or now - rec.status_at >= idle_poll_s  # contact by queue polls and answers does not refresh it
            or probing(rec)
        )
    ]


def due_queue(records: Iterable[PodRecord], now: float, idle_poll_s: float) -> list[PodRecord]:
    """Pods whose load nothing has reported for ``idle_poll_s`` (answers report it otherwise)."""
    return [
        rec
        for rec in records
        if rec.url
        and rec.status is not None
        and (rec.load_at is None or now - rec.load_at >= idle_poll_s or probing(rec))
    ]
