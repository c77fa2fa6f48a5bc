"""Hand-off: `mqttalk send`, `recv` and `status` run by the live process of the same peer.

When a live process (`listen`, `mqttalk mcp`, a `recv --wait`, ...) holds a peer's broker session, it
listens on a Unix socket next to the session lock (``STATE_DIR/locks/<hash>.sock``, 0600 in the 0700
state directory). The command line then hands itself over: it sends its argv, cwd, the environment that
decides settings (MQTTALK_*, XDG_*, HOME) and, for ``-``, what it read on stdin; the live process runs the
very same CLI code in-process against its open connection (see :mod:`._handoff_server`) and answers
with what it printed, in order, and the exit code. This module is the command's side: it imports the
standard library only (no typer, paho, pydantic), so a hand-off costs an interpreter start and a round
trip (:mod:`._entry` tries it before it loads the CLI).

Protocol (frames: 4-byte big-endian length, then JSON)::

    client -> request {v, argv, cwd, env, stdin, tty}
    server -> {"t": "ack"}            or {"t": "fallback"} (not mine, other settings: run it yourself)
    client -> {"t": "go"}             (from here on the client never runs the command itself)
    server -> {"t": "result", out, code, confirm}   or {"t": "fallback"} (nothing was done)
    client -> {"t": "printed"}        (only if confirm: recv marks read only what was printed)

Never twice, never a hang: the client runs the command itself only if no ack came within
:data:`ACK_TIMEOUT` (then it sends no "go", and the server does nothing without one) or the server
said "fallback" (it did nothing). Once it sent "go" it waits for the answer; a live process that dies
meanwhile is an error line, never a second run. A stale socket (process killed) refuses the connection:
the command runs itself at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import sys

TYPE_CHECKING = False  # (no typing: this module is all a hand-off imports)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

COMMANDS = ("send", "recv", "status")  # the commands a live process runs for another process
ACK_TIMEOUT = 1.0  # s the client waits for a live process to take its command before running it itself
ANSWER_TIMEOUT = 150.0  # s the client waits for the result once handed over (a send waits <= 120 s for its ack)
MAX_FRAME = 4 * 1024 * 1024  # a request: argv (a message of up to 256 KiB, escaped) plus stdin, in base64
STDIN_LIMIT = 256 * 1024 + 1  # what `send -` reads at most (_wire.MAX_PAYLOAD + 1, as _input.read_body)
MAX_RESULT = 1 << 30  # what a command printed (a `recv --json` of many long bodies is megabytes)
DISABLE = "MQTTALK_HANDOFF"  # =0: never hand a command over (nor serve one)


# -- the command's side ------------------------------------------------------------------------------


def eligible(args: list[str], env: Any) -> bool:
    """Whether to look for a live process at all. Help, --file (a path or a device the live process
    would open in its own place) and debugging always run here."""
    if not args or args[0] not in COMMANDS or env.get(DISABLE, "1") == "0" or env.get("MQTTALK_DEBUG"):
        return False
    for arg in args[1:]:
        if (
            arg in ("-h", "--help")
            or arg.startswith("--file")
            or (arg.startswith("-") and not arg.startswith("--") and "f" in arg)
        ):
            return False
    return True


def hand_over(args: list[str]) -> int | None:
    """Run ``args`` in the live process of this peer: its exit code, or None to run it here."""
    try:
        cwd = os.path.realpath(os.getcwd())
        path = locate(args, os.environ, cwd)
        # (maybe the message on stdin: read as `send -` would read it, and kept for running it here)
        stdin = _read_stdin() if path is not None and _body_on_stdin(args) else None
    except (OSError, ValueError):
        return None  # (run here, the command says what is wrong)
    sock = connect(path) if path is not None else None
    if sock is None:
        return None
    request = {
        "v": 1,
        "argv": args,
        "cwd": cwd,
        "env": relevant_env(os.environ),
        "stdin": stdin,
        "tty": [_isatty(sys.stdout), _isatty(sys.stderr)],
    }
    with sock:
        try:
            sock.settimeout(ACK_TIMEOUT)
            write_frame(sock, request)
            if read_frame(sock).get("t") != "ack":
                return None
            write_frame(sock, {"t": "go"})
        except (OSError, ValueError):
            return None  # no ack, so no "go": the live process does nothing
        return _answer(sock)


def _answer(sock: socket.socket) -> int | None:
    """Print what the live process answered and confirm it; its exit code (None: it did nothing)."""
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        answer = read_frame(sock, limit=MAX_RESULT)
    except (OSError, ValueError, RecursionError) as exc:
        why = "ended" if isinstance(exc, (ValueError, ConnectionError)) else "did not answer"
        print(
            f"mqttalk: error: the live mqttalk process of this peer took the command and {why} before "
            "answering (`mqttalk log` shows whether a message was recorded; MQTTALK_HANDOFF=0 runs "
            "commands without it)",
            file=sys.stderr,
        )
        return 1
    if answer.get("t") != "result":
        return None  # "fallback": it did nothing
    try:
        for stream, text in answer["out"]:
            target = sys.stdout if stream == 1 else sys.stderr
            if target is not None:  # (closed: print() writes nothing there either)
                target.write(text)
                target.flush()
    except BrokenPipeError:
        return 1  # as the command run here: exit 1, and nothing confirmed (nothing marked read)
    except (OSError, UnicodeError) as exc:  # a full disk, an encoding that cannot show the text
        print(f"mqttalk: error: cannot write the output: {exc}", file=sys.stderr)
        return 1  # nothing confirmed: nothing marked read
    if answer.get("confirm"):
        with contextlib.suppress(OSError):
            write_frame(sock, {"t": "printed"})
    code = answer.get("code", 1)
    return code if isinstance(code, int) else 1


def _read_stdin() -> str | None:
    """stdin's first STDIN_LIMIT bytes (latin-1, to carry bytes in JSON), and put them back for the
    command if it runs here after all. None: stdin is closed."""
    stdin = sys.stdin
    if stdin is None or getattr(stdin, "closed", False):
        return None
    import io

    data = stdin.buffer.read(STDIN_LIMIT)
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding=stdin.encoding, errors=stdin.errors)
    return data.decode("latin-1")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def relevant_env(env: Any) -> dict[str, str]:
    """The environment that decides settings and paths (both sides must agree on it): MQTTALK_* (but the
    switches of this hand-off and of tracebacks), XDG_CONFIG_HOME, XDG_STATE_HOME and HOME."""
    return {
        k: v
        for k, v in env.items()
        if (k.startswith("MQTTALK_") and k not in (DISABLE, "MQTTALK_DEBUG")) or k in _PATH_ENV
    }


_PATH_ENV = ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "HOME")
_SEND_VALUES = frozenset(
    {
        "--kind",
        "-k",
        "--to",
        "--re",
        "--subject",
        "--rev",
        "--state",
        "--commit",
        "--as",
        "--channel",
        "--connect-timeout",
        "--ca",
    }
)  # options of `send` that take a value


def _body_on_stdin(args: list[str]) -> bool:
    """Whether ``args`` is a `send` whose message is ``-`` (read from stdin), not an option's value."""
    if args[0] != "send":
        return False
    it = iter(args[1:])
    for arg in it:
        if arg == "--":
            return next(it, None) == "-"
        if arg in _SEND_VALUES:
            next(it, None)
        elif not arg.startswith("-") or arg == "-":
            return arg == "-"
    return False


def locate(args: list[str], env: Any, cwd: str) -> str | None:  # noqa: PLR0911 - each lookup may end it
    """The socket of the live process of the peer ``args`` act for, if there is one: the same lookup as
    Settings.load and open_channel (flags > environment > config file > this directory's binding), in
    brief. Only a hint: the live process resolves the command properly and refuses one not its own."""
    flags: dict[str, str] = {}
    it = iter(args[1:])
    for arg in it:
        if arg == "--":
            break
        for name in ("--as", "--channel"):
            if arg == name:
                flags[name] = next(it, "")
            elif arg.startswith(name + "="):
                flags[name] = arg.split("=", 1)[1]
    config = _config(env)
    if config is None:
        return None

    def setting(name: str) -> str | None:
        value = env.get("MQTTALK_" + name.upper()) or config.get(name)
        return value if isinstance(value, str) and value else None

    state = setting("state_dir")
    if state is None:
        xdg = env.get("XDG_STATE_HOME")
        state = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.join(_home(env), ".local/state"), "mqttalk")
    if not os.path.isabs(state):
        return None
    url = flags.get("--channel") or setting("channel")
    peer = flags.get("--as") or setting("peer")
    binding = _binding(state, cwd)
    if url is None:
        if binding is None:
            return None
        url, peer = binding.get("url"), binding.get("peer")
    elif (
        binding is not None
        and channel_of(str(binding.get("url"))) == channel_of(url)
        and (peer in (None, binding.get("peer")))
    ):
        peer = binding.get("peer")
    if not isinstance(url, str) or not isinstance(peer, str) or not peer:
        return None
    channel = channel_of(url)
    if not channel:
        return None
    path = socket_path(state, channel, peer)
    st = os.lstat(path)  # (FileNotFoundError: no live process)
    import stat

    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None
    return path


def _home(env: Any) -> str:
    home = env.get("HOME")
    if not home or not os.path.isabs(home):
        raise ValueError("no absolute HOME")
    return str(home)


def _config(env: Any) -> dict[str, Any] | None:
    """The config file's settings ({} if there is none; None if it cannot be used here)."""
    explicit = env.get("MQTTALK_CONFIG")
    if explicit:
        path = explicit
    else:
        xdg = env.get("XDG_CONFIG_HOME")
        path = os.path.join(
            xdg if xdg and os.path.isabs(xdg) else os.path.join(_home(env), ".config"), "mqttalk", "config.toml"
        )
    if not os.path.isabs(path):
        return None
    if not os.path.isfile(path):
        return {}
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the command says what is wrong with it
    section = data.get("mqttalk", data)
    return section if isinstance(section, dict) else None


def _binding(state_dir: str, cwd: str) -> dict[str, Any] | None:
    """This directory's binding (as _bindings.find): the entry of cwd or its nearest bound ancestor.
    (os.path, not pathlib: importing pathlib would cost a wheel install ~10 ms here.)"""
    try:
        with open(os.path.join(state_dir, "bindings.json"), "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    directory = cwd
    while True:
        entry = data.get(directory)
        if entry:
            return entry if isinstance(entry, dict) else None
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def channel_of(url: str) -> str:
    """A join URL's channel id (its last path level), without parsing or checking the rest."""
    rest = url.strip().split("#", 1)[0].split("?", 1)[0]
    if "://" not in rest:
        return ""
    path = rest.split("://", 1)[1].partition("/")[2]
    levels = [p for p in path.split("/") if p]
    return levels[-1] if len(levels) >= 2 else ""


def socket_path(state_dir: str | Path, channel: str, peer: str) -> str:
    """Where the live process of ``peer`` in ``channel`` listens: next to its session lock (the same
    name as Channel._lock_path's)."""
    name = hashlib.sha256(f"{channel}\n{peer}".encode()).hexdigest()[:24]
    return os.path.join(state_dir, "locks", f"{name}.sock")


def connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ACK_TIMEOUT)
    try:
        with short_path(path) as where:
            sock.connect(where)
    except OSError:  # nobody listens there any more (killed): a stale file
        sock.close()
        return None
    return sock


class short_path:  # (used as a function)
    """A path a Unix socket can be bound or connected at: AF_UNIX takes ~107 bytes, and a state
    directory can be deeper than that; then the directory is reached through /proc/self/fd (Linux)."""

    def __init__(self, path: str | Path) -> None:
        self.path = os.fspath(path)
        self.fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) < 100 or not os.path.isdir("/proc/self/fd"):
            return self.path
        directory, name = os.path.split(self.path)
        self.fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        return f"/proc/self/fd/{self.fd}/{name}"

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def read_frame(sock: socket.socket, limit: int = MAX_FRAME) -> dict[str, Any]:
    """One frame; ValueError if the peer closed, sent too much or not a JSON object."""
    size = struct.unpack(">I", _exactly(sock, 4))[0]
    if size > limit:
        raise ValueError(f"frame of {size} bytes")
    obj = json.loads(_exactly(sock, size))
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ValueError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
