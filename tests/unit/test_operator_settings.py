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


def test_chart_defaults_fill_pod_template_fields_a_group_does_not_set() -> None:
    from gpufleet.operator.reconcile import parse_spec

    defaults = '{"runtimeClassName": "nvidia", "imagePullSecrets": [{"name": "regcred"}], "loadTimeoutSeconds": 900}'
    options = load_settings(pod_server_defaults=defaults).build_options()
    body = {"spec": {"models": [{"id": "m", "source": "/m"}], "imagePullSecrets": [{"name": "mine"}]}}
    spec = parse_spec(body, options.defaults)
    assert spec.runtime_class_name == "nvidia" and spec.load_timeout_seconds == 900
    assert [s.name for s in spec.image_pull_secrets] == ["mine"]  # the group's own value wins


@pytest.mark.parametrize("bad", ['{"replicas": 3}', '{"runtimeClassName": "Not A Name"}', "[1]"])
def test_chart_defaults_are_checked_at_start_up(bad: str) -> None:
    with pytest.raises(ConfigError, match="GPUFLEET_OPERATOR_POD_SERVER_DEFAULTS"):
        load_settings(pod_server_defaults=bad)
