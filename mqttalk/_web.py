"""The page of `mqttalk watch`: a starlette app that serves it, its event stream and its box.

:class:`Hub` keeps what the page shows (members, specs, gaps, where the store ends) current, in the
event loop's thread; each open page has a stream that sends new rows (resumable from a cursor: the
newest received and sent row it has), then members, specs and the link state when they change.

Every request needs the token (compared in constant time), the Host header must name this server (no
DNS rebinding), and the event stream and every write refuse another origin. The page's script builds
rows from element trees with text nodes only (see :mod:`._view`), and its policy forbids any other
script. Nothing here ever holds the channel key or the broker password: the channel is shown by
``JoinURL.display()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field, ValidationError

from ._errors import MqttalkError, Queued, UsageError
from ._view import (
    ATTRS,
    BODY_SHOWN,
    PAGE_ROWS,
    TAGS,
    Member,
    gap_tree,
    last_statuses,
    members_tree,
    message_tree,
    spec_view,
    specs_tree,
    stamp,
)
from ._wire import MAX_PAYLOAD, Envelope, MessageId

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ._channel import Channel

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TICK = 0.25  # s between looks at the store and the members: new items show within a second
BEAT = 10.0  # s between the stream's heartbeats (the page reconnects after 30 s without one)
MAX_STREAMS = 32  # event streams open at once; more are refused (503), a stalled one costs one slot
INDEXED_BODY = 200  # characters of a message's body kept in memory (see Hub.keep)
SEND_STALL = 30.0  # s a stream may wait for a browser that does not read it before it is dropped


class Following(Protocol):
    """What the page needs of the live session that follows the channel (:class:`._watch.Watcher`)."""

    channel: Channel
    me: str
    link_text: str
    changed: threading.Event

    def members(self) -> list[Member]: ...


# -- what the page shows, kept current -----------------------------------------------------------------


class Hub:
    """The channel as the page shows it: the members and specs trees, the gaps, and where the store
    ends; refreshed every TICK (and at once when the live thread says something arrived). Runs in the
    event loop's thread, which has its own store connection."""

    def __init__(self, watcher: Following) -> None:
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
        if self.host in ("0.0.0.0", "::") and self.host_ok(request):  # noqa: S104 - (compared, not bound)
            own.add(f"http://{request.headers.get('host', '')}")  # (the page as opened: its Host is checked)
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

    reading = asyncio.Lock()  # one history read at a time, in a worker thread

    def refuse(request: Request, *, strict: bool) -> Response | None:
        if not server.host_ok(request):
            return JSONResponse({"error": "wrong Host header"}, 421, headers=HEADERS)
        if not server.token_ok(request):
            return JSONResponse(
                {"error": "a valid token is required (the URL mqttalk watch printed)"}, 403, headers=HEADERS
            )
        if strict and not server.origin_ok(request):
            return JSONResponse({"error": "refused: request from another origin"}, 403, headers=HEADERS)
        return None

    async def page(request: Request) -> Response:
        if (no := refuse(request, strict=False)) is not None:
            return no
        async with reading:  # (off the event loop: the live streams keep flowing while a long history renders)
            text, csp = await asyncio.to_thread(render_page, hub, server.token)
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

        def page_before() -> dict[str, Any]:
            envs = [e for e in hub.channel.history() if not before or stamp(e.ts) + e.id < before]
            shown = envs[-PAGE_ROWS:]
            return {"rows": hub.rows(shown, server.token), "left": len(envs) - len(shown)}

        async with reading:
            return JSONResponse(await asyncio.to_thread(page_before), headers=HEADERS)

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
        if len(m) > 18 or len(o) > 18:  # (SQLite integers: a longer number is no cursor of ours)
            return None
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
