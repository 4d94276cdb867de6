"""The model_groups.json contract: which models exist and how they are grouped.

A *group* is the unit of residency: all of its models are loaded onto one device
together, and a device holds exactly one current group at a time. Model ids are
unique across the whole file, so a request's ``model`` names its group.

A model's ``source`` is resolved each time the file is read: a relative path against the
file's folder, and ``package:<module>/<path>`` inside that Python package as installed in the
running environment (so a file written by one virtualenv works in any other that has it).

A pool pod's file may hold no group yet, and is rewritten while the pod runs: the lenient loader
(``parse_model_groups_lenient``) serves the good groups of a file and refuses the bad ones by
name, so one broken ModelGroup cannot take down a pod that serves many.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpufleet.api.errors import ConfigError

Task = Literal["chat", "completion", "embedding"]
DType = Literal["float32", "float16", "bfloat16", "auto"]

PACKAGE_PREFIX = "package:"

# Ids become URL path segments, metric labels and Kubernetes label values.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class ModelSpec(BaseModel):
    """One model: where its weights come from and what it does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=NAME_PATTERN, description="Name clients use in the `model` field.")
    source: str = Field(
        min_length=1,
        description=(
            "A local directory with config.json and safetensors weights (relative: to this file's folder), "
            "package:<module>/<path> (a folder inside an installed Python package), or a Hugging Face id."
        ),
    )
    task: Task = "chat"
    dtype: DType = "auto"
    context_length: int | None = Field(
        default=None, ge=8, le=1_048_576, description="Prompt plus generated tokens; defaults to the model config's."
    )


class GroupSpec(BaseModel):
    """A set of models that is loaded onto a device together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[ModelSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> GroupSpec:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate model ids in group: {', '.join(dupes)}")
        return self


class ModelGroupsFile(BaseModel):
    """The whole model_groups.json document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Empty is valid: a pool pod with no group bound yet starts, is ready, and serves nothing.
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    default_group: str | None = Field(default=None, description="The group preloaded at start-up; none: no preload.")

    @model_validator(mode="after")
    def _check(self) -> ModelGroupsFile:
        for name in self.groups:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"group name {name!r} must match {NAME_PATTERN}")
        if self.default_group is not None and self.default_group not in self.groups:
            raise ValueError(
                f"default_group {self.default_group!r} is not one of the groups: "
                f"{', '.join(sorted(self.groups)) or '(none)'}"
            )
        owner: dict[str, str] = {}
        for group_id, group in self.groups.items():
            for model in group.models:
                if model.id in owner:
                    raise ValueError(
                        f"model id {model.id!r} appears in groups {owner[model.id]!r} and {group_id!r}; "
                        "model ids must be unique across groups"
                    )
                owner[model.id] = group_id
        return self

    def group_of(self, model_id: str) -> str | None:
        for group_id, group in self.groups.items():
            if any(m.id == model_id for m in group.models):
                return group_id
        return None

    def model(self, model_id: str) -> ModelSpec | None:
        for group in self.groups.values():
            for m in group.models:
                if m.id == model_id:
                    return m
        return None

    def with_default(self, default_group: str | None) -> ModelGroupsFile:
        """The same file with the default group overridden (the DEFAULT_GROUP setting)."""
        if default_group is None or default_group == self.default_group:
            return self
        if default_group not in self.groups:
            raise ConfigError(
                f"DEFAULT_GROUP={default_group!r} is not a group in model_groups.json "
                f"(groups: {', '.join(sorted(self.groups)) or '(none)'})"
            )
        return self.model_copy(update={"default_group": default_group})


def load_model_groups(path: Path) -> ModelGroupsFile:
    """Parse and validate a model_groups.json; relative sources resolve against its folder."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"MODEL_GROUPS: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"MODEL_GROUPS: {path} is not valid JSON: {exc}") from None
    try:
        parsed = ModelGroupsFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"MODEL_GROUPS: {path}: {_first_error(exc)}") from None
    return _resolve_sources(parsed, path.parent)


def groups_digest(data: bytes) -> str:
    """The short content hash of a model_groups.json's bytes, as pods report the file they serve
    (``PodStatus.groups_hash``): a writer hashing the bytes it wrote can tell when a pod has them."""
    return hashlib.sha256(data).hexdigest()[:16]


class _Document(BaseModel):
    """A model_groups.json's outer shape, its groups not yet validated (the lenient loader's first step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: dict[str, Any] = Field(default_factory=dict)
    default_group: str | None = None


def load_model_groups_lenient(path: Path) -> tuple[ModelGroupsFile, dict[str, str]]:
    """``parse_model_groups_lenient`` of the file at ``path``; ConfigError when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"MODEL_GROUPS: cannot read {path}: {exc.strerror or exc}") from None
    return parse_model_groups_lenient(data, path)


def parse_model_groups_lenient(data: bytes, path: Path) -> tuple[ModelGroupsFile, dict[str, str]]:
    """The servable part of a model_groups.json and the groups refused, each with its reason.

    A group entry that fails validation (or whose source cannot resolve) is refused; a model id
    two good groups claim stays with the first group in sorted order, and the others are refused.
    A ``default_group`` naming a refused group becomes None. Only a document that is not one
    (not JSON, wrong outer shape, a default_group naming no group at all) is a ConfigError: the
    caller keeps serving what it had. ``path`` names the file in messages and anchors relative
    sources."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"MODEL_GROUPS: {path} is not valid JSON: {exc}") from None
    try:
        doc = _Document.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"MODEL_GROUPS: {path}: {_first_error(exc)}") from None
    refused: dict[str, str] = {}
    good: dict[str, GroupSpec] = {}
    owner: dict[str, str] = {}  # model id -> the group that keeps it
    for name in sorted(doc.groups):
        checked = _check_group(name, doc.groups[name], path.parent)
        if isinstance(checked, str):
            refused[name] = checked
            continue
        taken = {m.id: owner[m.id] for m in checked.models if m.id in owner}
        if taken:
            refused[name] = "; ".join(
                f"model id {mid!r} is already served by group {other!r} (of groups claiming one model id, the "
                "first in sorted order keeps it)"
                for mid, other in sorted(taken.items())
            )
            continue
        owner.update({m.id: name for m in checked.models})
        good[name] = checked
    default = doc.default_group
    if default is not None and default not in doc.groups:
        raise ConfigError(
            f"MODEL_GROUPS: {path}: field default_group: {default!r} is not one of the groups: "
            f"{', '.join(sorted(doc.groups)) or '(none)'}"
        )
    ordered = {g: good[g] for g in doc.groups if g in good}  # the file's order, as the strict loader keeps
    return ModelGroupsFile(groups=ordered, default_group=default if default in good else None), refused


def _check_group(name: str, entry: Any, base: Path) -> GroupSpec | str:
    """The group's spec with its sources resolved, or why it is refused."""
    if not re.match(NAME_PATTERN, name):
        return f"group name {name!r} must match {NAME_PATTERN}"
    try:
        spec = GroupSpec.model_validate(entry)
    except ValidationError as exc:
        return _first_error(exc)
    try:
        return _resolve_group(spec, base)
    except ConfigError as exc:
        return str(exc).removeprefix("MODEL_GROUPS: ")


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(document)"
    return f"field {where}: {first['msg']}"


def package_path(source: str) -> Path | None:
    """The folder a ``package:<module>/<path>`` source names in this environment; None if the
    package is not installed. Importing the package is not needed (nor done)."""
    module, _, inner = source.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / inner


def _resolve_sources(doc: ModelGroupsFile, base: Path) -> ModelGroupsFile:
    groups = {group_id: _resolve_group(group, base) for group_id, group in doc.groups.items()}
    return ModelGroupsFile(groups=groups, default_group=doc.default_group)


def _resolve_group(group: GroupSpec, base: Path) -> GroupSpec:
    models = []
    for m in group.models:
        source = _resolve(m, base)
        models.append(m if source == m.source else m.model_copy(update={"source": source}))
    return GroupSpec(models=tuple(models))


def _resolve(m: ModelSpec, base: Path) -> str:
    if m.source.startswith(PACKAGE_PREFIX):
        found = package_path(m.source)
        if found is None:
            package = m.source.removeprefix(PACKAGE_PREFIX).partition("/")[0]
            raise ConfigError(
                f"MODEL_GROUPS: model {m.id!r} comes from the Python package {package!r}, "
                "which is not installed in this environment"
            )
        return str(found)
    if m.source.startswith("~"):
        return os.path.expanduser(m.source)
    if m.source.startswith("."):
        return str((base / m.source).resolve())
    return m.source
