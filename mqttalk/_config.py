"""Settings: defaults < config file < MQTTALK_* environment < flags. One pydantic model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import UsageError

ENV_PREFIX = "MQTTALK_"


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / default


class Settings(BaseModel):
    """Every setting mqttalk reads. Each field F is also read from environment variable MQTTALK_<F>."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    broker: str | None = Field(
        None,
        description="Broker URL for `create` (mqtt://host:port; a cluster: mqtt://n1:port,n2:port,...). "
        "Unset: the embedded broker.",
    )
    prefix: str = Field("mqttalk/v1", description="Topic prefix new channels live under.")
    channel: str | None = Field(
        None, description="Join URL of the channel to act on (overrides this directory's binding)."
    )
    peer: str | None = Field(None, description="Peer name to act as (overrides this directory's binding).")
    connect_timeout: float = Field(5.0, gt=0, le=120, description="Seconds to wait for the broker to answer.")
    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) to verify an mqtts:// or wss:// broker with, instead of the system's."
    )
    ws_path: str = Field(
        "/mqtt", description="HTTP path of the broker's MQTT-over-websockets endpoint (ws://, wss://)."
    )
    heartbeat: float = Field(
        10.0, ge=0.2, le=3600, description="Seconds between presence heartbeats of a live process."
    )
    repair_timeout: float = Field(
        300.0,
        ge=0,
        le=30 * 24 * 3600,
        description="Seconds a reader waits for a sender to resend messages that never arrived before it shows a GAP.",
    )
    embedded_host: str = Field("127.0.0.1", description="Interface the embedded broker listens on.")
    embedded_port: int = Field(1884, ge=0, le=65535, description="Port of the embedded broker (0 or busy: a free one).")
    state_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "mqttalk",
        description="Where bindings, the message store and the embedded broker's pid live.",
    )

    @classmethod
    def load(cls, **flags: Any) -> Settings:
        """Build settings from the config file, then the environment, then non-None ``flags``."""
        values: dict[str, Any] = {}
        path = config_path()
        if path.is_file():
            import tomllib

            try:
                file_values = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
            values.update(file_values.get("mqttalk", file_values))
        for name in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env:
                values[name] = env
        values.update({k: v for k, v in flags.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise UsageError(
                f"setting {where!r} is not valid: {err['msg']}", f"check {ENV_PREFIX}{where.upper()}, flags and {path}"
            ) from None


def config_path() -> Path:
    """The config file: $MQTTALK_CONFIG, else $XDG_CONFIG_HOME/mqttalk/config.toml."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CONFIG_HOME", ".config") / "mqttalk" / "config.toml"


def settings_table() -> str:
    """The README's settings table, generated from :class:`Settings` (a test keeps README in step)."""
    rows = ["| setting | environment | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "`$XDG_STATE_HOME/mqttalk`" if name == "state_dir" else "(computed)"
        else:
            default = "unset" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)
