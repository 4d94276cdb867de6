"""Reloading model_groups.json and placement.json while the pod serves.

In a pool the operator rewrites one ConfigMap, mounted as a folder; the kubelet swaps a
``..data`` symlink to a new folder up to a minute later, so a reader sees the old file or the
new one, never half of one. The pod polls the *content* (the bytes, through the path), which
follows that swap whatever the inode does. Reading and parsing run on a thread; the pod service
applies a change on the event loop. A file that is gone for a moment or does not parse keeps
the configuration served before it, and says why in ``PodStatus.config_error``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.api.errors import ConfigError
from gpufleet.api.model_groups import GroupSpec, ModelGroupsFile, groups_digest, parse_model_groups_lenient
from gpufleet.api.placement import load_placement

if TYPE_CHECKING:
    from gpufleet.pod_server.service import PodService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupsDiff:
    """Groups by what a reload does to them (each sorted)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # same id, another spec
    unchanged: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


Groups = ModelGroupsFile | Mapping[str, GroupSpec]


def diff_groups(old: Groups, new: Groups) -> GroupsDiff:
    """What serving ``new`` after ``old`` changes, group by group (specs compared with their sources resolved)."""
    a = old.groups if isinstance(old, ModelGroupsFile) else old
    b = new.groups if isinstance(new, ModelGroupsFile) else new
    return GroupsDiff(
        added=tuple(sorted(b.keys() - a.keys())),
        removed=tuple(sorted(a.keys() - b.keys())),
        changed=tuple(sorted(g for g in a.keys() & b.keys() if a[g] != b[g])),
        unchanged=tuple(sorted(g for g in a.keys() & b.keys() if a[g] == b[g])),
    )


class ConfigWatcher:
    """Polls the pod's model_groups.json (when ``interval_s`` > 0) and placement.json, and hands
    each change to the pod service."""

    def __init__(
        self,
        service: PodService,
        *,
        groups_path: Path | None,
        placement_path: Path | None,
        interval_s: float,
        groups_hash: str | None,
        default_group: str | None = None,
    ) -> None:
        self.service = service
        self.groups_path = groups_path if interval_s > 0 else None
        self.placement_path = placement_path
        self.interval_s = interval_s
        self.default_group = default_group  # DEFAULT_GROUP, kept across reloads while the file has it
        self._seen = groups_hash  # the bytes last looked at, applied or refused
        self._seen_error: str | None = None  # why those bytes were refused as a whole
        self._errors: dict[str, str | None] = {"groups": None, "placement": None}

    async def run(self) -> None:
        """Poll until cancelled (the app's lifespan does); a poll that fails only is logged."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # one bad poll must not end reloading for the pod's life
                log.exception("configuration reload failed")

    async def poll(self) -> None:
        """Look at both files once and apply what changed (start-up reads the placement this way)."""
        if self.groups_path is not None:
            self._set_error("groups", await self._poll_groups(self.groups_path))
        if self.placement_path is not None:
            self._set_error("placement", await self._poll_placement(self.placement_path))
        self.service.set_config_error("; ".join(e for e in self._errors.values() if e) or None)
        # Each poll, not only on a change: a placed group that was not servable may be by now.
        self.service.honour_placement()

    async def _poll_groups(self, path: Path) -> str | None:
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:  # between two kubelet swaps, or unmounted: keep serving what we have
            return f"MODEL_GROUPS: cannot read {path}: {exc.strerror or exc}"
        digest = groups_digest(data)
        if digest == self._seen:
            return self._seen_error  # the same bytes: the same verdict, and nothing to apply
        self._seen, self._seen_error = digest, None
        if digest == self.service.groups_hash:
            return None  # back to the bytes served (after a bad write): nothing to apply
        try:
            new, refused = await asyncio.to_thread(parse_model_groups_lenient, data, path)
        except ConfigError as exc:
            self._seen_error = str(exc)
            return self._seen_error
        if self.default_group is not None and self.default_group in new.groups:
            new = new.with_default(self.default_group)
        self.service.apply_groups(new, refused, digest)
        return None

    async def _poll_placement(self, path: Path) -> str | None:
        try:
            placement = await asyncio.to_thread(load_placement, path)  # a missing file: an empty placement
        except ConfigError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:  # unreadable, or not text
            return f"PLACEMENT: cannot read {path}: {exc}"
        if placement != self.service.placement:
            self.service.apply_placement(placement)
        return None

    def _set_error(self, which: str, error: str | None) -> None:
        if error != self._errors[which] and error is not None:
            log.warning("configuration not reloaded; the previous one keeps serving", extra={"error": error})
        self._errors[which] = error
