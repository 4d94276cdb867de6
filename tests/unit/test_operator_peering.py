"""Which operator replica acts (pure part of gpufleet.operator.peering)."""

from __future__ import annotations

import datetime

import pytest

from gpufleet.operator.peering import is_active, peering_paths

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: int, lifetime: int = 60) -> dict[str, object]:
    seen = (NOW - datetime.timedelta(seconds=seconds_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen}


def test_only_the_highest_live_priority_acts() -> None:
    status = {"me": peer(5, 0), "other": peer(9, 10)}
    assert not is_active(status, "me", 5, NOW)
    assert is_active(status, "other", 9, NOW)
    assert is_active({"me": peer(5, 0), "dead": peer(9, 120)}, "me", 5, NOW)  # its keep-alive ran out
    assert is_active(None, "me", 5, NOW) and is_active({"bad": "x"}, "me", 1, NOW)


def test_peering_objects_follow_the_watch_mode() -> None:
    assert peering_paths("op", []) == ["/apis/kopf.dev/v1/clusterkopfpeerings/op"]
    assert peering_paths("op", ["a", "b"]) == ["/apis/kopf.dev/v1/namespaces/a/kopfpeerings/op",
                                              "/apis/kopf.dev/v1/namespaces/b/kopfpeerings/op"]
