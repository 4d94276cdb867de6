"""The benchmarks' own tests reuse the test suite's fixtures (bench may import tests; not the reverse)."""

from tests.conftest import demo_models

__all__ = ["demo_models"]
