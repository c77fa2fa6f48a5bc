"""Clustered and bridged brokers for tests/test_cluster.py: a NATS cluster, a RabbitMQ cluster, and an edge
Mosquitto bridged to a core through a link a test can cut. Each started from its file in config/, on
loopback ports of its own; nodes are lost with kill -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _brokers import CONFIG, RabbitBroker, substitute, tail
from conftest import end_process, free_port, wait_listening


def nats_exe() -> str:
    exe = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if exe is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    return exe


class NatsNode:
    """One node of a :class:`NatsCluster`: its own ports and JetStream directory; killable, restartable."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.dir = directory
        self.port = free_port()  # MQTT
        self.client_port = free_port()
        self.http_port = free_port()  # monitoring: /jsz says which node leads which stream
        self.route_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # ever killed (and maybe started again since)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, template: str, routes: list[int]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "nats-server.conf").write_text(
            substitute(
                template,
                {
                    r"^server_name: .*$": f"server_name: {self.name}",
                    r"^listen: .*$": f"listen: 127.0.0.1:{self.client_port}",
                    r"^http: .*$": f"http: 127.0.0.1:{self.http_port}",
                    r"^    store_dir: .*$": f'    store_dir: "{self.dir / "jetstream"}"',
                    r"^    listen: 127\.0\.0\.1:6222$": f"    listen: 127.0.0.1:{self.route_port}",
                    r"^    routes: .*$": "    routes: ["
                    + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
                    + "]",
                    r"^    listen: 127\.0\.0\.1:1883$": f"    listen: 127.0.0.1:{self.port}",
                },
            )
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_exe(), "-c", str(self.dir / "nats-server.conf"), "-l", str(self.dir / "nats.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: the node is lost mid-work, with nothing saved or said to the others."""
        self.killed = True
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as answer:
                return bool(json.load(answer).get("status") == "ok")
        except (OSError, ValueError):  # 503 while JetStream is not ready
            return False

    def jsz(self) -> dict[str, Any]:
        """The node's JetStream report: the meta leader, and each MQTT stream and consumer with its leader."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/jsz?accounts=true&streams=true&consumers=true&config=true", timeout=5
        ) as answer:
            report: dict[str, Any] = json.load(answer)
        return report


class NatsCluster:
    """Three nats-server nodes clustered over loopback routes, JetStream and MQTT on each, from
    config/nats-cluster.conf (MQTT streams and consumers with three replicas)."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.dir = directory
        self.nodes = [NatsNode(f"n{i + 1}", directory / f"n{i + 1}") for i in range(size)]
        self.version = ""

    def url(self, *order: int) -> str:
        """The cluster's broker URL, nodes in the given order (default: all, n1 first)."""
        picked = [self.nodes[i] for i in (order or range(len(self.nodes)))]
        return "mqtt://" + ",".join(n.address for n in picked)

    def start(self) -> None:
        exe = nats_exe()
        self.version = (
            subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
            .stdout.strip()
            .rsplit(" ", 1)[-1]
            .lstrip("v")
        )
        template = (CONFIG / "nats-cluster.conf").read_text()
        for node in self.nodes:
            node.write_config(template, [n.route_port for n in self.nodes])
        for node in self.nodes:
            node.start()
        self.wait_ready()
        self._make_mqtt_streams()

    def _make_mqtt_streams(self) -> None:
        """NATS makes its MQTT streams when the first MQTT client connects, with the replicas configured:
        three, so every node must be up then (with one down, that first connect fails: a finding of
        this cluster, see README). Connect once, so a test may lose a node before its peers' first connect."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        client.connect("127.0.0.1", self.nodes[0].port)
        client.loop_start()
        deadline = time.monotonic() + 120  # (a shared, loaded machine: a minute is seen)
        try:
            while "$MQTT_sess" not in self.streams() or not client.is_connected():
                if time.monotonic() > deadline:
                    raise RuntimeError("NATS made no MQTT streams within 120 s")
                time.sleep(0.2)
        finally:
            client.disconnect()
            client.loop_stop()

    def wait_ready(self, timeout: float = 90, *, healthy: bool = True) -> None:
        """Every running node listens for MQTT and knows the JetStream meta leader (before that, an MQTT
        client's first connect fails: NATS cannot make its streams)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.up:
                continue
            try:
                wait_listening(node.port, node.proc, timeout=max(1.0, deadline - time.monotonic()))
                wait_listening(node.http_port, node.proc, timeout=max(1.0, deadline - time.monotonic()))
            except RuntimeError as exc:
                self.stop()
                raise RuntimeError(
                    f"nats-server {node.name} did not start: {exc}\n{tail(node.dir / 'nats.log')}"
                ) from None
            # /healthz: JetStream is on, a meta leader is known, and this node's copies of the streams
            # are current (a node started again catches up before it counts as back)
            while healthy and not node.healthy():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NATS node {node.name} is not healthy\n{tail(node.dir / 'nats.log')}")
                time.sleep(0.1)

    def wait_leaders(self, timeout: float = 90) -> float:
        """Wait until the JetStream meta group and every MQTT stream are led by a node that is up (after a
        node was killed, the survivors notice and elect new leaders: seconds); returns the seconds waited."""
        started = time.monotonic()
        alive = {node.name for node in self.nodes if node.up}
        while True:
            try:
                node = next(n for n in self.nodes if n.up)
                meta = (node.jsz().get("meta_cluster") or {}).get("leader")
                led = [s.get("cluster", {}).get("leader") for s in self.streams().values()]
                if meta in alive and led and all(leader in alive for leader in led):
                    return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"NATS cluster elected no leaders among {sorted(alive)} within {timeout:g} s")
            time.sleep(0.2)

    def revive(self) -> None:
        """Start again every node a test killed (same JetStream directory: it rejoins and catches up)."""
        down = [node for node in self.nodes if not node.up]
        for node in down:
            node.start()
        if down:
            # (not /healthz: a restarted node's own retained-message consumer may take long to count as
            # current; that node serves MQTT clients before, so the next test need not wait for it)
            self.wait_ready(healthy=False)
            self.wait_leaders()

    def streams(self) -> dict[str, dict[str, Any]]:
        """The MQTT streams as a running node reports them: name -> stream detail (leader, replicas,
        messages, consumers)."""
        node = next(n for n in self.nodes if n.up)
        return {
            stream["name"]: stream
            for account in node.jsz().get("account_details", [])
            for stream in account.get("stream_detail", [])
        }

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RabbitCluster:
    """RabbitMQ nodes on this machine clustered with `rabbitmqctl join_cluster`, each from
    config/rabbitmq-cluster.conf with ports, Mnesia and log directories of its own; the Erlang cookie is
    the rabbitmq user's, shared by its nodes. Boots in 20-40 s: start it once per test session."""

    def __init__(self, size: int = 2) -> None:
        password = os.urandom(9).hex()
        config = CONFIG / "rabbitmq-cluster.conf"
        self.nodes = [RabbitBroker(f"c{i + 1}", config, password=password) for i in range(size)]

    def url(self, *order: int) -> str:
        """The cluster's broker URL with credentials, nodes in the given order (default: all, first first)."""
        first = self.nodes[0]
        hosts = ",".join(f"127.0.0.1:{self.nodes[i].port}" for i in (order or range(len(self.nodes))))
        return f"mqtt://{first.USER}:{first.password}@{hosts}"

    @property
    def version(self) -> str:
        return self.nodes[0].version

    def start(self) -> None:
        for node in self.nodes:  # booting at once: on two cores that is still faster than one after the other
            node.boot()
        for node in self.nodes:
            node.ready()
        seed = self.nodes[0]
        seed_up = seed.ctl("await_startup", timeout=120)
        if seed_up.returncode != 0:
            raise RuntimeError(f"RabbitMQ node {seed.node} did not start: {seed_up.stderr[:300]}\n{tail(seed.log)}")
        for node in self.nodes[1:]:
            for args in (["await_startup"], ["stop_app"], ["join_cluster", seed.node], ["start_app"]):
                # A node busy booting on two shared cores may not answer the CLI or its peer at once (seen in
                # a full run: join_cluster "unable to perform an operation" on the seed): try again, as an
                # operator would, before calling it a failure.
                for _attempt in range(3):
                    res = node.ctl(*args, timeout=120)
                    if res.returncode == 0:
                        break
                    time.sleep(5)
                else:
                    said = (res.stderr or res.stdout)[:600]
                    raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.node}: {said}\n{tail(node.log)}")
            node.ready()
        seed.add_user()  # users and permissions are cluster-wide

    def queues(self) -> list[dict[str, Any]]:
        """Every queue with its type, durability and message count, and the node it lives on (each
        running node lists its own: a classic queue's pid does not name its node)."""
        listed: list[dict[str, Any]] = []
        for node in self.nodes:
            if not node.started:
                continue
            res = node.ctl("list_queues", "--local", "name", "type", "durable", "messages", "--formatter", "json")
            json_at = res.stdout.find("\n[")  # (Erlang may print an error report about $HOME first)
            text = res.stdout if res.stdout.startswith("[") else res.stdout[json_at + 1 :]
            try:
                queues = json.loads(text) if res.returncode == 0 and (json_at >= 0 or text.startswith("[")) else None
            except ValueError:
                queues = None
            if queues is None:
                raise RuntimeError(f"rabbitmqctl list_queues on {node.node}: {res.stderr or res.stdout}")
            listed += [{**queue, "node": node.node} for queue in queues]
        return listed

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        node.kill()
        node.started = False  # nothing left to stop; its directories go with stop()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


class Relay:
    """A TCP relay on a free loopback port to a broker's port: the bridge's link, which a test cuts (every
    connection closed, and nothing accepted) for a while, with both brokers running on."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                near, _ = server.accept()
            except OSError:
                return  # closed: cut or stopped
            try:
                far = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                near.close()
                continue
            with self._lock:
                self._open += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        """The link drops: every connection through the relay is closed and no new one is accepted."""
        if self._server is not None:
            with contextlib.suppress(OSError):  # (close alone leaves a thread blocked in accept() accepting)
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def mend(self) -> None:
        """The link is back: the relay accepts again on the same port."""
        self.start()

    def stop(self) -> None:
        self.cut()


class BridgedMosquitto:
    """An edge Mosquitto from config/mosquitto-bridge.conf, bridged (through a :class:`Relay` the test can
    cut) to a core Mosquitto; both with persistence, on loopback ports of their own."""

    def __init__(self, directory: Path) -> None:
        from conftest import PrivateMosquitto

        self.core = PrivateMosquitto(directory / "core")
        self.relay = Relay(self.core.port)
        self.dir = directory / "edge"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def edge_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def core_url(self) -> str:
        return self.core.url

    @property
    def log(self) -> Path:
        return self.dir / "mosquitto.log"

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.core.start()
        self.relay.start()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            substitute(
                (CONFIG / "mosquitto-bridge.conf").read_text(),
                {
                    r"^listener .*$": f"listener {self.port} 127.0.0.1\nuser root\nlog_dest file {self.log}",
                    r"^persistence_location .*$": f"persistence_location {self.dir}/",
                    r"^address .*$": f"address 127.0.0.1:{self.relay.port}",
                },
            )
        )
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(self.port, self.proc)
        self.wait_bridged()

    def wait_bridged(self, timeout: float = 20) -> None:
        """Until the edge's bridge is connected to the core (the core's log says so)."""
        deadline = time.monotonic() + timeout
        core_log = self.core.dir / "mosquitto.log"
        while core_log.read_text(errors="replace").count("as mqttalk-edge-1") <= self._connects:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the edge's bridge did not connect to the core\n{tail(self.log)}")
            time.sleep(0.1)
        self._connects += 1

    _connects = 0

    def stop(self) -> None:
        end_process(self.proc)
        self.proc = None
        self.relay.stop()
        self.core.stop()
