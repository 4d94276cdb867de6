"""Everything on one machine: the process supervisor and ``gpufleet up``.

- ``processes``: free loopback ports, polling with a deadline, a child process with its log,
  and the supervisor that starts, restarts and stops a set of them (used by tests and bench too).
- ``up`` / ``cli``: ``gpufleet up``, the cluster topology (pod servers plus router) on one machine.

This is the only package that knows every component; no component imports it.
"""
