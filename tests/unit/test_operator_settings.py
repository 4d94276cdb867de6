"""Operator settings: parsed once from GPUFLEET_OPERATOR_* (and CLI flags), clear errors."""

from __future__ import annotations

import pytest

from gpufleet.api.errors import ConfigError
from gpufleet.operator.handlers import kopf_settings
from gpufleet.operator.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GPUFLEET_OPERATOR_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert s.namespaces == [] and s.resync_seconds == 30 and s.health_port == 8080
    assert s.build_options().pod_server_cluster_role == "gpufleet-pod-server"


def test_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_OPERATOR_NAMESPACES", "ml, team-b ,")
    monkeypatch.setenv("GPUFLEET_OPERATOR_POD_SERVER_IMAGE", "reg/pod:2")
    monkeypatch.setenv("GPUFLEET_OPERATOR_INSTANCE", "rel")
    s = load_settings(resync_seconds=5, health_port=None)
    assert s.namespaces == ["ml", "team-b"] and s.resync_seconds == 5 and s.health_port == 8080
    options = s.build_options()
    assert (options.image, options.instance) == ("reg/pod:2", "rel")


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_OPERATOR_RESYNC_SECONDS", "0")
    with pytest.raises(ConfigError, match="GPUFLEET_OPERATOR_RESYNC_SECONDS"):
        load_settings()


def test_kopf_settings_keep_bookkeeping_out_of_status() -> None:
    ks = kopf_settings(load_settings())
    assert ks.persistence.progress_storage.prefix == "operator.gpufleet.io"
    assert ks.scanning.disabled is False
    assert kopf_settings(load_settings(namespaces=["ml"])).scanning.disabled is True
