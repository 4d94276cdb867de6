"""Scale benchmarks (issue 14): the operator on a kwok cluster, and an emulated fleet of pod
servers in one process for the router. ``python -m bench.scale --help``."""
