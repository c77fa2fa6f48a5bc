"""mqttalk on a three-node NATS cluster (issue #17), next to one nats-server run in the same session.

    .venv/bin/python bench/cluster.py [--channels 500] [--probes 100] [--rounds 3]

1. Pairing (create, wait, pair; both PAIRED) and one message (send -> the reader's live connection
   stored it): peers on the same node vs on different nodes of the cluster, and on a single node.
2. Failover: a reader's session has 1,000 messages queued; its node is killed (kill -9); time until the
   reader, whose URL lists that node first, is connected to another node and has stored all 1,000.
   Reference: the same reader catching up on 1,000 with nothing killed.
3. Scale: CHANNELS channels, peers spread over the three nodes (channel i on node i % 3), every peer's
   live connection open; each node's resident memory, next to one nats-server holding the same
   channels, and bench/scale.py's single Mosquitto (bench/RESULTS.md).

Plain Python (nats-server from the distribution, the config files in config/); prints markdown and
writes bench/out/cluster.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, ROOT, free_port, wait_port

CONFIG = ROOT / "config"
NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
BODY = "status: 14 failing in test/users.test.ts (POST /users 409 on duplicate email); working on it"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sub(text: str, pattern: str, line: str) -> str:
    text, n = re.subn(pattern, line, text, flags=re.MULTILINE)
    if n != 1:
        raise SystemExit(f"bench: {pattern!r} matched {n} lines of the config file")
    return text


class Node:
    def __init__(self, name: str, directory: Path) -> None:
        self.name, self.dir = name, directory
        self.port, self.client, self.http, self.route = free_port(), free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, routes: list[int] | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = (CONFIG / ("nats-cluster.conf" if routes else "nats-server.conf")).read_text()
        text = sub(text, r"^listen: .*$", f"listen: 127.0.0.1:{self.client}")
        text = sub(text, r"^    store_dir: .*$", f'    store_dir: "{self.dir / "js"}"')
        if routes:
            text = sub(text, r"^server_name: .*$", f"server_name: {self.name}")
            text = sub(text, r"^http: .*$", f"http: 127.0.0.1:{self.http}")
            text = sub(text, r"^    listen: 127\.0\.0\.1:6222$", f"    listen: 127.0.0.1:{self.route}")
            text = sub(
                text,
                r"^    routes: .*$",
                "    routes: [" + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes) + "]",
            )
            text = sub(text, r"^    listen: 127\.0\.0\.1:1883$", f"    listen: 127.0.0.1:{self.port}")
        else:
            text = sub(text, r"^    listen: .*$", f"    listen: 127.0.0.1:{self.port}")
        (self.dir / "nats.conf").write_text(text)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS, "-c", str(self.dir / "nats.conf"), "-l", str(self.dir / "nats.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 90)

    def jsz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/jsz?accounts=true&streams=true", timeout=5) as r:
            report: dict[str, Any] = json.load(r)
        return report

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None


class Cluster:
    def __init__(self, root: Path, size: int) -> None:
        self.nodes = [Node(f"n{i + 1}", root / f"n{i + 1}") for i in range(size)]
        for node in self.nodes:
            node.configure([n.route for n in self.nodes] if size > 1 else None)

    def url(self, first: int = 0) -> str:
        k = len(self.nodes)
        return "mqtt://" + ",".join(f"127.0.0.1:{self.nodes[(first + i) % k].port}" for i in range(k))

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if len(self.nodes) > 1:
            self.wait_leaders()
        # the first MQTT client makes NATS's MQTT streams (three replicas: every node must be up)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", self.nodes[0].port)
        c.loop_start()
        deadline = time.monotonic() + 30
        while not c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.1)
        c.disconnect()
        c.loop_stop()

    def wait_leaders(self, timeout: float = 60) -> float:
        t = time.monotonic()
        alive = {n.name for n in self.nodes if n.proc is not None}
        while time.monotonic() - t < timeout:
            try:
                report = next(n for n in self.nodes if n.proc is not None).jsz()
                streams = [s for a in report.get("account_details", []) for s in a.get("stream_detail", [])]
                leader = (report.get("meta_cluster") or {}).get("leader")
                if leader in alive and all(s.get("cluster", {}).get("leader") in alive for s in streams):
                    return time.monotonic() - t
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("bench: the NATS cluster elected no leaders")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


FAILED_PAIRINGS: list[str] = []  # attempts the cluster did not complete (reported with the figures)


def pair(url_a: str, url_b: str, root: Path, i: int) -> tuple[Any, Any, float]:
    """:func:`pair_once`, tried up to three times: a busy cluster may not place a new session's replicated
    consumers within the connect timeout (each failure is counted and reported)."""
    for attempt in range(3):
        try:
            return pair_once(url_a, url_b, root / f"try{attempt}", i)
        except Exception as exc:  # noqa: BLE001 - any failure: count it, report it, try again
            FAILED_PAIRINGS.append(str(exc))
            print(f"bench: pairing {root.name}/{i}, attempt {attempt + 1} failed: {exc}", flush=True)
            time.sleep(2)
    raise SystemExit(f"bench: {root.name}/{i} did not pair in 3 attempts")


def pair_once(url_a: str, url_b: str, root: Path, i: int) -> tuple[Any, Any, float]:
    """impl creates through url_a and waits; tests pairs through url_b (same channel, its nodes in
    another order). Returns both channels and the seconds it took."""
    import mqttalk

    a_dir, b_dir = root / "a" / str(i), root / "b" / str(i)
    a_dir.mkdir(parents=True)
    b_dir.mkdir(parents=True)
    t = time.perf_counter()
    impl = mqttalk.create("impl", settings=mqttalk.Settings(broker=url_a, state_dir=root / "a-state"), cwd=a_dir)
    waited: list[list[str]] = []

    def wait() -> None:
        try:
            waited.append(impl.join(30, new_challenge=False))
        except Exception as exc:  # noqa: BLE001 - reported by the check below
            waited.append([f"error: {exc}"])

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    theirs = url_b + impl.url.render()[len(url_a) :]
    tests = mqttalk.pair(theirs, "tests", settings=mqttalk.Settings(state_dir=root / "b-state"), cwd=b_dir, wait=30)
    waiter.join(40)
    took = time.perf_counter() - t
    others = sorted(tests.paired)
    if others != ["impl"] or waited != [["tests"]]:
        raise RuntimeError(f"channel {i} did not pair ({others}, {waited})")
    return impl, tests, took


def one_message(impl: Any, tests: Any, probes: int) -> list[float]:
    arrived: list[float] = []
    tests.on_event = lambda e: arrived.append(time.perf_counter()) if e.kind == "message" else None
    out = []
    with impl.live(online=True) as sender, tests.live(online=True) as reader:
        for k in range(probes):
            arrived.clear()
            t = time.perf_counter()
            sender.send(f"{BODY} probe {k}", wait=False)
            sender.drain(timeout=0)
            deadline = time.monotonic() + 30
            while not arrived:
                if time.monotonic() > deadline:
                    raise SystemExit("bench: a probe never arrived")
                reader.poll(0.01)
                sender.poll(0)
            out.append(arrived[0] - t)
            sender.drain(timeout=10)
    return out


def catch_up(tests: Any, count: int) -> tuple[float, float]:
    """Open the reader (retrying while no node will take it) and poll until ``count`` new messages are
    stored; returns (seconds to connected, seconds to all stored), from now."""
    from mqttalk.errors import BrokerUnreachable, TimedOut

    t = time.perf_counter()
    got = [0]
    tests.on_event = lambda e: got.__setitem__(0, got[0] + 1) if e.kind == "message" else None
    deadline = time.monotonic() + 120
    while True:
        live = tests.live(online=True)
        try:
            live.open()
            break
        except (BrokerUnreachable, TimedOut):
            if time.monotonic() > deadline:
                raise SystemExit("bench: the reader found no node to connect to") from None
            time.sleep(0.1)
    connected = time.perf_counter() - t
    with live:
        while got[0] < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the reader caught up on only {got[0]} of {count}")
            live.poll(0.05)
    return connected, time.perf_counter() - t


def send(impl: Any, count: int) -> None:
    with impl.live(online=False) as live:
        for i in range(count):
            live.send(f"{BODY} {i}", wait=False)
        live.drain(timeout=120)


def ms(values: list[float], q: float = 0.5) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def spread(cluster: Cluster, root: Path, channels: int) -> tuple[list[float], float]:
    """``channels`` channels, channel i's peers on node i % nodes (pairing there), then every peer's live
    connection open at once; returns each node's RSS (MiB) and the pairing time."""
    pairs = []
    before = [rss_mib(n.proc.pid) for n in cluster.nodes if n.proc is not None]
    print(f"bench: {len(before)} node(s) before {channels} channels: {before} MiB", flush=True)
    t = time.perf_counter()
    for i in range(channels):
        url = cluster.url(i % len(cluster.nodes))
        impl, tests, _ = pair(url, url, root, i)
        pairs.append((impl, tests))
    took = time.perf_counter() - t
    lives = []
    try:
        for impl, tests in pairs:
            lives += [impl.live(online=True).open(), tests.live(online=True).open()]
        for live in lives:
            live.poll(0)
        after = [rss_mib(n.proc.pid) for n in cluster.nodes if n.proc is not None]
        print(f"bench: after: {after} MiB; pairing all took {took:.0f} s", flush=True)
        return [a - b for a, b in zip(after, before, strict=True)], took
    finally:
        for live in lives:
            live.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=500)
    ap.add_argument("--pairings", type=int, default=8)
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mqttalk-bench-cluster-"))
    lines = [f"# mqttalk on a NATS cluster — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    version = subprocess.run([NATS, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    lines += [f"{version}; three nodes on loopback, MQTT streams and consumers with three replicas.", ""]
    single = Cluster(root / "single", 1)
    cluster = Cluster(root / "cluster", 3)
    try:
        single.start()
        cluster.start()
        rows = []
        for label, url_a, url_b in (
            ("one nats-server", single.url(), single.url()),
            ("cluster, both peers on n1", cluster.url(0), cluster.url(0)),
            ("cluster, impl on n1, tests on n2", cluster.url(0), cluster.url(1)),
        ):
            took, lat = [], []
            for k in range(args.pairings):
                impl, tests, seconds = pair(url_a, url_b, root / re.sub(r"\W+", "-", label), k)
                took.append(seconds)
                if k == 0:
                    lat = one_message(impl, tests, args.probes)
            rows.append((label, took, lat))
            print(f"{label}: pairing {ms(took):.0f} ms, one message {ms(lat):.2f} ms", flush=True)
        base_pair, base_lat = statistics.median(rows[0][1]), statistics.median(rows[0][2])
        lines += [
            "| peers | pairing, median (p95) | one message, median (p95) | vs one nats-server |",
            "|---|---|---|---|",
        ]
        for label, took, lat in rows:
            lines.append(
                f"| {label} | {ms(took):.0f} ms ({ms(took, 0.95):.0f}) | {ms(lat):.2f} ms ({ms(lat, 0.95):.2f}) | "
                f"pairing {statistics.median(took) / base_pair:.2f}x, "
                f"message {statistics.median(lat) / base_lat:.2f}x |"
            )
        if args.channels:  # before any node is killed: all three current
            per_node, took_c = spread(cluster, root / "spread", args.channels)
            one, took_1 = spread(single, root / "spread-single", args.channels)
            idle = "see bench/RESULTS.md, bench/scale.py: one Mosquitto, 500 channels: 13.3-14.6 MiB"
            lines += [
                "",
                f"| {args.channels} channels, all {2 * args.channels} peers connected "
                "| resident memory added | pairing all |",
                "|---|---|---|",
                f"| cluster, per node (n1, n2, n3) | {', '.join(f'{m:.0f}' for m in per_node)} MiB (sum "
                f"{sum(per_node):.0f}) | {took_c:.0f} s |",
                f"| one nats-server | {one[0]:.0f} MiB | {took_1:.0f} s |",
                f"| ratio, cluster sum / one server | {sum(per_node) / one[0]:.1f}x | {took_c / took_1:.1f}x |",
                f"| one Mosquitto (bench/scale.py) | {idle} | |",
            ]
        # failover: the reader's node killed with 1,000 queued for it
        killed, calm = [], []
        for r in range(args.rounds):  # a fresh cluster each round: a node started again may stay behind
            victim = r % 3
            fresh = Cluster(root / f"failover-cluster-{r}", 3)
            try:
                fresh.start()
                impl, tests, _ = pair(fresh.url(victim), fresh.url(victim), root / f"failover-{r}", 0)
                send(impl, 1000)
                calm.append(catch_up(tests, 1000)[1])  # reference: nothing killed
                send(impl, 1000)
                fresh.nodes[victim].kill()
                connected, caught = catch_up(tests, 1000)
            finally:
                fresh.stop()
            killed.append((connected, caught))
            print(
                f"failover round {r}: connected after {connected:.2f} s, all 1000 after {caught:.2f} s "
                f"(nothing killed: {calm[-1]:.2f} s)",
                flush=True,
            )
        conn = [c for c, _ in killed]
        done = [d for _, d in killed]
        lines += [
            "",
            "| failover: reader's node killed, 1,000 queued | median | range | reference: nothing killed | ratio |",
            "|---|---|---|---|---|",
            f"| kill -9 -> reader connected to another node | {statistics.median(conn):.2f} s | "
            f"{min(conn):.2f}-{max(conn):.2f} s | | |",
            f"| kill -9 -> reader has stored all 1,000 | {statistics.median(done):.2f} s | {min(done):.2f}-"
            f"{max(done):.2f} s | {statistics.median(calm):.2f} s | "
            f"{statistics.median(done) / statistics.median(calm):.1f}x |",
        ]
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - what was measured so far is still reported
        lines += ["", f"(the bench stopped early: {exc})"]
    finally:
        cluster.stop()
        single.stop()
        shutil.rmtree(root, ignore_errors=True)
    lines += [
        "",
        f"Pairing attempts that failed and were tried again (the cluster did not place a new session's "
        f"consumers within the 5 s connect timeout): {len(FAILED_PAIRINGS)}.",
    ]
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
