"""Stands in for Claude Code as the parent of an MCP server, the way Claude Code starts one: as its child,
with the server's stdin and stdout being the pipes the test holds.

    python fake_claude.py [ARGS OF CLAUDE CODE ...] -- COMMAND [ARGS ...]

The arguments before ``--`` are this process's command line, which is what `mqttalk mcp --claude-channel`
looks at (``--dangerously-load-development-channels server:mqttalk``); COMMAND runs with this process's
stdin, stdout and stderr, and its exit code is this one's."""

import subprocess
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(subprocess.call(args[args.index("--") + 1 :]))
