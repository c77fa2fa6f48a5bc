from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttalk import JoinURL
from mqttalk._url import parse_broker
from mqttalk.errors import BadJoinURL


def test_join_url_round_trips_with_credentials_and_deep_prefix() -> None:
    text = "mqtts://bob:p%40ss@broker.example.com:8884/site/a/mqttalk/abcdefgh12345678#plain"
    url = JoinURL.parse(text)
    assert url.broker.scheme == "mqtts" and url.broker.tls
    assert (url.broker.host, url.broker.port) == ("broker.example.com", 8884)
    assert (url.broker.username, url.broker.password) == ("bob", "p@ss")
    assert url.prefix == "site/a/mqttalk"
    assert url.channel == "abcdefgh12345678"
    assert JoinURL.parse(url.render()) == url


def test_display_hides_the_password() -> None:
    url = JoinURL.parse("mqtt://bob:secret@h:1883/mqttalk/v1/abcdefgh12345678#plain")
    assert "secret" not in url.display()
    assert "bob@" in url.display()


@pytest.mark.parametrize(("scheme", "port"), [("mqtt", 1883), ("mqtts", 8883), ("ws", 80), ("wss", 443)])
def test_default_ports_per_scheme(scheme: str, port: int) -> None:
    assert JoinURL.parse(f"{scheme}://h/mqttalk/v1/abcdefgh12345678#plain").broker.port == port


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("not a url", "scheme"),
        ("http://h/mqttalk/v1/abcdefgh12345678#plain", "unsupported scheme"),
        ("mqtt:///mqttalk/v1/abcdefgh12345678#plain", "no host"),
        ("mqtt://h:99999/mqttalk/v1/abcdefgh12345678#plain", "malformed"),
        ("mqtt://h:1883#plain", "no channel"),
        ("mqtt://h:1883/abcdefgh12345678#plain", "no channel"),
        ("mqtt://h/mqttalk/v1/short", "not valid"),
        ("mqtt://h/mqtt+alk/v1/abcdefgh12345678#plain", "prefix"),
        ("mqtt://h/mqttalk/v1/abcdefgh12345678#k=AAAA", "key"),
        ("mqtt://h/mqttalk/v1/abcdefgh12345678", "cut off"),
    ],
)
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


def _sealed_url() -> str:
    from mqttalk._seal import Seal
    from mqttalk._url import channel_id_for

    key = Seal.new().token
    return JoinURL(parse_broker("h:1883"), "mqttalk/v1", channel_id_for(key), key).render()


def test_a_sealed_url_cut_anywhere_in_its_key_is_refused_before_connecting() -> None:
    url = _sealed_url()
    assert JoinURL.parse(url).sealed
    base, key = url.split("#k=")
    for cut in range(len(key)):
        with pytest.raises(BadJoinURL) as err:
            JoinURL.parse(f"{base}#k={key[:cut]}")
        assert "cut" in err.value.line() or "damaged" in err.value.line()
    with pytest.raises(BadJoinURL, match="cut off"):
        JoinURL.parse(base)  # the whole fragment lost: never a silent plain channel


def test_a_sealed_url_with_one_character_changed_is_refused() -> None:
    url = _sealed_url()
    base, key = url.split("#k=")
    refused = 0
    for i in range(len(key) - 1):  # (the last character carries 2 unused bits: some changes keep the key)
        other = "A" if key[i] != "A" else "B"
        with pytest.raises(BadJoinURL, match="does not belong"):
            JoinURL.parse(f"{base}#k={key[:i]}{other}{key[i + 1 :]}")
        refused += 1
    channel = base.rsplit("/", 1)[1]
    with pytest.raises(BadJoinURL, match="does not belong"):
        JoinURL.parse(url.replace(channel, ("b" if channel[0] == "a" else "a") + channel[1:]))
    assert refused == 42


def test_a_plain_url_says_so_and_round_trips() -> None:
    url = JoinURL.parse("mqtt://h:1883/mqttalk/v1/abcdefgh12345678#plain")
    assert not url.sealed and url.render().endswith("#plain") and url.display().endswith("#plain")


# -- a cluster: several addresses of one broker -------------------------------------------------------


def test_a_cluster_url_names_its_nodes_in_order_and_round_trips() -> None:
    text = "mqtt://bob:p%40ss@n1.example.com:1883,n2.example.com,[::1]:1885/mqttalk/v1/abcdefgh12345678#plain"
    url = JoinURL.parse(text)
    nodes = [(n.host, n.port, n.username, n.password) for n in url.broker.nodes]
    assert nodes == [
        ("n1.example.com", 1883, "bob", "p@ss"),
        ("n2.example.com", 1883, "bob", "p@ss"),  # the scheme's default port, as for one address
        ("::1", 1885, "bob", "p@ss"),
    ]
    assert url.render() == text.replace("n2.example.com,", "n2.example.com:1883,")
    assert JoinURL.parse(url.render()) == url
    assert (
        url.display()
        == "mqtt://bob@n1.example.com:1883,n2.example.com:1883,[::1]:1885/mqttalk/v1/abcdefgh12345678#plain"
    )
    assert [n.display() for n in url.broker.nodes][1] == "mqtt://bob@n2.example.com:1883"


def test_one_address_parses_and_renders_exactly_as_before() -> None:
    text = "mqtts://bob:p%40ss@broker.example.com:8884/site/a/mqttalk/abcdefgh12345678#plain"
    url = JoinURL.parse(text)
    assert url.broker.more == () and url.broker.nodes == (url.broker,)
    assert url.render() == text and "," not in url.display()


def test_a_sealed_cluster_url_derives_the_same_channel_id() -> None:
    from mqttalk._seal import Seal
    from mqttalk._url import channel_id_for

    key = Seal.new().token
    one = JoinURL(parse_broker("n1:1883"), "mqttalk/v1", channel_id_for(key), key)
    many = JoinURL.parse(one.render().replace("n1:1883", "n1:1883,n2:1883,n3:1883"))
    assert many.channel == one.channel and many.key == one.key and many.sealed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("mqtt://a:1883,,b:1883/mqttalk/v1/abcdefgh12345678#plain", "empty address"),
        ("mqtt://a:1883,/mqttalk/v1/abcdefgh12345678#plain", "empty address"),
        ("mqtt://,a:1883/mqttalk/v1/abcdefgh12345678#plain", "empty address"),
        ("mqtt://a:1883,a:1883/mqttalk/v1/abcdefgh12345678#plain", "a:1883 twice"),
        ("mqtt://a,a:1883/mqttalk/v1/abcdefgh12345678#plain", "a:1883 twice"),  # 1883 is mqtt's default
        ("mqtt://a:1883,mqtts://b:8883/mqttalk/v1/abcdefgh12345678#plain", "share one scheme"),
        ("mqtt://a:1883,b:x/mqttalk/v1/abcdefgh12345678#plain", "malformed"),
        ("mqtt://a:1883,b:99999/mqttalk/v1/abcdefgh12345678#plain", "malformed"),
        ("mqtt://" + ",".join(f"h{i}:1883" for i in range(50)) + "/mqttalk/v1/abcdefgh12345678#plain", "50 addresses"),
        ("mqtt://a:1883, b:1883/mqttalk/v1/abcdefgh12345678#plain", "a space"),
        ("mqtt://u:p1@a:1883,v:p2@b:1883/mqttalk/v1/abcdefgh12345678#plain", "credentials per node"),
        ("mqtt://a:1,b:2@c:3/mqttalk/v1/abcdefgh12345678#plain", "credentials per node"),
    ],
)
def test_bad_cluster_urls_say_what_is_wrong_in_one_line(text: str, says: str) -> None:
    with pytest.raises(BadJoinURL) as err:
        JoinURL.parse(text)
    assert says in err.value.line() and "\n" not in err.value.line()
    with pytest.raises(BadJoinURL):  # --broker and the config file take the same list
        parse_broker(text.split("/mqttalk/", maxsplit=1)[0])


def test_broker_url_accepts_a_bare_list_of_nodes() -> None:
    broker = parse_broker("n1:1883,n2:1884")
    assert [(n.scheme, n.host, n.port) for n in broker.nodes] == [("mqtt", "n1", 1883), ("mqtt", "n2", 1884)]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab1:,@[]./%-", max_size=40))
def test_any_address_list_parses_or_is_one_clear_error_and_round_trips(hosts: str) -> None:
    text = f"mqtt://{hosts}/mqttalk/v1/abcdefgh12345678#plain"
    try:
        url = JoinURL.parse(text)
    except BadJoinURL as err:
        assert "\n" not in err.line()
        return
    assert JoinURL.parse(url.render()) == url
    assert len(url.broker.nodes) == len({(n.host, n.port) for n in url.broker.nodes}) <= 16


def test_a_password_holding_slash_or_at_is_never_repeated_in_an_error() -> None:
    for text in ("mqtt://u:top/secret@h1:1,h2:2/p/cccccccccc#plain", "mqtt://u:top@secret@h1:1/p/cccccccccc#plain"):
        with pytest.raises(BadJoinURL) as err:
            JoinURL.parse(text)
        assert "top" not in err.value.line() and "secret" not in err.value.line(), err.value.line()
