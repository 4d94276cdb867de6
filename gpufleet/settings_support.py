"""What every component's settings share: comma-separated lists, one clear start-up error, and the
fields of every HTTP server (pod server and router)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpufleet.api.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)


class ServerSettings(BaseSettings):
    """Where an HTTP server listens, who may call it, how much it accepts, how much it says.
    Declared once here; PodServerSettings and RouterSettings add their own fields."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = Field(default=None, description="If set, /v1 and /api need 'Authorization: Bearer <key>'.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Larger request bodies get 413.")
    log_level: str = "INFO"
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="An idle client connection is closed after this. Longer than any client pool keeps one idle "
        "(httpx and the openai SDK: 5 s; the router's UPSTREAM_KEEPALIVE_S), so no client reuses a connection "
        "the server is closing.",
    )


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
