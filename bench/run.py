"""mqttalk benchmarks, each next to a reference measured in the same run (the machine is shared and noisy).

    .venv/bin/python bench/run.py [--runs N] [--quick] [--only pairing|send|handoff|imports ...]

Prints a markdown report and writes it to bench/out/latest.md (paste it into bench/RESULTS.md).
Everything targets 127.0.0.1: Mosquitto on 1883 and an embedded amqtt broker started here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent
MQTTALK = str(BIN / "mqttalk")
PAYLOAD = "tests written, all red: 14 failing in test/users.test.ts (POST /users 409 on duplicate email)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on {port}")


def ms(seconds: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    s = sorted(seconds)
    return statistics.median(s) * 1000, s[min(len(s) - 1, int(len(s) * 0.9))] * 1000


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {proc.stderr.decode()[-300:]}")
    return took


def interleaved(cases: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Run each case once per round, rounds repeated: noise from the machine hits all cases alike."""
    got: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm caches (pyc, page cache, protocol cache)
    for _ in range(runs):
        for name, fn in cases.items():
            got[name].append(fn())
    return got


class Env:
    """A scratch HOME with two session directories."""

    def __init__(self, python: Path = BIN) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mqttalk-bench-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTALK_")}
        self.env.update(
            HOME=str(self.root), XDG_STATE_HOME=str(self.root / "state"), XDG_CONFIG_HOME=str(self.root / "config")
        )
        self.a, self.b = self.root / "impl", self.root / "tests"
        self.a.mkdir()
        self.b.mkdir()

    def mqttalk(self, cwd: Path, *args: str, exe: str = MQTTALK) -> str:
        proc = subprocess.run([exe, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"bench: mqttalk {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def create(self, broker: str, *flags: str) -> str:
        out = self.mqttalk(self.a, "create", "--as", "impl", "--broker", broker, *flags)
        return re.search(r"join URL: (\S+)", out).group(1)  # type: ignore[union-attr]

    def paired(self, broker: str, *flags: str) -> str:
        """Create as impl, waiting (so it answers the pairing challenge), and pair as tests; the join URL."""
        a = subprocess.Popen(
            [MQTTALK, "create", "--as", "impl", "--broker", broker, "--wait", "30", *flags],
            cwd=self.a,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert a.stdout is not None
        url = ""
        for line in a.stdout:
            if line.startswith("join URL: "):
                url = line.split(": ", 1)[1].strip()
                break
        if not url:
            raise SystemExit(f"bench: create printed no join URL: {a.communicate(timeout=30)[1]}")
        self.mqttalk(self.b, "pair", url, "--as", "tests")
        a.communicate(timeout=30)
        if a.returncode != 0:
            raise SystemExit(f"bench: create --wait exited {a.returncode}")
        return url

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def line_times(proc: subprocess.Popen[str], needle: str, t0_holder: list[float], out: list[float]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if needle in line:
            out.append(time.perf_counter())
            return


def bench_pairing(broker: str, runs: int) -> list[str]:
    """B's `mqttalk pair` start -> PAIRED printed by B and by A (A waits in `recv --wait`)."""
    b_times, a_times, both = [], [], []
    ref: list[float] = []
    for _ in range(runs):
        e = Env()
        try:
            url = e.create(broker)
            a = subprocess.Popen(
                [MQTTALK, "recv", "--wait", "30"],
                cwd=e.a,
                env=e.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            time.sleep(0.8)  # A is connected and waiting
            a_seen: list[float] = []
            reader = threading.Thread(target=line_times, args=(a, "PAIRED with tests", [], a_seen))
            reader.start()
            t0 = time.perf_counter()
            b = subprocess.Popen(
                [MQTTALK, "pair", url, "--as", "tests"],
                cwd=e.b,
                env=e.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            b_seen: list[float] = []
            line_times(b, "PAIRED with impl", [], b_seen)
            b.wait(30)
            reader.join(30)
            subprocess.run([MQTTALK, "send", "done"], cwd=e.b, env=e.env, capture_output=True, timeout=30)
            a.wait(30)
            if not (a_seen and b_seen):
                raise SystemExit("bench: pairing did not print PAIRED on both sides")
            b_times.append(b_seen[0] - t0)
            a_times.append(a_seen[0] - t0)
            both.append(max(a_seen[0], b_seen[0]) - t0)
            # reference: the bare MQTT work of pairing with mosquitto clients: B publishes its retained
            # presence and reads A's retained presence.
            host, port = broker.split("//")[1].split(":")
            topic = f"bench/ref/{os.getpid()}/{len(ref)}"
            subprocess.run(
                ["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-r", "-t", topic + "/a", "-m", "a"], check=True
            )
            t = time.perf_counter()
            subprocess.run(
                ["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-r", "-t", topic + "/b", "-m", "b"], check=True
            )
            subprocess.run(
                ["mosquitto_sub", "-h", host, "-p", port, "-q", "1", "-C", "1", "-W", "5", "-t", topic + "/a"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            ref.append(time.perf_counter() - t)
            for suffix in ("/a", "/b"):  # clear the retained reference topics
                subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-r", "-n", "-t", topic + suffix], check=True)
        finally:
            e.close()
    rows = []
    for name, vals in (
        ("B prints PAIRED", b_times),
        ("A (waiting) prints PAIRED", a_times),
        ("both sides PAIRED", both),
        ("reference: mosquitto_pub -r + mosquitto_sub -C 1", ref),
    ):
        med, p90 = ms(vals)
        rows.append(f"| {name} | {med:.0f} | {p90:.0f} |")
    ratio = statistics.median(both) / statistics.median(ref)
    rows.append(f"| **ratio both-PAIRED / reference** | **{ratio:.1f}x** | |")
    return rows


def bench_send(broker: str, runs: int, wheel_exe: str | None) -> list[str]:
    """One-shot `mqttalk send` vs `mosquitto_pub -q 1` and a minimal raw paho publish, same payload."""
    e = Env()
    try:
        e.paired(broker)
        host, port = broker.split("//")[1].split(":")
        raw_paho = ROOT / "bench" / "paho_pub.py"
        cases: dict[str, Callable[[], float]] = {
            "mqttalk send (editable dev install)": lambda: timed([MQTTALK, "send", PAYLOAD], e.env, e.a),
            "mosquitto_pub -q 1": lambda: timed(
                ["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", "bench/x", "-m", PAYLOAD], e.env
            ),
            "raw paho one-shot publish (python)": lambda: timed(
                [str(BIN / "python"), str(raw_paho), host, port, PAYLOAD], e.env
            ),
            "python -c pass (venv)": lambda: timed([str(BIN / "python"), "-c", "pass"], e.env),
        }
        if wheel_exe:
            cases["mqttalk send (installed wheel)"] = lambda: timed([wheel_exe, "send", PAYLOAD], e.env, e.a)
        got = interleaved(cases, runs)
        e.mqttalk(e.b, "recv")  # drain
    finally:
        e.close()
    ref = statistics.median(got["mosquitto_pub -q 1"])
    paho = statistics.median(got["raw paho one-shot publish (python)"])
    rows = []
    for name, vals in got.items():
        med, p90 = ms(vals)
        rows.append(
            f"| {name} | {med:.0f} | {p90:.0f} | {statistics.median(vals) / ref:.0f}x | "
            f"{statistics.median(vals) / paho:.2f}x |"
        )
    return rows


def bench_handoff(broker: str, runs: int) -> list[str]:
    """`send`, `recv` and `status` with a live process of the same peer (`listen`: the command hands itself
    over a local socket) and without one (the other peer: the command connects itself), each next to a
    minimal paho publish (bench/paho_pub.py) in the same rounds."""
    e = Env()
    listen = None
    try:
        e.paired(broker)
        host, port = broker.split("//")[1].split(":")
        listen = subprocess.Popen(
            [MQTTALK, "listen"], cwd=e.a, env=e.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while not list((e.root / "state" / "mqttalk" / "locks").glob("*.sock")):
            if time.monotonic() > deadline:
                raise SystemExit("bench: `mqttalk listen` never listened for commands")
            time.sleep(0.05)
        cases: dict[str, Callable[[], float]] = {
            "raw paho one-shot publish (bench/paho_pub.py)": lambda: timed(
                [str(BIN / "python"), str(ROOT / "bench" / "paho_pub.py"), host, port, PAYLOAD], e.env
            )
        }
        for command in (["send", PAYLOAD], ["recv"], ["status"]):
            name = command[0]
            cases[f"mqttalk {name}, live process of the peer running"] = lambda c=command: timed(
                [MQTTALK, *c], e.env, e.a
            )
            cases[f"mqttalk {name}, no live process"] = lambda c=command: timed([MQTTALK, *c], e.env, e.b)
        got = interleaved(cases, runs)
    finally:
        if listen is not None:
            listen.terminate()
            listen.wait(20)
        e.close()
    paho = statistics.median(got["raw paho one-shot publish (bench/paho_pub.py)"])
    rows = []
    for name, vals in got.items():
        med, p90 = ms(vals)
        rows.append(f"| {name} | {med:.0f} | {p90:.0f} | {statistics.median(vals) / paho:.2f}x |")
    return rows


def bench_imports(runs: int) -> list[str]:
    env = {**os.environ}
    py = str(BIN / "python")
    third = (
        "import os; os.environ['PYDANTIC_DISABLE_PLUGINS']='__all__'; import typer, paho.mqtt.client\n"
        "from pydantic import BaseModel\nclass A(BaseModel):\n  x: int = 1\nA(x=1).model_dump_json()"
    )
    cases = {
        "python -c pass": lambda: timed([py, "-c", "pass"], env),
        "import mqttalk.cli": lambda: timed([py, "-c", "import mqttalk.cli"], env),
        "mqttalk --help": lambda: timed([MQTTALK, "--help"], env),
        "floor: import typer + paho + first pydantic model": lambda: timed([py, "-c", third], env),
    }
    got = interleaved(cases, runs)
    rows = [f"| {name} | {ms(v)[0]:.0f} | {ms(v)[1]:.0f} |" for name, v in got.items()]
    proc = subprocess.run([py, "-X", "importtime", "-c", "import mqttalk.cli"], capture_output=True, text=True)
    mods = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = [m for m in ("amqtt", "sqlite3", "paho.mqtt.client", "pydantic", "cryptography", "mcp") if m in mods]
    rows.append(f"| heavy modules loaded by `import mqttalk.cli` | {', '.join(heavy) or 'none'} | |")
    return rows


def wheel_install() -> str | None:
    """A non-editable install in bench/out/venv, as users get from `pip install`."""
    venv = OUT / "venv"
    exe = venv / "bin" / "mqttalk"
    try:
        if not exe.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--force-reinstall", "--no-deps", str(ROOT)],
            check=True,
            capture_output=True,
        )
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        print(f"bench: could not build the wheel install ({exc}); skipping that row", file=sys.stderr)
        return None
    return str(exe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="few runs, to check the bench itself works")
    ap.add_argument(
        "--only",
        choices=["pairing", "send", "handoff", "imports"],
        action="append",
        help="run only these sections (repeatable; default: all)",
    )
    args = ap.parse_args()
    only = set(args.only or ["pairing", "send", "handoff", "imports"])
    runs = 5 if args.quick else args.runs
    OUT.mkdir(parents=True, exist_ok=True)
    # Byte-compiled, as an installed wheel is: with PYTHONDONTWRITEBYTECODE set, every start of the
    # editable install would compile mqttalk's modules again (~10-20 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "mqttalk"), str(ROOT / "broker")], check=True)
    wait_port(1883)
    amqtt_port = free_port()
    state = Path(tempfile.mkdtemp(prefix="mqttalk-bench-broker-"))
    broker = subprocess.Popen(
        [MQTTALK, "broker", "--port", str(amqtt_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MQTTALK_STATE_DIR": str(state)},
    )
    wait_port(amqtt_port)
    brokers = {
        "Mosquitto 127.0.0.1:1883 (MQTT 5)": "mqtt://127.0.0.1:1883",
        f"embedded amqtt 127.0.0.1:{amqtt_port} (MQTT 3.1.1)": f"mqtt://127.0.0.1:{amqtt_port}",
    }
    wheel = wheel_install() if "send" in only else None
    report = [
        f"# mqttalk bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"host: {os.uname().nodename}, {os.cpu_count()} cpus, Python {sys.version.split()[0]}; "
        f"runs per figure: {runs} (pairing: {max(3, runs // 3)})",
        "",
    ]
    try:
        for label, url in brokers.items():
            if "pairing" in only:
                report += [
                    f"## Pairing on {label}",
                    "",
                    "time from B's `mqttalk pair` process start, ms | median | p90 |",
                    "|---|---|---|",
                ]
                report += bench_pairing(url, max(3, runs // 3))
                report.append("")
            if "send" in only:
                report += [
                    f"## One-shot send on {label}",
                    "",
                    "| command | median ms | p90 ms | vs mosquitto_pub | vs raw paho |",
                    "|---|---|---|---|---|",
                ]
                report += bench_send(url, runs, wheel)
                report.append("")
            if "handoff" in only:
                report += [
                    f"## send / recv / status with and without a live process on {label}",
                    "",
                    "| command | median ms | p90 ms | vs raw paho |",
                    "|---|---|---|---|",
                ]
                report += bench_handoff(url, runs)
                report.append("")
        if "imports" in only:
            report += ["## CLI start-up", "", "| what | median ms | p90 ms |", "|---|---|---|"]
            report += bench_imports(runs)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(state, ignore_errors=True)
    text = "\n".join(report) + "\n"
    (OUT / "latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
