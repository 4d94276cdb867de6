"""The operator waits until the API server serves its kinds before kopf watches them."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from gpufleet.operator.startup import kind_paths, wait_until_served

pytestmark = pytest.mark.unit


class Answers:
    """A Kube whose list requests answer from a script: a status code to raise, or None for success."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = script
        self.paths: list[str] = []

    def request(self, method: str, path: str, query: Any = None) -> Any:
        self.paths.append(path)
        status = self.script.pop(0) if self.script else None
        if status is not None:
            raise ApiException(status=status, reason="scripted")
        return {"items": []}


def test_transient_answers_are_waited_out_kind_by_kind() -> None:
    kube = Answers([429, 404, None, 503, None])
    now = [0.0]
    assert wait_until_served(kube, ["ml"], clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))  # type: ignore[arg-type]
    first, second = kind_paths(["ml"])
    assert kube.paths == [first, first, first, second, second]
    assert first.endswith("/namespaces/ml/modelgroups") and second.endswith("/namespaces/ml/gpupools")


def test_it_gives_up_at_the_deadline_and_leaves_other_errors_to_kopf() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    assert not wait_until_served(Answers([429] * 1000), [], timeout_s=5, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    assert now[0] >= 5
    assert wait_until_served(Answers([403]), [], clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
