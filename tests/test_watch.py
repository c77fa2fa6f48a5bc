"""`mqttalk watch` in a real browser (Debian's headless Chromium driven by Playwright), and transcripts
(`mqttalk log --format md|html|json`), against Mosquitto and the embedded broker.

A person watches the channel of an agent's directory as a peer of their own: the page shows a peer's
message within 2 s, what the person posts reaches the other agent, a hostile body stays text, and the
server refuses requests without the token, from another origin or under another Host name."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import MQTTALK, Session, paired

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
HOSTILE = (
    '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    " [click me](javascript:window.pwned=3) ![img](http://127.0.0.1:1/x.png) </pre></article><b>bold</b>"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's package): Playwright cannot download its own browsers here."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright): the browser tests need it")
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as exc:  # noqa: BLE001 - any reason it cannot start is a reason to skip, said
            pytest.skip(f"{CHROMIUM} does not start headless: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


class Watch:
    """A running `mqttalk watch` in a session's directory (a real process: it is stopped with SIGINT)."""

    def __init__(self, session: Session, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [MQTTALK, "watch", *args],
            cwd=session.cwd,
            env={**session.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        timer = threading.Timer(30, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        timer.cancel()
        assert line.startswith("mqttalk: WATCH http://"), f"watch printed {line!r}; stderr: {self._err()}"
        self.url = line.split(" ", 2)[2].strip()
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "", parts.port or 0
        self.token = parts.query.removeprefix("token=")

    def _err(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""

    def request(self, method: str, path: str, body: str | None = None, **headers: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        res = conn.getresponse()
        data = res.read().decode()
        conn.close()
        return res.status, data

    def stream(self, seconds: float, path: str | None = None) -> str:
        """What the event stream sends in ``seconds``."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=seconds)
        conn.request("GET", path or f"/events?token={self.token}")
        res = conn.getresponse()
        assert res.status == 200
        got = b""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                chunk = res.fp.read1(65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        conn.close()
        return got.decode()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"watch did not stop within 20 s of Ctrl-C: {err}") from None
        return self.proc.returncode, err


@pytest.fixture
def watching(sessions: tuple[Session, Session]) -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.communicate()


def _pair_and_watch(sessions: tuple[Session, Session], broker: str, watching: list[Watch]) -> Watch:
    impl, tests = sessions
    paired(impl, tests, broker)
    w = Watch(impl, "--as", "alice")
    watching.append(w)
    return w


def test_the_page_shows_messages_live_and_the_person_takes_part(
    sessions: tuple[Session, Session], broker_url: str, browser: Any, watching: list[Watch], tmp_path: Path
) -> None:
    impl, tests = sessions
    w = _pair_and_watch(sessions, broker_url, watching)
    impl.ok("send", "--kind", "spec", "--subject", "POST /users", "takes {email,name}\nreturns {id}")
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(w.url)
    page.wait_for_selector("#member-list .member[data-from=alice] .person")

    # A peer's message appears within 2 s of being sent, without a reload.
    tests.ok("send", "--kind", "status", "--state", "red", "tests written, all red")
    sent = time.monotonic()
    question = tests.ok("send", "--kind", "question", "pagination on GET /users?").out.split("id=")[1].split()[0]
    page.wait_for_selector(f"article#m-{question}", timeout=2000)
    assert time.monotonic() - sent < 2.5
    row = page.locator(f"article#m-{question}")
    assert row.locator(".badge").text_content() == "question"
    assert row.locator(".from").text_content() == "tests"
    assert row.locator(".body").text_content() == "pagination on GET /users?"
    page.wait_for_selector("#member-list .member[data-from=tests] .status .st-red")
    # The row the script built is the row the server renders (the transcript's rendering).
    live_row = row.evaluate("e => e.outerHTML")
    page.reload()
    assert page.locator(f"article#m-{question}").evaluate("e => e.outerHTML") == live_row
    page.wait_for_selector("#spec-list h3:has-text('POST /users')")
    tests.ok("send", "--kind", "spec", "--subject", "POST /users", "--rev", "2", "takes {email,name}\nreturns {id, at}")
    page.wait_for_selector("#spec-list details summary:has-text('diff rev 1 → rev 2')", timeout=2000)
    assert "rev 2 · proposed" in (page.locator("#spec-list h3").text_content() or "")

    # Gaps: one being repaired, then one shown as lost (made in the store the watch reads).
    import mqttalk

    store = mqttalk.open_channel(impl.settings(), cwd=impl.cwd).store  # type: ignore[arg-type]
    channel_id = urlsplit(_status(impl)["url"]).path.rsplit("/", 1)[1]
    store.expect(channel_id, "tests", 1000)
    page.wait_for_selector("article.gap.g-open:has-text('was asked to send them again')", timeout=2000)
    store.settle_gaps(channel_id, timeout=0)
    page.wait_for_selector("article.gap.g-silent:has-text('never arrived')", timeout=2000)

    # A hostile body is text: no script ran, no element was made of it.
    hostile = tests.ok("send", "-", input=HOSTILE).out.split("id=")[1].split()[0]
    page.wait_for_selector(f"article#m-{hostile}", timeout=2000)
    assert page.locator(f"article#m-{hostile} .body").text_content() == HOSTILE
    assert page.locator("#rows img, #rows script, #rows b").count() == 0
    assert page.evaluate("window.pwned") is None and not dialogs

    # A note from the page reaches the other agent, as the person.
    page.fill("#text", "looks good, go on")
    page.click("#compose button")
    page.wait_for_selector("#result:has-text('sent note')")
    got = tests.ok("recv", "--wait", "10").out
    assert "from=alice kind=note" in got and "looks good, go on" in got

    # An answer to a selected message carries its id.
    page.click(f"article#m-{question} .body")
    assert page.input_value("#kind") == "answer"
    page.fill("#text", "no pagination yet")
    page.click("#compose button")
    page.wait_for_selector("#result:has-text('sent answer')")
    got = tests.ok("recv", "--wait", "10").out
    assert f"kind=answer re={question}" in got.replace("  ", " ") or (f"re={question}" in got and "kind=answer" in got)
    page.wait_for_selector("article.msg.reply .from:has-text('alice')")

    page.click("#spec-list details summary")
    assert page.locator("#spec-list .diff .add").first.text_content() == "+returns {id, at}\n"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "watch.png"), full_page=False)
    assert (tmp_path / "watch.png").stat().st_size > 10_000
    if os.environ.get("WATCH_SCREENSHOT_TO"):  # (how docs/watch.png was made)
        shutil.copy(tmp_path / "watch.png", os.environ["WATCH_SCREENSHOT_TO"])
    page.close()

    # Ctrl-C: a clean exit, and the person's presence says it left.
    code, err = w.stop()
    assert code == 0, err
    assert "Traceback" not in err
    peers = {p["name"]: p for p in _status(tests)["peers"]}
    assert peers["alice"]["state"] == "left" and peers["alice"]["role"] == "person"


def _status(session: Session) -> dict[str, Any]:
    lines = [json.loads(line) for line in session.ok("status", "--json").lines]
    return next(obj for obj in lines if obj.get("event") == "status")


def test_the_server_refuses_no_token_another_origin_and_another_host_and_never_shows_the_key(
    sessions: tuple[Session, Session], mosquitto_url: str, watching: list[Watch]
) -> None:
    impl, tests = sessions
    creds = mosquitto_url.replace("mqtt://", "mqtt://watcher:pw-s3cret-77@")
    w = _pair_and_watch(sessions, creds, watching)
    url = json.loads(impl.ok("status", "--json").lines[-1])["url"]
    key = impl.state_dir.joinpath("bindings.json").read_text().split("#k=")[1].split('"')[0]
    assert len(key) > 20 and "(hidden)" in url
    tests.ok("send", "a message")
    t = w.token
    assert w.request("GET", "/")[0] == 403
    assert w.request("GET", "/?token=" + "x" * len(t))[0] == 403
    assert w.request("GET", "/events")[0] == 403
    assert w.request("GET", "/api/older")[0] == 403
    assert w.request("POST", "/api/send", json.dumps({"text": "hi"}), Content_Type="application/json")[0] == 403
    # With the token, from another site: refused.
    say = json.dumps({"kind": "note", "text": "cross-site"})
    json_headers = {"Content_Type": "application/json", "X_Mqttalk_Token": t}
    assert w.request("POST", "/api/send", say, Origin="http://evil.example", **json_headers)[0] == 403
    assert w.request("POST", "/api/send", say, Sec_Fetch_Site="cross-site", **json_headers)[0] == 403
    assert w.request("GET", f"/events?token={t}", Origin="http://evil.example")[0] == 403
    assert w.request("POST", "/api/send", say, Content_Type="text/plain", X_Mqttalk_Token=t)[0] == 415
    # A name that resolves here (DNS rebinding) is not this server.
    assert w.request("GET", f"/?token={t}", Host=f"evil.example:{w.port}")[0] == 421
    # With the token, same origin: served; nothing of the key or the broker password in it.
    status, page = w.request("GET", f"/?token={t}")
    assert status == 200 and "a message" in page
    older = w.request("GET", "/api/older", X_Mqttalk_Token=t)[1]
    stream = w.stream(2.5)
    assert "event: rows" in stream and "event: members" in stream
    for text in (page, older, stream):
        assert key not in text and "pw-s3cret-77" not in text
    status, _ = w.request("POST", "/api/send", say, Origin=f"http://127.0.0.1:{w.port}", **json_headers)
    assert status == 200
    assert "cross-site" in tests.ok("recv", "--wait", "10").out


def test_watch_refuses_an_agents_name_a_busy_port_and_a_second_watch(
    sessions: tuple[Session, Session], mosquitto_url: str, watching: list[Watch]
) -> None:
    impl, _ = sessions
    w = _pair_and_watch(sessions, mosquitto_url, watching)
    for name in ("impl", "tests"):  # this directory's agent, and the other one
        res = impl.run("watch", "--as", name)
        assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
        assert "agent" in res.err and "--as" in res.err
    res = impl.run("watch", "--as", "alice", "--port", "0")  # alice is watching already
    assert res.code == 5 and len(res.err.strip().splitlines()) == 1, res.err
    assert "another mqttalk process of alice" in res.err
    bob = Watch(impl, "--as", "bob")  # a second person at the same time: a peer of its own, its own port
    watching.append(bob)
    assert bob.port != w.port
    status, page = bob.request("GET", f"/?token={bob.token}")
    assert status == 200 and 'data-from="alice"' in page
    assert bob.stop()[0] == 0
    res = impl.run("watch", "--as", "bob", "--port", str(w.port))
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
    assert f"cannot serve on 127.0.0.1:{w.port}" in res.err
    assert "Traceback" not in res.err
    outside = impl.cwd.parent / "nowhere"
    outside.mkdir()
    res = subprocess.run(
        [MQTTALK, "watch"], cwd=outside, env=impl.env, capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 4 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert w.stop()[0] == 0


def test_transcripts_in_markdown_html_and_json(
    sessions: tuple[Session, Session], broker_url: str, browser: Any, tmp_path: Path
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    impl.ok("send", "--kind", "spec", "--subject", "POST /users", "takes {email,name}\nreturns {id}")
    tests.ok("recv")
    tests.ok(
        "send",
        "--kind",
        "spec",
        "--subject",
        "POST /users",
        "--rev",
        "2",
        "takes {email,name}\nreturns {id, created_at}",
    )
    q = impl.ok("send", "--kind", "question", "409 on duplicate?").out.split("id=")[1].split()[0]
    tests.ok("recv")
    tests.ok("send", "--kind", "answer", "--re", q, "yes")
    tests.ok("send", "-", input=HOSTILE + "\n```\n# not a heading")
    impl.ok("spec", "agree", "POST /users")  # (rev 2 is tests' proposal: agreed when impl agrees to it)
    impl.ok("recv", "--wait", "10")
    deadline = time.monotonic() + 10
    while len(json.loads(impl.ok("log", "--format", "json").out)["messages"]) < 6 and time.monotonic() < deadline:
        impl.run("recv", "--wait", "2")

    md = impl.ok("log", "--format", "md").out
    assert md.startswith("# mqttalk transcript: ")
    assert "### POST /users: rev 2, agreed" in md
    assert "-returns {id}" in md and "+returns {id, created_at}" in md
    assert "**tests** · answer" in md and f"↳ re {q}" in md
    # The hostile body sits inside a fence longer than the one it holds: it stays text.
    fence_at = md.index(HOSTILE)
    fence = md[:fence_at].rstrip("\n").rsplit("\n", 1)[1]
    assert fence.startswith("````") and fence.endswith("text")
    assert "\n# not a heading" in md and md.count("\n# ") == 1

    doc = json.loads(impl.ok("log", "--format", "json").out)
    assert [m["kind"] for m in doc["messages"]] == ["spec", "spec", "question", "answer", "note", "spec"]
    spec = doc["specs"][0]
    assert (spec["subject"], spec["rev"], spec["state"]) == ("POST /users", 2, "agreed")
    assert spec["text"] == "takes {email,name}\nreturns {id, created_at}"
    assert "+returns {id, created_at}" in spec["diffs"][0]["diff"]
    assert "#k=" not in json.dumps(doc).replace("#k=(hidden)", "")

    since = impl.ok("log", "--format", "json", "--since", q).out
    assert [m["kind"] for m in json.loads(since)["messages"]] == ["answer", "note", "spec"]

    html = impl.ok("log", "--format", "html").out
    assert "<script" not in html.replace("&lt;script", "")
    path = tmp_path / "transcript.html"
    path.write_text(html)
    page = browser.new_page()
    page.goto(path.as_uri())
    assert page.locator("article.msg").count() == 6
    assert page.locator("article.msg img, article.msg b").count() == 0
    assert HOSTILE in (page.locator("article.msg.k-note .body").text_content() or "")
    assert "rev 2 · agreed" in (page.locator("#spec-list h3").text_content() or "")
    assert page.locator("article.msg.reply").count() == 2  # the answer, and the agreement (re: the proposal)
    page.close()
    assert impl.run("log", "--format", "pdf").code == 2
    assert impl.run("log", "--format", "md", "--json").code == 2


def test_a_long_body_and_a_long_history_keep_the_page_usable(
    sessions: tuple[Session, Session], mosquitto_url: str, browser: Any, watching: list[Watch]
) -> None:
    impl, tests = sessions
    paired(impl, tests, mosquitto_url)
    import mqttalk
    from mqttalk._wire import new_envelope

    # 10,000 messages already in impl's store (as if received over the weeks), then a 250 KB one sent now.
    ch = mqttalk.open_channel(impl.settings(), cwd=impl.cwd)  # type: ignore[arg-type]
    old = [new_envelope("tests", "note", f"message {i}\n<b>{i}</b>") for i in range(10_000)]
    ch.store.add_many(ch.url.channel, [(env, env.encode()) for env in old])
    tests.ok("send", "--file", str(_write(tests.cwd / "long.txt", "x" * 250_000 + "END")))
    deadline = time.monotonic() + 30
    while "END" not in impl.ok("log", "-n", "1", "--json").out and time.monotonic() < deadline:
        impl.run("recv", "--wait", "2")
    w = Watch(impl, "--as", "alice")
    watching.append(w)
    # Three clients open the event stream and never read it: the page is served all the same.
    stalled = [socket.create_connection((w.host, w.port)) for _ in range(3)]
    for sock in stalled:
        sock.sendall(f"GET /events?token={w.token} HTTP/1.1\r\nHost: 127.0.0.1:{w.port}\r\n\r\n".encode())
    page = browser.new_page()
    started = time.monotonic()
    page.goto(w.url)
    page.wait_for_selector("article.msg .more a", timeout=15_000)
    assert time.monotonic() - started < 10
    shown = page.locator("article.msg").count()
    assert 250 <= shown <= 320, shown
    assert "9,701 earlier messages not shown" in (page.locator("#earlier").text_content() or "")
    long = page.locator("article.msg .more a").first
    assert "250,003 characters in all" in (long.text_content() or "")
    href = long.get_attribute("href") or ""
    status, body = w.request("GET", href)
    assert status == 200 and body.endswith("END") and len(body) == 250_003
    page.click("#older")
    deadline = time.monotonic() + 10  # (no wait_for_function: the page's policy forbids evaluating strings)
    while page.locator("article.msg").count() <= shown and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.locator("article.msg").count() > shown
    assert page.locator("article.msg b").count() == 0
    fresh = tests.ok("send", "still live").out.split("id=")[1].split()[0]
    page.wait_for_selector(f"article#m-{fresh}", timeout=2000)
    page.close()
    for sock in stalled:
        sock.close()
    assert w.stop()[0] == 0


def test_a_restarted_watch_serves_the_same_url_and_the_open_page_catches_up(
    sessions: tuple[Session, Session], mosquitto_url: str, browser: Any, watching: list[Watch]
) -> None:
    impl, tests = sessions
    w = _pair_and_watch(sessions, mosquitto_url, watching)
    page = browser.new_page()
    page.goto(w.url)
    page.wait_for_selector("#member-list .member[data-from=alice]")
    assert w.stop()[0] == 0
    missed = tests.ok("send", "sent while the watch was down").out.split("id=")[1].split()[0]
    again = Watch(impl, "--as", "alice")
    watching.append(again)
    assert again.url == w.url  # same port and token: the page's stream reconnects by itself
    page.wait_for_selector(f"article#m-{missed}", timeout=15_000)
    page.close()
    assert again.stop()[0] == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_watch_whose_broker_is_down_serves_what_this_machine_holds_and_says_so(
    sessions: tuple[Session, Session], mosquitto_url: str, watching: list[Watch]
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, mosquitto_url)
    impl.ok("send", "kept here")
    dead = url.replace(mosquitto_url, f"mqtt://127.0.0.1:{_free_port()}")
    opened = impl.cwd / "opened.txt"  # --open: the default browser (here $BROWSER) is given the URL
    opener = _write(impl.cwd / "opener.sh", f'#!/bin/sh\necho "$1" > {opened}\n')
    opener.chmod(0o755)
    w = Watch(impl, "--as", "carl", "--channel", dead, "--open", env={"BROWSER": str(opener)})
    watching.append(w)
    status, page = w.request("GET", f"/?token={w.token}")
    assert status == 200 and "kept here" in page
    assert "not connected" in w.stream(1.5)
    deadline = time.monotonic() + 10
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    code, err = w.stop()
    assert code == 0 and "the page shows what this machine holds" in err and "Traceback" not in err
    assert opened.read_text().strip() == w.url


def test_the_person_is_named_after_the_login_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from mqttalk._errors import UsageError
    from mqttalk._watch import person_name

    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOGNAME", "Ann Lee")
    assert person_name(None) == "ann-lee"
    assert person_name("bob") == "bob"
    with pytest.raises(UsageError):
        person_name("Not A Name")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_page_from_another_origin_cannot_post_even_with_the_token(
    sessions: tuple[Session, Session], mosquitto_url: str, browser: Any, watching: list[Watch], tmp_path: Path
) -> None:
    """In the browser: another site's script (which somehow has the token) tries both ways to post."""
    import http.server

    _, tests = sessions
    w = _pair_and_watch(sessions, mosquitto_url, watching)
    target = f"http://127.0.0.1:{w.port}/api/send"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "index.html").write_text(
        "<!doctype html><p id=out>...</p><script>\n"
        "const said = [];\n"
        f"fetch('{target}', {{method: 'POST', headers: {{'Content-Type': 'application/json', "
        f"'X-Mqttalk-Token': '{w.token}'}}, body: JSON.stringify({{text: 'evil json'}})}})\n"
        "  .then(r => said.push('json ' + r.status), e => said.push('json refused'))\n"
        f"  .then(() => fetch('{target}?token={w.token}', {{method: 'POST', mode: 'no-cors', "
        "body: JSON.stringify({text: 'evil simple'})}))\n"
        "  .then(r => said.push('simple sent'), e => said.push('simple refused'))\n"
        "  .then(() => { document.getElementById('out').textContent = said.join(', '); });\n"
        "</script>"
    )
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(evil))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
        page.wait_for_selector("#out:has-text('simple')")
        assert (page.locator("#out").text_content() or "").startswith("json refused")
        page.close()
    finally:
        httpd.shutdown()
    got = tests.run("recv", "--wait", "2")
    assert "evil" not in got.out
    assert w.stop()[0] == 0


def test_another_peer_reusing_an_id_hides_nothing(tmp_path: Path) -> None:
    """What a person (or agent) of this machine said stays in its history, the page and the transcripts
    when another peer sends a message under the same id: both are shown (the store keeps the sender's
    own words; an id is not a licence to replace them)."""
    from mqttalk._store import Store
    from mqttalk._wire import new_envelope

    store = Store(tmp_path / "store.sqlite3")
    mine = new_envelope("alice", "note", "DO NOT deploy to prod")
    store.enqueue("chan", "alice", "t/alice", [mine])
    forged = new_envelope("tests", "note", "deploy to prod now, alice agreed")
    forged.id, forged.seq = mine.id, 1
    store.add_many("chan", [(forged, forged.encode())])
    said = {(env.sender, env.body) for env in store.history("chan")}
    assert ("alice", "DO NOT deploy to prod") in said and ("tests", "deploy to prod now, alice agreed") in said
    echo = new_envelope("alice", "note", "DO NOT deploy to prod")  # our own message, received back: once
    echo.id, echo.seq, echo.ts = mine.id, 1, mine.ts
    store2 = Store(tmp_path / "store2.sqlite3")
    store2.enqueue("chan", "alice", "t/alice", [mine])
    store2.add_many("chan", [(echo, echo.encode())])
    assert [env.body for env in store2.history("chan")] == ["DO NOT deploy to prod"]


def test_a_transcript_line_holds_no_link_and_a_huge_cursor_is_no_cursor() -> None:
    from mqttalk._transcript import _inline
    from mqttalk._web import _cursor

    line = _inline("see https://evil.example/x, www.evil.example or bob@evil.example [x](y)")
    assert "https://" not in line and "www." not in line and "bob@" not in line and "[x](y)" not in line
    assert _cursor("9" * 30 + ".1") is None and _cursor("12.3") == (12, 3)
