"""Real `mqttalk` processes without paying Python's start-up for each: a fork server.

A command of the suite costs ~0.3 s of CPU before it does anything (the interpreter, typer, pydantic,
paho, sqlite3), and the suite runs thousands of them. This server is started once per test process
(per xdist worker): it imports `mqttalk` and what its commands import, then forks one process per
command. Each is still a process of its own, with its own pid, working directory, environment,
stdin/stdout/stderr pipes, exit code and signals; it runs the `mqttalk` console script's entry point
and exits as the interpreter does (non-daemon threads joined, atexit run, streams flushed, SystemExit
and uncaught exceptions turned into the same exit codes). Only the imports were done before it
started, and the modules are not torn down after it (that alone took ~0.1 s a command). What is
about start-up itself (which modules a command imports, how long it takes) runs the installed
command with a fresh interpreter, as does every command when MQTTALK_TEST_EXEC=1 is set.

Protocol, over a Unix socket: the client sends a length-prefixed JSON request (argv, cwd, env) with the
three pipe ends for the child's stdin, stdout and stderr attached (SCM_RIGHTS). The server forks a
waiter, which forks the command and writes back "pid\\n", then, once it exits, "returncode\\n"
(negative: killed by that signal, as subprocess reports it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("!I")
_ENTRY: dict[str, Any] = {}  # the console script's function, once loaded


# -- the server (runs as `python _forkserver.py SOCKET`) ------------------------------------------------


def _preload() -> None:
    """Import what the commands import, so that a forked command finds it done."""
    import importlib
    import pkgutil

    import mqttalk
    import mqttalk.cli  # (sets PYDANTIC_DISABLE_PLUGINS, as each real start does)

    for mod in pkgutil.iter_modules(mqttalk.__path__):
        if mod.name in ("_mcp", "__main__"):  # the MCP SDK: only `mqttalk mcp` loads it, and that runs for real
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(f"mqttalk.{mod.name}")
    for name in ("paho.mqtt.client", "sqlite3", "pydantic", "yaml", "cryptography.hazmat.primitives.ciphers.aead"):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mqttalk"]
    _ENTRY["main"] = script.load()  # what the installed `mqttalk` script runs


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _HEADER.size:
        data += conn.recv(1 << 16)
    (size,) = _HEADER.unpack_from(data)
    body = data[_HEADER.size :]
    while len(body) < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise EOFError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def serve(path: str) -> dict[str, Any]:
    """Accept requests until killed. Returns only in a forked command, with its request."""
    _preload()
    import gc

    gc.freeze()  # what was imported stays out of the collector's way: forked children do not copy its pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    Path(path + ".ready").touch()
    while True:
        conn, _ = listener.accept()
        try:
            request, fds = _recv_request(conn)
        except (OSError, EOFError, ValueError):
            conn.close()
            continue
        if os.fork() == 0:  # the waiter
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:  # the command
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                os.closerange(3, 65536)
                return request
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"{pid}\n".encode())
                _, status = os.waitpid(pid, 0)
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            finally:
                os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)


def run_command(request: dict[str, Any]) -> None:
    """In the forked command: become the `mqttalk` the request asked for, and run its entry point."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")  # what importing mqttalk.cli sets at start-up
    sys.argv = list(request["argv"])
    try:
        _ENTRY["main"]()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # noqa: BLE001 - the interpreter's way with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
        if isinstance(exc, KeyboardInterrupt):  # it then dies of SIGINT
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    _exit(code)


def _exit_code(value: object) -> int:
    """What the interpreter makes of SystemExit(value)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """End as the interpreter does (non-daemon threads joined, atexit functions run, standard streams
    flushed, and what the command left open finalized), without tearing down the modules the server
    imported: the slow part. What finalization does that can be seen from outside is done by hand:
    files the command opened are flushed, and its SQLite connections closed (closing the last one
    checkpoints the WAL into the database and removes it; mqttalk keeps its store open until exit)."""
    import atexit
    import gc
    import sqlite3

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    standard = {id(sys.stdin), id(sys.stdout), id(sys.stderr)}
    for obj in gc.get_objects():  # (the server's own objects are frozen: only what the command made)
        with contextlib.suppress(Exception):
            if isinstance(obj, sqlite3.Connection):
                obj.close()
            elif isinstance(obj, io.IOBase) and id(obj) not in standard and not obj.closed:
                obj.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if code == 0 and stream is sys.stdout:
                code = 120  # the interpreter's exit code when flushing stdout fails at exit
    os._exit(code)


# -- the client ---------------------------------------------------------------------------------------


class ForkServer:
    """One server per test process, started on first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.path = ""
        self.lock = threading.Lock()

    def address(self) -> str:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                import tempfile

                directory = tempfile.mkdtemp(prefix="mqttalk-forkserver-")
                self.path = os.path.join(directory, "sock")
                with open(os.path.join(directory, "log"), "wb") as log:
                    self.proc = subprocess.Popen(
                        [sys.executable, __file__, self.path],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                deadline = time.monotonic() + 60
                while not os.path.exists(self.path + ".ready"):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the fork server did not start (exit {self.proc.poll()})")
                    time.sleep(0.01)
            return self.path

    def stop(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            if self.path:
                import shutil

                shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)  # its socket and log
                self.path = ""


SERVER = ForkServer()


class Forked:
    """A forked `mqttalk` process, with the parts of subprocess.Popen's interface the tests use (text mode)."""

    def __init__(self, argv: list[str], *, cwd: Path | str, env: dict[str, str], stdin_pipe: bool) -> None:
        self.args = argv
        self.returncode: int | None = None
        if stdin_pipe:
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), -1
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(SERVER.address())
            socket.send_fds(self._conn, [_HEADER.pack(len(request)) + request], [in_r, out_w, err_w])
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self._replies = self._conn.makefile("rb")
        line = self._replies.readline()
        if not line:
            raise RuntimeError("the fork server did not start the command")
        self.pid = int(line)
        self.stdin = io.TextIOWrapper(open(in_w, "wb"), write_through=True) if in_w >= 0 else None
        self.stdout = io.TextIOWrapper(open(out_r, "rb"))
        self.stderr = io.TextIOWrapper(open(err_r, "rb"))
        self._readers: list[threading.Thread] = []
        self._exited = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        self._read: dict[str, list[str]] = {"out": [], "err": []}

    # -- exit status (one thread reads it, so that any thread may poll or wait)

    def _watch(self) -> None:
        try:
            line = self._replies.readline()
        except OSError:
            line = b""
        self.returncode = int(line) if line else -signal.SIGKILL  # (no line: the waiter itself was killed)
        self._replies.close()
        self._conn.close()
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode if self._exited.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    # -- signals

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # -- output

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        if not self._readers:
            for key, stream in (("out", self.stdout), ("err", self.stderr)):
                reader = threading.Thread(target=lambda k=key, s=stream: self._read[k].append(s.read()), daemon=True)
                reader.start()
                self._readers.append(reader)
            if self.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in self._readers:
            reader.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            stream.close()
        return "".join(self._read["out"]), "".join(self._read["err"])


def run(
    argv: list[str], *, cwd: Path | str, env: dict[str, str], input: str | None, timeout: float
) -> tuple[int, str, str]:
    """subprocess.run(argv, capture_output=True, text=True, timeout=timeout) through the fork server."""
    proc = Forked(argv, cwd=cwd, env=env, stdin_pipe=input is not None)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


if __name__ == "__main__":
    run_command(serve(sys.argv[1]))
