from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.api.errors import ConfigError
from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.devices import parse_device_list
from gpufleet.pod_server.settings import PodServerSettings, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DEVICES", "DEVICE", "NUM_WORKERS_PER_GPU", "MAX_CPU_CACHED_MODELS", "LAZY_LOAD_MODEL", "PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_devices_list_is_split_and_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICES", "cpu:0, cpu:1 ,CPU:2")
    assert load_settings().devices == ["cpu:0", "cpu:1", "cpu:2"]


def test_single_device_variable_still_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE", "cpu")
    assert load_settings().devices == ["cpu:0"]


def test_default_without_gpus_is_cpu() -> None:
    assert parse_device_list([], cuda_count=0) == ["cpu:0"]
    assert parse_device_list([], cuda_count=2) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [(["tpu:0"], "not a device"), (["cuda:3"], "unavailable"), (["cpu:0", "cpu"], "listed twice")],
)
def test_bad_devices_name_the_setting(raw: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        parse_device_list(raw, cuda_count=1)
    assert "DEVICES" in str(info.value)


def test_unavailable_gpu_stops_startup_with_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICES", "cuda:7")
    with pytest.raises(ConfigError, match=r"DEVICES.*cuda:7.*unavailable"):
        load_settings()


@pytest.mark.parametrize(
    ("var", "value"), [("NUM_WORKERS_PER_GPU", "0"), ("MAX_CPU_CACHED_MODELS", "-1"), ("LAZY_LOAD_MODEL", "perhaps")]
)
def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        load_settings()


def test_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("NUM_WORKERS_PER_GPU=3\nDEVICES=cpu:0,cpu:1\n")
    s = load_settings()
    assert (s.num_workers_per_gpu, s.devices) == (3, ["cpu:0", "cpu:1"])


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "model_groups.json"
    p.write_text(json.dumps(doc))
    return p


def test_model_groups_resolve_relative_sources(tmp_path: Path) -> None:
    doc = {"default_group": "a", "groups": {"a": {"models": [{"id": "m", "source": "./m", "task": "chat"}]}}}
    parsed = load_model_groups(_write(tmp_path, doc))
    assert parsed.model("m").source == str(tmp_path / "m")  # type: ignore[union-attr]
    assert parsed.group_of("m") == "a"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"default_group": "z", "groups": {"a": {"models": [{"id": "m", "source": "x"}]}}}, "default_group"),
        (
            {
                "default_group": "a",
                "groups": {
                    "a": {"models": [{"id": "m", "source": "x"}]},
                    "b": {"models": [{"id": "m", "source": "y"}]},
                },
            },
            "unique across groups",
        ),
        ({"default_group": "a", "groups": {"a": {"models": [{"id": "m", "source": "x", "task": "tts"}]}}}, "task"),
        ({"default_group": "a", "groups": {"a": {"models": []}}}, "models"),
    ],
)
def test_invalid_model_groups_name_the_field(tmp_path: Path, doc: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_model_groups(_write(tmp_path, doc))


def test_model_groups_not_json(tmp_path: Path) -> None:
    p = tmp_path / "model_groups.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_groups(p)


def test_default_group_override_must_exist(tmp_path: Path) -> None:
    doc = {"default_group": "a", "groups": {"a": {"models": [{"id": "m", "source": "x"}]}}}
    parsed = load_model_groups(_write(tmp_path, doc))
    with pytest.raises(ConfigError, match="DEFAULT_GROUP"):
        parsed.with_default("zzz")


def test_server_fields_are_declared_once_for_pod_server_and_router() -> None:
    from gpufleet.router.settings import RouterSettings
    from gpufleet.settings_support import ServerSettings

    shared = set(ServerSettings.model_fields)
    assert shared == {"host", "port", "api_key", "max_body_bytes", "log_level", "keep_alive_s"}
    for cls in (PodServerSettings, RouterSettings):
        assert issubclass(cls, ServerSettings)
        assert not shared & set(cls.__annotations__), f"{cls.__name__} redeclares a shared field"


def test_keep_alive_outlasts_the_client_pool_on_every_hop() -> None:
    from gpufleet.router.settings import load_router_settings

    router = load_router_settings(pod_urls=["http://127.0.0.1:1"])
    pod = PodServerSettings(devices=["cpu:0"])
    httpx_pool_idle_s = 5.0  # httpx's (and so the openai SDK's) keepalive_expiry
    assert router.keep_alive_s > httpx_pool_idle_s
    assert pod.keep_alive_s > router.upstream_keepalive_s


def test_sequences_per_device_default_by_device_kind() -> None:
    from gpufleet.pod_server.group_runtime import max_sequences

    assert max_sequences("cpu:0", None) == 32  # where the library's CPU step peaks (bench engine_peer)
    assert max_sequences("cuda:1", None) == 64
    assert max_sequences("cpu:0", 8) == 8 and max_sequences("cuda:0", 128) == 128  # the setting wins
