"""Push latency: a peer's `mqttalk send` exits -> the MCP client holds the channel notification.

    .venv/bin/python bench/push.py [--messages 100]

Per broker (Mosquitto on 127.0.0.1:1883, an embedded amqtt broker started here): impl and tests pair;
`mqttalk mcp --claude-channel-always` runs for tests under a raw JSON-RPC client (a thread timestamps each
line it reads); a raw paho subscriber on the same broker timestamps the same publish. Each message is
sent by a real `mqttalk send` process (one at a time); times are measured from that process's exit.
Prints a markdown report (p50 / p90 in ms) and writes it to bench/out/push.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MQTTALK, OUT, Env, free_port, ms, wait_port


class Client:
    """`mqttalk mcp` under a raw MCP client: every channel notification's id and arrival time."""

    def __init__(self, env: Env) -> None:
        self.proc = subprocess.Popen(
            [MQTTALK, "mcp", "--claude-channel-always"],
            cwd=env.b,
            env=env.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.arrived: dict[str, float] = {}
        self.answered = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self._write(
            {
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "bench", "version": "0"},
                },
            }
        )
        if not self.answered.wait(30):
            raise SystemExit("bench: mqttalk mcp did not answer initialize")
        self._write({"method": "notifications/initialized"})

    def _write(self, message: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = time.perf_counter()
            message = json.loads(line)
            if message.get("id") == 1:
                self.answered.set()
            elif message.get("method") == "notifications/claude/channel":
                msg_id = message["params"]["meta"].get("id")
                if msg_id:
                    self.arrived[msg_id] = at

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


class PahoSubscriber:
    """A minimal paho subscriber to the channel's message topics: when the broker delivered each publish."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        from mqttalk import JoinURL
        from mqttalk._seal import Seal
        from mqttalk._topics import Topics

        join = JoinURL.parse(url)
        topic = Topics(join.prefix, join.channel, Seal.from_token(join.key) if join.key else None).all_msg
        self.arrivals: list[float] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda *_: self.arrivals.append(time.perf_counter())
        self.client.connect(join.broker.host, join.broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("bench: the paho subscriber did not subscribe")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bench_broker(broker: str, messages: int) -> dict[str, list[float]]:
    env = Env()
    try:
        url = env.paired(broker)
        env.mqttalk(env.b, "recv")  # the PAIRED notice
        client = Client(env)
        paho = PahoSubscriber(url)
        time.sleep(1.0)  # the server holds the session, online
        pushed, raw, overhead = [], [], []
        for i in range(messages):
            before = len(paho.arrivals)
            out = env.mqttalk(env.a, "send", "--json", "--kind", "status", "--state", "red", f"{i} 409 case fails")
            exited = time.perf_counter()
            msg_id = json.loads(out)["id"]
            deadline = time.monotonic() + 10
            while msg_id not in client.arrived or len(paho.arrivals) <= before:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: message {i} was not pushed within 10 s")
                time.sleep(0.001)
            pushed.append(client.arrived[msg_id] - exited)
            raw.append(paho.arrivals[before] - exited)
            overhead.append(client.arrived[msg_id] - paho.arrivals[before])
        paho.close()
        client.close()
        return {"push": pushed, "paho": raw, "over": overhead}
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100)
    args = parser.parse_args()
    port = free_port()
    state = Path(tempfile.mkdtemp(prefix="mqttalk-bench-broker-"))
    broker = subprocess.Popen(
        [MQTTALK, "broker", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MQTTALK_STATE_DIR": str(state)},
    )
    try:
        wait_port(port)
        rows = [
            "| broker | send exits -> MCP client holds the push | send exits -> raw paho subscriber has it "
            "| push - paho |",
            "|---|---|---|---|",
        ]
        for label, url in (
            ("Mosquitto 127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
            (f"embedded amqtt 127.0.0.1:{port}", f"mqtt://127.0.0.1:{port}"),
        ):
            got = bench_broker(url, args.messages)
            cells = [f"p50 {m:.1f} / p90 {p:.1f}" for m, p in (ms(got[k]) for k in ("push", "paho", "over"))]
            rows.append(f"| {label} | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
    finally:
        broker.terminate()
        broker.wait(30)
    report = "\n".join([f"### Push latency ({args.messages} messages per broker, ms)", "", *rows, ""])
    OUT.mkdir(exist_ok=True)
    (OUT / "push.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
