"""The `mqttalk` command: parse, make one library call, render. Imports stay lazy for a fast start."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NoReturn

# pydantic scans installed packages' entry points for plugins the first time a model validates
# (~15 ms of importlib.metadata). The CLI uses none, and every command pays for that start-up.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer

from ._errors import EXIT_TIMEOUT, EXIT_USAGE, MqttalkError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._bindings import Binding
    from ._channel import Channel, SpecDone
    from ._config import Settings
    from ._live import Live, ServiceStart
    from ._peer import Event
    from ._spec import Contract
    from ._store import Gap
    from ._wire import Envelope

HELP = """\
Pair coding-agent sessions through an MQTT broker and let them exchange structured messages.

\b
Session A:   mqttalk create --as impl          (prints a join URL and a sentence to paste into B)
Session B:   mqttalk pair URL --as tests       (prints: mqttalk: PAIRED with impl)
Either side: mqttalk send "POST /users takes {email,name}"
             mqttalk send --kind status --state red "tests written, all red"
             mqttalk recv --wait 60            (prints unread messages; waits up to 60 s for one)
             mqttalk status                    (peers, presence, unread count)
Agents:      mqttalk guide                     (the manual an agent reads: who is here, what to run when)
             mqttalk mcp                       (the same as MCP tools over stdio)
             mqttalk install claude            (Claude Code hooks that show new messages as they come)
You:         mqttalk watch                     (the channel live in your browser; say something from it)
             mqttalk log --format html > t.html  (a transcript: md, html or json)

Each directory remembers the channel and peer it joined; --channel URL --as NAME (or MQTTALK_CHANNEL,
MQTTALK_PEER) act for another. With no broker configured, `create` starts the embedded broker on
127.0.0.1 in the background; --broker mqtt://HOST:PORT (or MQTTALK_BROKER) uses any MQTT broker.

\b
Exit codes: 0 ok, 1 error, 2 bad input, 3 timed out (nothing arrived / no peer yet),
            4 no channel for this directory, 5 broker unreachable or refused,
            6 queued: kept in the outbox, sent by the next command that reaches the broker,
            7 pair: nobody is in that channel, nothing joined (check the join URL's broker and prefix).
"""

_APP_SETTINGS: dict[str, Any] = dict(
    name="mqttalk",
    help=HELP,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
app = typer.Typer(**_APP_SETTINGS)

PUBLIC_BROKERS = {
    "test.mosquitto.org",
    "broker.hivemq.com",
    "broker.emqx.io",
    "mqtt.eclipseprojects.io",
    "public.mqtthq.com",
    "broker.mqttdashboard.com",
}

AsOpt = Annotated[
    str | None,
    typer.Option(
        "--as", metavar="NAME", help="Peer name (a-z 0-9 - _). Default: this directory's name, or its binding."
    ),
]
ChannelOpt = Annotated[
    str | None,
    typer.Option(
        "--channel", metavar="URL", help="Join URL to act on instead of this directory's binding (MQTTALK_CHANNEL)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (one object per line) for programs.")]
RoleOpt = Annotated[str | None, typer.Option("--role", help="What this session works on, shown to peers.")]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        metavar="PATH",
        help="CA certificate (PEM) that signed an mqtts:// or wss:// broker's certificate; "
        "remembered for this directory (MQTTALK_CA_FILE).",
    ),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--connect-timeout", metavar="SECONDS", help="Seconds to wait for the broker (default 5)."),
]


def _open(channel_url: str | None, as_: str | None, out: _Printer) -> Channel:
    """The channel a command acts for: --channel/--as, MQTTALK_CHANNEL/MQTTALK_PEER, or the binding."""
    from ._api import open_channel

    channel = open_channel(_settings(channel=channel_url, peer=as_), HOST.cwd, on_event=out.event)
    if HOST.adopt is not None:  # run by a live process of this peer for another process: act through it
        return HOST.adopt(channel)
    channel.service = SERVICE
    return channel


def _settings(**flags: Any) -> Settings:
    from ._config import Settings

    return Settings.load(**flags)


def _piped(stdin: Any) -> bool:
    """Whether text waits on stdin (a pipe with data): only to say why a send without TEXT is empty.
    Never while serving another process's command (this process's stdin is not that command's)."""
    if HOST.adopt is not None or stdin is None or getattr(stdin, "closed", True):
        return False
    try:
        import select

        fd = stdin.fileno()
        return not stdin.isatty() and bool(select.select([fd], [], [], 0)[0]) and bool(os.read(fd, 1))
    except (OSError, ValueError, AttributeError):
        return False


def _safe(text: Any, limit: int = 0) -> str:
    """Text a peer controls (a name, a role, a reason) made safe for one line of ours (see _render.line)."""
    from ._render import line

    return line(text, limit)


class _Host(threading.local):
    """Where this thread runs a command: in its own process, or in a live process of the same peer that
    serves it for another process (see _handoff_server): then in the command's directory (``cwd``), and
    its channel acts through that process's connection (``adopt``)."""

    cwd: Path | None = None
    adopt: Callable[[Channel], Channel] | None = None


HOST = _Host()
SERVICE: ServiceStart | None = None  # run by the live sessions of this process's channels (set by _entry)


class _Drops:
    """Payloads dropped (DROPPED: malformed, stale, replayed) or that did not open (DECRYPT_FAIL): counted,
    and told as one line per kind at the end of the command (`listen`: at most every SUMMARY_EVERY
    seconds), with the first reason as an example. A flood of junk costs the agent one line, not 2,000."""

    SUMMARY_EVERY = 5.0
    WORDS: ClassVar[dict[str, tuple[str, str]]] = {
        "dropped": ("DROPPED", "that could not be used"),
        "decrypt_fail": ("DECRYPT_FAIL", "that did not open with this channel's key"),
    }

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.told = float("-inf")

    def add(self, kind: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, reason)

    def flush(self, every: float = 0.0) -> None:
        """Print the summary lines (on stderr) if any, and at most once per ``every`` seconds."""
        if not self.counts or time.monotonic() - self.told < every:
            return
        for kind, count in self.counts.items():
            word, what = self.WORDS.get(kind, (kind.upper(), ""))
            print(
                f"mqttalk: {word} {count:,} payload{'s' if count != 1 else ''} {what} "
                f"(the first: {_safe(self.first[kind], 200)}; never shown, never stored)",
                file=sys.stderr,
                flush=True,
            )
        self.counts.clear()
        self.first.clear()
        self.told = time.monotonic()


_DROPS = _Drops()


class _Printer:
    """Renders events and results; --json switches every line to a JSON object. In text, whatever a peer
    controls is escaped (see _render.line): no peer can write a line of ours, or an escape sequence."""

    def __init__(self, as_json: bool, *, listening: bool = False) -> None:
        self.json = as_json
        self.listening = listening  # `listen` prints message and connection events as they happen
        self.bodies: Path | None = None  # where long bodies go (see _render.LONG_BODY); None: print them whole

    def data(self, text: str, obj: dict[str, Any]) -> None:
        print(json.dumps(obj, default=str) if self.json else text, flush=True)

    def note(self, text: str) -> None:
        """A diagnostic for people (stderr); silent in --json mode unless it is a warning."""
        if not self.json:
            print(f"mqttalk: {text}", file=sys.stderr, flush=True)

    def message(self, env: Envelope) -> None:
        """A whole message: its one-line header, then its body (or one JSON object, whole body included).

        A body longer than _render.LONG_BODY characters is written to a file in the state directory
        and shown as a preview plus that file's path: agents pay for every token they read."""
        if self.json:
            self.data("", {"event": "message", **env.model_dump(mode="json", by_alias=True, exclude_none=True)})
        else:
            from ._render import message_text

            print(message_text(env, self.bodies, terminal=sys.stdout.isatty()) + "\n", flush=True)

    def gap(self, gap: Gap) -> None:
        from ._render import gap_data, gap_text

        self.data(gap_text(gap), gap_data(gap))

    def event(self, event: Event) -> None:
        """Show an event as it happens: pairings, waits and other wire versions always; `listen` also shows
        messages, peers gone offline, gaps and the broker link (a read prints the gaps it fetched)."""
        from ._render import event_data, notice_text

        if event.kind in ("dropped", "decrypt_fail"):
            _DROPS.add(event.kind, event.detail)
        elif event.kind == "waiting":
            self.note(f"waiting {_safe(event.detail, 300)}...")
        elif event.kind == "outdated":
            self.note((notice_text(event) or "").removeprefix("mqttalk: "))
        elif event.kind == "message" and self.listening and event.envelope is not None:
            self.data(f"mqttalk: MESSAGE {_facts(event.envelope)}", event_data(event))  # (--json: body included)
        elif event.kind == "paired" or self.listening:
            text = notice_text(event)
            if text is not None:
                self.data(text, event_data(event))


@app.command()
def create(
    as_: AsOpt = None,
    role: RoleOpt = None,
    broker: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Broker to use, e.g. mqtt://host:1883 (MQTTALK_BROKER). Default: embedded."),
    ] = None,
    prefix: Annotated[str | None, typer.Option(help="Topic prefix (MQTTALK_PREFIX, default mqttalk/v1).")] = None,
    wait: Annotated[
        float, typer.Option(metavar="SECONDS", help="After printing the URL, wait this long for a peer to pair.")
    ] = 0.0,
    plain: Annotated[
        bool,
        typer.Option("--plain", help="No channel key: readable JSON on the broker (private brokers, IoT dashboards)."),
    ] = False,
    ca: CaOpt = None,
    connect_timeout: TimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a new channel and print its join URL plus a sentence to paste into the other session.

    Channels are sealed by default: a key in the URL's #k= fragment (never sent to the broker) seals
    every payload and names every topic, so the broker and its other users learn nothing.
    """
    from ._api import create as create_channel
    from ._input import check_seconds

    check_seconds(wait, "--wait")
    out = _Printer(as_json)
    settings = _settings(broker=broker, prefix=prefix, connect_timeout=connect_timeout, ca_file=ca)
    _private_state(settings)
    if plain and settings.broker:
        from ._url import parse_broker

        host = parse_broker(settings.broker).host
        if host in PUBLIC_BROKERS:
            print(
                f"mqttalk: WARNING: a --plain channel on the public broker {host}: anyone subscribed to # "
                "there reads every message and name. Drop --plain to seal it.",
                file=sys.stderr,
                flush=True,
            )
    from ._bindings import find

    before = find(settings.state_dir, Path.cwd().resolve())
    channel = create_channel(as_, role=role, settings=settings, on_event=out.event, sealed=not plain)
    _rebound(before, channel, out)
    url = channel.url.render()
    share = _share_text(channel.me, url)
    out.data(
        f"mqttalk: CREATED channel as {channel.me} on {channel.url.broker.display()}\n"
        f"join URL: {url}\n\nPaste this into the other session:\n\n{share}\n",
        {"event": "created", "url": url, "peer": channel.me, "share": share},
    )
    if channel.url.broker.host in ("127.0.0.1", "localhost", "::1"):
        out.note(
            "this broker is on this machine only (127.0.0.1); for a session on another machine, create "
            "the channel on a broker both machines reach: --broker mqtt://HOST:PORT (see README: Brokers)"
        )
    if wait <= 0:
        out.note(
            "to see PAIRED the moment the other side pairs, wait for it: `mqttalk recv --wait 600` "
            "(pairing is confirmed by a challenge only a running mqttalk answers)"
        )
    # The URL is on screen (the user must share it) before we block.
    if wait > 0 and not channel.join(wait, new_member=False, new_challenge=False):
        out.note(
            f"no peer paired within {wait:g}s; the channel stays open "
            "(`mqttalk recv --wait SECONDS` prints PAIRED when one comes)"
        )
        raise typer.Exit(EXIT_TIMEOUT)


@app.command()
def pair(
    url: Annotated[
        str,
        typer.Argument(
            metavar="URL",
            help="The join URL printed by `mqttalk create`; '-' reads it from stdin (keeps the "
            "channel key out of the process list and shell history).",
        ),
    ],
    as_: AsOpt = None,
    role: RoleOpt = None,
    wait: Annotated[float, typer.Option(metavar="SECONDS", help="How long to wait for another peer.")] = 10.0,
    ca: CaOpt = None,
    connect_timeout: TimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Join a channel from its join URL; prints `mqttalk: PAIRED with NAME` once the other peer is seen."""
    from ._api import pair as pair_channel
    from ._input import check_seconds, read_url

    check_seconds(wait, "--wait")
    out = _Printer(as_json)
    settings = _settings(connect_timeout=connect_timeout, ca_file=ca)
    _private_state(settings)
    if url == "-":
        url = read_url(sys.stdin)
    from ._bindings import find

    before = find(settings.state_dir, Path.cwd().resolve())
    channel = pair_channel(url, as_, role=role, settings=settings, wait=wait, on_event=out.event)
    _rebound(before, channel, out)
    if not channel.paired:
        from ._render import CLI, alone_text, unanswered_text

        out.note(
            unanswered_text(channel.me, channel.unanswered, CLI, channel.waited)
            if channel.unanswered
            else alone_text(channel.me, CLI)
        )
        raise typer.Exit(EXIT_TIMEOUT)


def _send_spec(channel: Channel, body: str, data: dict[str, Any], re: str | None, *, next_rev: bool) -> Envelope:
    """A `send --kind spec`: what is queued for us taken in first, so that without --rev a proposal is
    the next revision (as `spec propose` numbers it) and an answer is about the latest. Our retained
    contract state is left to the spec commands (a write on the spec topic as the message goes out
    would tell a snooper its kind). With the broker out of reach it is queued as any message is."""
    from ._errors import BrokerUnreachable, TimedOut
    from ._spec import default_rev, fold

    def plan(envs: list[Envelope], _members: list[str]) -> tuple[str, dict[str, Any], str | None]:
        fields = dict(data)
        if next_rev:
            fields["rev"] = default_rev(fold(envs), str(fields.get("subject")), fields.get("state"))
        return body, fields, re

    try:
        env = channel.spec_op(plan, publish=False)[0]
    except (BrokerUnreachable, TimedOut):
        _b, fields, _r = plan(channel.store.specs(channel.url.channel, channel.me), [])
        return channel.send(body, "spec", data=fields, re=re)
    assert env is not None  # (the plan always sends)
    return env


@app.command()
def send(
    text: Annotated[
        str | None,
        typer.Argument(
            metavar="[TEXT]", help="The message. '-' reads it from stdin (safest for quotes, $, backticks)."
        ),
    ] = None,
    kind: Annotated[str, typer.Option("--kind", "-k", help="note, spec, status, question or answer.")] = "note",
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the message from this file.")] = None,
    to: Annotated[str | None, typer.Option(metavar="PEER", help="Send to one peer only.")] = None,
    re: Annotated[
        str | None, typer.Option("--re", metavar="ID", help="Id of the message this answers or continues.")
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="spec: what it specifies, e.g. 'POST /users' (default: the first line).")
    ] = None,
    rev: Annotated[
        int | None, typer.Option(help="spec: revision number (default: the next one for a proposal, else the latest).")
    ] = None,
    state: Annotated[
        str | None, typer.Option(help="spec: proposed|agreed|rejected. status: red|green|blocked|working|done.")
    ] = None,
    commit: Annotated[str | None, typer.Option(help="status: the git commit it refers to.")] = None,
    spec: Annotated[
        str | None,
        typer.Option(
            metavar="SUBJECT",
            help="status: the spec it is against, at its agreed revision (or --rev N). Default: the one "
            "agreed subject, if exactly one is.",
        ),
    ] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a message (QoS 1); exits 0 only once the broker has acknowledged it."""
    from ._errors import BadMessage
    from ._input import check_id, read_body, typed_fields

    out = _Printer(as_json)
    if to is not None:
        from ._topics import check_peer

        check_peer(to)  # (whether it names a member is known only on the broker)
    check_id(re, "--re")
    status_rev = None
    if spec is not None or (kind == "status" and rev is not None):
        from ._spec import status_request

        status_rev, rev = status_request(kind, spec, rev)
    body = read_body(text, file, sys.stdin)
    try:
        data = typed_fields(kind, body, subject=subject, rev=rev, state=state, commit=commit)
    except BadMessage:
        if text is None and file is None and _piped(sys.stdin):
            raise BadMessage(
                "no message given (text piped in is read only when TEXT is '-')", "… | mqttalk send -"
            ) from None
        raise
    channel = _open(channel_url, as_, out)
    if spec is not None:
        from ._spec import fold, status_spec

        data.update(status_spec(fold(channel.store.specs(channel.url.channel, channel.me)), spec, status_rev))
    if kind == "spec" and to is None:
        env = _send_spec(channel, body, data, re, next_rev=rev is None)
    else:
        env = channel.send(body, kind, data=data, to=to, re=re)
    out.data(
        f"mqttalk: SENT kind={env.kind} id={env.id}" + (f" to={to}" if to else ""),
        {"event": "sent", "id": env.id, "kind": env.kind, "to": to},
    )
    if env.kind == "status" and channel.store.specs(channel.url.channel, channel.me):
        from ._render import status_against

        out.note(status_against(env, channel.store.specs(channel.url.channel, channel.me)))
    if not set(channel.store.known_presences(channel.url.channel)) - {channel.me}:
        out.note(
            "nobody else has joined this channel yet: the first peer to join gets this message once it has "
            "joined and a command of yours runs again (it asks; that command sends it once more)"
        )
    if to is not None and to not in channel.store.known_presences(channel.url.channel):
        out.note(
            f"no peer named {to} has been seen in this channel (yet): only a peer of that name will ever "
            "read it; `mqttalk status` lists the peers"
        )


@app.command()
def recv(
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            "-w",
            metavar="SECONDS",
            help="Block up to this long for a message (or for a peer to pair); exit 3 if nothing came.",
        ),
    ] = 0.0,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print unread messages once, oldest first, then mark them read.

    Each message is one header line and its body; a body over 600 characters is shown as a preview and the
    path of a file holding all of it (--json prints whole bodies)."""
    from ._input import check_seconds

    check_seconds(wait, "--wait")
    out = _Printer(as_json)
    channel = _open(channel_url, as_, out)
    out.bodies = channel.settings.state_dir / "bodies"
    inbox = channel.fetch(wait)
    with channel.reading():  # (another reader of this peer, such as the MCP server's push, may have taken some)
        inbox = channel.still_unread(inbox)
        if out.json:
            for gap in inbox.gaps:
                out.gap(gap)
        else:
            from ._render import gap_lines

            for text in gap_lines(inbox.gaps):  # at most a screenful, and how many more
                print(text, flush=True)
        for m in inbox.messages:
            out.message(m.envelope)
        channel.mark_read(inbox)
    if not inbox:
        if wait > 0:
            out.note(f"no new message within {wait:g}s")
            raise typer.Exit(EXIT_TIMEOUT)
        out.note("no unread messages")


@app.command()
def listen(
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Stop after this long (default: run until interrupted).")
    ] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stay connected: keep presence online, store every message as it arrives, print one line per event.

    Run it in the background and wake on its output; read bodies with `mqttalk recv` (it reads what
    `listen` stored). Lines: MESSAGE, PAIRED, OFFLINE, GAP, BROKER_DOWN, BROKER_UP. It reconnects
    with backoff when the broker goes away, and sends what other mqttalk processes of this peer queued.
    """
    import signal

    from ._input import check_seconds

    check_seconds(timeout, "--timeout")
    out = _Printer(as_json, listening=True)
    channel = _open(channel_url, as_, out)

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    deadline = None if timeout is None else time.monotonic() + timeout
    live = channel.live(online=True, reconnect=True)
    try:
        if not _first_connect(live, out, deadline):
            return
        with live:
            live.announce("online")
            node = f" (node {live.node})" if len(channel.url.broker.nodes) > 1 else ""
            out.note(f"listening as {channel.me} on {channel.url.display()}{node} (Ctrl-C stops)")
            while deadline is None or time.monotonic() < deadline:
                live.poll(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
                _DROPS.flush(every=_Drops.SUMMARY_EVERY)
    except KeyboardInterrupt:
        pass


def _first_connect(live: Live, out: _Printer, deadline: float | None) -> bool:
    """Open ``live``, waiting for a broker that is down (BROKER_DOWN, then BROKER_UP once it is there), as
    `listen` rides out a broker that goes away later; False if ``deadline`` came first. A broker that
    refuses us (credentials, ACL, another process holding the session) is an error at once."""
    from ._errors import BrokerUnreachable, TimedOut
    from ._peer import Event

    backoff, down = 0.5, False
    while True:
        try:
            live.open()
        except (BrokerUnreachable, TimedOut) as exc:
            if not down:
                out.event(Event("disconnected", detail=exc.message))
                down = True
            if deadline is not None and time.monotonic() + backoff > deadline:
                return False
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        if down:
            out.event(Event("reconnected", broker=live.node))
        return True


@app.command()
def log(
    since: Annotated[
        str | None,
        typer.Option(
            metavar="TIME|ID",
            help="Only from this time: ISO (2026-11-25T12:00, with or without Z or +HH:MM; UTC "
            "if no zone), HH:MM today (UTC), or 10m / 2h / 3d ago; or only after this message id.",
        ),
    ] = None,
    peer: Annotated[str | None, typer.Option(metavar="NAME", help="Only messages from this peer.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", "-k", help="Only this kind.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the last N.")] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
    form: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="text (default: the lines `recv` prints), or a transcript: md, html (the `watch` page's "
            "rendering, no script) or json (one document); e.g. `mqttalk log --format html > chat.html`.",
        ),
    ] = "text",
) -> None:
    """Show the channel's history from the local store (sent and received), oldest first; --format writes a
    transcript with the specs."""
    if form not in ("text", "md", "html", "json"):
        from ._errors import UsageError

        raise UsageError(f"unknown --format {form!r}", "use text, md, html or json")
    if form != "text" and as_json:
        from ._errors import UsageError

        raise UsageError("--json and --format exclude each other", "--format json writes one JSON document")
    if since is not None:
        from ._since import normalise

        since = normalise(since)
    if kind is not None:
        from ._wire import KINDS

        if kind not in KINDS:
            from ._errors import UsageError

            raise UsageError(f"unknown kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    if peer is not None:
        from ._topics import check_peer

        check_peer(peer)
    out = _Printer(as_json)
    channel = _open(channel_url, as_, out)
    if form != "text":
        from ._transcript import as_json as json_text
        from ._transcript import document, html, markdown

        doc = document(channel, since=since, limit=limit)
        if peer or kind:
            doc.envelopes = [e for e in doc.envelopes if e.sender == (peer or e.sender) and e.kind == (kind or e.kind)]
        sys.stdout.write({"md": markdown, "html": html, "json": json_text}[form](doc))
        return
    out.bodies = channel.settings.state_dir / "bodies"
    for env in channel.history(peer=peer, kind=kind, since=since, limit=limit):
        out.message(env)


@app.command()
def watch(
    port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, metavar="N", help="TCP port (default: the last one used if free, else any free one)."
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            metavar="HOST", help="Interface to serve on. Anything but loopback lets others on the network try it."
        ),
    ] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
    as_: Annotated[
        str | None,
        typer.Option(
            "--as", metavar="NAME", help="Your peer name as a person (default: your login name); never an agent's."
        ),
    ] = None,
    channel_url: ChannelOpt = None,
) -> None:
    """Watch the channel live in a browser and take part as a person (a peer of your own, never an agent).

    Serves a page on 127.0.0.1 and prints its URL with a secret token: the members and their presence and
    last status, the specs with their revisions and diffs, and the conversation as it happens, with a box to
    send a note, a question or an answer. Every request needs the token; the channel key never reaches the
    page. Ctrl-C stops it (your presence: left)."""
    from ._watch import serve

    raise typer.Exit(
        serve(
            _settings(channel=channel_url),
            HOST.cwd or Path.cwd().resolve(),
            as_=as_,
            host=host,
            port=port,
            open_browser=open_browser,
        )
    )


@app.command()
def status(channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False) -> None:
    """Show the channel, its peers and their presence (online / last seen / left), and your unread count."""
    out = _Printer(as_json)
    channel = _open(channel_url, as_, out)
    st = channel.status()
    if as_json:
        out.data(
            "",
            {
                "event": "status",
                "url": st.url,
                "me": st.me,
                "protocol": st.protocol,
                "unread": st.unread,
                "gaps": st.gaps,
                "queued": st.queued,
                "sealed": st.sealed,
                "peers": [
                    {
                        "name": p.name,
                        "role": p.role,
                        "state": p.state,
                        "me": p.me,
                        "paired": p.paired,
                        "last_seen": p.last_seen.isoformat(),
                        "since": p.since.isoformat(),
                        "liveness": p.liveness(),
                    }
                    for p in st.peers
                ],
                "work": [
                    {
                        "peer": w.peer,
                        "state": w.state,
                        "at": w.at.isoformat(),
                        "spec": w.spec,
                        "rev": w.rev,
                        "in_force": w.in_force,
                        "outdated": w.outdated,
                    }
                    for w in st.work
                ],
            },
        )
        return
    from ._render import status_text

    print(status_text(st))


@app.command()
def leave(channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False) -> None:
    """Mark yourself gone from the channel and forget this directory's binding."""
    from ._api import forget, open_channel

    out = _Printer(as_json)
    settings = _settings(channel=channel_url, peer=as_)
    channel = open_channel(settings, on_event=out.event)
    channel.leave()
    forget(channel)
    out.data(
        f"mqttalk: LEFT channel {channel.url.display()} as {channel.me}",
        {"event": "left", "url": channel.url.display(), "peer": channel.me},
    )


@app.command()
def broker(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 1884).")] = None,
    ws_port: Annotated[int | None, typer.Option(help="Also listen for MQTT over websockets here.")] = None,
    db: Annotated[
        Path | None,
        typer.Option(help="Keep sessions, queues and retained messages here (default: STATE_DIR/broker-PORT.sqlite3)."),
    ] = None,
    memory: Annotated[bool, typer.Option("--memory", help="Keep nothing across restarts.")] = False,
    stop: Annotated[
        bool,
        typer.Option(
            "--stop",
            help="Stop the embedded broker `create` started in the background (recorded in "
            "STATE_DIR/broker.json) instead of running one; later commands no longer restart it.",
        ),
    ] = False,
) -> None:
    """Run the embedded MQTT broker (amqtt) in the foreground until Ctrl-C; --stop stops the one running in
    the background.

    Sessions, offline queues and retained messages survive a restart (kept in SQLite)."""
    if stop:
        from . import _embedded

        settings = _settings()
        address = _embedded.running(settings.state_dir)
        if not _embedded.stop(settings.state_dir):
            print(
                "mqttalk: no embedded broker of this user is running (nothing recorded in "
                f"{settings.state_dir / 'broker.json'})",
                file=sys.stderr,
            )
            raise typer.Exit(1)
        deadline = time.monotonic() + 15  # it writes its database before it exits
        while address is not None and _embedded._listening(address.host, address.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"mqttalk: STOPPED the embedded broker{f' on {address.display()}' if address else ''}", flush=True)
        return

    import mqttalk_broker

    settings = _settings(embedded_host=host, embedded_port=port)

    def ready() -> None:
        where = f"mqtt://{settings.embedded_host}:{settings.embedded_port}"
        _record_broker(settings, None if memory else db)
        print(
            f"mqttalk: broker listening on {where}"
            + (f" and ws://{settings.embedded_host}:{ws_port}/mqtt" if ws_port else ""),
            flush=True,
        )

    if db is None and not memory:
        db = settings.state_dir / f"broker-{settings.embedded_port}.sqlite3"
    try:
        mqttalk_broker.run(
            settings.embedded_host, settings.embedded_port, ws_port=ws_port, db=None if memory else db, ready=ready
        )
    except OSError as exc:
        from ._errors import BrokerUnreachable

        raise BrokerUnreachable(
            f"embedded broker cannot listen on {settings.embedded_host}:{settings.embedded_port}: {exc.strerror or exc}"
        ) from None


@app.command()
def demo(keep: Annotated[bool, typer.Option(help="Keep the demo's temporary directories.")] = False) -> None:
    """Show the whole story on the embedded broker: create, pair, spec, status, recv, status, leave."""
    from ._demo import run

    raise typer.Exit(run(keep=keep))


@app.command()
def guide(
    role: Annotated[
        str | None,
        typer.Option(metavar="ROLE", help="The part you play: tests, impl or review (default: your peer name)."),
    ] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
) -> None:
    """Print the agent's manual for this directory's channel: who you are, who your peers are, and the exact
    commands to read, wait and send, and when to use each. With no channel yet: how to create or join one."""
    from ._guide import check_role
    from ._guide import guide as render

    check_role(role)
    text = render(_settings(channel=channel_url, peer=as_), Path.cwd().resolve(), role, _Printer(False).event)
    print(text, end="")


@app.command()
def mcp(
    channel: Annotated[
        bool,
        typer.Option(
            "--claude-channel",
            help="Be a Claude Code channel: push each peer message and notice into the session as it arrives "
            "(marked read). Pushes only when the Claude Code that started this server was given "
            "--dangerously-load-development-channels server:NAME (NAME: --server-name); otherwise messages "
            "stay unread for the receive tool and the hooks.",
        ),
    ] = False,
    always: Annotated[
        bool,
        typer.Option(
            "--claude-channel-always",
            help="Push without that check (a client you know shows channel notifications; any other drops "
            "them, and what it dropped is marked read).",
        ),
    ] = False,
    server_name: Annotated[
        str, typer.Option("--server-name", metavar="NAME", help="The name Claude Code knows this server by.")
    ] = "mqttalk",
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="PATH",
            help="Act for this project directory (default: the one the client starts the server in).",
        ),
    ] = None,
) -> None:
    """Run an MCP server on stdin/stdout, so an agent uses mqttalk as native tools.

    \b
    Tools: receive (waits up to 55 s), send, status, history, spec_* (contracts), create, pair, leave.
    Resources: mqttalk://guide, mqttalk://inbox and mqttalk://peers (subscribe: the server says when
    they change). It holds this directory's channel with presence online and stores messages as they
    arrive. `mqttalk install claude` sets up Claude Code (hooks, and .mcp.json with --claude-channel);
    then start it with: claude --dangerously-load-development-channels server:mqttalk (2.1.80+).
    Other clients: command `mqttalk`, arguments `mcp` (README: one section per client).
    The MCP SDK (the mcp package) is one of mqttalk's dependencies."""
    from ._errors import UsageError

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", server_name):
        raise UsageError(f"--server-name {server_name[:40]!r} is not a server name", "use letters, digits, - _ .")
    try:
        import mcp.server.mcpserver  # noqa: F401 - only to say clearly when the optional package is missing
    except ImportError:
        print(
            "mqttalk: error: `mqttalk mcp` needs the MCP SDK, a dependency of mqttalk: pip install 'mcp>=2.3,<3'",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    from ._mcp import serve

    if directory is not None and not directory.is_dir():
        raise UsageError(f"--dir {str(directory)[:200]!r} is not a directory", "give the project's directory")
    serve(
        _settings(),
        (directory or Path.cwd()).resolve(),
        service=SERVICE,
        push=channel or always,
        always=always,
        server_name=server_name,
    )


@app.command()
def hook(
    agent: Annotated[str, typer.Argument(metavar="AGENT", help="The agent that runs the hook: claude.")],
    event: Annotated[
        str | None,
        typer.Option(
            metavar="EVENT", help="UserPromptSubmit, PostToolUse or Stop (default: hook_event_name from stdin)."
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option(metavar="SECONDS", help="Stop: how long to wait for a reply the agent awaits.")
    ] = 90.0,
    every: Annotated[
        float, typer.Option(metavar="SECONDS", help="PostToolUse: look for messages at most this often.")
    ] = 15.0,
) -> None:
    """A Claude Code hook: read the hook's JSON on stdin, add new peer messages to the agent's context.

    UserPromptSubmit and PostToolUse print hookSpecificOutput.additionalContext with messages not seen yet
    (never the same one twice; nothing when there is nothing new). Stop, when the agent's last message asked
    a question or proposed a spec, waits up to --wait seconds for the reply and makes the agent continue with
    it. Any error: nothing on stdout, one line on stderr, exit 0. `mqttalk install claude` sets it up."""
    from ._hook import main_stdio

    raise typer.Exit(main_stdio(agent, event, wait=wait, every=every))


@app.command()
def install(
    agent: Annotated[str, typer.Argument(metavar="AGENT", help="The agent to set up: claude.")],
    user: Annotated[
        bool, typer.Option("--user", help="Write ~/.claude/settings.json (every project) instead of this project's.")
    ] = False,
    project: Annotated[
        bool, typer.Option("--project", help="Write .claude/settings.json in this directory (the default).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    skill: Annotated[
        bool, typer.Option("--skill/--no-skill", help="Also write the mqttalk skill (.claude/skills/mqttalk/SKILL.md).")
    ] = True,
    stop_wait: Annotated[
        float, typer.Option(metavar="SECONDS", help="How long the Stop hook waits for an awaited reply.")
    ] = 90.0,
    mcp_server: Annotated[
        bool,
        typer.Option(
            "--mcp/--no-mcp",
            help="Also add the MCP server, as a channel, to the project's .mcp.json (--user: print how).",
        ),
    ] = True,
) -> None:
    """Set up Claude Code: the MCP server as a channel, hooks, and a skill.

    \b
    .mcp.json: the mqttalk server (mqttalk mcp --claude-channel). Start Claude Code with
      claude --dangerously-load-development-channels server:mqttalk
    and each peer message arrives in the session the moment it comes.
    .claude/settings.json: hooks (UserPromptSubmit, PostToolUse, Stop) that show new peer messages in a
    session started without channels. Both read one cursor: nothing is shown twice.
    Merges into the files, keeping everything else; running it again changes nothing. Prints each
    change and the diff."""
    from ._errors import UsageError
    from ._input import check_seconds
    from ._install import mqttalk_command, plan_claude, start_lines

    check_seconds(stop_wait, "--stop-wait")
    if agent != "claude":
        raise UsageError(f"unknown agent {agent!r}", "only claude is supported")
    if user and project:
        raise UsageError("--user and --project exclude each other")
    command = mqttalk_command()
    target = Path.home() if user else Path.cwd()
    plan = plan_claude(target, stop_wait=stop_wait, skill=skill, command=command, mcp_json=mcp_server and not user)
    if not plan.changes:
        print("mqttalk: nothing to change: Claude Code is already set up" + (" for this user" if user else " here"))
    for change in plan.changes:
        print(f"mqttalk: {'would change' if dry_run else 'changed'}: {change}")
    print(plan.diff(), end="")
    if not dry_run:
        try:
            plan.write()
        except OSError as exc:
            raise UsageError(f"could not write the settings: {exc}", "nothing else was changed") from None
    if mcp_server:
        print("\n".join(start_lines(command, user=user)))


spec_app = typer.Typer(
    name="spec",
    help="""Negotiate an interface as a contract: propose revisions, agree to one by its digest, build against it.

\b
mqttalk spec propose "POST /users" "takes {email,name}; 201 {id, created_at}; 409 on duplicate"
mqttalk spec agree "POST /users"          (the latest revision; the agreement names its sha256)
mqttalk spec list                         (each subject: latest revision, agreed by all / waiting for NAMES)
mqttalk spec export --out docs/specs      (each agreed subject as Markdown, byte for byte)

A revision is agreed once every member present when it was proposed (or named with --to) agreed to
its digest; a newer revision starts over. Revision numbers are counted, never typed.""",
    rich_markup_mode=None,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
app.add_typer(spec_app)

SubjectArg = Annotated[str, typer.Argument(metavar="SUBJECT", help='What the spec is about, e.g. "POST /users".')]
RevOpt = Annotated[int | None, typer.Option("--rev", metavar="N", help="A revision (default: the latest).")]


def _spec_done(out: _Printer, verb: str, done: SpecDone, subject: str) -> None:
    from ._render import spec_done_data, spec_done_text

    env, contract = done
    out.data(spec_done_text(verb, env, contract, subject), spec_done_data(verb, env, contract, subject))


def _spec_name(subject: str) -> str:
    from ._spec import quoted

    return quoted(subject)


def _spec_read(channel: Channel) -> Contract:
    """The contract, the broker's view taken in first; with the broker out of reach, what this machine
    knows (said on stderr)."""
    from ._errors import BrokerUnreachable, TimedOut
    from ._spec import fold

    try:
        return channel.contract()
    except (BrokerUnreachable, TimedOut) as exc:
        print(
            f"mqttalk: warning: broker not reached ({_safe(exc.message, 200)}): showing what this machine knows",
            file=sys.stderr,
            flush=True,
        )
        return fold(channel.store.specs(channel.url.channel, channel.me))


@spec_app.command("propose")
def spec_propose(
    subject: SubjectArg,
    text: Annotated[
        str | None,
        typer.Argument(metavar="[TEXT]", help="The spec. '-' reads it from stdin (safest for quotes, $, backticks)."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the spec from this file.")] = None,
    re: Annotated[
        str | None, typer.Option("--re", metavar="ID", help="Id of the question or rejection this answers.")
    ] = None,
    to: Annotated[
        list[str] | None,
        typer.Option(
            "--to", metavar="NAMES", help="The peers whose agreement it needs (comma-separated; default: all present)."
        ),
    ] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Propose a new revision of SUBJECT (its number is the next after the latest anyone proposed)."""
    from ._input import check_id, read_body
    from ._spec import check_subject, check_text
    from ._topics import check_peer

    check_subject(subject)
    check_id(re, "--re")
    needs = [check_peer(n.strip()) for names in to or [] for n in names.split(",") if n.strip()]
    body = check_text(read_body(text, file, sys.stdin))
    out = _Printer(as_json)
    done = _open(channel_url, as_, out).spec_propose(subject, body, re=re, to=needs)
    _spec_done(out, "PROPOSED", done, subject)


@spec_app.command("agree")
def spec_agree(
    subject: SubjectArg, rev: RevOpt = None, channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False
) -> None:
    """Agree to the latest revision of SUBJECT (refused for an older one: the line says which is the latest)."""
    from ._spec import check_rev, check_subject

    check_subject(subject)
    check_rev(rev)
    out = _Printer(as_json)
    _spec_done(out, "AGREED", _open(channel_url, as_, out).spec_agree(subject, rev), subject)


@spec_app.command("reject")
def spec_reject(
    subject: SubjectArg,
    why: Annotated[str, typer.Argument(metavar="WHY", help="What is wrong with it ('-' reads it from stdin).")],
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject the latest revision of SUBJECT, saying why (answer with a new `spec propose --re ID`)."""
    from ._input import read_body
    from ._spec import check_reason, check_subject

    check_subject(subject)
    reason = check_reason(read_body(why, None, sys.stdin), subject)
    out = _Printer(as_json)
    _spec_done(out, "REJECTED", _open(channel_url, as_, out).spec_reject(subject, reason), subject)


@spec_app.command("withdraw")
def spec_withdraw(
    subject: SubjectArg, channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False
) -> None:
    """Withdraw SUBJECT (only its latest proposer can); a new `spec propose` opens it again."""
    from ._spec import check_subject

    check_subject(subject)
    out = _Printer(as_json)
    _spec_done(out, "WITHDRAWN", _open(channel_url, as_, out).spec_withdraw(subject), subject)


@spec_app.command("list")
def spec_list(channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False) -> None:
    """One line per subject: latest revision, its state (agreed by all / waiting for NAMES / rejected /
    conflict), who proposed it, when."""
    from ._render import spec_data, spec_line

    out = _Printer(as_json)
    contract = _spec_read(_open(channel_url, as_, out))
    subjects = [s for s in contract.subjects.values() if s.revisions]
    for subj in subjects:
        out.data(spec_line(subj), {"event": "spec", **spec_data(subj)})
    if not subjects:
        out.note('no spec yet (propose one: `mqttalk spec propose "SUBJECT" TEXT`)')


@spec_app.command("show")
def spec_show(
    subject: SubjectArg, rev: RevOpt = None, channel_url: ChannelOpt = None, as_: AsOpt = None, as_json: JsonOpt = False
) -> None:
    """Print the text of SUBJECT's latest revision (or --rev N) exactly as proposed; its facts go to stderr."""
    from ._render import spec_revision_text
    from ._spec import check_rev, check_subject

    check_subject(subject)
    check_rev(rev)
    out = _Printer(as_json)
    subj = _spec_read(_open(channel_url, as_, out)).subject(subject)
    got = subj.revision(rev) if rev is not None else subj.latest
    if as_json:
        out.data("", {"event": "spec_text", "subject": subject, "rev": got.rev, "digest": got.digest, "text": got.text})
        return
    print(f"mqttalk: {spec_revision_text(subj, got)}", file=sys.stderr, flush=True)
    sys.stdout.write(got.text)
    sys.stdout.flush()


@spec_app.command("diff")
def spec_diff(
    subject: SubjectArg,
    a: Annotated[int, typer.Argument(metavar="A", help="The older revision.")],
    b: Annotated[int, typer.Argument(metavar="B", help="The newer revision.")],
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A unified diff between revisions A and B of SUBJECT (texts over 2,000 lines or 100 KB: their sizes
    and digests instead)."""
    from ._spec import check_rev, check_subject, diff_text, too_large_to_diff

    check_subject(subject)
    check_rev(a)
    check_rev(b)
    out = _Printer(as_json)
    subj = _spec_read(_open(channel_url, as_, out)).subject(subject)
    old, new = subj.revision(a), subj.revision(b)
    diff = diff_text(old, new, f"{_safe(subj.name, 200)} rev {a}", f"{_safe(subj.name, 200)} rev {b}")
    if diff is None:
        said = too_large_to_diff(subj.name, old, new)
        if as_json:
            out.data("", {"event": "spec_diff", "subject": subj.name, "a": a, "b": b, "diff": None, "too_large": said})
        else:
            out.note(said)
        return
    out.data(diff.rstrip("\n"), {"event": "spec_diff", "subject": subject, "a": a, "b": b, "diff": diff})
    if not diff:
        out.note(f"revisions {a} and {b} of {_spec_name(subject)} have the same text")


@spec_app.command("export")
def spec_export(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Write the files here (default: the state directory's specs/CHANNEL; nothing goes into "
            "your repository unless DIR is there).",
        ),
    ] = None,
    channel_url: ChannelOpt = None,
    as_: AsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write each agreed subject as one Markdown file: a small header (subject, revision, digest, agreed by,
    when), then the agreed text byte for byte."""
    from ._errors import UsageError
    from ._spec import export_files, write_exports

    out = _Printer(as_json)
    channel = _open(channel_url, as_, out)
    contract = _spec_read(channel)
    where = out_dir if out_dir is not None else channel.settings.state_dir / "specs" / channel.url.channel[:16]
    files = export_files(contract)
    try:
        write_exports(where, files)
        if not files:
            out.note("no subject is agreed yet: nothing written")
        for name, _data, (subj, rev) in files:
            out.data(
                f"mqttalk: EXPORTED {_spec_name(subj.name)} rev {rev.rev} to {where / name}",
                {
                    "event": "exported",
                    "subject": subj.name,
                    "rev": rev.rev,
                    "digest": rev.digest,
                    "path": str(where / name),
                },
            )
    except OSError as exc:
        raise UsageError(f"cannot write to {where}: {exc.strerror or exc}") from None


def _private_state(settings: Settings) -> None:
    """The state directory, 0700 before anything is written in it (the store holds decrypted messages,
    the bindings channel keys): see _state."""
    from ._state import private_dir, store_errors

    with store_errors(settings.state_dir / "store.sqlite3"):
        private_dir(settings.state_dir)


def _record_broker(settings: Settings, db: Path | None) -> None:
    """Record this broker as the state directory's embedded one, unless another recorded one still runs
    (a second broker started by hand must not take the place of the one channels were created on)."""
    from ._embedded import record, still_recorded
    from ._state import private_dir

    other = still_recorded(settings.state_dir)
    if other is not None and (other.host, other.port) != (settings.embedded_host, settings.embedded_port):
        return
    record(private_dir(settings.state_dir), settings.embedded_host, settings.embedded_port, os.getpid(), db)


def _rebound(before: Binding | None, channel: Channel, out: _Printer) -> None:
    """Say so when create or pair moved this directory off another channel it was bound to here."""
    from ._url import JoinURL

    here = str(Path.cwd().resolve())
    if before is None or before.directory != here or before.url == channel.url.render():
        return
    old = JoinURL.parse(before.url)
    if old.channel != channel.url.channel:
        out.note(
            f"this directory now acts for this channel; it was bound to {old.display()} as "
            f"{_safe(before.peer, 64)}, where it is still a member (`mqttalk leave --channel URL --as "
            f"{_safe(before.peer, 64)}` with that URL leaves it)"
        )


def _share_text(peer: str, url: str) -> str:
    from ._guide import share_text

    return share_text(peer, url)


def _facts(env: Envelope) -> str:
    """The key=value header of a message: one line, cheap in tokens."""
    from ._render import facts

    return facts(env)


def _version(value: bool) -> None:
    if value:
        from ._version import __version__

        print(f"mqttalk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the app; map every error to one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if not args:
            args = ["--help"]
        elif args == ["spec"]:  # (a group alone: its help, as `mqttalk` alone shows the app's)
            args = ["spec", "--help"]
        if not all(arg.isascii() for arg in args):  # (cheap: most command lines are ASCII)
            from ._input import check_args

            check_args(args)
        try:
            rv = _app_for(args)(args=args, prog_name="mqttalk", standalone_mode=False)
        finally:
            _DROPS.flush()  # what was dropped, one line per kind, before any error line
    except MqttalkError as exc:
        print(f"mqttalk: {exc.label}: {exc.line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        command = next((a for a in args if not a.startswith("-")), "")
        hint = f"see `mqttalk {command} --help`" if command in app_commands() else "see `mqttalk --help`"
        sub = next((a for a in args[args.index(command) + 1 :] if not a.startswith("-")), "") if command else ""
        if command == "spec" and sub in spec_app_commands():
            hint = f"see `mqttalk spec {sub} --help`"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"mqttalk: error: {message} ({hint})", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 0) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        print("mqttalk: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("MQTTALK_DEBUG"):
            raise
        if type(exc).__module__ == "sqlite3":  # the store is damaged, read-only, or the disk is full
            from ._state import store_error

            error = store_error(exc)
            if error is not None:
                print(f"mqttalk: {error.label}: {error.line()}", file=sys.stderr)
                sys.exit(error.exit_code)
        print(
            f"mqttalk: internal error: {type(exc).__name__}: {exc} (MQTTALK_DEBUG=1 shows a traceback)", file=sys.stderr
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _app_for(args: list[str]) -> typer.Typer:
    """The app with only the command being run: typer inspects every registered command's signature
    on each start (~10 ms for all of them), and an agent starts mqttalk many times."""
    name = args[0] if args else ""
    wanted = [c for c in app.registered_commands if _name(c) == name]
    groups = [g for g in app.registered_groups if _group_name(g) == name]
    if groups:
        lean = typer.Typer(**_APP_SETTINGS)
        lean.registered_callback = app.registered_callback
        lean.registered_groups = groups
        return lean
    if not wanted:
        return app  # top-level --help, --version, or an unknown command (click explains)
    lean = typer.Typer(**_APP_SETTINGS)
    lean.registered_callback = app.registered_callback
    lean.registered_commands = wanted
    return lean


def _group_name(group: typer.models.TyperInfo) -> str:
    return str(group.typer_instance.info.name) if group.typer_instance else ""


def _name(command: typer.models.CommandInfo) -> str:
    return command.name or (command.callback.__name__ if command.callback else "")


def spec_app_commands() -> set[str]:
    return {c.name or "" for c in spec_app.registered_commands}


def app_commands() -> set[str]:
    return {_name(c) for c in app.registered_commands} | {_group_name(g) for g in app.registered_groups}
