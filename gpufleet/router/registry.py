"""Which pods the router knows, what it calls them, and which models they serve.

Discovery names each pod by an id (its URL, or ``namespace/name`` in Kubernetes); routing names
it by the name its status document gives, made unique (``name@host:port`` when two pods share
one). A pod's devices are keyed ``<routing name>/<device>``, so a rename changes its keys: the
registry says so (``on_unindex``) before it renames. Registering or renaming one pod with a name
of its own costs O(1), so 1,000 pods register in linear time; only a name shared by several pods
renames the fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gpufleet.api.pod_status import PodStatus
from gpufleet.router import tenancy
from gpufleet.router.ejection import EjectionPolicy, Outlier


@dataclass(eq=False)
class PodRecord:
    """One pod server as discovered, with the latest figures it gave (``gpufleet.router.reports``)."""

    id: str  # discovery key: the URL (static) or namespace/name (kubernetes)
    url: str | None
    outlier: Outlier
    hint_name: str | None = None  # Kubernetes' Pod name, before any status document
    node: str | None = None
    discovered_ready: bool = True  # Kubernetes readiness; always True for static URLs
    tenant: str | None = None  # its namespace: its group and model ids are qualified by it (router.tenancy)
    name: str = ""  # unique routing name, set by the Registry
    # Its status document, and when it was observed.
    status: PodStatus | None = None
    status_at: float | None = None
    status_due: bool = False  # an answer announced a newer status version than the document we hold
    annotated: bool = False  # its status comes from Kubernetes (the pod's status Lease)
    confirmed: bool = True  # False after an ejection until a new status document arrives
    contact_at: float | None = None  # last successful contact (a poll or an answer)
    # Each figure is dated by the latest source that carries it (gpufleet.api.device_report):
    # the counts come with every answer (load report) and with queue polls; which groups wait only
    # with queue polls, which busy pods never get.
    others: dict[str, int] = field(default_factory=dict)  # device -> load beyond ours, last reported
    waiting: dict[str, int] = field(default_factory=dict)  # device -> requests queued there, last reported
    load_at: float | None = None  # when the counts were last reported (an answer or a queue poll)
    waiting_groups: dict[str, frozenset[str]] = field(default_factory=dict)  # device -> groups queued there
    groups_at: float | None = None  # when a queue document last said which groups wait

    @property
    def base_name(self) -> str:
        if self.status is not None:
            return self.status.pod
        return self.hint_name or urlsplit(self.url or self.id).netloc or self.id

    @property
    def ready(self) -> bool:
        return (
            self.discovered_ready
            and self.confirmed
            and self.status is not None
            and self.status.ready
            and self.url is not None
        )

    @property
    def routable(self) -> bool:
        return self.ready and self.outlier.admitted


class Registry:
    def __init__(
        self,
        ejection: EjectionPolicy,
        on_unindex: Callable[[PodRecord], None],
        on_upsert: Callable[[PodRecord], None] = lambda rec: None,
    ) -> None:
        self.ejection = ejection
        self.on_unindex = on_unindex  # its device keys are about to change or go
        self.on_upsert = on_upsert  # discovery told something new of it
        self.pods: dict[str, PodRecord] = {}
        self.by_name: dict[str, PodRecord] = {}
        self.members = 0  # bumped whenever a pod joins, leaves or is renamed
        self._base_counts: dict[str, int] = {}  # pods per base name, as _rename_all last counted
        self._models: dict[str, str] | None = {}  # model id -> group, union of every pod's (None: rebuild)
        self._local_models: dict[str, str] = {}  # qualified model id (or its alias) -> the pod servers' id
        self._known: dict[str, str] = {}  # model id -> group from the ModelGroup resources (gpufleet.router.catalog)

    def upsert(
        self,
        pod_id: str,
        url: str | None,
        *,
        name: str | None = None,
        node: str | None = None,
        ready: bool = True,
        tenant: str | None = None,
    ) -> PodRecord:
        rec = self.pods.get(pod_id)
        if rec is None:
            rec = self.pods[pod_id] = PodRecord(
                pod_id, url, self.ejection.new(), hint_name=name, node=node, tenant=tenant
            )
        before = (rec.name, rec.base_name)
        rec.url, rec.hint_name, rec.node, rec.discovered_ready = url, name or rec.hint_name, node or rec.node, ready
        base = rec.base_name
        if before == (base, base) and self.by_name.get(base) is rec:
            pass  # the same name as before: nothing to rename
        elif not rec.name and self._base_counts.get(base, 0) == 0:
            # A new pod with a name of its own: registering 1,000 pods stays linear.
            rec.name = base
            self.by_name[base] = rec
            self._base_counts[base] = 1
            self.members += 1
            self._models = None
        else:
            self._rename_all()
        self.on_upsert(rec)
        return rec

    def remove(self, pod_id: str) -> None:
        rec = self.pods.pop(pod_id, None)
        if rec is not None:
            self.on_unindex(rec)
            self._rename_all()

    def replace_all(self, pod_ids: Iterable[str]) -> None:
        """Forget every pod not in ``pod_ids`` (a fresh list from discovery)."""
        keep = set(pod_ids)
        for gone in [p for p in self.pods if p not in keep]:
            self.on_unindex(self.pods.pop(gone))
        self._rename_all()

    def status_changed(self, rec: PodRecord, old_base: str) -> None:
        """``rec`` has a status document naming another pod (or other models) than before: its name
        (``old_base`` until now) and the fleet's models follow it."""
        if self._rename_alone(rec, old_base):
            self._models = None
        else:
            self._rename_all()

    def _rename_alone(self, rec: PodRecord, old_base: str) -> bool:
        """Give ``rec`` its new base name without renaming the fleet, when neither name is shared
        (the first status of each of 1,000 pods stays linear); False when a full rename is needed."""
        new_base = rec.base_name
        if new_base == old_base:
            return rec.name == new_base or self._base_counts.get(new_base, 0) > 1
        if self._base_counts.get(old_base, 0) != 1 or self._base_counts.get(new_base, 0) != 0 or rec.name != old_base:
            return False
        self.on_unindex(rec)
        del self.by_name[old_base]
        del self._base_counts[old_base]
        rec.name = new_base
        self.by_name[new_base] = rec
        self._base_counts[new_base] = 1
        self.members += 1
        return True

    def _rename_all(self) -> None:
        self.members += 1  # membership may have changed
        counts: dict[str, int] = {}
        for rec in self.pods.values():
            counts[rec.base_name] = counts.get(rec.base_name, 0) + 1
        self._base_counts = counts
        self.by_name = {}
        for rec in self.pods.values():
            base = rec.base_name
            name = base if counts[base] == 1 else f"{base}@{urlsplit(rec.url or rec.id).netloc or rec.id}"
            if name != rec.name:
                self.on_unindex(rec)  # its devices' keys change with it
                rec.name = name
            self.by_name[rec.name] = rec
        self._models = None  # rebuilt when next asked: registering 1,000 pods must not rebuild it 1,000 times

    def set_known(self, models: dict[str, str]) -> None:
        """The models the resources declare, served or not (a group at zero pods): known to routing too."""
        self._known = models
        self._models = None

    @property
    def models(self) -> dict[str, str]:
        """Model id -> group, the union of every pod's and the resources' (and namespace aliases)."""
        if self._models is None:
            self._build_models()
        assert self._models is not None
        return self._models

    @property
    def local_models(self) -> dict[str, str]:
        """What the pod servers call each qualified model id (they know only their namespace's ids)."""
        if self._models is None:
            self._build_models()
        return self._local_models

    def _build_models(self) -> None:
        models: dict[str, str] = {}
        for rec in self.pods.values():
            if rec.status is not None:
                for model, group in rec.status.models.items():
                    models.setdefault(model, group)
        for model, group in self._known.items():  # what the pods report wins: it is what they serve
            models.setdefault(model, group)
        local = {m: tenancy.local_id(m) for m in models if "/" in m}
        for alias, qualified in tenancy.aliases(models).items():
            if alias not in models:
                models[alias] = models[qualified]
                local[alias] = alias
        self._models, self._local_models = models, local
