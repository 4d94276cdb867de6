"""The GPU benchmark: one bounded run on a borrowed CUDA machine (``python -m bench.gpu``)."""
