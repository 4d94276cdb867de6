"""Every setting a component reads is documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gpufleet.local.up import UpSettings
from gpufleet.operator.settings import OperatorSettings
from gpufleet.pod_server.settings import PodServerSettings
from gpufleet.router.settings import RouterSettings

pytestmark = pytest.mark.unit
README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("settings", [PodServerSettings, RouterSettings, UpSettings, OperatorSettings])
def test_every_setting_is_in_the_readme(settings: type[BaseSettings]) -> None:
    prefix = str(settings.model_config.get("env_prefix") or "")
    names = [f"{prefix}{name}".upper() for name in settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in README]
    assert not missing, f"undocumented settings of {settings.__name__}: {missing}"


def test_the_request_field_table_is_the_code() -> None:
    from gpufleet.api.fields import support_table

    assert support_table() in README, "README's request field table differs from gpufleet.api.fields.support_table()"
