"""The order a device serves its queue in: table tests of the pure rule."""

from __future__ import annotations

import pytest

from gpufleet.pod_server.queue_order import Action, GroupQueue, QueuePolicy, QueueState, next_action, switch_deadline

pytestmark = pytest.mark.unit

POLICY = QueuePolicy(max_wait_s=5.0, min_residency_s=2.0, linger_s=0.0)


def state(current: str | None, running: int, *queues: GroupQueue, now: float = 100.0, since: float = 0.0) -> QueueState:
    return QueueState(current, running, 4, tuple(queues), now, since)


@pytest.mark.parametrize(
    ("case", "s", "action", "group"),
    [
        ("nothing queued", state("a", 2), Action.WAIT, None),
        ("current group's work joins the batch", state("a", 2, GroupQueue("a", 3, 99.0)), Action.ADMIT, "a"),
        ("batch full", state("a", 4, GroupQueue("a", 3, 99.0)), Action.WAIT, None),
        (
            "n=3 does not fit beside 2 running",
            state("a", 2, GroupQueue("a", 1, 99.0, head_weight=3)),
            Action.WAIT,
            None,
        ),
        ("an oversized request runs alone", state("a", 0, GroupQueue("a", 1, 99.0, head_weight=9)), Action.ADMIT, "a"),
        (
            "another group waits briefly: keep serving the current one",
            state("a", 2, GroupQueue("a", 2, 99.0), GroupQueue("b", 5, 97.0)),
            Action.ADMIT,
            "a",
        ),
        (
            "another group waited past max_wait: drain",
            state("a", 2, GroupQueue("a", 2, 99.0), GroupQueue("b", 5, 94.0)),
            Action.DRAIN,
            "b",
        ),
        (
            "drained and starved: switch",
            state("a", 0, GroupQueue("a", 2, 99.0), GroupQueue("b", 5, 94.0)),
            Action.SWITCH,
            "b",
        ),
        (
            "starved, but the current group only just arrived: keep it",
            state("a", 2, GroupQueue("a", 2, 99.0), GroupQueue("b", 5, 90.0), since=99.0),
            Action.ADMIT,
            "a",
        ),
        (
            "no work for the current group: drain towards the other",
            state("a", 1, GroupQueue("b", 1, 99.9)),
            Action.DRAIN,
            "b",
        ),
        ("idle and only other work: switch at once", state("a", 0, GroupQueue("b", 1, 99.9)), Action.SWITCH, "b"),
        (
            "the group waiting longest goes first",
            state("a", 0, GroupQueue("b", 9, 99.0), GroupQueue("c", 1, 98.0)),
            Action.SWITCH,
            "c",
        ),
        ("nothing current yet", state(None, 0, GroupQueue("b", 1, 99.0), since=0.0), Action.SWITCH, "b"),
    ],
)
def test_next_action(case: str, s: QueueState, action: Action, group: str | None) -> None:
    got = next_action(s, POLICY)
    assert (got.action, got.group) == (action, group), case


def test_two_busy_groups_alternate_in_batches_not_per_request() -> None:
    """Replay of 24 requests alternating a/b, all queued at once, served 4 at a time in 1 s batches."""
    queue = [("a" if i % 2 == 0 else "b", 0.0) for i in range(24)]
    current, running, now, since, switches = "a", 0, 0.0, 0.0, 0
    while queue:
        groups: dict[str, GroupQueue] = {}
        for g, at in queue:
            q = groups.get(g)
            groups[g] = GroupQueue(g, (q.waiting if q else 0) + 1, q.oldest_at if q else at)
        step = next_action(QueueState(current, running, 4, tuple(groups.values()), now, since), POLICY)
        if step.action is Action.ADMIT:
            batch = [item for item in queue if item[0] == current][:4]
            for item in batch:
                queue.remove(item)
            now += 1.0  # the batch runs and finishes
        elif step.action is Action.SWITCH:
            assert step.group is not None
            current, since, switches = step.group, now, switches + 1
        else:
            pytest.fail(f"stuck: {step}")
    assert switches == 1


def test_deadline_is_when_the_starvation_bound_fires() -> None:
    s = state("a", 2, GroupQueue("a", 2, 99.0), GroupQueue("b", 5, 97.0), since=98.0)
    assert switch_deadline(s, POLICY) == pytest.approx(102.0)
    assert switch_deadline(state("a", 2, GroupQueue("a", 1, 99.0)), POLICY) is None


LINGER = QueuePolicy(max_wait_s=5.0, min_residency_s=2.0, linger_s=0.5)


@pytest.mark.parametrize(
    ("s", "action", "group"),
    [
        # b has waited 0.2 s of the 0.5 s linger: the device keeps a for its next request
        (state("a", 0, GroupQueue("b", 1, 99.8)), Action.WAIT, None),
        # past the linger: switch
        (state("a", 0, GroupQueue("b", 1, 99.4)), Action.SWITCH, "b"),
        # an empty device has nothing to linger on
        (state(None, 0, GroupQueue("b", 1, 99.9)), Action.SWITCH, "b"),
        # work of the current group arrived meanwhile: it runs, b keeps waiting (bounded by max_wait)
        (state("a", 0, GroupQueue("a", 1, 99.9), GroupQueue("b", 1, 99.8)), Action.ADMIT, "a"),
    ],
)
def test_linger(s: QueueState, action: Action, group: str | None) -> None:
    n = next_action(s, LINGER)
    assert (n.action, n.group) == (action, group)


def test_linger_deadline_wakes_the_device() -> None:
    assert switch_deadline(state("a", 0, GroupQueue("b", 1, 99.8)), LINGER) == pytest.approx(100.3)
    assert switch_deadline(state("a", 0, GroupQueue("b", 1, 99.8)), POLICY) is None
