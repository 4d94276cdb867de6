"""The pool benchmark's layouts are what a user would apply: valid against the CRDs' own models."""

from __future__ import annotations

import pytest

from bench.pool import HOST_CACHE_MODELS, N_GROUPS, POOL_PODS, Model, manifests
from gpufleet.api.gpupool import GpuPoolSpec
from gpufleet.api.modelgroup import ModelGroupSpec

pytestmark = pytest.mark.unit

MODELS = [Model(f"g{i:02d}", f"m{i:02d}", f"/models/m{i:02d}") for i in range(N_GROUPS)]


def test_the_pool_layout_binds_every_group_to_one_pool_of_two_pods() -> None:
    docs = manifests("pool-no-linger", MODELS)
    pools = [d for d in docs if d["kind"] == "GpuPool"]
    assert len(pools) == 1
    pool = GpuPoolSpec.model_validate(pools[0]["spec"])
    assert (pool.replicas, pool.host_cache.models, pool.switch.linger_seconds) == (POOL_PODS, HOST_CACHE_MODELS, 0)
    groups = [ModelGroupSpec.model_validate(d["spec"]) for d in docs if d["kind"] == "ModelGroup"]
    assert len(groups) == N_GROUPS and {g.pool for g in groups} == {pools[0]["metadata"]["name"]}


def test_the_dedicated_layout_gives_each_group_one_pod_and_no_pool() -> None:
    docs = manifests("dedicated", MODELS)
    assert all(d["kind"] == "ModelGroup" for d in docs)
    groups = [ModelGroupSpec.model_validate(d["spec"]) for d in docs]
    assert [(g.pool, g.replicas, g.cpu_cache_size) for g in groups] == [(None, 1, HOST_CACHE_MODELS)] * N_GROUPS
