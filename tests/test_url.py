from __future__ import annotations

import pytest

from mqttalk import BadJoinURL, JoinURL
from mqttalk._url import parse_broker


def test_join_url_round_trips_with_credentials_and_deep_prefix() -> None:
    text = "mqtts://bob:p%40ss@broker.example.com:8884/site/a/mqttalk/abcdefgh12345678"
    url = JoinURL.parse(text)
    assert url.broker.scheme == "mqtts" and url.broker.tls
    assert (url.broker.host, url.broker.port) == ("broker.example.com", 8884)
    assert (url.broker.username, url.broker.password) == ("bob", "p@ss")
    assert url.prefix == "site/a/mqttalk"
    assert url.channel == "abcdefgh12345678"
    assert JoinURL.parse(url.render()) == url


def test_display_hides_the_password() -> None:
    url = JoinURL.parse("mqtt://bob:secret@h:1883/mqttalk/v1/abcdefgh12345678")
    assert "secret" not in url.display()
    assert "bob@" in url.display()


@pytest.mark.parametrize(("scheme", "port"), [("mqtt", 1883), ("mqtts", 8883), ("ws", 80), ("wss", 443)])
def test_default_ports_per_scheme(scheme: str, port: int) -> None:
    assert JoinURL.parse(f"{scheme}://h/mqttalk/v1/abcdefgh12345678").broker.port == port


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("not a url", "scheme"),
    ("http://h/mqttalk/v1/abcdefgh12345678", "unsupported scheme"),
    ("mqtt:///mqttalk/v1/abcdefgh12345678", "no host"),
    ("mqtt://h:99999/mqttalk/v1/abcdefgh12345678", "malformed"),
    ("mqtt://h:1883", "no channel"),
    ("mqtt://h:1883/abcdefgh12345678", "no channel"),
    ("mqtt://h/mqttalk/v1/short", "not valid"),
    ("mqtt://h/mqtt+alk/v1/abcdefgh12345678", "prefix"),
    ("mqtt://h/mqttalk/v1/abcdefgh12345678#k=AAAA", "key"),
])
def test_bad_join_urls_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(BadJoinURL) as err:
        JoinURL.parse(text)
    assert says in err.value.line()


def test_errors_never_echo_a_password() -> None:
    with pytest.raises(BadJoinURL) as err:
        JoinURL.parse("mqtt://bob:secret@h:1883/nochannel")
    assert "secret" not in err.value.line()


def test_broker_url_accepts_bare_host_port() -> None:
    broker = parse_broker("localhost:1884")
    assert (broker.scheme, broker.host, broker.port) == ("mqtt", "localhost", 1884)
    with pytest.raises(BadJoinURL):
        parse_broker("mqtt://h:1883/some/path")
