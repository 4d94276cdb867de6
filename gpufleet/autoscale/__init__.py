"""Demand decides capacity: pure rules, shared by the operator and the benchmark.

``residency``: how many devices of a pool hold each group current. ``replicas``: how many
pods a pool (or a dedicated ModelGroup) runs. Both are functions of a snapshot of demand, the
settings, the state the previous call returned, and the time: no I/O, no clock of their own.
"""
