"""Transport security and websockets: mqtts:// with certificate verification on (a CA of the test's
own), and ws:// to the embedded broker's websocket listener."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

import pytest
from conftest import EmbeddedBroker, PrivateMosquitto, Session, paired
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _cert(
    subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None, *, ca: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def make_ca(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _cert("mqttalk test CA", None, None, ca=True)
    key, cert = _cert("127.0.0.1", ca_key, ca.subject, ca=False)
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def test_mqtts_pairs_with_the_ca_and_is_refused_without(sessions: tuple[Session, Session], tmp_path: Path) -> None:
    pem = make_ca(tmp_path / "pki")
    broker = PrivateMosquitto(tmp_path / "tls", cafile=pem["ca"], certfile=pem["cert"], keyfile=pem["key"])
    broker.start()
    try:
        impl, tests = sessions
        url = f"mqtts://127.0.0.1:{broker.port}"
        refused = impl.run("create", "--as", "impl", "--broker", url)  # the system's CAs do not know it
        assert refused.code == 5 and "not trusted" in refused.err and "--ca" in refused.err
        assert "Traceback" not in refused.err
        join = paired(impl, tests, url, "--ca", str(pem["ca"]), pair_flags=("--ca", str(pem["ca"])))
        assert join.startswith("mqtts://127.0.0.1:")
        outsider = Session("outsider", impl.cwd.parent)
        assert outsider.run("pair", join, "--as", "outsider").code == 5  # it has no CA
        impl.ok("send", "over TLS")  # the directory remembers its CA
        assert "over TLS" in tests.ok("recv").out
    finally:
        broker.stop()


def test_ws_pairs_through_the_embedded_brokers_websocket_listener(
    sessions: tuple[Session, Session], tmp_path: Path
) -> None:
    broker = EmbeddedBroker(tmp_path / "ws-broker", websockets=True)
    broker.start()
    try:
        impl, tests = sessions
        url = paired(impl, tests, f"ws://127.0.0.1:{broker.ws_port}")
        assert url.startswith("ws://")
        tests.ok("send", "--kind", "status", "--state", "green", "over websockets")
        assert "over websockets" in impl.ok("recv").out
    finally:
        broker.stop()


def test_a_burst_corks_the_socket_and_always_uncorks_it(broker_url: str, tmp_path: Path) -> None:
    """Publishes of one window leave in few TCP segments (TCP_CORK on during the burst); after it, even
    one left by an exception, the socket is uncorked, or every later message would wait ~200 ms."""
    from mqttalk._transport import Link, _tcp
    from mqttalk._url import parse_broker

    if not hasattr(socket, "TCP_CORK"):
        pytest.skip("TCP_CORK is Linux only")
    with Link(parse_broker(broker_url), state_dir=tmp_path) as link:
        raw = _tcp(link._client.socket() if link._client else None)

        def corked() -> int:
            return int(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))

        assert corked() == 0
        with link.burst():
            assert corked() == 1
            link.publish("mqttalk-test/burst", b"x", wait=False)
        assert corked() == 0
        with pytest.raises(RuntimeError), link.burst():
            raise RuntimeError("mid-burst")
        assert corked() == 0
        link.publish("mqttalk-test/burst", b"y")  # acknowledged: the corked bytes went out


def test_success_pubacks_take_the_short_way_and_none_takes_pahos_way(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUBACK that says success without properties (amqtt: the message id alone; Mosquitto, to a topic
    nobody subscribes to: "No matching subscribers") is handled without paho's per-packet ReasonCode and
    Properties; every publish is still acknowledged, in order, as success."""
    import paho.mqtt.client as mqtt

    from mqttalk._transport import Link
    from mqttalk._url import parse_broker

    slow: list[str] = []
    paho_way = mqtt.Client._handle_pubackcomp  # (if paho renames it, this test fails: look again)

    def counted(self: mqtt.Client, cmd: str) -> object:
        slow.append(cmd)
        return paho_way(self, cmd)  # type: ignore[arg-type]

    monkeypatch.setattr(mqtt.Client, "_handle_pubackcomp", counted)
    acked: list[tuple[int, bool]] = []
    with Link(parse_broker(broker_url), state_dir=tmp_path) as link:
        client = link._client
        assert client is not None
        on_publish = client.on_publish

        def record(c: object, u: object, mid: int, rc: object, p: object) -> None:
            acked.append((mid, bool(rc.is_failure)))  # type: ignore[attr-defined]
            on_publish(c, u, mid, rc, p)  # type: ignore[misc]

        client.on_publish = record
        infos = [link.publish("mqttalk-test/puback", b"m%d" % i, wait=False) for i in range(50)]
        for info in infos:
            link.wait_published(info)
    assert acked == [(info.mid, False) for info in infos]
    assert slow == []  # none took paho's way
