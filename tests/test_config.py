"""Settings precedence: defaults < config file < MQTTALK_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqttalk import Settings
from mqttalk.errors import UsageError


def test_defaults_need_no_configuration(isolated_home: Path) -> None:
    s = Settings.load()
    assert s.broker is None and s.prefix == "mqttalk/v1" and s.connect_timeout == 5.0
    assert s.state_dir == isolated_home / ".local" / "state" / "mqttalk"


def test_file_then_environment_then_flags(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = isolated_home / ".config" / "mqttalk" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('broker = "mqtt://from-file:1883"\nprefix = "plant/7/mqttalk"\nconnect_timeout = 2\n')
    s = Settings.load()
    assert (s.broker, s.prefix, s.connect_timeout) == ("mqtt://from-file:1883", "plant/7/mqttalk", 2.0)
    monkeypatch.setenv("MQTTALK_BROKER", "mqtt://from-env:1883")
    assert Settings.load().broker == "mqtt://from-env:1883"
    assert Settings.load().prefix == "plant/7/mqttalk"  # the file still counts for what env does not set
    assert Settings.load(broker="mqtt://from-flag:1883").broker == "mqtt://from-flag:1883"


def test_config_file_location_can_be_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("[mqttalk]\nembedded_port = 18999\n")
    monkeypatch.setenv("MQTTALK_CONFIG", str(cfg))
    assert Settings.load().embedded_port == 18999


def test_bad_settings_say_where_to_look(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTALK_CONNECT_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="connect_timeout"):
        Settings.load()
    monkeypatch.delenv("MQTTALK_CONNECT_TIMEOUT")
    cfg = isolated_home / ".config" / "mqttalk" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("broker = [unclosed\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        Settings.load()
    cfg.write_text("brokr = 'typo'\n")
    with pytest.raises(UsageError, match="brokr"):
        Settings.load()


def test_the_shipped_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "mqttalk.toml"
    monkeypatch.setenv("MQTTALK_CONFIG", str(example))
    s = Settings.load()
    assert (s.broker, s.prefix, s.connect_timeout, s.heartbeat) == ("mqtt://127.0.0.1:1883", "mqttalk/v1", 5.0, 10.0)
