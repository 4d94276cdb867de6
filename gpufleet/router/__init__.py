"""The router: one OpenAI-compatible endpoint in front of many pod servers.

- ``settings``: RouterSettings (environment, parsed once in main()).
- ``discovery`` / ``kube_discovery``: where pod servers come from (static URLs, a Pod watch).
- ``polling``: status and queue polls of the pods.
- ``state`` / ``ejection``: what the router knows about its fleet, turned into routing snapshots.
- ``decide``: model -> group -> policy (``gpufleet.routing``), one log line and metric per decision.
- ``proxy`` / ``upstream``: forwarding with SSE pass-through, retry before the first byte.
- ``fleet_api`` / ``app``: the fleet-wide read API and the ASGI app with its lifespan.
- ``cli``: ``gpufleet router`` (``gpufleet up`` lives in ``gpufleet.local``).
"""
