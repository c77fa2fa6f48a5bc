"""The one place the version is written (the package, presence and the MCP server read it here)."""

__version__ = "0.2.0"
