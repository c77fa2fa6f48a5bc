"""`mqttalk demo`: the whole story, run for real with the `mqttalk` command in two directories.

It uses a fresh state directory, so it starts its own embedded broker (as `create` does for a new
user), and stops it at the end. It checks what it shows: a broken step makes the demo fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = "POST /users takes {email, name}; returns 201 {id, created_at}."
SPEC2 = "POST /users takes {email, name}; returns 201 {id, created_at}; 409 if the email exists."


class _Step(Exception):
    pass


def run(keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="mqttalk-demo-"))
    env = {**os.environ, "MQTTALK_STATE_DIR": str(root / "state"), "MQTTALK_EMBEDDED_PORT": "0"}
    for var in ("MQTTALK_CHANNEL", "MQTTALK_PEER", "MQTTALK_BROKER"):
        env.pop(var, None)
    dirs = {"impl": root / "api-server", "tests": root / "api-tests"}
    for d in dirs.values():
        d.mkdir()

    def cmd(who: str, *args: str, expect: int = 0) -> str:
        shown = " ".join(a if re.fullmatch(r"[\w./:=@%+-]+", a) else repr(a) for a in args)
        print(f"\n[{who}] $ mqttalk {shown}", flush=True)
        argv = [sys.executable, "-m", "mqttalk", *args]
        proc = subprocess.run(
            argv,
            cwd=dirs[who],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        out = proc.stdout.rstrip()
        print("\n".join("    " + line for line in out.splitlines()), flush=True)
        if proc.returncode != expect:
            raise _Step(f"`mqttalk {shown}` exited {proc.returncode}, expected {expect}")
        return proc.stdout

    print(
        "mqttalk demo: two coding-agent sessions, 'impl' (owns src/api/users.ts) and 'tests' (owns\n"
        "test/users.test.ts), each in its own directory, talk through the embedded broker."
    )
    try:
        created = cmd("impl", "create", "--as", "impl", "--role", "implements POST /users")
        url = re.search(r"join URL: (\S+)", created)
        if not url:
            raise _Step("create printed no join URL")
        print("\n[impl] $ mqttalk recv --wait 20     (in the background: returns once its peer pairs)", flush=True)
        waiting = subprocess.Popen(
            [sys.executable, "-m", "mqttalk", "recv", "--wait", "20"],
            cwd=dirs["impl"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.0)  # let it connect
        paired = cmd("tests", "pair", url.group(1), "--as", "tests", "--role", "writes the API tests")
        if "PAIRED with impl" not in paired:
            raise _Step("tests did not print PAIRED")
        out, _ = waiting.communicate(timeout=30)
        print("    [impl's background recv printed, and returned:]")
        print("\n".join("    " + line for line in out.rstrip().splitlines()), flush=True)
        if "PAIRED with tests" not in out:
            raise _Step("impl's waiting recv did not print PAIRED")
        question = cmd("tests", "send", "--kind", "question", "What does POST /users return on success?")
        qid = re.search(r"id=(\S+)", question)
        if "kind=question" not in cmd("impl", "recv"):
            raise _Step("impl did not receive the question")
        cmd("impl", "send", "--kind", "answer", "--re", qid.group(1) if qid else "?", "201 with {id, created_at}")
        cmd("impl", "spec", "propose", "POST /users", SPEC)
        got = cmd("tests", "recv")
        if "kind=spec" not in got or "kind=answer" not in got:
            raise _Step("tests did not receive the answer and the spec")
        cmd("tests", "spec", "propose", "POST /users", SPEC2)  # a counter-proposal: revision 2
        if "rev=2 state=proposed" not in cmd("impl", "recv"):
            raise _Step("impl did not receive the counter-proposal")
        cmd("impl", "spec", "diff", "POST /users", "1", "2")
        agreed = cmd("impl", "spec", "agree", "POST /users")
        if "agreed by all" not in agreed:
            raise _Step("impl's agreement did not make rev 2 agreed by all")
        cmd("tests", "send", "--kind", "status", "--state", "red", "tests written, all red")
        got = cmd("impl", "recv")
        if "state=red spec='POST /users' rev=2" not in got:
            raise _Step("impl did not receive the red status against rev 2")
        cmd("impl", "send", "--kind", "status", "--state", "green", "implemented; green on my side")
        got = cmd("tests", "recv", "--wait", "5")
        if "rev=2 state=agreed" not in got or "state=green spec='POST /users' rev=2" not in got:
            raise _Step("tests did not receive the agreement and the green status against rev 2")
        if "agreed by all" not in cmd("tests", "spec", "list"):
            raise _Step("tests' spec list does not show POST /users agreed by all")
        exported = cmd("tests", "spec", "export", "--out", str(root / "api-tests" / "specs"))
        if "EXPORTED 'POST /users' rev 2" not in exported:
            raise _Step("tests did not export the agreed spec")
        cmd("tests", "status")
        cmd("impl", "leave")
        status = cmd("tests", "status")
        if "impl" not in status or "left" not in status:
            raise _Step("tests' status does not show impl as left")
    except (_Step, subprocess.TimeoutExpired) as exc:
        print(f"\nmqttalk demo: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        from ._embedded import stop

        stop(root / "state")
        if keep:
            print(f"\n(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(
        "\nmqttalk demo: OK - paired, negotiated a spec to an agreed revision, reported red then green against it,"
        " exported it, and left."
    )
    return 0
