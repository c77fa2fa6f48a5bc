"""Hand-off (issue #18): beside a live process of the same peer, `send`, `recv` and `status` hand themselves
to it over a Unix socket in the state directory, importing neither paho nor pydantic, with the same
output and exit codes as when they run themselves. Real brokers, real processes, nothing mocked."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from conftest import Result, Session, paired

HEAVY = ("paho.mqtt.client", "pydantic", "typer", "sqlite3", "cryptography")


def sockets(session: Session) -> list[Path]:
    return sorted((session.state_dir / "locks").glob("*.sock"))


def wait_socket(session: Session, proc: subprocess.Popen[str], timeout: float = 20) -> Path:
    from mqttalk._handoff import short_path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found in sockets(session):  # (one that answers: a killed process leaves its file behind)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, short_path(found) as where:
                try:
                    probe.connect(where)
                except OSError:
                    continue
            return found
        assert proc.poll() is None, f"live process exited {proc.returncode}: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("the live process never listened for commands")


@contextmanager
def live(session: Session, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A live process of ``session``'s peer (default `listen`), listening for commands."""
    proc = session.start(*(args or ("listen",)))
    try:
        wait_socket(session, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def traced(
    session: Session, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> tuple[Result, set[str]]:
    """Run `python -X importtime -m mqttalk ARGS` as the session: the result and the modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mqttalk", *args],
        cwd=session.cwd,
        env={**session.env, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    mods = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    err = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return Result(proc.returncode, proc.stdout, err), mods


def handed_over(session: Session, *args: str, input: str | None = None) -> Result:
    """Run a command that must go through the live process: it imports none of the heavy modules."""
    res, mods = traced(session, *args, input=input)
    assert not [m for m in HEAVY if m in mods], f"`mqttalk {' '.join(args)}` ran itself: {res.err}"
    return res


def ran_itself(session: Session, *args: str, input: str | None = None) -> Result:
    res, mods = traced(session, *args, input=input, env={"MQTTALK_HANDOFF": "0"})
    assert "paho.mqtt.client" in mods or "pydantic" in mods or "typer" in mods
    return res


def bodies(session: Session) -> list[str]:
    out = session.ok("recv", "--json").lines
    return [json.loads(line)["body"] for line in out if json.loads(line).get("event") == "message"]


def test_send_recv_status_beside_listen_go_through_the_live_process(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl) as proc:
        res = handed_over(impl, "send", "--kind", "status", "--state", "red", "tests written, all red")
        assert res.code == 0 and res.out.startswith("mqttalk: SENT kind=status id="), res
        assert handed_over(impl, "send", "-", input="from stdin $HOME `x`\n").code == 0
        assert bodies(tests) == ["tests written, all red", "from stdin $HOME `x`\n"]
        tests.ok("send", "--kind", "question", "pagination?")
        deadline = time.monotonic() + 10
        while "unread:  1" not in (st := handed_over(impl, "status")).out and time.monotonic() < deadline:
            time.sleep(0.1)
        assert st.code == 0 and "tests:" in st.out and "unread:  1" in st.out, st
        status = json.loads(handed_over(impl, "status", "--json").out)
        assert status["me"] == "impl" and {p["name"] for p in status["peers"]} == {"impl", "tests"}
        got = handed_over(impl, "recv")
        assert got.code == 0 and "from=tests kind=question" in got.out and "pagination?" in got.out
        again = handed_over(impl, "recv")
        assert (again.code, again.out, again.err) == (0, "", "mqttalk: no unread messages\n")
        assert proc.poll() is None


def test_errors_and_exit_codes_are_the_same_through_the_live_process(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    big = "x" * (256 * 1024 + 10)
    cases: list[tuple[tuple[str, ...], str | None]] = [
        (("send", "--kind", "bogus", "x"), None),
        (("send", "--re", "not-an-id", "x"), None),
        (("send", "--state", "red", "a note with a state"), None),
        (("send", "--kind", "status", "no state"), None),
        (("send", "-"), big),
        (("send", "-"), ""),
        (("send", "--to", "Bad Name!", "x"), None),
        (("send", "--nope", "x"), None),
        (("recv", "--wait", "-1"), None),
        (("status", "extra"), None),
        (("recv",), None),
        (("recv", "--json"), None),
    ]
    with live(impl):
        for args, stdin in cases:
            here = ran_itself(impl, *args, input=stdin)
            there = handed_over(impl, *args, input=stdin)
            assert (there.code, there.out, there.err) == (here.code, here.out, here.err), args
            assert here.code in (0, 2), (args, here)


def test_a_live_process_killed_leaves_a_socket_that_commands_step_over(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    proc = impl.start("listen")
    stale = wait_socket(impl, proc)
    assert handed_over(impl, "send", "before the crash").code == 0
    proc.kill()  # kill -9: nothing removes the socket file
    proc.communicate(timeout=10)
    assert stale.exists()
    started = time.monotonic()
    res, mods = traced(impl, "send", "after the crash")
    assert res.code == 0 and "paho.mqtt.client" in mods, res  # sent by itself, at once
    assert time.monotonic() - started < 10
    assert bodies(tests) == ["before the crash", "after the crash"]
    with live(impl):  # the next live process takes the place over
        assert handed_over(impl, "send", "through the new one").code == 0
    assert not sockets(impl)  # removed on a clean stop
    assert bodies(tests) == ["through the new one"]


def test_garbage_silence_and_strangers_do_not_hurt_the_live_process(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl) as proc:
        path = sockets(impl)[0]
        from mqttalk._handoff import short_path

        def client() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            with short_path(path) as where:
                s.connect(where)
            return s

        nested = b"[" * 100_000 + b"]" * 100_000  # deep enough to exhaust the JSON parser's recursion
        for junk in (
            b"\xff\xff\xff\xff",
            struct.pack(">I", 5) + b"[1,2]",
            struct.pack(">I", 3) + b"{{{",
            struct.pack(">I", 2) + b"{}",
            b"GET / HTTP/1.0\r\n\r\n",
            struct.pack(">I", len(nested)) + nested,
        ):
            with client() as s:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                with suppress(ConnectionResetError):  # (dropped with what it sent unread)
                    assert s.recv(100) == b""  # dropped, nothing answered
        request = {
            "v": 1,
            "argv": ["send", "never"],
            "cwd": str(impl.cwd),
            "env": {},
            "stdin": None,
            "tty": [False, False],
        }
        data = json.dumps(request).encode()
        with client() as s:  # other settings than the live process's: "run it yourself"
            s.sendall(struct.pack(">I", len(data)) + data)
            size = struct.unpack(">I", s.recv(4))[0]
            assert json.loads(s.recv(size))["t"] == "fallback"
        secret = impl.cwd / "secret.txt"
        secret.write_text("not for the channel")
        for argv in (["send", "--file", str(secret)], ["send", "-f", str(secret)], ["leave"], ["broker"]):
            from mqttalk._handoff import relevant_env

            request = {
                "v": 1,
                "argv": argv,
                "cwd": str(impl.cwd),
                "env": relevant_env(impl.env),
                "stdin": None,
                "tty": [False, False],
            }
            data = json.dumps(request).encode()
            with client() as s:  # a file this process would open for the caller, a command not served: dropped
                s.sendall(struct.pack(">I", len(data)) + data)
                with suppress(ConnectionResetError):
                    assert s.recv(100) == b"", argv
        silent = client()  # says nothing: costs the live process a bounded wait, no more
        assert handed_over(impl, "send", "despite a silent client").code == 0
        silent.close()
        assert proc.poll() is None
        if os.getuid() == 0:  # another user (root can become one): turned away by its uid
            modes = {p: p.stat().st_mode for p in (path.parent, path)}
            try:
                for p in modes:
                    p.chmod(0o777)
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: another user, then a well-formed request
                    answer = b"?"
                    try:
                        os.chdir(path.parent)  # (the directories above stay closed to that user)
                        os.setuid(65534)
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                            s.settimeout(5)
                            s.connect(path.name)
                            answer = s.recv(4096)  # (turned away at once, before it says anything)
                    except BaseException as exc:  # noqa: BLE001 - the child reports any failure
                        answer = repr(exc).encode()
                    finally:
                        os.write(write, answer)
                        os._exit(0)
                os.close(write)
                os.waitpid(pid, 0)
                with os.fdopen(read, "rb") as fh:
                    answer = fh.read()
                    assert b'"t":"refused"' in answer, answer
            finally:
                for p, mode in modes.items():
                    p.chmod(mode)
        assert proc.poll() is None
        assert handed_over(impl, "send", "still serving").code == 0
    assert bodies(tests) == ["despite a silent client", "still serving"]  # (and not the secret file)


def test_two_concurrent_sends_both_arrive_once(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl):
        procs = [impl.start("send", f"concurrent {i}") for i in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0 and "SENT" in out, err
    assert sorted(bodies(tests)) == [f"concurrent {i}" for i in range(4)]


def test_recv_marks_read_only_what_was_printed(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl):
        tests.ok("send", "one")
        tests.ok("send", "two")
        deadline = time.monotonic() + 10
        while "unread:  2" not in handed_over(impl, "status").out and time.monotonic() < deadline:
            time.sleep(0.1)
        # stdout closed before it prints: exit 1, as when it runs itself, and nothing is marked read
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "mqttalk", "recv"],
            cwd=impl.cwd,
            env=impl.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "paho.mqtt.client" not in err
        got = handed_over(impl, "recv")
        assert got.out.count("mqttalk: MESSAGE from=tests") == 2
        assert handed_over(impl, "recv").err == "mqttalk: no unread messages\n"


def test_recv_wait_with_nothing_unread_waits_by_itself(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl):
        res, _ = traced(impl, "recv", "--wait", "1")
        assert res.code == 3 and res.err.endswith("mqttalk: no new message within 1s\n"), res
        tests.ok("send", "waited for")
        res, _ = traced(impl, "recv", "--wait", "10")
        assert res.code == 0 and "waited for" in res.out


def test_a_recv_wait_and_an_mcp_server_serve_commands_too(sessions: tuple[Session, Session], broker_url: str) -> None:
    pytest.importorskip("mcp")
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl, "recv", "--wait", "60") as waiting:
        assert handed_over(impl, "send", "while waiting").code == 0
        assert waiting.poll() is None
    assert bodies(tests) == ["while waiting"]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mqttalk"), "mcp"],
        cwd=impl.cwd,
        env=impl.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_socket(impl, server)  # type: ignore[arg-type]
        res = handed_over(impl, "send", "through the MCP server")
        assert res.code == 0 and "SENT" in res.out
        assert "tests:" in handed_over(impl, "status").out
    finally:
        server.communicate(input="", timeout=30)  # stdin closed: the MCP server ends
    assert bodies(tests) == ["through the MCP server"]


def test_a_big_recv_to_a_slow_reader_is_printed_whole_and_marked_read(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    """Megabytes of unread messages, printed into a pipe read seconds later: all of it arrives, once, and
    is marked read once the command printed it (not dropped as unconfirmed)."""
    impl, tests = sessions
    paired(impl, tests, broker_url)
    with live(impl):
        for i in range(20):
            tests.ok("send", "-", input=f"{i:02d}" + "x" * 220_000)
        deadline = time.monotonic() + 30
        while "unread:  20" not in handed_over(impl, "status").out and time.monotonic() < deadline:
            time.sleep(0.2)
        reader = impl.cwd / "slow_reader.py"  # reads nothing for 3 s: the command blocks printing meanwhile
        reader.write_text(
            "import sys, time\ntime.sleep(3)\ndata = sys.stdin.read()\nprint(len(data), data.count('xx\"'))\n"
        )
        proc = subprocess.run(
            f"{sys.executable} -m mqttalk recv --json | {sys.executable} {reader}",
            shell=True,
            cwd=impl.cwd,
            env=impl.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        size, bodies_seen = (int(x) for x in proc.stdout.split())
        assert size > 4 * 1024 * 1024 and bodies_seen == 20, proc.stdout
        assert handed_over(impl, "recv").err == "mqttalk: no unread messages\n"


def test_a_signal_that_comes_while_a_command_is_served_is_handled_after_it() -> None:
    """A SIGTERM or Ctrl-C meant for `listen` must end `listen`, not the command it serves at that moment."""
    from mqttalk._handoff_server import _signals_deferred

    seen: list[str] = []

    def handler(sig: int, _frame: object) -> None:
        seen.append(f"handled {sig}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            seen.append("command done")
        assert seen == ["command done", f"handled {int(signal.SIGTERM)}"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_live_send_that_loses_the_broker_is_queued_not_failed(tmp_path: Path, durable_broker: Any) -> None:
    """A message recorded by a live connection that then loses the broker says QUEUED (exit 6), like a
    one-shot send, not "broker unreachable": an agent that retried would send it twice."""
    from conftest import pair_in_process

    import mqttalk

    impl, tests = pair_in_process(tmp_path, durable_broker.url)
    with impl.live(online=True, reconnect=False) as live:
        durable_broker.stop()
        with pytest.raises(mqttalk.errors.Queued) as queued:
            live.send("recorded, then the broker went away")
    assert queued.value.exit_code == 6
    durable_broker.start()
    impl.send("after it came back")  # sends the queued one first
    deadline, bodies_got = time.monotonic() + 20, []
    while len(bodies_got) < 2 and time.monotonic() < deadline:  # (fetch returns all unread, read or not yet)
        bodies_got = [m.envelope.body for m in tests.fetch(wait=2).messages]
    assert bodies_got == ["recorded, then the broker went away", "after it came back"]


def test_the_socket_name_is_the_session_locks(tmp_path: Path) -> None:
    """The command finds the live process by the name of its session lock (Channel._lock_path)."""
    import mqttalk
    from mqttalk._handoff import STDIN_LIMIT, channel_of, socket_path
    from mqttalk._wire import MAX_PAYLOAD

    assert STDIN_LIMIT == MAX_PAYLOAD + 1
    url = "mqtt://u:p@127.0.0.1:1883/a/b/abcdefgh12345678#plain"
    assert channel_of(url) == mqttalk.JoinURL.parse(url).channel
    ch = mqttalk.Channel(mqttalk.JoinURL.parse(url), "impl", member="m", settings=mqttalk.Settings(state_dir=tmp_path))
    lock = ch.lock_path("session")
    assert Path(socket_path(tmp_path, ch.url.channel, "impl")) == lock.with_name(lock.name.split(".")[0] + ".sock")
