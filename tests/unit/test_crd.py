"""The ModelGroup and GpuPool CRDs: generated from the pydantic models, and in agreement with them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from gpufleet.api import labels
from gpufleet.api.gpupool import GpuPoolSpec, GpuPoolStatus
from gpufleet.api.modelgroup import POD_FIELD_DEFAULTS, ModelGroupSpec, ModelGroupStatus
from gpufleet.operator.crd import build_crd, build_pool_crd, crd_yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "modelgroup.yaml"
CHART_CRD_FILE = ROOT / "deploy" / "helm" / "gpufleet" / "files" / "modelgroup-crd.yaml"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
KINDS = ("modelgroup", "gpupool")


def _schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = (crd or build_crd())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _pool_schema() -> dict[str, Any]:
    return _schema(build_pool_crd())


def _jsonschema(node: Any) -> Any:
    """The CRD schema as plain JSON Schema (nullable -> null allowed, int-or-string)."""
    if isinstance(node, list):
        return [_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*kinds, "null"]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # the API server prunes or (strict) rejects unknown fields
    return out


def _validate_cr(obj: dict[str, Any]) -> None:
    schema = _pool_schema() if obj.get("kind") == "GpuPool" else _schema()
    jsonschema.validate(obj, _jsonschema(schema))


def _examples(kind: str = labels.KIND) -> list[dict[str, Any]]:
    docs = []
    for path in EXAMPLES:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind)
    return docs


def _example_groups() -> list[dict[str, Any]]:
    return _examples(labels.KIND)


@pytest.mark.parametrize("kind", KINDS)
def test_crd_file_is_generated_output(kind: str) -> None:
    assert (ROOT / "crds" / f"{kind}.yaml").read_text() == crd_yaml(kind), "stale: run `gpufleet crd -d crds`"


@pytest.mark.parametrize("kind", KINDS)
def test_chart_carries_the_same_crd(kind: str) -> None:
    assert (ROOT / "deploy" / "helm" / "gpufleet" / "files" / f"{kind}-crd.yaml").read_text() == crd_yaml(kind), (
        f"deploy/helm/gpufleet/files/{kind}-crd.yaml is stale: cp crds/{kind}.yaml there"
    )


@pytest.mark.parametrize("build", [build_crd, build_pool_crd])
def test_crd_is_a_valid_kubernetes_object(build: Any) -> None:
    kubernetes_validate.validate(build(), kubernetes_validate.latest_version(), strict=True)


def test_crd_names_and_subresources() -> None:
    crd = build_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modelgroups.gpufleet.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == ("gpufleet.io", "Namespaced", "ModelGroup")
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Desired"] == ".spec.replicas"
    assert "Ready" in columns["Status"] and "Age" in columns


BOUNDS = {"ge": "minimum", "le": "maximum", "min_length": "minLength", "max_length": "maxLength", "pattern": "pattern"}


def _walk_models(model: type[pydantic.BaseModel], schema: dict[str, Any], where: str, checked: list[str]) -> None:
    """Every pydantic field has a CRD property of the same name, type, default and bounds."""
    props = schema["properties"]
    assert set(props) == {f.alias or n for n, f in model.model_fields.items()}, where
    required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
    assert set(schema.get("required", [])) == required, where
    for name, field in model.model_fields.items():
        prop = props[field.alias or name]
        here = f"{where}.{field.alias or name}"
        if field.description:
            assert prop.get("description") == field.description, here
        if not field.is_required() and field.default_factory is None and field.default is not None:
            assert prop.get("default") == field.default, here
        for meta in field.metadata:
            for attr, key in BOUNDS.items():
                value = getattr(meta, attr, None)
                if value is None:
                    continue
                if prop.get("type") == "array":
                    key = {"minLength": "minItems", "maxLength": "maxItems"}.get(key, key)
                assert prop.get(key) == value, f"{here}: {key}"
                checked.append(f"{here}:{key}")
        nested = [a for a in get_args(field.annotation) or (field.annotation,)
                  if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
        for sub in nested:
            node = prop["items"] if prop["type"] == "array" else prop
            _walk_models(sub, node, here, checked)


def test_spec_and_status_agree_with_pydantic() -> None:
    schema = _schema()
    checked: list[str] = []
    _walk_models(ModelGroupSpec, schema["properties"]["spec"], "spec", checked)
    _walk_models(ModelGroupStatus, schema["properties"]["status"], "status", checked)
    assert {"spec.replicas:maximum", "spec.models:minItems", "spec.models.id:pattern", "spec.pool:pattern",
            "spec.minResident:maximum"} <= set(checked)
    pool: list[str] = []
    _walk_models(GpuPoolSpec, _pool_schema()["properties"]["spec"], "spec", pool)
    _walk_models(GpuPoolStatus, _pool_schema()["properties"]["status"], "status", pool)
    assert {"spec.replicas:maximum", "spec.hostCache.models:maximum", "spec.maxSequencesPerDevice:minimum"} <= set(pool)


def test_kubernetes_only_rules_are_present() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["models"]["x-kubernetes-list-type"] == "map"
    assert spec["models"]["x-kubernetes-list-map-keys"] == ["id"]
    assert spec["gpusPerPod"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert "nvidia.com/gpu" in spec["resources"]["x-kubernetes-validations"][0]["rule"]
    assert "self.metadata.name.size() <= 52" in _schema()["x-kubernetes-validations"][0]["rule"]


@pytest.mark.parametrize("doc", _example_groups(), ids=lambda d: d["metadata"]["name"])
def test_examples_are_valid_for_both(doc: dict[str, Any]) -> None:
    ModelGroupSpec.model_validate(doc["spec"])
    _validate_cr(doc)


@pytest.mark.parametrize("doc", _examples("GpuPool"), ids=lambda d: d["metadata"]["name"])
def test_pool_examples_are_valid_for_both(doc: dict[str, Any]) -> None:
    GpuPoolSpec.model_validate(doc["spec"])
    _validate_cr(doc)
    bound = [g for g in _example_groups() if g["spec"].get("pool") == doc["metadata"]["name"]]
    assert bound  # an example pool comes with the groups that share it


def test_pool_crd_names_columns_and_subresources() -> None:
    crd = build_pool_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "gpupools.gpufleet.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "gpufleet.io", "Namespaced", "GpuPool", "gpupools")
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Ready", "Desired", "GPUs/Pod", "Groups", "Status", "Age"]
    assert columns["Groups"]["jsonPath"] == ".status.groups"
    props = _pool_schema()["properties"]["spec"]["properties"]
    assert props["gpusPerPod"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert props["resources"]["x-kubernetes-validations"] == _schema()["properties"]["spec"]["properties"][
        "resources"]["x-kubernetes-validations"]
    assert props["env"]["x-kubernetes-validations"] == _schema()["properties"]["spec"]["properties"]["env"][
        "x-kubernetes-validations"]
    assert "self.metadata.name.size() <= 52" in _pool_schema()["x-kubernetes-validations"][0]["rule"]
    conditions = _pool_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def _pooled_rules() -> dict[str, dict[str, Any]]:
    rules = _schema()["properties"]["spec"]["x-kubernetes-validations"]
    return {r.get("fieldPath", r["rule"]): r for r in rules}


def test_pooled_groups_refuse_every_pod_field_in_cel() -> None:
    rules = _pooled_rules()
    for field, default in POD_FIELD_DEFAULTS.items():
        rule = rules[f".{field}"]
        assert rule["rule"].startswith(f"!has(self.pool) || !has(self.{field})"), field
        if default is not None:  # the API server fills defaults in first: the default is "unset"
            assert rule["rule"].endswith(f"self.{field} == {json_literal(default)}"), field
        assert rule["messageExpression"] == (
            f'"spec.{field} is a pod setting: this ModelGroup runs on GpuPool " + self.pool + "\'s pods; set it there"'
        )
        assert rule["reason"] == "FieldValueForbidden"
    assert rules[".image"]["rule"] == "!has(self.pool) || !has(self.image)"
    assert rules[".env"]["rule"] == "!has(self.pool) || !has(self.env) || size(self.env) == 0"
    assert rules[".replicas"]["rule"] == "!has(self.pool) || !has(self.replicas) || self.replicas == 1"
    # One O(1) rule per field: the CRD stays far within the API server's CEL cost budget.
    assert len(rules) == len(POD_FIELD_DEFAULTS) + 3  # + pool-only fields; pool fixed; maxResident >= minResident


def json_literal(value: Any) -> str:
    import json

    return json.dumps(value)


def test_pool_is_fixed_at_creation_and_only_pooled_groups_take_min_resident() -> None:
    rules = _pooled_rules()
    fixed = rules[".pool"]
    assert "oldSelf.pool" in fixed["rule"] and "create a new ModelGroup" in fixed["message"]
    only_pooled = next(r for r in rules.values() if "minResident" in r["rule"])
    assert only_pooled["rule"].startswith("has(self.pool) ||")


def test_a_pooled_spec_with_a_pod_field_is_refused_by_the_pydantic_model() -> None:
    doc = _minimal()
    doc["spec"].update(pool="shared", image="mine:1")
    with pytest.raises(pydantic.ValidationError, match=r"spec.image is a pod setting.*GpuPool 'shared'"):
        ModelGroupSpec.model_validate(doc["spec"])
    doc["spec"].update(image=None, replicas=1, minResident=2, priority=5)  # defaults are not "set"
    doc["spec"].pop("image")
    assert ModelGroupSpec.model_validate(doc["spec"]).min_resident == 2
    _validate_cr(doc)
    with pytest.raises(pydantic.ValidationError, match="apply to pooled groups only"):
        ModelGroupSpec.model_validate({**_minimal()["spec"], "minResident": 1})


@pytest.mark.parametrize("pool", ["other/shared", "Shared", "x" * 53, ""])
def test_a_pool_reference_is_a_local_name(pool: str) -> None:
    """Cross-namespace references cannot be written: spec.pool is a DNS label of this namespace."""
    doc = _minimal()
    doc["spec"]["pool"] = pool
    with pytest.raises(pydantic.ValidationError):
        ModelGroupSpec.model_validate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError):
        _validate_cr(doc)


def _minimal() -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "ModelGroup",
        "metadata": {"name": "g"},
        "spec": {"models": [{"id": "m", "source": "/models/m"}]},
    }


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("replicas",), -1),
        (("replicas",), 1000),
        (("gpusPerPod",), 0),
        (("models",), []),
        (("models", 0, "id"), "bad id!"),
        (("models", 0, "task"), "vision"),
        (("models", 0, "source"), ""),
        (("imagePullPolicy",), "Sometimes"),
        (("unknownField",), 1),
    ],
)
def test_bad_specs_fail_both_ways(path: tuple[Any, ...], value: Any) -> None:
    doc = _minimal()
    node = doc["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(pydantic.ValidationError):
        ModelGroupSpec.model_validate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError):
        _validate_cr(doc)


def test_rules_enforced_by_the_api_server_are_also_in_pydantic() -> None:
    """Duplicate ids (list-map) and GPUs in resources (CEL) are the API server's job; the
    operator still refuses them if an outdated CRD let them through."""
    doc = _minimal()
    doc["spec"]["models"].append(copy.deepcopy(doc["spec"]["models"][0]))
    with pytest.raises(pydantic.ValidationError, match="duplicate model ids"):
        ModelGroupSpec.model_validate(doc["spec"])
    doc = _minimal()
    doc["spec"]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    with pytest.raises(pydantic.ValidationError, match="gpusPerPod"):
        ModelGroupSpec.model_validate(doc["spec"])


def test_quantities_accept_integers_and_strings() -> None:
    doc = _minimal()
    doc["spec"]["resources"] = {"requests": {"cpu": 2, "memory": "4Gi"}}
    ModelGroupSpec.model_validate(doc["spec"])
    _validate_cr(doc)


def test_gpufleet_crd_command_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    from gpufleet.cli import main

    assert main(["crd"]) == 0
    assert capsys.readouterr().out == CRD_FILE.read_text()


def test_gpufleet_crd_command_writes_both(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gpufleet.cli import main

    assert main(["crd", "--kind", "gpupool"]) == 0
    assert capsys.readouterr().out == (ROOT / "crds" / "gpupool.yaml").read_text()
    assert main(["crd", "--output-dir", str(tmp_path)]) == 0
    for kind in KINDS:
        assert (tmp_path / f"{kind}.yaml").read_text() == (ROOT / "crds" / f"{kind}.yaml").read_text()
