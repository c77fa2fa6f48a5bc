"""The embedded broker restarted mid-delivery: does it keep what it acknowledged? And how fast is it?

    .venv/bin/python bench/broker_durability.py --kill TERM --reader live      # issue 13, case 2
    .venv/bin/python bench/broker_durability.py --kill KILL --reader offline
    .venv/bin/python bench/broker_durability.py --kill none                    # throughput only

Real processes throughout: `mqttalk broker --db FILE` on a free port, two homes paired through it
(`create`/`pair`), a library sender (`live.send(wait=False)` x N, then `drain()`), and a reader that
is either a running `mqttalk listen` (live) or nobody until the end (offline). With --kill, the broker
gets the signal when the live reader has shown --at messages (offline: when the sender has --at
acknowledged), and is started again at once with the same --db on the same port. The sender then
sends what is left of its outbox; in the end `mqttalk recv --json` must show every message once.

Prints what the sender had acknowledged when the broker died, how many of those the reader never
got, and the rate (messages/s from the first send to the reader having them all).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MQTTALK = str(Path(sys.executable).parent / "mqttalk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Home:
    """One peer: a working directory and a HOME of its own."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.cwd = root / name
        self.cwd.mkdir(parents=True)
        home = root / f"{name}-home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTALK_")}
        self.env.update(
            HOME=str(home), XDG_STATE_HOME=str(home / ".local" / "state"), XDG_CONFIG_HOME=str(home / ".config")
        )
        self.state_dir = home / ".local" / "state" / "mqttalk"

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            [MQTTALK, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mqttalk {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [MQTTALK, *args], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def channel(self) -> Any:
        import mqttalk

        return mqttalk.open_channel(mqttalk.Settings(state_dir=self.state_dir), cwd=self.cwd)


class Broker:
    def __init__(self, root: Path, code: str | None = None) -> None:
        self.port = free_port()
        self.db = root / "broker.sqlite3"
        self.env = {**os.environ, "MQTTALK_STATE_DIR": str(root / "broker-state")}
        if code:  # another version of the mqttalk_broker package (a directory holding it), for comparisons
            self.env["PYTHONPATH"] = os.pathsep.join([code, os.environ.get("PYTHONPATH", "")])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MQTTALK, "broker", "--port", str(self.port), "--db", str(self.db)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the broker did not start")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pair(impl: Home, tests: Home, url: str) -> None:
    proc = impl.start("create", "--as", "impl", "--broker", url, "--wait", "30")
    assert proc.stdout is not None
    join = next(line.split(": ", 1)[1].strip() for line in proc.stdout if line.startswith("join URL: "))
    tests.run("pair", join, "--as", "tests")
    proc.communicate(timeout=30)


def unsent_ids(channel: Any) -> set[str]:
    return {p.id for p in channel.store.pending(channel.url.channel, channel.me)}


def run(count: int, kill: str, reader: str, at: int, code: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mqttalk-durability-") as tmp:
        root = Path(tmp)
        broker = Broker(root, code)
        broker.start()
        impl, tests = Home(root, "impl"), Home(root, "tests")
        try:
            pair(impl, tests, f"mqtt://127.0.0.1:{broker.port}")
            shown: list[str] = []
            listener = None
            if reader == "live":
                listener = tests.start("listen")
                threading.Thread(
                    target=lambda: shown.extend(line for line in listener.stdout or [] if "MESSAGE" in line),
                    daemon=True,
                ).start()
                time.sleep(1.0)
            channel = impl.channel()
            ids: list[str] = []
            failed: list[BaseException] = []

            def send() -> None:
                try:
                    with channel.live(online=False) as live:
                        for i in range(count):
                            ids.append(live.send(f"message {i}", wait=False).id)
                        live.drain(timeout=120)
                except Exception as exc:  # noqa: BLE001 - the broker went away: what was not acknowledged stays pending
                    failed.append(exc)

            started = time.monotonic()
            sender = threading.Thread(target=send)
            sender.start()
            acked: set[str] = set()
            restarted_at, stop_s = None, 0.0
            if kill != "none":

                def progress() -> int:
                    if reader == "live":
                        return len(shown)
                    return max(0, len(ids) - len(unsent_ids(channel)))

                deadline = time.monotonic() + 120
                while progress() < at and sender.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.01)
                stopping = time.monotonic()
                broker.signal(signal.SIGTERM if kill == "TERM" else signal.SIGKILL)
                stop_s = time.monotonic() - stopping
                sender.join(120)
                acked = set(ids) - unsent_ids(channel)
                broker.start()
                restarted_at = time.monotonic()
                with channel.live(online=False) as live:  # what the sender has left
                    live.drain(timeout=120)
            else:
                sender.join(300)
            sent_done = time.monotonic()
            if listener is not None:
                last, quiet_since = -1, time.monotonic()
                while len(shown) < count and time.monotonic() - quiet_since < 10:  # until 10 s of nothing
                    if len(shown) != last:
                        last, quiet_since = len(shown), time.monotonic()
                    time.sleep(0.01)
                delivered_at = time.monotonic()
                listener.send_signal(signal.SIGTERM)
                listener.wait(30)
            else:
                delivered_at = time.monotonic()
            got = [json.loads(line) for line in tests.run("recv", "--json").splitlines()]
            got_ids = [m["id"] for m in got if m.get("event") == "message"]
            if listener is None:
                delivered_at = time.monotonic()
            return {
                "count": count,
                "kill": kill,
                "reader": reader,
                "acknowledged_when_killed": len(acked) if kill != "none" else None,
                "shown_when_killed": at if kill != "none" and reader == "live" else None,
                "lost_acknowledged": len(acked - set(got_ids)),
                "missing_in_the_end": len(set(ids) - set(got_ids)),
                "shown_twice": len(got_ids) - len(set(got_ids)),
                "sender_error": repr(failed[0]) if failed else None,
                "send_s": round(sent_done - started, 2),
                "broker_stop_s": round(stop_s, 2),
                "end_to_end_msgs_per_s": round(count / (delivered_at - started)) if kill == "none" else None,
                "after_restart_s": round(delivered_at - restarted_at, 2) if restarted_at else None,
            }
        finally:
            if broker.proc is not None and broker.proc.poll() is None:
                broker.signal(signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--kill", choices=["TERM", "KILL", "none"], default="TERM")
    parser.add_argument("--reader", choices=["live", "offline"], default="live")
    parser.add_argument("--at", type=int, default=1000, help="kill when this many were shown (live) or acked")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--broker-code",
        metavar="DIR",
        help="run the mqttalk_broker package found in DIR "
        "(e.g. one exported from an older commit) instead of the installed one",
    )
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps(run(args.count, args.kill, args.reader, args.at, args.broker_code)), flush=True)


if __name__ == "__main__":
    main()
