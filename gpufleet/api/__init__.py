"""gpufleet's shared contract: schemas, status documents, label keys and errors.

Imports no web framework, Kubernetes client or torch, so every component can depend on it.
"""
