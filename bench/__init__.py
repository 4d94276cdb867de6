"""gpufleet benchmarks: routing quality, the cost of a group switch, throughput.

``python -m bench`` (or ``bench/run``) runs every part this machine can run; ``python -m
bench PART`` runs one. Results land in ``bench/results/``: one JSON per part, PNG plots and
``SUMMARY.md``. See ``bench/README.md``.
"""
