// A second, independent MCP client: Node's @modelcontextprotocol/sdk (installed by the test with npm).
// Usage: node mcp_node_client.mjs '{"command": ..., "args": [...], "cwd": ..., "env": {...}}'
// Prints one JSON object per line: {"event": "ready", capabilities, instructions}, {"event": "subscribed"},
// then {"event": "notification", method, params} for every notification the server sends, and
// {"event": "tool", name, text} for each tool the test asks for on stdin ("tool NAME"); "quit" ends it.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import readline from "node:readline";

const server = JSON.parse(process.argv[2]);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const client = new Client({ name: "node-test", version: "0" }, { capabilities: {} });
client.fallbackNotificationHandler = async (n) => say({ event: "notification", method: n.method, params: n.params });
await client.connect(new StdioClientTransport({ ...server, stderr: "inherit" }));
say({ event: "ready", capabilities: client.getServerCapabilities(), instructions: client.getInstructions() });
await client.subscribeResource({ uri: "mqttalk://inbox" });
say({ event: "subscribed" });
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (line.startsWith("tool ")) {
    const result = await client.callTool({ name: line.slice(5), arguments: {} });
    say({ event: "tool", name: line.slice(5), text: result.content.map((c) => c.text).join("\n") });
  } else if (line === "quit") break;
}
await client.close();
