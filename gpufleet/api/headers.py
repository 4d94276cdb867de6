"""HTTP headers the router and the pod server exchange (the contract between them)."""

from __future__ import annotations

# Router -> pod: the device the router decided on. The pod honours it while that device is still
# eligible, so a request is routed once, not again with other inputs.
ROUTED_DEVICE_HEADER = "x-gpufleet-device"
# Pod -> router (and client): the device that served, and whether its group was switched in for it.
SERVED_BY_DEVICE_HEADER = "x-served-by-device"
GROUP_SWITCH_HEADER = "x-group-switch"
