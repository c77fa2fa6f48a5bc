"""Brokers for the compatibility matrix: NATS (MQTT listener) and RabbitMQ (rabbitmq_mqtt), each started
from the very file in config/ with ports and directories of the test session's own.

A broker that cannot be had on this machine (not installed, no right to run it) is skipped with the
reason; one that is installed but does not start is an error, with the tail of its log.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import end_process, free_port, listening, wait_listening

CONFIG = Path(__file__).resolve().parent.parent / "config"


@dataclass(frozen=True)
class MatrixBroker:
    """One broker of the matrix, as the tests see it."""

    name: str
    url: str  # mqtt://[user:pass@]127.0.0.1:PORT, for `mqttalk create --broker`
    version: str
    protocol: str  # what `mqttalk status` reports: "MQTT 5" or "MQTT 3.1.1"


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace whole lines of a config file: each regex (multiline) must match exactly once, so a change
    to the shipped file that the fixtures no longer understand fails loudly instead of being ignored."""
    for pattern, line in replacements.items():
        text, n = re.subn(pattern, line, text, flags=re.MULTILINE)
        if n != 1:
            raise AssertionError(f"{pattern!r} matched {n} lines of the config file, expected 1")
    return text


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


class NatsBroker:
    """nats-server with JetStream and its MQTT listener, from config/nats-server.conf."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("nats-server") or (
            "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
        )
        if exe is None:
            pytest.skip("nats-server is not installed (apt-get install nats-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-server.conf"
        conf.write_text(
            substitute(
                (CONFIG / "nats-server.conf").read_text(),
                {
                    r"^listen: .*$": f"listen: 127.0.0.1:{free_port()}",
                    r"^    store_dir: .*$": f'    store_dir: "{self.dir / "jetstream"}"',
                    r"^    listen: .*$": f"    listen: 127.0.0.1:{self.port}",
                },
            )
        )
        self.version = (
            subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
            .stdout.strip()
            .rsplit(" ", 1)[-1]
            .lstrip("v")
        )
        log = self.dir / "nats.log"
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf), "-l", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_listening(self.port, self.proc, timeout=30)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"nats-server did not start: {exc}\n{tail(log)}") from None

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None


class RabbitBroker:
    """A RabbitMQ node of the test session's own with rabbitmq_mqtt, from config/rabbitmq.conf and
    config/rabbitmq.enabled_plugins, next to (never touching) the machine's own node.

    Debian's scripts run the node as the `rabbitmq` user (they `su` to it when run by root), so its
    directories live in a fresh /tmp directory that user owns. It takes 10-30 s to boot: start it once.
    """

    USER = "mqttalk"

    def __init__(self, name: str = "test", config: Path = CONFIG / "rabbitmq.conf", password: str = "") -> None:
        self.node = f"mqttalk-{name}-{os.getpid()}@localhost"
        self.config = config
        self.port = free_port()
        self.password = password or os.urandom(9).hex()
        self.dir: Path | None = None
        self.version = ""
        self.started = False
        self.own_epmd = False  # Erlang starts epmd (port 4369) if none runs: then it is ours to stop

    @property
    def url(self) -> str:
        return f"mqtt://{self.USER}:{self.password}@127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        assert self.dir is not None
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),  # not the system node's
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
        }

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # No RABBITMQ_DIST_PORT here: the CLI would listen on that port + 10000.
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        self.boot()
        self.ready()
        self.add_user()

    def boot(self) -> None:
        """Start the node in the background (``ready`` waits for it)."""
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        try:
            rabbit = pwd.getpwnam("rabbitmq")
        except KeyError:
            pytest.skip("there is no rabbitmq user to run a RabbitMQ node as")
        if os.geteuid() not in (0, rabbit.pw_uid):
            pytest.skip("RabbitMQ's scripts run only as root or the rabbitmq user")
        plugins = CONFIG / "rabbitmq.enabled_plugins"
        self.dir = Path(tempfile.mkdtemp(prefix="mqttalk-rabbitmq-"))
        self.dir.chmod(0o755)
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq-env.conf").write_text("")
        shutil.copy(plugins, self.dir / "enabled_plugins")
        (self.dir / "rabbitmq.conf").write_text(
            substitute(
                self.config.read_text(),
                {
                    r"^listeners\.tcp\.default = .*$": f"listeners.tcp.default = 127.0.0.1:{free_port()}",
                    r"^mqtt\.listeners\.tcp\.default = .*$": f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
                },
            )
        )
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, rabbit.pw_uid, rabbit.pw_gid)
        env = {
            **self._env(),
            "RABBITMQ_DIST_PORT": str(free_port()),
            # the node's Erlang distribution listens on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.own_epmd = not listening(4369)
        started = subprocess.run(
            ["rabbitmq-server", "-detached"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        self.started = True
        if started.returncode != 0:
            raise RuntimeError(
                f"rabbitmq-server -detached exited {started.returncode}: "
                f"{started.stderr or started.stdout}\n{tail(self.log)}"
            )

    @property
    def log(self) -> Path:
        assert self.dir is not None
        return self.dir / "log" / f"{self.node}.log"

    def ready(self) -> None:
        """Wait until the node listens for MQTT (10-30 s after ``boot``)."""
        log = self.log
        deadline = time.monotonic() + 90  # 10-30 s on an idle machine; more on a busy one
        while not listening(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"RabbitMQ node {self.node} did not open MQTT port {self.port} within 90 s\n{tail(log)}"
                )
            time.sleep(0.2)
        found = re.search(r"Starting RabbitMQ ([0-9][0-9.]*)", log.read_text(errors="replace"))
        self.version = found.group(1) if found else "?"

    def add_user(self) -> None:
        for args in (
            ["add_user", self.USER, self.password],
            ["set_permissions", "-p", "/", self.USER, ".*", ".*", ".*"],
        ):
            res = self.ctl(*args)
            if res.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {args[0]} failed: {res.stderr or res.stdout}")

    def kill(self) -> None:
        """kill -9 the node's Erlang VM: a node lost, no goodbye to the cluster."""
        assert self.dir is not None
        pid_file = self.dir / "mnesia" / f"{self.node}.pid"
        subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)

    def stop(self) -> None:
        if self.started:
            res = self.ctl("stop")
            if res.returncode != 0 and self.dir is not None:  # last resort: the node's own pid
                pid_file = self.dir / "mnesia" / f"{self.node}.pid"
                if pid_file.exists():
                    subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)
            self.started = False
            if self.own_epmd and shutil.which("epmd"):
                # epmd refuses to go while any node (another test session's) still uses it
                subprocess.run(["epmd", "-kill"], capture_output=True, timeout=10, check=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
