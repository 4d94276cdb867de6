"""model_groups.json as a pool pod reads it: empty is fine, a bad group is refused by name, the rest serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpufleet.api.errors import ConfigError
from gpufleet.api.model_groups import (
    ModelGroupsFile,
    groups_digest,
    load_model_groups,
    load_model_groups_lenient,
    parse_model_groups_lenient,
)
from gpufleet.api.pod_status import PodStatus

pytestmark = pytest.mark.unit


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "model_groups.json"
    p.write_text(json.dumps(doc))
    return p


def _group(*ids: str, **extra: object) -> dict[str, object]:
    return {"models": [{"id": i, "source": f"/models/{i}", "task": "chat", **extra} for i in ids]}


@pytest.mark.parametrize("doc", [{}, {"groups": {}}, {"groups": {}, "default_group": None}])
def test_a_file_without_groups_is_valid_and_has_no_default(tmp_path: Path, doc: object) -> None:
    for parsed in (load_model_groups(_write(tmp_path, doc)), load_model_groups_lenient(_write(tmp_path, doc))[0]):
        assert parsed.groups == {} and parsed.default_group is None
        assert parsed.with_default(None) is parsed
    with pytest.raises(ConfigError, match=r"DEFAULT_GROUP='a'.*\(none\)"):
        ModelGroupsFile().with_default("a")


def test_the_default_group_is_optional_but_must_be_a_group(tmp_path: Path) -> None:
    assert load_model_groups(_write(tmp_path, {"groups": {"a": _group("m")}})).default_group is None
    with pytest.raises(ConfigError, match="default_group"):
        load_model_groups(_write(tmp_path, {"groups": {"a": _group("m")}, "default_group": "b"}))


def test_malformed_groups_are_refused_by_name_and_the_rest_serves(tmp_path: Path) -> None:
    doc = {
        "default_group": "good",
        "groups": {
            "good": _group("m1"),
            "bad-task": _group("m2", task="tts"),
            "no-models": {"models": []},
            "bad name!": _group("m3"),
            "extra-field": {"models": [{"id": "m4", "source": "/x"}], "replicas": 2},
            "missing-package": {"models": [{"id": "m5", "source": "package:no_such_package_xyz/model"}]},
        },
    }
    served, refused = load_model_groups_lenient(_write(tmp_path, doc))
    assert list(served.groups) == ["good"] and served.default_group == "good"
    assert set(refused) == {"bad-task", "no-models", "bad name!", "extra-field", "missing-package"}
    assert "models.0.task" in refused["bad-task"]
    assert "models" in refused["no-models"]
    assert "must match" in refused["bad name!"]
    assert "replicas" in refused["extra-field"]
    assert "no_such_package_xyz" in refused["missing-package"]
    # The strict loader (a pod that never reloads) still refuses the whole file.
    with pytest.raises(ConfigError):
        load_model_groups(_write(tmp_path, doc))


def test_a_contested_model_id_stays_with_the_first_group_in_sorted_order(tmp_path: Path) -> None:
    doc = {"groups": {"zeta": _group("shared", "z"), "alpha": _group("shared", "a"), "mid": _group("a", "m")}}
    served, refused = parse_model_groups_lenient(json.dumps(doc).encode(), tmp_path / "model_groups.json")
    assert list(served.groups) == ["alpha"]  # mid and zeta each claim a model alpha keeps
    assert "'a'" in refused["mid"] and "'alpha'" in refused["mid"] and "sorted order" in refused["mid"]
    assert "'shared'" in refused["zeta"] and "'alpha'" in refused["zeta"]


def test_a_malformed_group_claims_no_model_id(tmp_path: Path) -> None:
    doc = {"groups": {"a": _group("m", task="tts"), "b": _group("m")}}
    served, refused = parse_model_groups_lenient(json.dumps(doc).encode(), tmp_path / "f.json")
    assert list(served.groups) == ["b"] and list(refused) == ["a"]


def test_a_default_naming_a_refused_group_is_dropped(tmp_path: Path) -> None:
    doc = {"default_group": "bad", "groups": {"bad": _group("m", task="tts"), "ok": _group("n")}}
    served, refused = parse_model_groups_lenient(json.dumps(doc).encode(), tmp_path / "f.json")
    assert served.default_group is None and list(refused) == ["bad"]


def test_relative_sources_resolve_against_the_files_folder(tmp_path: Path) -> None:
    doc = {"groups": {"a": {"models": [{"id": "m", "source": "./weights/m"}]}}}
    served, _ = parse_model_groups_lenient(json.dumps(doc).encode(), tmp_path / "model_groups.json")
    assert served.groups["a"].models[0].source == str(tmp_path / "weights" / "m")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "(document)"),
        (b'{"groups": [], "default_group": null}', "groups"),
        (b'{"groups": {}, "extra": 1}', "extra"),
        (b'{"groups": {"a": {"models": [{"id": "m", "source": "x"}]}}, "default_group": "z"}', "default_group"),
    ],
)
def test_a_document_that_is_not_one_is_an_error_as_a_whole(tmp_path: Path, data: bytes, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"MODEL_GROUPS: .*" + re.escape(needle)):
        parse_model_groups_lenient(data, tmp_path / "model_groups.json")


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_model_groups_lenient(tmp_path / "absent.json")


def test_the_digest_is_a_short_sha256_of_the_bytes() -> None:
    import hashlib

    assert groups_digest(b"{}") == hashlib.sha256(b"{}").hexdigest()[:16]
    assert groups_digest(b"{}") != groups_digest(b"{ }")


def test_status_documents_without_the_new_fields_still_parse_and_changes_rewrite_the_lease() -> None:
    old = PodStatus.model_validate({"pod": "p", "timestamp": 1.0, "unknown_future_field": 1})
    assert old.refused_groups == {} and old.groups_hash is None and old.config_error is None
    assert old.placement_generation is None
    refused = old.model_copy(update={"refused_groups": {"bad": "field models: too short"}})
    rehashed = old.model_copy(update={"groups_hash": "abc"})
    assert len({old.state_key(), refused.state_key(), rehashed.state_key()}) == 3
    assert old.model_copy(update={"timestamp": 2.0}).state_key() == old.state_key()
