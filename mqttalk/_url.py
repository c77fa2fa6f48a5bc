"""The join URL: one value object that parses, validates and renders.

Form (as mosquitto_sub -L and MQTTX accept it, plus a channel)::

    SCHEME://[user[:pass]@]host[:port]/PREFIX/CHANNEL#k=KEY     a sealed channel
    SCHEME://[user[:pass]@]host[:port]/PREFIX/CHANNEL#plain     a plain one
    SCHEME://[user[:pass]@]n1[:port],n2[:port],.../PREFIX/...   the nodes of one cluster, tried in order

SCHEME is mqtt, mqtts, ws or wss. PREFIX is one or more topic levels (default ``mqttalk/v1``). The nodes
of a cluster share the scheme and the credentials: they are one broker that answers at several addresses.

A URL checks itself, because chat tools and terminals cut and mangle long strings: a sealed channel's
id is derived from its key (:func:`channel_id_for`), so a key cut short or changed by one character is
refused here, before anything connects; and a plain channel says so, so a URL whose fragment was cut
off is an error, never a silent fall back to a plain channel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

from ._errors import BadJoinURL

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_LEVEL_RE = re.compile(r"^[^#+/\x00]+$")
_KEY_RE = re.compile(r"^k=[A-Za-z0-9_-]{43}$")
PLAIN = "plain"  # the fragment of a plain channel's URL
MAX_NODES = 16  # a peer tries the nodes in order, a connect timeout each: more would be minutes of trying


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker is: scheme, host, port and optional credentials; for a cluster, the other nodes'
    addresses too (``more``), which share the scheme and credentials and are tried after host:port."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    more: tuple[tuple[str, int], ...] = ()  # the other nodes of a cluster, in the order they are tried

    @property
    def nodes(self) -> tuple[BrokerAddress, ...]:
        """Each node as an address of its own (one for a single broker), in the order they are tried."""
        first = replace(self, more=())
        return (first, *(replace(first, host=host, port=port) for host, port in self.more))

    def node(self) -> str:
        """host:port of this address's (first) node: how a peer says which node it is on."""
        return f"{_host(self.host)}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def websockets(self) -> bool:
        return self.scheme in ("ws", "wss")

    def display(self) -> str:
        """The address without the password (safe to print)."""
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        return f"{self.scheme}://{user}{self._hosts()}"

    def render(self) -> str:
        """The address with credentials, as a URL prefix."""
        cred = ""
        if self.username is not None:
            cred = quote(self.username, safe="")
            if self.password is not None:
                cred += ":" + quote(self.password, safe="")
            cred += "@"
        return f"{self.scheme}://{cred}{self._hosts()}"

    def _hosts(self) -> str:
        return ",".join(f"{_host(host)}:{port}" for host, port in ((self.host, self.port), *self.more))


@dataclass(frozen=True)
class JoinURL:
    """A broker address plus the channel's topic prefix and id."""

    broker: BrokerAddress
    prefix: str
    channel: str
    key: str | None = None  # the channel key (base64url), from the #k= fragment; None: a plain channel

    @property
    def sealed(self) -> bool:
        return self.key is not None

    @classmethod
    def parse(cls, text: str) -> JoinURL:
        """Parse and validate a join URL; raise :class:`BadJoinURL` with a line that says what is wrong."""
        broker, path, fragment = _split(text.strip(), what="join URL")
        levels = [unquote(p) for p in path.split("/") if p]
        if len(levels) < 2:
            raise BadJoinURL(
                f"join URL has no channel: {_safe(text)!r}",
                "expected SCHEME://HOST[:PORT]/PREFIX/CHANNEL, as printed by `mqttalk create`",
            )
        channel = levels[-1]
        if not _CHANNEL_RE.match(channel):
            raise BadJoinURL(f"join URL's channel id {channel!r} is not valid (8-64 of A-Z a-z 0-9 _ -)")
        prefix = "/".join(levels[:-1])
        check_prefix(prefix, error=BadJoinURL)
        key = None
        if not fragment:
            raise BadJoinURL(
                "join URL has no channel key (#k=...): it looks cut off",
                "copy the whole URL `mqttalk create` printed; a plain channel's URL ends in #plain",
            )
        if fragment != PLAIN:
            if not _KEY_RE.match(fragment):
                raise BadJoinURL(
                    "join URL's channel key (#k=...) is damaged or cut short",
                    "copy the whole join URL from `mqttalk create` again",
                )
            key = fragment[2:]
        if key is not None and channel != channel_id_for(key):
            raise BadJoinURL(
                "join URL's channel key does not belong to its channel: the URL was changed or damaged "
                "(or made by mqttalk before 0.2)",
                "copy the whole join URL from `mqttalk create` again",
            )
        return cls(broker, prefix, channel, key)

    def render(self) -> str:
        """The URL to paste (includes credentials and the channel key if it has them)."""
        fragment = f"#k={self.key}" if self.key else f"#{PLAIN}"
        return f"{self.broker.render()}/{quote(self.prefix, safe='/')}/{self.channel}{fragment}"

    def display(self) -> str:
        """The URL without the password or the key (safe for logs and status)."""
        fragment = "#k=(hidden)" if self.key else f"#{PLAIN}"
        return f"{self.broker.display()}/{quote(self.prefix, safe='/')}/{self.channel}{fragment}"


def channel_id_for(key: str) -> str:
    """A sealed channel's id, derived from its key (base64url): 26 lowercase base32 characters, so the
    URL's channel and key vouch for each other (and the key itself is not recoverable from the id)."""
    raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    digest = hmac.new(raw, b"mqttalk channel id v1", hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:26]


def parse_broker(text: str) -> BrokerAddress:
    """Parse a broker URL (``mqtt://host:port``, or a cluster's ``mqtt://n1:port,n2:port``; a bare
    ``host[:port]`` means mqtt://)."""
    text = text.strip()
    if "://" not in text:
        text = "mqtt://" + text
    broker, path, fragment = _split(text, what="broker URL")
    if path.strip("/") or fragment:
        raise BadJoinURL(f"broker URL must not have a path: {_safe(text)!r}", "use mqtt://HOST[:PORT]")
    return broker


def check_prefix(prefix: str, error: type[Exception] = BadJoinURL) -> str:
    levels = prefix.split("/")
    if not prefix or not all(_LEVEL_RE.match(level) for level in levels):
        raise error(f"topic prefix {prefix!r} is not valid (non-empty levels, no + or #)")
    return prefix


def _split(text: str, what: str) -> tuple[BrokerAddress, str, str]:
    if not text:
        raise BadJoinURL(f"empty {what}")
    if text.split("#", 1)[0].count("://") > 1:
        raise BadJoinURL(
            f"{what} names addresses with schemes of their own: {_safe(text)!r}",
            "the nodes of one cluster share one scheme: SCHEME://n1:PORT,n2:PORT/...",
        )
    userinfo = text.split("#", 1)[0].partition("://")[2].split("/", 1)[0].rpartition("@")[0]
    if "@" in userinfo or "," in userinfo:
        raise BadJoinURL(
            f"{what} has credentials per node, or a raw '@' or ',' in them: {_safe(text)!r}",
            "the nodes of one cluster share one user: SCHEME://USER:PASS@n1:PORT,n2:PORT/... "
            "(percent-encode @ and , in a password: %40, %2C)",
        )
    try:
        parts = urlsplit(text)
        hosts = parts.netloc.rpartition("@")[2]
        nodes = [_node(parts.scheme, entry, text, what) for entry in hosts.split(",")] if "," in hosts else []
        port = None if nodes else parts.port
    except ValueError:  # (its text may quote a piece of the password: not repeated)
        raise BadJoinURL(
            f"{what} is malformed: {_safe(text)!r}", "check the port numbers and the '/' after them"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadJoinURL(
            f"{what} has unsupported scheme {parts.scheme + '://' if parts.scheme else '(none)'}",
            "use mqtt://, mqtts://, ws:// or wss://",
        )
    if not nodes:
        if not parts.hostname:
            raise BadJoinURL(f"{what} has no host: {_safe(text)!r}")
        nodes = [(parts.hostname, port)]
    if len(nodes) > MAX_NODES:
        raise BadJoinURL(
            f"{what} names {len(nodes)} addresses; at most {MAX_NODES}",
            "name a few nodes of the cluster: each one that does not answer costs a connect timeout",
        )
    named = [(host, node_port or DEFAULT_PORTS[scheme]) for host, node_port in nodes]
    twice = next((f"{_host(h)}:{p}" for i, (h, p) in enumerate(named) if (h, p) in named[:i]), None)
    if twice is not None:
        raise BadJoinURL(f"{what} names the address {twice} twice", "name each node of the cluster once")
    broker = BrokerAddress(
        scheme=scheme,
        host=named[0][0],
        port=named[0][1],
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        more=tuple(named[1:]),
    )
    return broker, parts.path, parts.fragment


def _node(scheme: str, entry: str, text: str, what: str) -> tuple[str, int | None]:
    """One address of a cluster's list (``host[:port]``); raises ValueError for a bad port."""
    if not entry.strip():
        raise BadJoinURL(
            f"{what} has an empty address in its list of nodes: {_safe(text)!r}",
            "separate the nodes with single commas: SCHEME://n1:PORT,n2:PORT/...",
        )
    if entry != entry.strip() or any(c.isspace() for c in entry):
        raise BadJoinURL(
            f"{what} has a space in its list of nodes: {_safe(text)!r}",
            "separate the nodes with commas only: SCHEME://n1:PORT,n2:PORT/...",
        )
    parts = urlsplit(f"{scheme}://{entry}")
    if not parts.hostname or parts.path or parts.query:
        raise BadJoinURL(f"{what} has a malformed address {entry!r} in its list of nodes")
    return parts.hostname, parts.port


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _safe(text: str) -> str:
    """The text with any password and channel key blanked, for error messages (up to the last ``@``: a
    password holding ``/`` or ``@`` is blanked whole too)."""
    text = re.sub(r"#.*$", "#...", text)
    return re.sub(r"(://[^:/@]*:).*@", r"\1***@", text)[:200]
