"""HTTP headers the router and the pod server exchange (the contract between them)."""

from __future__ import annotations

# Router -> pod. The router forwards the client's body unchanged; its decisions travel in headers.
# The device the router decided on: the pod honours it while that device is still eligible, so a
# request is routed once, not again with other inputs. Every request through a router carries it.
ROUTED_DEVICE_HEADER = "x-gpufleet-device"
# The pod-local device the request must run on and nowhere else: the client's exclusive target or
# lease, resolved by the router. Absent: the pod may use any of its devices (the client's target, if
# any, named the whole pod or node). A routed request's body fields ``exclusive_gpu`` and ``lease``
# are the client's, for the router: a pod reading these headers ignores them.
EXCLUSIVE_DEVICE_HEADER = "x-gpufleet-exclusive"
# The pod's own id of the requested model, when the client named it otherwise (namespace-qualified,
# ``team-a/chat``, which the pod knows as ``chat``); absent: the body's ``model`` is the pod's id.
MODEL_HEADER = "x-gpufleet-model"
# A pod whose status document announces this version (or later) reads the headers above. To a pod
# that does not, the router still sends a rewritten body (the target as its device, no lease, its
# own model id) where the client's would not do.
ROUTING_HEADERS_VERSION = 1

# Pod -> router (and client): the device that served, and whether its group was switched in for it.
SERVED_BY_DEVICE_HEADER = "x-served-by-device"
GROUP_SWITCH_HEADER = "x-group-switch"
