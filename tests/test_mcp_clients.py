"""`mqttalk mcp` driven by real MCP client libraries, as agents' clients are built: the Python SDK's
`ClientSession` and Node's `@modelcontextprotocol/sdk` (installed from npm into the test's temporary
directory). Each is started as Claude Code starts a channel (the child of a process carrying
`--dangerously-load-development-channels server:mqttalk`, see fake_claude.py), takes the pushed
`notifications/claude/channel`, and subscribes to mqttalk://inbox."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import MQTTALK, Session, paired

FAKE_CLAUDE = Path(__file__).parent / "fake_claude.py"
NODE_CLIENT = Path(__file__).parent / "mcp_node_client.mjs"
CHANNELS_ON = ["--dangerously-load-development-channels", "server:mqttalk"]


def server_command() -> list[str]:
    return [sys.executable, str(FAKE_CLAUDE), *CHANNELS_ON, "--", MQTTALK, "mcp", "--claude-channel"]


@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")  # (the handshake-era way, on purpose)
def test_the_python_sdk_client_gets_a_spec_pushed_once_and_inbox_updates(
    sessions: tuple[Session, Session], mosquitto_url: str, tmp_path: Path
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.extension import NotificationBinding
    from mcp.client.stdio import stdio_client
    from mcp_types import NotificationParams, ResourceUpdatedNotification

    impl, tests = sessions
    paired(impl, tests, mosquitto_url)
    tests.ok("recv")  # the PAIRED notice

    class ChannelParams(NotificationParams):
        content: str
        meta: dict[str, str]

    pushed: list[tuple[float, ChannelParams]] = []
    updated: list[str] = []

    async def on_channel(params: ChannelParams) -> None:
        pushed.append((time.monotonic(), params))

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updated.append(str(message.params.uri))

    async def until(done: Any, within: float) -> None:
        with anyio.fail_after(within):
            while not done():
                await anyio.sleep(0.02)

    async def run() -> None:
        command = server_command()
        params = StdioServerParameters(command=command[0], args=command[1:], cwd=tests.cwd, env=tests.env)
        with open(tmp_path / "mcp.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                binding = NotificationBinding(
                    method="notifications/claude/channel", params_type=ChannelParams, handler=on_channel
                )
                async with ClientSession(
                    read, write, message_handler=on_message, notification_bindings=[binding]
                ) as client:
                    init = await client.initialize()
                    assert init.capabilities.experimental == {"claude/channel": {}}
                    assert init.capabilities.resources is not None and init.capabilities.resources.subscribe
                    await client.subscribe_resource("mqttalk://inbox")
                    sent = json.loads(
                        (
                            await anyio.to_thread.run_sync(
                                lambda: impl.ok(
                                    "send",
                                    "--json",
                                    "--kind",
                                    "spec",
                                    "--subject",
                                    "POST /users",
                                    "-",
                                    input="POST /users takes {email, name}\nreturns {id, created_at}; 409 on duplicate",
                                )
                            )
                        ).out
                    )
                    exited = time.monotonic()
                    await until(lambda: any(p.meta.get("id") == sent["id"] for _, p in pushed), within=10)
                    at, got = next((t, p) for t, p in pushed if p.meta.get("id") == sent["id"])
                    assert at - exited < 1.0, f"pushed {at - exited:.2f}s after the sender exited"
                    assert got.meta == {
                        "event": "message",
                        "from": "impl",
                        "kind": "spec",
                        "id": sent["id"],
                        "subject": "POST /users",
                        "rev": "1",
                        "state": "proposed",
                    }
                    assert got.content.startswith("mqttalk: MESSAGE from=impl kind=spec subject='POST /users'")
                    assert got.content.endswith("returns {id, created_at}; 409 on duplicate")
                    await until(lambda: "mqttalk://inbox" in updated, within=5)  # it came, and was marked read
                    await anyio.sleep(1.0)
                    assert [p.meta.get("id") for _, p in pushed].count(sent["id"]) == 1  # once
                    result = await client.call_tool("receive", {})
                    assert result.content[0].text == "mqttalk: no new message"  # type: ignore[union-attr]
                    inbox = await client.read_resource("mqttalk://inbox")
                    assert inbox.contents[0].text == "mqttalk: no unread message"  # type: ignore[union-attr]

    anyio.run(run)
    assert "MESSAGE" not in tests.ok("recv").out  # the cursor `recv` and the hooks use: read


@pytest.fixture(scope="session")
def node_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding @modelcontextprotocol/sdk from npm, once per test run."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node SDK client (apt-get install nodejs npm)")
    where = tmp_path_factory.mktemp("node-sdk")
    res = subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", "@modelcontextprotocol/sdk@1"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"npm could not install @modelcontextprotocol/sdk: {res.stderr.strip()[-300:]}")
    shutil.copy(NODE_CLIENT, where / NODE_CLIENT.name)
    return where


def test_the_node_sdk_client_sees_the_capability_a_push_and_an_inbox_update(
    sessions: tuple[Session, Session], mosquitto_url: str, node_sdk: Path, tmp_path: Path
) -> None:
    impl, tests = sessions
    paired(impl, tests, mosquitto_url)
    tests.ok("recv")
    command = server_command()
    server = {"command": command[0], "args": command[1:], "cwd": str(tests.cwd), "env": tests.env}
    with open(tmp_path / "node.err", "w") as errlog:
        proc = subprocess.Popen(
            ["node", str(node_sdk / NODE_CLIENT.name), json.dumps(server)],
            cwd=node_sdk,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            bufsize=1,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:

            def next_event(kind: str) -> dict[str, Any]:
                for line in proc.stdout:  # type: ignore[union-attr]
                    event = json.loads(line)
                    if event["event"] == kind:
                        return dict(event)
                raise AssertionError(f"the node client ended before {kind}: {(tmp_path / 'node.err').read_text()}")

            ready = next_event("ready")
            assert ready["capabilities"]["experimental"] == {"claude/channel": {}}
            assert ready["capabilities"]["resources"]["subscribe"] is True
            assert '<channel source="mqttalk"' in " ".join(ready["instructions"].split())
            next_event("subscribed")
            sent = json.loads(impl.ok("send", "--json", "--kind", "status", "--state", "green", "all green").out)
            seen: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 15
            while not {"notifications/claude/channel", "notifications/resources/updated"} <= seen.keys():
                assert time.monotonic() < deadline, seen
                event = next_event("notification")
                seen.setdefault(event["method"], event["params"])
            assert seen["notifications/claude/channel"]["meta"] == {
                "event": "message",
                "from": "impl",
                "kind": "status",
                "id": sent["id"],
                "state": "green",
            }
            assert seen["notifications/resources/updated"] == {"uri": "mqttalk://inbox"}
            proc.stdin.write("tool receive\n")
            assert next_event("tool")["text"] == "mqttalk: no new message"
            proc.stdin.write("quit\n")
            proc.stdin.close()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_2026_client_listens_for_inbox_updates(
    sessions: tuple[Session, Session], mosquitto_url: str, tmp_path: Path
) -> None:
    """Protocol 2026-07-28 drops resources/subscribe for a subscriptions/listen stream: the SDK's `Client`
    (which negotiates the newest version it can) hears mqttalk://inbox change on one."""
    from mcp import Client, StdioServerParameters
    from mcp.shared.subscriptions import ResourceUpdated

    impl, tests = sessions
    paired(impl, tests, mosquitto_url)
    tests.ok("recv")

    async def run() -> None:
        params = StdioServerParameters(command=MQTTALK, args=["mcp"], cwd=tests.cwd, env=tests.env)
        async with Client(params) as client:
            assert (client.session.protocol_version or "") >= "2026-07-28", client.session.protocol_version
            async with client.listen(resource_subscriptions=["mqttalk://inbox"]) as events:
                await anyio.sleep(1.0)  # (the first look of a new server announces everything once)
                sent = json.loads(
                    (await anyio.to_thread.run_sync(lambda: impl.ok("send", "--json", "listen to this"))).out
                )
                with anyio.fail_after(10):
                    async for event in events:
                        if isinstance(event, ResourceUpdated) and event.uri == "mqttalk://inbox":
                            inbox = await client.read_resource("mqttalk://inbox")
                            if sent["id"] in inbox.contents[0].text:  # type: ignore[union-attr]
                                break

    anyio.run(run)
    assert "listen to this" in tests.ok("recv").out  # reading the resource marked nothing read
