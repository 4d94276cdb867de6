"""The placement document: which group each device of a pool should hold, current or cached.

One writer: the operator computes it (``gpufleet.operator.placement.place``, a pure
function) and publishes it in the pool's ConfigMap as ``placement.json`` beside
``model_groups.json``. One reader: each pool pod server, which honours it through its
existing queue rule (a placed group is queued as a zero-weight job, never interrupting a
running batch) and its prefetcher (placed cached groups are loaded into the host cache when
it has room). It is a floor, not a cage: demand may switch a device to any group afterwards,
and the switched-out group lands in the host cache, which still counts as resident.

Devices are named by their index in the pod's ``DEVICES`` list (``"0"``, ``"1"``...): the
operator knows ``gpusPerPod``, not the names the pod gives its devices.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufleet.api.errors import ConfigError

PLACEMENT_FILE = "placement.json"


class DevicePlacement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    current: str | None = Field(default=None, description="The group this device makes current when it is idle.")
    cached: tuple[str, ...] = Field(
        default=(), description="Groups to keep in the pod's host cache for this device (prefetched when room)."
    )


class PodPlacement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: dict[str, DevicePlacement] = Field(default_factory=dict, description="Device index -> placement.")


class PoolPlacement(BaseModel):
    """The whole placement.json document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generation: int = Field(default=0, ge=0, description="Bumped by the writer on every change (for logs).")
    pods: dict[str, PodPlacement] = Field(default_factory=dict, description="Pod name -> its devices' placement.")

    def for_device(self, pod: str, index: int) -> DevicePlacement:
        """This device's placement (empty when the document does not name it)."""
        return self.pods.get(pod, PodPlacement()).devices.get(str(index), DevicePlacement())


def load_placement(path: Path) -> PoolPlacement:
    """Parse a placement.json; a missing file is an empty placement (a pod outside a pool)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return PoolPlacement()
    except json.JSONDecodeError as exc:
        raise ConfigError(f"PLACEMENT: {path} is not valid JSON: {exc}") from None
    try:
        return PoolPlacement.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise ConfigError(f"PLACEMENT: {path}: field {where}: {first['msg']}") from None
