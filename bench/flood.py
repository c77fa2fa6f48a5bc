"""A flooded channel (issue #12, case 5): `mqttalk recv` where 10,000 fake peers left a retained presence,
next to `mqttalk recv` on a clean channel, in the same run (A B A B), on each broker.

    .venv/bin/python bench/flood.py [--fakes 10000] [--rounds 5]

The fakes are what anyone can publish on a --plain channel (a member can on a sealed one): valid,
fresh "online" presences under 10,000 names. The broker sends every one of them to the reader on
every connect (Mosquitto here keeps up to 20,000 per client, so none is dropped before it arrives).
Measured: the whole `mqttalk recv` process, start-up included; next to it, a raw paho process that only
connects, subscribes to the channel's presence and counts the 10,000 retained messages (the floor for
any client that reads presence on connect). Prints markdown; writes bench/out/flood.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MQTTALK, OUT, free_port, wait_port


def session_env(root: Path, name: str) -> tuple[dict[str, str], Path]:
    home = root / name
    (home / "cwd").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTALK_")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), XDG_CONFIG_HOME=str(home / "config"))
    return env, home / "cwd"


def channel(root: Path, broker: str) -> tuple[str, dict[str, str], Path]:
    """A paired plain channel; returns its URL and the reader's (tests') environment and directory."""
    env, cwd = session_env(root, "impl")
    out = subprocess.run(
        [MQTTALK, "create", "--as", "impl", "--broker", broker, "--plain"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    url = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("join URL: "))
    tenv, tcwd = session_env(root, "tests")
    subprocess.run(
        [MQTTALK, "pair", url, "--as", "tests", "--wait", "0"], env=tenv, cwd=tcwd, capture_output=True, check=False
    )
    return url, tenv, tcwd


def flood(url: str, fakes: int) -> None:
    from mqttalk import JoinURL
    from mqttalk._topics import Topics
    from mqttalk._wire import now

    join = JoinURL.parse(url)
    topics = Topics(join.prefix, join.channel)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect(join.broker.host, join.broker.port)
    c.loop_start()
    info = None
    for i in range(fakes):
        stamp = now().isoformat()
        pres = {
            "v": 2,
            "peer": f"fake{i}",
            "state": "online",
            "member": "m",
            "since": stamp,
            "hb": stamp,
            "every": 3600,
        }
        info = c.publish(topics.presence(f"fake{i}"), json.dumps(pres), qos=1, retain=True)
    if info is not None:
        info.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def paho_reference(url: str, fakes: int) -> float:
    """Seconds for a raw paho process (MQTT 5, as mqttalk speaks to Mosquitto; 3.1.1 to amqtt) to start,
    connect, subscribe to the channel's presence and take in every retained one: the floor for any
    client that reads presence on connect."""
    script = (
        "import sys, threading, paho.mqtt.client as m\n"
        "from paho.mqtt.enums import CallbackAPIVersion as V\n"
        "host, port, topic, n, v = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])\n"
        "got, done = [0], threading.Event()\n"
        "def on(_c, _u, _m):\n"
        "    got[0] += 1\n"
        "    if got[0] >= n: done.set()\n"
        "c = m.Client(V.VERSION2, protocol=v)\n"
        "c.on_message = on\n"
        "c.connect(host, port)\n"
        "c.subscribe(topic, qos=1)\n"
        "c.loop_start()\n"
        "sys.exit(0 if done.wait(60) else 1)\n"
    )
    from mqttalk import JoinURL
    from mqttalk._topics import Topics

    join = JoinURL.parse(url)
    topic = Topics(join.prefix, join.channel).all_presence
    version = str(mqtt.MQTTv5 if "Mosquitto" in _BROKER[0] else mqtt.MQTTv311)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", script, join.broker.host, str(join.broker.port), topic, str(fakes), version], check=True
    )
    return time.perf_counter() - t


_BROKER = [""]


def recv_time(env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    res = subprocess.run([MQTTALK, "recv"], env=env, cwd=cwd, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"bench: recv exited {res.returncode}: {res.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fakes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mqttalk-flood-"))
    mport, aport = free_port(), free_port()
    (root / "mosquitto.conf").write_text(
        f"listener {mport} 127.0.0.1\nallow_anonymous true\nuser root\nmax_queued_messages 20000\n"
    )
    procs = [
        subprocess.Popen(
            ["mosquitto", "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
        subprocess.Popen(
            [MQTTALK, "broker", "--port", str(aport), "--memory"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MQTTALK_STATE_DIR": str(root / "amqtt")},
        ),
    ]
    lines = [
        f"# `mqttalk recv` with {args.fakes:,} fake peers' retained presence vs a clean channel",
        "",
        "| broker | flooded recv (s) | clean recv (s) | ratio | raw paho taking the 10,000 presences (s) | "
        "flooded recv / raw paho |",
        "|---|---|---|---|---|---|",
    ]
    try:
        wait_port(mport)
        wait_port(aport)
        for name, broker in (
            ("Mosquitto 2.0", f"mqtt://127.0.0.1:{mport}"),
            ("embedded amqtt", f"mqtt://127.0.0.1:{aport}"),
        ):
            flooded_url, fenv, fcwd = channel(root / name.split()[0] / "flooded", broker)
            _, cenv, ccwd = channel(root / name.split()[0] / "clean", broker)
            flood(flooded_url, args.fakes)
            recv_time(fenv, fcwd)  # the first read stores 10,000 presences once
            _BROKER[0] = name
            flooded, clean, paho = [], [], []
            for _ in range(args.rounds):
                flooded.append(recv_time(fenv, fcwd))
                clean.append(recv_time(cenv, ccwd))
                paho.append(paho_reference(flooded_url, args.fakes))
            ratios = [f / c for f, c in zip(flooded, clean, strict=True)]
            floor = [f / p for f, p in zip(flooded, paho, strict=True)]
            row = (
                f"| {name} | {statistics.median(flooded):.2f} | {statistics.median(clean):.2f} | "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{statistics.median(paho):.2f} | "
                f"{statistics.median(floor):.2f}x ({min(floor):.2f}-{max(floor):.2f}) |"
            )
            print(row, flush=True)
            lines.append(row)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "flood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
