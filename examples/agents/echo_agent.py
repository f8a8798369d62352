#!/usr/bin/env python3
"""An oonode agent in Python: `oonode host --exec "python3 examples/agents/echo_agent.py"`.

The node writes one JSON request per line on stdin; the agent answers on stdout with
any number of chunk lines, then one result (or error) line. See docs/agent-protocol.md.
Standard library only.
"""
import json
import sys


def send(message):
    # One line per message, flushed at once: the node is waiting for it.
    print(json.dumps(message), flush=True)


# Optional: names the agent in /info, the banner and /docs.
send({"ready": True, "name": "echo-py", "summary": "I echo your message, word by word.",
      "examples": ["hello there", "streaming arrives one word at a time"]})

for line in sys.stdin:
    request = json.loads(line)
    rid, prompt = request["id"], request["prompt"]
    for word in prompt.split(" "):
        send({"id": rid, "chunk": word + " "})
    # `messages` is the session's history before this prompt (user, assistant, …).
    turn = len(request["messages"]) // 2 + 1
    answer = prompt if turn == 1 else f"{prompt} (turn {turn})"
    send({"id": rid, "result": answer})
