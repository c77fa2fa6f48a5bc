"""Fixtures: real brokers on loopback, isolated homes, and sessions that run the real `mqttalk` command."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _forkserver
import pytest

MQTTALK = str(Path(sys.executable).parent / "mqttalk")
MOSQUITTO_PORT = 1883
# Sessions run `mqttalk` commands as processes forked from a server that has imported mqttalk already
# (tests/_forkserver.py): real processes, without ~0.3 s of interpreter and imports each. Set
# MQTTALK_TEST_EXEC=1 to start every one with a fresh interpreter instead.
FRESH_EXEC = os.environ.get("MQTTALK_TEST_EXEC", "") not in ("", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on port {port} after {timeout}s")
        time.sleep(0.05)


def end_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a broker process started by a test: SIGTERM (brokers save their state), SIGKILL if it hangs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def running(broker: Any) -> Iterator[Any]:
    """A fixture's body for a broker: started, handed over, stopped even if the start or a test failed."""
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers per core. A test mostly waits (on brokers, on timeouts it tests, on the
    processes it runs): with one worker per core the cores stayed ~40 % idle."""
    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup, with every RabbitMQ test in one group: one worker boots one node (10-30 s, and two
        at once on two cores take longer still), and every NATS cluster test in another (test_cluster.py shares one
    cluster between them); the other brokers start in a second or less. (The group is
        made here from the test ids: xdist 3.8's xdist_group mark no longer reaches its scheduler under
        pytest 9.2, whose node ids it can no longer rewrite.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class RabbitOnOneWorker(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if "rabbitmq" in nodeid:
                return "rabbitmq"
            if "test_cluster.py" in nodeid and "nats" in nodeid:  # one NATS cluster for them all
                return "nats_cluster"
            return str(super()._split_scope(nodeid))

    return RabbitOnOneWorker(config, log)


@pytest.fixture(scope="session", autouse=True)
def fork_server() -> Iterator[None]:
    """The fork server of this test process is stopped at its end (it starts on first use)."""
    yield
    _forkserver.SERVER.stop()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own HOME, config and state directories; no MQTTALK_* from the developer."""
    home = tmp_path / "home"
    home.mkdir()
    for var in list(os.environ):
        if var.startswith("MQTTALK_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    return home


class EmbeddedBroker:
    """`mqttalk broker` (amqtt) as a real process on a free port; can be stopped and started again."""

    def __init__(self, state_dir: Path, *, websockets: bool = False, memory: bool = False) -> None:
        self.port = free_port()
        self.ws_port = free_port() if websockets else None
        self.state_dir = state_dir
        self.memory = memory  # keep nothing across restarts (`mqttalk broker --memory`)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MQTTALK_STATE_DIR": str(self.state_dir)}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "broker.log", "ab")
        ws = ["--ws-port", str(self.ws_port)] if self.ws_port else []
        ws += ["--memory"] if self.memory else []
        self.proc = subprocess.Popen(
            [MQTTALK, "broker", "--port", str(self.port), *ws], env=env, stdout=log, stderr=log
        )
        log.close()
        wait_listening(self.port, self.proc)
        if self.ws_port:
            wait_listening(self.ws_port, self.proc)

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None


class ConfiguredEmbedded(EmbeddedBroker):
    """The embedded broker run from a copy of broker/mqttalk-broker.yaml with ``limits`` changed."""

    def __init__(self, state_dir: Path, **limits: Any) -> None:
        super().__init__(state_dir)
        self.limits = limits

    def start(self) -> None:
        import yaml
        from mqttalk_broker import CONFIG_FILE

        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(CONFIG_FILE.read_text())
        config["limits"].update(self.limits)
        path = self.state_dir / "mqttalk-broker.yaml"
        path.write_text(yaml.safe_dump(config))
        script = (
            "import sys; from pathlib import Path; from mqttalk_broker import run; "
            "run(port=int(sys.argv[1]), config_file=Path(sys.argv[2]), db=Path(sys.argv[3]))"
        )
        log = open(self.state_dir / "broker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, str(self.port), str(path), str(self.state_dir / "broker.sqlite3")],
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_listening(self.port, self.proc)


class PrivateMosquitto:
    """A Mosquitto of the test's own, on a free port, with persistence on; can be restarted."""

    def __init__(self, directory: Path, **options: object) -> None:
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",
            "persistence true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.dir}/mosquitto.log",
        ]
        lines += [f"{key} {value}" for key, value in options.items()]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(self.port, self.proc)

    def stop(self) -> None:
        end_process(self.proc)  # SIGTERM: mosquitto writes its persistence file, then exits
        self.proc = None


@pytest.fixture(params=["mosquitto", "amqtt"])
def durable_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateMosquitto | EmbeddedBroker]:
    """A broker of this test's own that it may stop and start: Mosquitto with persistence on, or the
    embedded broker (which keeps its sessions in SQLite)."""
    broker: PrivateMosquitto | EmbeddedBroker
    if request.param == "mosquitto":
        broker = PrivateMosquitto(tmp_path / "mosquitto")
    else:
        broker = EmbeddedBroker(tmp_path / "amqtt-state")
    yield from running(broker)


@pytest.fixture(scope="session")
def amqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    yield from running(EmbeddedBroker(tmp_path_factory.mktemp("amqtt-state")))


@pytest.fixture(scope="session")
def private_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test session's own (the machine's one on 1883 may be configured otherwise)."""
    yield from running(PrivateMosquitto(tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def nats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """nats-server with JetStream and its MQTT listener, from config/nats-server.conf (see _brokers.py)."""
    from _brokers import NatsBroker

    yield from running(NatsBroker(tmp_path_factory.mktemp("nats")))


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[object]:
    """A RabbitMQ node with rabbitmq_mqtt, from config/rabbitmq.conf; booted once per test session."""
    from _brokers import RabbitBroker

    yield from running(RabbitBroker())


@pytest.fixture(scope="session")
def rabbitmq_cluster() -> Iterator[object]:
    """Two clustered RabbitMQ nodes from config/rabbitmq-cluster.conf; booted once per test session (on
    the worker that runs every RabbitMQ test), and lost by the one test that uses it."""
    from _clusters import RabbitCluster

    yield from running(RabbitCluster())


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """The machine's Mosquitto on 127.0.0.1:1883, started if it is down."""
    if not listening(MOSQUITTO_PORT):
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        subprocess.run(["mosquitto", "-d", "-c", "/etc/mosquitto/mosquitto.conf"], check=False)
        try:
            wait_listening(MOSQUITTO_PORT, timeout=10)
        except RuntimeError as exc:
            pytest.skip(f"mosquitto would not start on 127.0.0.1:{MOSQUITTO_PORT}: {exc}")
    return f"mqtt://127.0.0.1:{MOSQUITTO_PORT}"


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Every broker-facing test runs against Mosquitto (MQTT 5) and the embedded amqtt (MQTT 3.1.1)."""
    if request.param == "mosquitto":
        return str(request.getfixturevalue("mosquitto_url"))
    return str(request.getfixturevalue("amqtt_broker").url)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


class Session:
    """One coding-agent session: a working directory and a HOME, running the real `mqttalk` command."""

    def __init__(self, name: str, root: Path, home: Path | None = None) -> None:
        self.name = name
        self.cwd = root / name
        self.cwd.mkdir(parents=True)
        self.home = home or root / f"{name}-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTALK_")}
        self.env.update(
            HOME=str(self.home),
            XDG_STATE_HOME=str(self.home / ".local" / "state"),
            XDG_CONFIG_HOME=str(self.home / ".config"),
        )

    @property
    def state_dir(self) -> Path:
        return self.home / ".local" / "state" / "mqttalk"

    def run(
        self, *args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
    ) -> Result:
        if FRESH_EXEC:
            proc = subprocess.run(
                [MQTTALK, *args],
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            return Result(proc.returncode, proc.stdout, proc.stderr)
        code, out, err = _forkserver.run(
            [MQTTALK, *args], cwd=self.cwd, env={**self.env, **(env or {})}, input=input, timeout=timeout
        )
        return Result(code, out, err)

    def ok(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        res = self.run(*args, input=input, env=env)
        assert res.code == 0, f"mqttalk {' '.join(args)} exited {res.code}\nstdout: {res.out}\nstderr: {res.err}"
        return res

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        if FRESH_EXEC:
            return subprocess.Popen(
                [MQTTALK, *args],
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        proc = _forkserver.Forked([MQTTALK, *args], cwd=self.cwd, env={**self.env, **(env or {})}, stdin_pipe=False)
        return proc  # type: ignore[return-value]  # (the parts of Popen's interface the tests use)

    def settings(self) -> object:
        """Library settings as this session's `mqttalk` sees them (its state directory)."""
        from mqttalk import Settings

        return Settings(state_dir=self.state_dir)

    def channel(self) -> object:
        """The library's Channel for this session's directory binding."""
        import mqttalk

        return mqttalk.open_channel(self.settings(), cwd=self.cwd)  # type: ignore[arg-type]


@pytest.fixture
def sessions(tmp_path: Path) -> tuple[Session, Session]:
    """Two sessions as on two machines: separate working directories and separate homes."""
    return Session("impl", tmp_path), Session("tests", tmp_path)


def channel_topics(url: str) -> object:
    """The topic names of a channel, as its peers derive them (keyed hashes when sealed)."""
    from mqttalk import JoinURL
    from mqttalk._seal import Seal
    from mqttalk._topics import Topics

    join = JoinURL.parse(url)
    return Topics(join.prefix, join.channel, Seal.from_token(join.key) if join.key else None)


def status_of(session: Session) -> dict[str, object]:
    """The `status --json` object (other lines, such as a PAIRED notice, may come before it)."""
    lines = [json.loads(line) for line in session.ok("status", "--json").lines]
    return next(obj for obj in lines if obj.get("event") == "status")


def until_listening(proc: subprocess.Popen[str]) -> str:
    """Wait until a started `mqttalk listen` says it is listening (connected, subscribed, its presence
    online); returns what it wrote to stderr until then, for a test that checks its stderr."""
    assert proc.stderr is not None
    seen = ""
    while "mqttalk: listening as " not in (line := proc.stderr.readline()):
        assert line, f"listen ended before it listened: {seen}"
        seen += line
    return seen + line


def join_url(result: Result) -> str:
    for line in result.lines:
        if line.startswith("join URL: "):
            return line.split(": ", 1)[1]
    raise AssertionError(f"no join URL in:\n{result.out}")


def read_join_url(proc: subprocess.Popen[str]) -> str:
    """The join URL a running `mqttalk create --wait` prints (before it waits)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("join URL: "):
            return line.split(": ", 1)[1].strip()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f"create exited {proc.returncode} before printing the join URL: {err}")


def paired(
    impl: Session,
    tests: Session,
    broker: str | None,
    *create_flags: str,
    pair_flags: tuple[str, ...] = (),
    url_on_stdin: bool = False,
    env: dict[str, str] | None = None,
) -> str:
    """Create as impl (waiting, so it answers the pairing challenge at once) and pair as tests; both
    print PAIRED. ``broker`` None: the embedded one. Returns the join URL."""
    where = ("--broker", broker) if broker else ()
    proc = impl.start("create", "--as", "impl", *where, "--wait", "30", *create_flags, env=env)
    url = read_join_url(proc)
    if url_on_stdin:
        res = tests.ok("pair", "-", "--as", "tests", *pair_flags, input=url + "\n", env=env)
    else:
        res = tests.ok("pair", url, "--as", "tests", *pair_flags, env=env)
    assert "mqttalk: PAIRED with impl" in res.out
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "mqttalk: PAIRED with tests" in out, f"create --wait: {out}\n{err}"
    return url


def pair_in_process(tmp_path: Path, broker_url: str) -> tuple[Any, Any]:
    """impl and tests paired through the library on one broker, as on two machines (each its own state
    directory and working directory under ``tmp_path``)."""
    import mqttalk

    made = []
    for name in ("impl", "tests"):
        (tmp_path / name).mkdir()
        made.append(mqttalk.Settings.load(broker=broker_url, state_dir=tmp_path / f"{name}-state"))
    impl = mqttalk.create("impl", settings=made[0], cwd=tmp_path / "impl")
    tests = mqttalk.pair(impl.url.render(), "tests", settings=made[1], cwd=tmp_path / "tests", wait=0)
    return impl, tests
