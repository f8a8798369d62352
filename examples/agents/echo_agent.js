#!/usr/bin/env node
// An oonode agent in JavaScript (Node.js, no packages):
//   oonode host --exec "node examples/agents/echo_agent.js"
// One JSON request per line on stdin; chunk lines, then one result (or error) line on
// stdout. See docs/agent-protocol.md.
const readline = require("node:readline");

const send = (message) => process.stdout.write(JSON.stringify(message) + "\n");

// Optional: names the agent in /info, the banner and /docs.
send({ ready: true, name: "echo-js", summary: "I echo your message, word by word.",
       examples: ["hello there", "streaming arrives one word at a time"] });

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
  const { id, prompt, messages } = JSON.parse(line);
  for (const word of prompt.split(" ")) send({ id, chunk: word + " " });
  // `messages` is the session's history before this prompt (user, assistant, …).
  const turn = Math.floor(messages.length / 2) + 1;
  send({ id, result: turn === 1 ? prompt : `${prompt} (turn ${turn})` });
});
// At the end of stdin (the node stopping), readline closes and the process exits.
