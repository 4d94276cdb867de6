"""Exclusive targets and leases as pure rules (gpufleet.routing.policy / .leases), for every policy."""

from __future__ import annotations

import pytest

from gpufleet.api.errors import Conflict, InvalidRequest, Unavailable
from gpufleet.routing import leases
from gpufleet.routing.alternatives import POLICIES
from gpufleet.routing.leases import Lease
from gpufleet.routing.policy import DeviceState, Outcome, RouteRequest, Snapshot, choose_device, select_target

pytestmark = pytest.mark.unit

NOW = 1_000_000.0  # wall clock of the lease store


def dev(
    pod: str, device: str = "cuda:0", node: str | None = None, uuid: str | None = None, **kw: object
) -> DeviceState:
    return DeviceState(pod=pod, device=device, node=node, uuid=uuid, last_switch_at=-3600.0, **kw)  # type: ignore[arg-type]


# Four single-GPU pods on node-a (the operator's gpusPerPod=1), one two-GPU pod on node-b.
FLEET = (
    dev("alpha-0", "cuda:0", "node-a", "GPU-aaaa0000", current_group="g"),
    dev("alpha-1", "cuda:0", "node-a", "GPU-aaaa1111", current_group="g"),
    dev("alpha-2", "cuda:0", "node-a", "GPU-aaaa2222", current_group="g"),
    dev("alpha-3", "cuda:0", "node-a", "GPU-aaaa3333", current_group="g"),
    dev("beta-0", "cuda:0", "node-b", "GPU-bbbb0000", current_group="g"),
    dev("beta-0", "cuda:1", "node-b", "GPU-bbbb1111", current_group="g"),
)


@pytest.mark.parametrize(
    ("target", "outcome", "named"),
    [
        ("node-a/cuda:0", Outcome.AMBIGUOUS_TARGET, None),  # four GPUs answer to it: refused, not guessed
        ("node-b/cuda:1", Outcome.ROUTED, ["beta-0/cuda:1"]),  # one pod on the node has it
        ("alpha-2/cuda:0", Outcome.ROUTED, ["alpha-2/cuda:0"]),
        ("cuda:1", Outcome.ROUTED, ["beta-0/cuda:1"]),  # a bare device of a single pod
        ("cuda:0", Outcome.AMBIGUOUS_TARGET, None),  # five pods have a cuda:0
        ("GPU-aaaa3333", Outcome.ROUTED, ["alpha-3/cuda:0"]),  # the physical GPU
        ("gpu-AAAA3333", Outcome.ROUTED, ["alpha-3/cuda:0"]),  # UUIDs compare without case
        ("GPU-ffff", Outcome.UNKNOWN_TARGET, None),
        ("node-a", Outcome.ROUTED, ["alpha-0/cuda:0", "alpha-1/cuda:0", "alpha-2/cuda:0", "alpha-3/cuda:0"]),
        ("beta-0", Outcome.ROUTED, ["beta-0/cuda:0", "beta-0/cuda:1"]),
        ("node-a/cuda:9", Outcome.UNKNOWN_TARGET, None),
    ],
)
def test_every_target_form_is_checked_for_ambiguity(target: str, outcome: Outcome, named: list[str] | None) -> None:
    found = select_target(FLEET, target)
    if named is None:
        assert not isinstance(found, list) and found.outcome is outcome, found
        return
    assert isinstance(found, list)
    assert sorted(d.key for d in found) == named


def test_an_ambiguous_target_names_the_pods_it_could_mean() -> None:
    found = select_target(FLEET, "node-a/cuda:0")
    assert not isinstance(found, list)
    for pod in ("alpha-0", "alpha-1", "alpha-2", "alpha-3"):
        assert pod in found.reason
    assert "GPU UUID" in found.reason


def test_a_word_that_is_a_pod_and_a_node_naming_different_devices_is_ambiguous() -> None:
    fleet = (dev("worker", "cuda:0", "node-x"), dev("other", "cuda:0", "worker"))
    assert not isinstance(select_target(fleet, "worker"), list)
    # ...but a pod named like its node, alone there, means the same devices either way.
    same = (dev("host-1", "cuda:0", "host-1"), dev("host-1", "cuda:1", "host-1"))
    assert isinstance(select_target(same, "host-1"), list)


def test_one_uuid_claimed_by_two_pods_is_ambiguous() -> None:
    fleet = (dev("old", uuid="GPU-1"), dev("new", uuid="GPU-1"))
    assert not isinstance(select_target(fleet, "GPU-1"), list)


def test_the_exclusive_target_refusal_maps_ambiguity_through_choose_device() -> None:
    d = choose_device(RouteRequest("g", "node-a/cuda:0"), Snapshot(FLEET))
    assert d.outcome is Outcome.AMBIGUOUS_TARGET


# --- leases in routing ---------------------------------------------------------------------------


def lease(devices: tuple[str, ...], lid: str = "lease-1", ttl: int = 60, at: float = NOW - 1) -> Lease:
    return Lease(lid, devices[0], devices, ttl, acquired_at=at, renewed_at=at)


HELD = lease(("beta-0/cuda:1",))
LEASED_SNAP = leases.with_leases(Snapshot(FLEET), [HELD], NOW)


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize(
    ("exclusive", "carried", "outcome", "allowed"),
    [
        (None, None, Outcome.ROUTED, "not-leased"),  # plain traffic never lands on it
        ("beta-0", None, Outcome.ROUTED, "beta-0/cuda:0"),  # its pod: the other device
        ("node-b", None, Outcome.ROUTED, "beta-0/cuda:0"),
        ("beta-0/cuda:1", None, Outcome.LEASED, None),  # names the leased device without the lease
        ("GPU-bbbb1111", None, Outcome.LEASED, None),
        ("cuda:1", None, Outcome.LEASED, None),
        (None, "lease-1", Outcome.ROUTED, "beta-0/cuda:1"),  # the lease alone picks its device
        ("beta-0/cuda:1", "lease-1", Outcome.ROUTED, "beta-0/cuda:1"),
        ("node-b", "lease-1", Outcome.ROUTED, "beta-0/cuda:1"),  # the lease narrows the target
        ("alpha-0", "lease-1", Outcome.LEASE_MISMATCH, None),
        (None, "lease-nope", Outcome.UNKNOWN_LEASE, None),
        ("alpha-0", "lease-nope", Outcome.UNKNOWN_LEASE, None),
    ],
)
def test_leases_hold_for_every_policy(
    policy_name: str, exclusive: str | None, carried: str | None, outcome: Outcome, allowed: str | None
) -> None:
    policy = POLICIES[policy_name]
    for seq in range(12):  # round robin walks every device: each must obey
        d = policy(RouteRequest("g", exclusive, sequence=seq, lease=carried), LEASED_SNAP)
        assert d.outcome is outcome, d.reason
        if allowed == "not-leased":
            assert d.choice is not None and d.choice.key != "beta-0/cuda:1"
        elif allowed is not None:
            assert d.choice is not None and d.choice.key == allowed


def test_a_leased_device_that_is_down_is_down_not_free() -> None:
    snap = leases.with_leases(Snapshot((dev("p", "cuda:0", healthy=False), dev("q"))), [lease(("p/cuda:0",))], NOW)
    assert choose_device(RouteRequest("g", lease="lease-1"), snap).outcome is Outcome.TARGET_DOWN
    assert choose_device(RouteRequest("g"), snap).choice.key == "q/cuda:0"  # type: ignore[union-attr]


def test_every_device_leased_refuses_plain_traffic() -> None:
    snap = leases.with_leases(Snapshot((dev("p"),)), [lease(("p/cuda:0",))], NOW)
    assert choose_device(RouteRequest("g"), snap).outcome is Outcome.LEASED


def test_a_lease_whose_devices_are_gone_is_target_down() -> None:
    snap = leases.with_leases(Snapshot((dev("p"),)), [lease(("gone/cuda:0",))], NOW)
    assert choose_device(RouteRequest("g", lease="lease-1"), snap).outcome is Outcome.TARGET_DOWN


def test_an_expired_lease_frees_its_device_and_is_unknown() -> None:
    old = lease(("beta-0/cuda:1",), ttl=10, at=NOW - 10)  # expires exactly now
    snap = leases.with_leases(Snapshot(FLEET), [old], NOW)
    assert all(d.leased_by is None for d in snap.devices) and not snap.leases
    assert choose_device(RouteRequest("g", "beta-0/cuda:1"), snap).routed
    assert choose_device(RouteRequest("g", lease="lease-1"), snap).outcome is Outcome.UNKNOWN_LEASE
    assert leases.with_leases(Snapshot(FLEET), [old], NOW - 0.001).leases == {"lease-1"}


def test_the_earlier_of_two_overlapping_leases_holds() -> None:
    first, second = lease(("p/cuda:0",), "lease-b", at=NOW - 5), lease(("p/cuda:0",), "lease-a", at=NOW - 2)
    assert leases.held_devices([second, first], NOW)["p/cuda:0"].id == "lease-b"


def test_conflicts_ignore_expired_and_self() -> None:
    live, dead = lease(("p/cuda:0", "p/cuda:1"), "l1"), lease(("q/cuda:0",), "l2", ttl=1, at=NOW - 5)
    assert [x.id for x in leases.conflicting(["p/cuda:1"], [live, dead], NOW)] == ["l1"]
    assert leases.conflicting(["q/cuda:0"], [live, dead], NOW) == []
    assert leases.conflicting(["p/cuda:0"], [live], NOW, other_than="l1") == []


# --- lease API rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"), [("node-a/cuda:0", "ambiguous_device"), ("nowhere", "unknown_device")]
)
def test_resolve_refuses_with_the_param_target(target: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        leases.resolve(target, FLEET)
    assert info.value.param == "target" and info.value.code == code and "lease target" in info.value.message


def test_resolve_a_node_holds_all_its_devices() -> None:
    assert [d.key for d in leases.resolve("node-b", FLEET)] == ["beta-0/cuda:0", "beta-0/cuda:1"]


@pytest.mark.parametrize("ttl", [0, -1, 3601])
def test_ttl_bounds(ttl: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        leases.check_ttl(ttl, 3600)
    assert info.value.param == "ttl_s"


def test_document_is_rfc3339_and_counts_down() -> None:
    doc = leases.document(Lease("lease-1", "t", ("p/cuda:0",), 30, 0.0, 60.0), now=80.0)
    assert doc["expires_at"] == "1970-01-01T00:01:30.000Z" and doc["acquired_at"] == "1970-01-01T00:00:00.000Z"
    assert doc["expires_in_s"] == 10.0 and doc["devices"] == ["p/cuda:0"] and doc["ttl_s"] == 30


def test_renewal_counts_from_now() -> None:
    x = Lease("l", "t", ("p/cuda:0",), 30, 0.0, 0.0).renewed(100.0)
    assert x.expires_at == 130.0 and x.acquired_at == 0.0
    assert x.renewed(110.0, ttl_s=5).expires_at == 115.0


@pytest.mark.parametrize(
    ("outcome", "exclusive", "status", "code", "param"),
    [
        (Outcome.LEASED, "p/cuda:0", 409, "device_leased", "exclusive_gpu"),
        (Outcome.LEASED, None, 503, "all_devices_leased", None),
        (Outcome.UNKNOWN_LEASE, None, 400, "unknown_lease", "lease"),
        (Outcome.LEASE_MISMATCH, "q", 400, "lease_mismatch", "exclusive_gpu"),
        (Outcome.TARGET_DOWN, None, 503, "target_unavailable", None),  # its devices are down
    ],
)
def test_lease_refusals_map_to_openai_errors(
    outcome: Outcome, exclusive: str | None, status: int, code: str, param: str | None
) -> None:
    from gpufleet.routing.policy import Decision

    err = leases.refusal(Decision(outcome, None, "why"), exclusive, "lease-1", retry_after_s=7.2)
    assert err is not None and err.status_code == status and err.code == code and err.param == param
    body = err.to_openai()["error"]
    assert body["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if outcome is Outcome.LEASED and isinstance(err, Unavailable):
        assert err.headers() == {"Retry-After": "7"}  # until the earliest lease expires
    assert leases.refusal(Decision(Outcome.SATURATED, None, "x"), None, None, 1.0) is None


def test_conflict_error_is_a_409_naming_the_devices() -> None:
    err = leases.conflict_error("node-b", [lease(("beta-0/cuda:1",))])
    assert isinstance(err, Conflict) and err.status_code == 409 and err.code == "device_leased"
    assert "beta-0/cuda:1" in err.message


# --- a pod serves only its own groups ---------------------------------------------------------------


MIXED = (
    dev("chat-0", current_group=None, groups=frozenset({"team-a/chat"}), load=40),  # busy, but it serves chat
    dev("embed-0", current_group=None, groups=frozenset({"team-a/embed"})),  # idle, cheaper: never for chat
    dev("local", "cpu:0", current_group=None),  # groups unknown (an older pod server): may serve anything
)


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_a_group_goes_only_to_pods_that_serve_it(policy_name: str) -> None:
    for seq in range(6):
        d = POLICIES[policy_name](RouteRequest("team-a/chat", sequence=seq), Snapshot(MIXED))
        assert d.routed and d.choice is not None and d.choice.pod in ("chat-0", "local"), d.reason


def test_an_exclusive_target_of_another_group_is_refused_by_name() -> None:
    from gpufleet.api.errors import InvalidRequest as Bad
    from gpufleet.router.decide import Decider
    from gpufleet.router.metrics import RouterMetrics
    from gpufleet.router.state import FleetState

    d = choose_device(RouteRequest("team-a/chat", "embed-0"), Snapshot(MIXED))
    assert d.outcome is Outcome.GROUP_NOT_SERVED
    err = Decider(FleetState(), RouterMetrics(), "affinity").refusal(d, "team-a/chat", "embed-0")
    assert isinstance(err, Bad) and err.code == "target_lacks_model" and err.param == "exclusive_gpu"
    snap = leases.with_leases(Snapshot(MIXED), [lease(("embed-0/cuda:0",))], NOW)
    d = choose_device(RouteRequest("team-a/chat", lease="lease-1"), snap)
    assert d.outcome is Outcome.GROUP_NOT_SERVED
    refused = leases.refusal(d, None, "lease-1", 1.0)
    assert refused is not None and refused.param == "lease" and refused.code == "target_lacks_model"
