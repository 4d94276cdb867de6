"""What every component's settings share: comma-separated lists, and one clear start-up error."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from gpufleet.api.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)


def split_csv(value: Any) -> Any:
    """'a, b,,c' -> ['a', 'b', 'c']; lists pass through (use as a mode='before' validator)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def parse_settings(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment; a bad value becomes one message naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        prefix = str(cls.model_config.get("env_prefix") or "")
        msg = str(first["msg"]).removeprefix("Value error, ")
        if not first["loc"]:  # a whole-model check already names its setting
            raise ConfigError(msg) from None
        name = f"{prefix}{str(first['loc'][0]).upper()}"
        raise ConfigError(f"{name}: {msg} (got {first.get('input')!r})") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
