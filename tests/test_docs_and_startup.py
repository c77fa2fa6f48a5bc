"""Docs that match the code, and a CLI that starts without what it does not need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mqttalk._config import settings_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_generated_from_the_model() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings-table -->\n", 1)[1].split("<!-- /settings-table -->", 1)[0].strip()
    assert table == settings_table()


def test_readme_quick_start_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    first, second = [line for line in block.splitlines() if line.strip()]
    assert "mqttalk demo" in first
    assert second in ci.splitlines()


def _imported_by(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}


def test_importing_the_cli_pulls_in_no_heavy_module() -> None:
    mods = _imported_by("import mqttalk.cli")
    for heavy in ("amqtt", "sqlite3", "paho.mqtt.client", "pydantic", "yaml", "asyncio"):
        assert heavy not in mods, f"`import mqttalk.cli` imports {heavy}"


def test_importing_the_package_is_lazy() -> None:
    mods = _imported_by("import mqttalk")
    assert "pydantic" not in mods and "paho.mqtt.client" not in mods


def test_demo_runs_the_whole_story(isolated_home: Path) -> None:
    """The README's first command ends with `mqttalk demo`: it must work on a fresh machine."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mqttalk"), "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mqttalk demo: OK" in proc.stdout
    for step in (
        "PAIRED with impl",
        "PAIRED with tests",
        "kind=spec",
        "state=agreed",
        "state=red",
        "state=green",
        "impl [implements POST /users]: left",
    ):
        assert step in proc.stdout
    # Presence updates a session's broker queue kept while it was away arrive next to the newer retained
    # one (on amqtt, after it): stale copies, no replay, and nothing to alarm a newcomer with.
    assert "DROPPED" not in proc.stdout, proc.stdout
