"""`mqttalk watch`: the channel live in a browser, for the person behind the agents, who may take part.

The person is a peer of its own (``--as``, default the login name), marked ``role: person`` in presence;
it never acts as an agent (a name an agent holds here or in the channel is refused), so it has its own
membership, broker session, cursor and outbox in the same state directory: it reads the whole history
this machine's store holds, and steals nothing from the agent. A thread holds that peer's live session
(presence ``online``, messages stored as they arrive); the page follows the store.

The server is starlette on uvicorn (imported only by this command), on 127.0.0.1 unless told otherwise.
Every request needs the token printed with the URL (compared in constant time), the Host header must
name this server (no DNS rebinding), and the event stream and every write refuse another origin. The
page's script builds rows from element trees with text nodes only (see :mod:`._view`), and a policy
forbids any other script. The channel key and broker password never leave the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from ._errors import BrokerUnreachable, MqttalkError, NameTaken, Queued, TimedOut, UsageError
from ._view import (
    ATTRS,
    BODY_SHOWN,
    PAGE_ROWS,
    PERSON_ROLE,
    TAGS,
    gap_tree,
    last_statuses,
    members_of,
    members_tree,
    message_tree,
    spec_view,
    specs_tree,
    stamp,
)
from ._wire import MAX_PAYLOAD, Envelope, MessageId, decode_presence

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ._channel import Channel
    from ._config import Settings
    from ._live import Live
    from ._peer import Event

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TICK = 0.25  # s between looks at the store and the members: new items show within a second
BEAT = 10.0  # s between the stream's heartbeats (the page reconnects after 30 s without one)
MAX_STREAMS = 32  # event streams open at once; more are refused (503), a stalled one costs one slot
INDEXED_BODY = 200  # characters of a message's body kept in memory (see Hub.keep)
SEND_STALL = 30.0  # s a stream may wait for a browser that does not read it before it is dropped


# -- the person's peer -------------------------------------------------------------------------------


def person_name(as_: str | None) -> str:
    """``--as``, else the login name made a peer name ("Ann Lee" -> "ann-lee")."""
    import getpass

    from ._topics import check_peer, peer_from_directory

    if as_ is not None:
        return check_peer(as_)
    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = "person"
    return peer_from_directory(login)


def person_channel(settings: Settings, cwd: Path, as_: str | None) -> Channel:
    """The channel of ``--channel URL`` or of this directory's binding, as the person's own peer.

    Refused: a name this machine's agents are bound as in that channel, or one whose presence in it is an
    agent's (a person never speaks as an agent, nor takes an agent's session or read cursor)."""
    from . import _bindings
    from ._api import open_channel
    from ._url import JoinURL

    binding = _bindings.find(settings.state_dir, cwd)
    url = settings.channel or (binding.url if binding else None)
    if url is None:
        binding = _bindings.require(binding)  # raises NotBound, saying how to create or join one
        url = binding.url
    name = person_name(as_)
    cid = JoinURL.parse(url).channel
    agents = _bindings.bound_peers(settings.state_dir, cid)
    if binding is not None and JoinURL.parse(binding.url).channel == cid:
        agents.add(binding.peer)
    if binding is not None and binding.ca_file and settings.ca_file is None:
        settings = settings.model_copy(update={"ca_file": Path(binding.ca_file)})
    if name in agents:
        raise UsageError(
            f"{name!r} is an agent of this channel on this machine; a person watches as a peer of their own",
            "give another name with --as NAME",
        )
    channel = open_channel(settings.model_copy(update={"channel": url, "peer": name}), cwd)
    raw = channel.store.known_presences(cid).get(name)
    pres = decode_presence(raw) if raw else None
    if pres is not None and pres.role != PERSON_ROLE:
        raise NameTaken(f"{name!r} is an agent in this channel, not a person", "give another name with --as NAME")
    channel.role = PERSON_ROLE
    return channel


class Watcher:
    """The person's live session, in a thread: presence online, every message stored as it arrives, the
    members as their presence shows them. Ends with the person's presence ``left``."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.me = channel.me
        # Never a "new member" that starts each sender's sequence where it stands: the store may be an
        # agent's here, and that would drop what the agent has yet to receive. Like the first peer to join,
        # it asks the senders for what this store lacks, and they send it again (to the whole channel).
        self.first = channel.store.recorded_identity(channel.url.channel, channel.me) is None
        self.link_text = "connecting to the broker…"
        self._members: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._fatal: MqttalkError | None = None
        self._thread = threading.Thread(target=self._run, name="mqttalk-watch-live", daemon=True)
        self.changed = threading.Event()  # set when something arrived: the page looks at once

    def start(self, wait: float) -> None:
        """Start; raise what makes watching impossible (the name taken, another watch of this person)."""
        self._thread.start()
        self._ready.wait(wait)
        if self._fatal is not None:
            raise self._fatal

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.channel.settings.connect_timeout * 2 + 5)

    def members(self) -> list[Any]:
        with self._lock:
            return list(self._members)

    def _on_event(self, event: Event) -> None:
        if event.kind in ("message", "gap", "paired", "offline"):
            self.changed.set()
        elif event.kind == "disconnected":
            self.link_text = "broker connection lost; reconnecting…"
        elif event.kind == "reconnected":
            self.link_text = "live"

    def _look(self, live: Live) -> None:
        snapshot = members_of(live.presences.values(), self.me)
        with self._lock:
            if snapshot != self._members:
                self._members = snapshot
                self.changed.set()

    def _run(self) -> None:
        from ._errors import SessionBusy
        from ._live import Live

        ch = self.channel
        ch.on_event = self._on_event
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self.first:
                    ch.store.nonce(ch.url.channel, ch.me, renew=True)
                with Live(ch, online=True, reconnect=True, new_member=False) as live:
                    self.first = False
                    live.announce("online")
                    self.link_text = "live"
                    self._look(live)
                    self._ready.set()
                    backoff = 1.0
                    while not self._stop.is_set():
                        live.poll(TICK)
                        self._look(live)
                    with contextlib.suppress(BrokerUnreachable, TimedOut):
                        live.drain()
                        if live.connected:
                            live.announce("left")
                return
            except (SessionBusy, NameTaken, UsageError) as exc:
                if isinstance(exc, SessionBusy):
                    exc = SessionBusy(
                        f"another mqttalk process of {ch.me} (another `mqttalk watch`?) holds its broker session",
                        "use that one's page, or watch as another name with --as NAME",
                    )
                self._fatal = exc
                self._ready.set()
                return
            except MqttalkError as exc:
                self.link_text = f"not connected ({exc.line()}); retrying"
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                self.link_text = f"not connected ({type(exc).__name__}: {exc}); retrying"
            self._ready.set()  # (the page serves what the store holds meanwhile)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)


# -- what the page shows, kept current -----------------------------------------------------------------


class Hub:
    """The channel as the page shows it: the members and specs trees, the gaps, and where the store
    ends; refreshed every TICK (and at once when the live thread says something arrived). Runs in the
    event loop's thread, which has its own store connection."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.channel = watcher.channel
        self.ends = (0, 0)
        self.index: dict[str, Envelope] = {}  # every message by id (for what an answer answers)
        self.persons: set[str] = set()
        self.versions = {"members": 0, "specs": 0, "gaps": 0, "link": 0}
        self.trees: dict[str, Any] = {}
        self._seen: dict[str, Any] = {}
        self.streams = 0
        self.stopping = False

    def lookup(self, msg_id: str) -> Envelope | None:
        return self.index.get(msg_id)

    def keep(self, env: Envelope) -> None:
        """Index a message: specs and statuses whole (the panels show them), others by their first
        line only (what an answer shows of the message it answers): 10,000 long bodies stay on disk."""
        if env.kind not in ("spec", "status") and len(env.body) > INDEXED_BODY:
            env = env.model_copy(update={"body": env.body[:INDEXED_BODY]})
        self.index[env.id] = env

    def refresh(self) -> None:
        ch = self.channel
        cid = ch.url.channel
        store = ch.store
        envs, self.ends = store.newer(cid, self.ends, limit=100_000)
        for env in envs:
            self.keep(env)
        members = self.watcher.members()
        self.persons = {m.name for m in members if m.person}
        if envs or members != self._seen.get("members_raw"):
            statuses = last_statuses(e for e in self.index.values() if e.kind == "status")
            self._set("members", members_tree(members, statuses))
            self._seen["members_raw"] = members
        if any(env.kind == "spec" for env in envs) or "specs" not in self.trees:
            self._set("specs", specs_tree(spec_view(e for e in self.index.values() if e.kind == "spec")))
        gaps = store.gap_list(cid)
        self._set("gaps", [gap_tree(gap, found) for gap, found in gaps])
        self._set("link", {"text": f"{self.watcher.me} (person) · {self.watcher.link_text}"})

    def _set(self, what: str, tree: Any) -> None:
        if self.trees.get(what) != tree:
            self.trees[what] = tree
            self.versions[what] += 1

    def rows(self, envs: list[Envelope], token: str) -> list[Any]:
        return [
            message_tree(env, self.persons, self.lookup, shown=BODY_SHOWN, body_href=f"/body/{env.id}?token={token}")
            for env in envs
        ]

    async def run(self) -> None:
        while not self.stopping:
            self.refresh()
            await asyncio.to_thread(self.watcher.changed.wait, TICK)
            self.watcher.changed.clear()


# -- the web server ---------------------------------------------------------------------------------------


class Say(BaseModel):
    """What the page's box sends."""

    kind: Literal["note", "question", "answer"] = "note"
    text: str = Field(max_length=MAX_PAYLOAD)
    re: MessageId | None = None


@dataclass
class Server:
    host: str
    port: int
    token: str

    def hosts(self) -> set[str]:
        return {*LOOPBACK, self.host.strip("[]")}

    def origin_ok(self, request: Request) -> bool:
        """Refuse another site's page: its Origin, or Sec-Fetch-Site saying the request is cross-site."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = {f"http://{h if ':' not in h else f'[{h}]'}:{self.port}" for h in self.hosts()}
        return origin in own

    def host_ok(self, request: Request) -> bool:
        """The Host header names this server: a page from a name that resolves here (DNS rebinding) is
        refused. On a wildcard address, any IP literal is this machine's."""
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name in self.hosts():
            return True
        if self.host in ("0.0.0.0", "::"):  # noqa: S104 - (compared, not bound)
            try:
                ipaddress.ip_address(name)
            except ValueError:
                return False
            return True
        return False

    def token_ok(self, request: Request) -> bool:
        given = request.query_params.get("token") or request.headers.get("x-mqttalk-token") or ""
        return hmac.compare_digest(given.encode(), self.token.encode())


HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def build_app(server: Server, hub: Hub) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    def refuse(request: Request, *, strict: bool) -> Response | None:
        if not server.host_ok(request):
            return PlainTextResponse("wrong Host header\n", 421, headers=HEADERS)
        if not server.token_ok(request):
            return PlainTextResponse(
                "a valid token is required (the URL mqttalk watch printed)\n", 403, headers=HEADERS
            )
        if strict and not server.origin_ok(request):
            return PlainTextResponse("refused: request from another origin\n", 403, headers=HEADERS)
        return None

    async def page(request: Request) -> Response:
        if (no := refuse(request, strict=False)) is not None:
            return no
        text, csp = render_page(hub, server.token)
        return HTMLResponse(text, headers={**HEADERS, "Content-Security-Policy": csp})

    async def events(request: Request) -> Response:
        if (no := refuse(request, strict=True)) is not None:
            return no
        if hub.streams >= MAX_STREAMS:
            return PlainTextResponse("too many pages open\n", 503, headers=HEADERS)
        from sse_starlette.sse import EventSourceResponse

        after = _cursor(request.headers.get("last-event-id")) or _cursor(request.query_params.get("after"))
        return EventSourceResponse(
            stream(request, hub, after or hub.ends, server.token), send_timeout=SEND_STALL, headers=HEADERS, ping=None
        )

    async def send(request: Request) -> Response:  # noqa: PLR0911 - one answer per refusal
        if (no := refuse(request, strict=True)) is not None:
            return no
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send JSON"}, 415, headers=HEADERS)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_PAYLOAD * 6 + 4096:
                return JSONResponse({"error": "message too large"}, 413, headers=HEADERS)
        try:
            say = Say.model_validate_json(raw)
        except ValidationError as exc:
            return JSONResponse({"error": f"not a message: {exc.errors()[0]['msg']}"}, 400, headers=HEADERS)
        try:
            env = await asyncio.to_thread(_say, hub.channel, say)
        except Queued as exc:
            return JSONResponse({"text": f"queued: {exc.line()}"}, 202, headers=HEADERS)
        except MqttalkError as exc:
            return JSONResponse({"error": exc.line()}, 400, headers=HEADERS)
        hub.watcher.changed.set()
        return JSONResponse({"id": env.id, "text": f"sent {env.kind} id={env.id}"}, headers=HEADERS)

    async def older(request: Request) -> Response:
        if (no := refuse(request, strict=True)) is not None:
            return no
        before = request.query_params.get("before", "")
        envs = [e for e in hub.channel.history() if not before or stamp(e.ts) + e.id < before]
        shown = envs[-PAGE_ROWS:]
        return JSONResponse({"rows": hub.rows(shown, server.token), "left": len(envs) - len(shown)}, headers=HEADERS)

    async def body(request: Request) -> Response:
        if (no := refuse(request, strict=False)) is not None:
            return no
        msg_id = request.path_params["msg_id"]
        env = hub.channel.store.message(hub.channel.url.channel, msg_id)
        if env is None:
            return PlainTextResponse("no such message\n", 404, headers=HEADERS)
        return PlainTextResponse(env.body, headers={**HEADERS, "Content-Security-Policy": "default-src 'none'"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(hub.run())
        yield
        hub.stopping = True
        task.cancel()

    routes = [
        Route("/", page),
        Route("/events", events),
        Route("/api/send", send, methods=["POST"]),
        Route("/api/older", older),
        Route("/body/{msg_id}", body),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _say(channel: Channel, say: Say) -> Envelope:
    """Send as the person (in a worker thread: the live thread publishes it from the outbox)."""
    if say.kind == "answer" and not say.re:
        raise UsageError("an answer needs a message to answer: select one on the page")
    return channel.send(say.text, say.kind, re=say.re)


def _cursor(text: str | None) -> tuple[int, int] | None:
    try:
        m, o = (text or "").split(".")
        return max(0, int(m)), max(0, int(o))
    except ValueError:
        return None


async def stream(request: Request, hub: Hub, after: tuple[int, int], token: str) -> AsyncIterator[dict[str, Any]]:
    """The page's event stream: new rows (each batch with the cursor to resume from), then members,
    specs, gaps and the link state whenever they change, and a beat every BEAT seconds."""
    hub.streams += 1
    try:
        sent = dict.fromkeys(hub.versions, -1)
        cursor, beat = after, time.monotonic()
        while not hub.stopping:
            envs, ends = hub.channel.store.newer(hub.channel.url.channel, cursor, limit=200)
            if ends != cursor:
                for env in envs:
                    if env.id not in hub.index:
                        hub.keep(env)
                cursor = ends
                text = f"{cursor[0]}.{cursor[1]}"
                yield {"event": "rows", "id": text, "data": json.dumps({"rows": hub.rows(envs, token), "cursor": text})}
                continue
            for what in ("members", "specs", "link"):
                if sent[what] != hub.versions[what] and what in hub.trees:
                    sent[what] = hub.versions[what]
                    yield {"event": what, "data": json.dumps(hub.trees[what])}
            if sent["gaps"] != hub.versions["gaps"] and "gaps" in hub.trees:
                sent["gaps"] = hub.versions["gaps"]
                text = f"{cursor[0]}.{cursor[1]}"
                yield {"event": "rows", "id": text, "data": json.dumps({"rows": hub.trees["gaps"], "cursor": text})}
            if time.monotonic() - beat > BEAT:
                beat = time.monotonic()
                yield {"event": "beat", "data": "{}"}
            if await request.is_disconnected():
                return
            await asyncio.sleep(TICK)
    finally:
        hub.streams -= 1


_CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render_page(hub: Hub, token: str) -> tuple[str, str]:
    """The page: the transcript's rendering of the newest PAGE_ROWS messages, plus the script and the box;
    and its content security policy (the header says the same as the page's meta)."""
    from html import escape
    from importlib import resources

    from ._transcript import Document, html
    from ._wire import now

    hub.refresh()
    ch = hub.channel
    ends = hub.ends
    envs = ch.history()
    shown = envs[-PAGE_ROWS:]
    nonce = secrets.token_urlsafe(16)
    csp = _CSP.format(nonce=nonce)
    doc = Document(
        ch.url.display(), now(), shown, ch.store.gap_list(ch.url.channel), hub.watcher.members(), hub.persons
    )
    doc.earlier = len(envs) - len(shown)
    doc.specs = spec_view(e for e in envs if e.kind == "spec")
    script = resources.files("mqttalk").joinpath("data", "watch.js").read_text(encoding="utf-8")
    me = escape(hub.watcher.me)
    attrs = {
        "data-token": token,
        "data-cursor": f"{ends[0]}.{ends[1]}",
        "data-tags": " ".join(sorted(TAGS)),
        "data-attrs": " ".join(sorted(ATTRS)),
        "class": "live",
    }
    compose = (
        '<form id="compose"><div id="replying" class="replying"></div>'
        '<select id="kind"><option>note</option><option>question</option><option>answer</option></select>'
        f'<textarea id="text" placeholder="say something to the agents, as {me} (Ctrl-Enter sends)"></textarea>'
        f'<button type="submit">send as {me}</button><div id="result" class="result"></div></form>'
    )
    text = html(
        doc,
        page={
            "csp": csp,
            "nonce_attr": f' nonce="{nonce}"',
            "body_attrs": "".join(f' {k}="{escape(v, quote=True)}"' for k, v in attrs.items()),
            "meta": f"watching as {hub.watcher.me} (person)",
            "shown": str(BODY_SHOWN),
            "token": token,
            "older": '<button id="older" type="button">load earlier</button>' if doc.earlier else "",
            "compose": compose,
            "link": '<p id="link" class="link"></p>',
            "script": f'<script nonce="{nonce}">\n{script}</script>',
        },
    )
    return text, csp


# -- running it -----------------------------------------------------------------------------------------


def _remembered(settings: Settings, channel: Channel) -> tuple[Path, dict[str, Any]]:
    """Where this person's watch of this channel keeps its port and token (0600), so a restarted watch
    serves the same URL and an open page reconnects and catches up."""
    from ._state import private_dir

    key = hashlib.sha256(f"{channel.url.channel}/{channel.me}".encode()).hexdigest()[:20]
    path = private_dir(settings.state_dir / "watch") / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return path, data if isinstance(data, dict) else {}


def _bind(host: str, port: int | None, remembered: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in [port] if port is not None else [remembered, 0] if remembered else [0]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # (a restarted watch takes its port back while the last one's connections are in TIME_WAIT; two
        # listeners on one port are still refused on Linux)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate or 0))
        except OSError as exc:
            sock.close()
            if port is not None:
                raise UsageError(
                    f"cannot serve on {host}:{port}: {exc.strerror or exc}",
                    "give another --port, or none for a free one",
                ) from None
            continue
        sock.listen(64)
        sock.set_inheritable(False)
        return sock
    raise UsageError(f"cannot serve on {host}: no free port")


def loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt  # (SIGTERM as Ctrl-C: the person's presence is left, not away)


def serve(settings: Settings, cwd: Path, *, as_: str | None, host: str, port: int | None, open_browser: bool) -> int:
    import uvicorn

    from ._state import private_file

    channel = person_channel(settings, cwd, as_)
    if not loopback(host):
        print(
            f"mqttalk: warning: serving on {host}, not loopback: anyone who can reach it and has the URL can read "
            "this channel and write to it as you",
            file=sys.stderr,
            flush=True,
        )
    watcher = Watcher(channel)
    watcher.start(settings.connect_timeout * 2 + 5)
    try:
        memory, saved = _remembered(settings, channel)
        token = str(saved.get("token") or secrets.token_urlsafe(24))
        sock = _bind(host, port, saved.get("port") if isinstance(saved.get("port"), int) else None)
        bound = sock.getsockname()[1]
        private_file(memory).write_text(json.dumps({"port": bound, "token": token}))
        shown_host = f"[{host}]" if ":" in host else host
        url = f"http://{shown_host}:{bound}/?token={token}"
        print(f"mqttalk: WATCH {url}", flush=True)
        print(
            f"mqttalk: watching {channel.url.display()} as {channel.me} (a person); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        if open_browser:
            import webbrowser

            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        hub = Hub(watcher)
        server = Server(host.strip("[]"), bound, token)
        config = uvicorn.Config(
            build_app(server, hub), log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="on"
        )
        # uvicorn shuts down on SIGINT and SIGTERM, then raises the signal again: ours ends as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupted)
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        watcher.stop()
    print(f"mqttalk: STOPPED watching; {channel.me} left the channel", file=sys.stderr, flush=True)
    return 0
