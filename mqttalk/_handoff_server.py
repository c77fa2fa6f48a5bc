"""Hand-off, the live process's side: run `send`, `recv` and `status` for another process of the same
peer, through this process's open connection (see :mod:`._handoff` for the protocol).

The command runs as the very CLI code (``cli.main``) in this thread, which owns the connection and the
store, with what it prints captured (stdout and stderr in order, this thread only: `mqttalk mcp` speaks
MCP on its own stdout in another thread) and the channel it opens swapped for one acting through the
live connection: a send is recorded and published here, recv hands its messages over and marks them
read only once the client printed them, status reads the presence this process keeps. Anything it
cannot do exactly as the command run there would (another channel or peer, other settings, a wait, no
connection) is answered "fallback" before anything was done.

A client is the same user (SO_PEERCRED, on top of the 0700 state directory), or it is turned away; a
slow or silent one costs this process at most READ_TIMEOUT per step.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._channel import Channel
from ._handoff import COMMANDS, eligible, read_frame, relevant_env, short_path, socket_path, write_frame

if TYPE_CHECKING:
    from ._live import Live
    from ._peer import Event, Inbox, Status
    from ._wire import Envelope

READ_TIMEOUT = 0.5  # s a client may take to send its request or its "go"
WRITE_TIMEOUT = 5.0  # s a client may take to read the result (a big `recv --json`)
CONFIRM_TIMEOUT = 600.0  # s a recv's client may take to print (a slow pipe, a pager) before saying so
PER_SERVE = 8  # commands answered at most per call (then the live loop goes on)
MAX_CONFIRMING = 64  # recv results waiting for their client to say it printed them (the oldest go first)


class Fallback(BaseException):  # (not an error: "run it yourself")
    """Raised while serving a command this live process cannot run as the command itself would: nothing
    was done, the command runs itself. A BaseException, so the CLI's ``except Exception`` lets it through."""


class _Local(threading.local):
    serving: Request | None = None  # the request being served in this thread


local = _Local()


class Server:
    """The listening socket of one :class:`Live` (which holds its peer's session lock): a
    :class:`~._live.Service`."""

    def __init__(self, live: Live, sock: socket.socket, path: Path) -> None:
        self.live = live
        self.sock = sock
        self.path = path
        self._inode = os.stat(path).st_ino
        # recv results handed over, marked read once their client says it printed them (it may take
        # long: a slow pipe, a pager), looked at without blocking on every serve(), before new commands
        self._confirming: list[tuple[socket.socket, list[Callable[[], None]], float]] = []

    @classmethod
    def start(cls, live: Live) -> Server | None:
        """Listen for ``live``'s peer; None if that cannot be done here (then commands run themselves)."""
        ch = live.peer
        path = Path(socket_path(ch.settings.state_dir, ch.url.channel, ch.me))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket: we hold the session lock, its process is gone
            with short_path(path) as where:
                sock.bind(where)
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            return cls(live, sock, path)
        except OSError:
            sock.close()
            return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # (never another process's socket)
                self.path.unlink()
        self.sock.close()
        for conn, _, _ in self._confirming:
            conn.close()
        self._confirming.clear()

    def serve(self) -> None:
        """Answer the commands waiting (never while serving one: a served command may poll the link)."""
        if local.serving is not None:
            return
        self._confirmations()  # (first: a recv that printed is marked read before the next recv reads)
        for _ in range(PER_SERVE):
            try:
                conn, _ = self.sock.accept()
            except OSError:  # (none waiting, or the socket is gone)
                return
            try:
                kept = self._handle(conn)
            except Exception:  # noqa: BLE001 - a client gone, slow or speaking nonsense (even JSON nested
                kept = False  # deep enough to exhaust the parser) is dropped: nothing done, the live process goes on
            if not kept:
                conn.close()

    def _confirmations(self) -> None:
        """Mark read what each waiting recv's client says it printed; drop those gone or too slow."""
        waiting, self._confirming = self._confirming, []
        for conn, steps, deadline in waiting:
            said = _peek_frame(conn)
            if said is None and time.monotonic() < deadline:
                self._confirming.append((conn, steps, deadline))  # not yet
                continue
            conn.close()
            if said == {"t": "printed"}:
                for step in steps:
                    step()

    def _handle(self, conn: socket.socket) -> bool:
        """Serve one connection; whether it is kept (a recv waiting for its client to say it printed)."""
        conn.setblocking(True)
        conn.settimeout(READ_TIMEOUT)
        if not _same_user(conn):
            write_frame(conn, {"t": "refused", "why": "another user"})
            return False
        req = Request.parse(read_frame(conn), self.live)
        if req.env != relevant_env(os.environ):  # other settings, other paths: the command must run itself
            write_frame(conn, {"t": "fallback", "why": "environment"})
            return False
        write_frame(conn, {"t": "ack", "pid": os.getpid()})
        if read_frame(conn, limit=1024).get("t") != "go":
            return False  # the client gave up waiting and runs the command itself: do nothing
        try:
            code = req.run()
        except Fallback:
            write_frame(conn, {"t": "fallback", "why": "not here"})
            return False
        conn.settimeout(WRITE_TIMEOUT)
        write_frame(conn, {"t": "result", "out": req.out, "code": code, "confirm": bool(req.after_print)})
        if not req.after_print:
            return False
        conn.setblocking(False)
        if len(self._confirming) >= MAX_CONFIRMING:
            self._confirming.pop(0)[0].close()
        self._confirming.append((conn, req.after_print, time.monotonic() + CONFIRM_TIMEOUT))
        return True


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that come while a command is served are handled once it is done (it takes at
    most a connect timeout): raised inside it, the command would end with 130 and this process go on."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (signals reach the main thread only: nothing to defer in the MCP server's live thread)
        return
    came: list[signal.Signals] = []
    saved = {
        sig: signal.signal(sig, lambda number, _f: came.append(signal.Signals(number)))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if came:
        handler = saved[came[0]]
        if callable(handler):
            handler(came[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(came[0])


def _peek_frame(conn: socket.socket) -> dict[str, Any] | None:
    """A whole small frame waiting on a non-blocking ``conn`` (taken); None if it is not all there yet.
    A closed or misbehaving client reads as an empty frame ({})."""
    try:
        head = conn.recv(4, socket.MSG_PEEK)
        if len(head) < 4:
            return {} if not head else None
        size = struct.unpack(">I", head)[0]
        if size > 1024:
            return {}
        if len(conn.recv(4 + size, socket.MSG_PEEK)) < 4 + size:
            return None
        conn.setblocking(True)
        return read_frame(conn, limit=1024)
    except (BlockingIOError, InterruptedError):
        return None
    except (OSError, ValueError, RecursionError):
        return {}


def _same_user(conn: socket.socket) -> bool:
    cred = getattr(socket, "SO_PEERCRED", None)
    if cred is None:
        return True  # (not Linux: the 0700 state directory alone keeps other users out)
    uid: int = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, cred, struct.calcsize("3i")))[1]
    return uid == os.getuid()


@dataclass
class Request:
    """A command to run here, and what it printed."""

    live: Live
    argv: list[str]
    cwd: str
    env: dict[str, str]
    stdin: bytes | None
    tty: tuple[bool, bool]
    out: list[tuple[int, str]] = field(default_factory=list)
    after_print: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def parse(cls, obj: dict[str, Any], live: Live) -> Request:
        argv, cwd, env, stdin, tty = obj["argv"], obj["cwd"], obj["env"], obj["stdin"], obj["tty"]
        if (
            obj.get("v") != 1
            or not isinstance(argv, list)
            or not all(isinstance(a, str) for a in argv)
            or not argv
            or not isinstance(cwd, str)
            or not os.path.isabs(cwd)
            or not isinstance(env, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            or not (stdin is None or isinstance(stdin, str))
            or not isinstance(tty, list)
            or len(tty) != 2
        ):
            raise ValueError("malformed request")
        if argv[0] not in COMMANDS or not eligible(argv, {}):  # (--file: a path this process would open for it)
            raise ValueError("not a command served here")
        return cls(
            live, argv, cwd, env, None if stdin is None else stdin.encode("latin-1"), (bool(tty[0]), bool(tty[1]))
        )

    def run(self) -> int:
        """Run the command as `mqttalk ARGV` would, here; its exit code (raises Fallback)."""
        from . import cli

        with self._serving():
            try:
                cli.main(self.argv)
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """sys.stdout/stderr/stdin of this thread are the client's; the live process's own events (a
        message arriving while a send waits for its ack) are still its own, printed where they belong."""
        from . import cli

        saved = sys.stdout, sys.stderr, sys.stdin
        drops = cli._DROPS
        channel = self.live.peer
        on_event = channel.on_event

        def own_event(event: Event) -> None:  # the live process's, not the command's
            serving = local.serving
            local.serving, cli._DROPS = None, drops
            try:
                on_event(event)
            finally:
                local.serving, cli._DROPS = serving, mine

        mine = cli._Drops()
        sys.stdout, sys.stderr = _Out(saved[0], 1), _Out(saved[1], 2)
        sys.stdin = _In(saved[2])
        cli._DROPS, channel.on_event, local.serving = mine, own_event, self
        cli.HOST.cwd, cli.HOST.adopt = Path(self.cwd), self.adopt
        try:
            with _signals_deferred():  # a Ctrl-C or SIGTERM meant for this process ends it, not the command
                yield
        finally:
            local.serving = None
            cli.HOST.cwd = cli.HOST.adopt = None
            sys.stdout, sys.stderr, sys.stdin = saved
            cli._DROPS, channel.on_event = drops, on_event

    # -- what cli._open calls while serving --------------------------------------------------------

    def adopt(self, channel: Channel) -> Channel:
        """The channel the command resolved, acting through the live connection, if it is the live one."""
        mine = self.live.peer
        if (
            channel.url.channel != mine.url.channel
            or channel.me != mine.me
            or channel.settings.state_dir.resolve() != mine.settings.state_dir.resolve()
        ):
            raise Fallback
        return _Served.of(channel, self)


class _Served(Channel):
    """A command's channel, with the operations a served command uses acting through the live connection."""

    request: Request

    @classmethod
    def of(cls, channel: Channel, request: Request) -> _Served:
        served = cls.__new__(cls)
        served.__dict__.update(channel.__dict__)  # the same peer, binding and settings the command resolved
        served.request = request
        return served

    def send(
        self,
        body: str,
        kind: str = "note",
        *,
        data: dict[str, Any] | None = None,
        to: str | None = None,
        re: str | None = None,
    ) -> Envelope:
        live = self.request.live
        if not live.connected or not live.sending:
            raise Fallback  # the command run there waits for this process to send, then says QUEUED
        return live.send(body, kind, data=data, to=to, re=re)

    def fetch(self, wait: float = 0.0) -> Inbox:
        got = self.unread()
        if wait > 0 and not got:
            raise Fallback  # a wait would stall this process: the command waits by itself (on the store)
        return got

    def mark_read(self, inbox: Inbox) -> None:
        """Only once the client printed them (see Server._handle)."""
        self.request.after_print.append(lambda: Channel.mark_read(self, inbox))

    def status(self) -> Status:
        """As Channel.status beside a live process, from the presence this process keeps."""
        if not self.request.live.connected:
            raise Fallback
        return self.status_of(self.request.live)


class _Out:
    """sys.stdout / sys.stderr while serving: the serving thread's writes go to the request, in order."""

    def __init__(self, real: TextIO, stream: int) -> None:
        self._real = real
        self._stream = stream

    def write(self, text: str | bytes) -> int:
        req = local.serving
        if req is None:
            return int(self._real.write(text if isinstance(text, str) else text.decode(errors="replace")))
        req.out.append((self._stream, text if isinstance(text, str) else text.decode(errors="replace")))
        return len(text)

    def flush(self) -> None:
        if local.serving is None and self._real is not None:
            self._real.flush()

    def isatty(self) -> bool:
        req = local.serving
        return bool(req.tty[self._stream - 1] if req is not None else self._real.isatty())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _In:
    """sys.stdin while serving: the serving thread reads what the client read on its stdin."""

    def __init__(self, real: TextIO) -> None:
        self._real = real

    @property
    def closed(self) -> bool:
        req = local.serving
        if req is not None:
            return req.stdin is None
        return bool(getattr(self._real, "closed", True))

    @property
    def buffer(self) -> Any:
        req = local.serving
        return io.BytesIO(req.stdin or b"") if req is not None else self._real.buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
