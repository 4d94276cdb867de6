"""The router: one OpenAI-compatible endpoint in front of many pod servers.

- ``settings``: RouterSettings (environment, parsed once in main()).
- ``discovery`` / ``kube_discovery``: where pod servers come from (static URLs, a Pod watch).
- ``polling``: status and queue polls of the pods.
- ``state``: what the router knows about its fleet, and the one entry point of its decisions; made of
  ``registry`` (which pods, their names and models), ``reports`` (what pods report, how fresh),
  ``tickets`` (this router's own traffic), ``devices`` (a pod's DeviceStates) and ``fleet_index``
  (the kept index, brought up to date in one place); ``ejection``: outlier ejection of a pod.
- ``decide``: model -> group -> policy (``gpufleet.routing``), one log line and metric per decision.
- ``proxy`` / ``upstream``: forwarding the client's bytes with the decisions in headers, SSE
  pass-through, retry before the first byte; ``mock_upstream``: the same interface in-process, for tests.
- ``metrics``: Prometheus series (per pod and device only when ``METRICS_POD_LABELS`` says so).
- ``fleet_api`` / ``app``: the fleet-wide read API and the ASGI app with its lifespan.
- ``cli``: ``gpufleet router`` (``gpufleet up`` lives in ``gpufleet.local``).
"""
