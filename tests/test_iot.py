"""Fitting into existing MQTT infrastructure: plain channels readable by any MQTT consumer (the
Node-RED / Home Assistant style: subscribe, parse JSON), and MQTT 5 properties brokers' rules
engines can route on."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MOSQUITTO_PORT, Session, channel_topics, paired
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk._wire import WIRE_VERSION


def test_a_plain_channel_is_readable_json_for_mosquitto_sub(sessions: tuple[Session, Session]) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    impl, tests = sessions
    url = paired(impl, tests, f"mqtt://127.0.0.1:{MOSQUITTO_PORT}", "--plain")
    topics: Any = channel_topics(url)
    assert topics.msg("tests") == f"mqttalk/v1/{url.rsplit('/', 1)[1].split('#')[0]}/msg/tests"  # readable names
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(MOSQUITTO_PORT),
            "-v",
            "-C",
            "1",
            "-W",
            "20",
            "-t",
            topics.all_msg,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    tests.ok("send", "--kind", "status", "--state", "green", "green on my side")
    out, _ = sub.communicate(timeout=30)
    topic, payload = out.strip().split(" ", 1)
    assert topic == topics.msg("tests")
    env = json.loads(payload)
    assert (env["from"], env["kind"], env["data"], env["body"]) == (
        "tests",
        "status",
        {"state": "green"},
        "green on my side",
    )
    presence = subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(MOSQUITTO_PORT),
            "-C",
            "2",
            "-W",
            "10",
            "-t",
            topics.all_presence,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    peers = {json.loads(line)["peer"]: json.loads(line) for line in presence.stdout.splitlines()}
    assert set(peers) == {"impl", "tests"} and peers["tests"]["state"] == "joined"  # retained: read at once


def test_mqtt5_publishes_carry_content_type_user_property_and_presence_expiry(
    sessions: tuple[Session, Session],
) -> None:
    impl, tests = sessions
    got: list[mqtt.MQTTMessage] = []
    for flags in (("--plain",), ()):
        got.clear()
        url = paired(impl, tests, f"mqtt://127.0.0.1:{MOSQUITTO_PORT}", *flags)
        topics: Any = channel_topics(url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_message = lambda _c, _u, m: got.append(m)
        client.connect("127.0.0.1", MOSQUITTO_PORT)
        client.subscribe([(topics.all_msg, 1), (topics.all_presence, 1)])
        client.loop_start()
        time.sleep(0.5)
        impl.ok("send", "hello")
        deadline = time.monotonic() + 10
        while not any(m.topic == topics.msg("impl") for m in got) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
        client.loop_stop()
        message = next(m for m in got if m.topic == topics.msg("impl"))
        presence = next(m for m in got if m.topic.startswith(topics.root + "/presence/"))
        plain = bool(flags)
        props = message.properties
        assert props is not None
        assert props.ContentType == ("application/json" if plain else "application/octet-stream")
        assert getattr(props, "PayloadFormatIndicator", 0) == (1 if plain else 0)
        assert ("mqttalk", str(WIRE_VERSION)) in props.UserProperty
        pprops = presence.properties
        assert pprops is not None and presence.retain
        # the broker counts the expiry down: about 8 days left (the 7-day session expiry, plus one)
        assert 7 * 24 * 3600 < pprops.MessageExpiryInterval <= 8 * 24 * 3600
        for session in (impl, tests):
            session.ok("leave")
