#!/usr/bin/env python3
"""An agent that asks another agent, by address, through its own node:

    oonode host --exec "python3 examples/agents/delegate_agent.py 0x<address of the other agent>"

It has no network code: it writes a `call` line and the node makes the call with its
own key over the best path (direct, swarm or relay), then writes the answer back on
stdin as a `call_result` line. See docs/agent-protocol.md.
"""
import json
import sys

peer = sys.argv[1]


def send(message):
    print(json.dumps(message), flush=True)


send({"ready": True, "name": "delegate", "summary": f"I ask {peer[:10]}… and pass its answer on."})

for line in sys.stdin:
    request = json.loads(line)
    rid = request["id"]
    send({"id": rid, "chunk": f"asking {peer[:10]}… "})
    send({"id": rid, "call": {"to": peer, "prompt": request["prompt"]}})
    reply = json.loads(sys.stdin.readline())["call_result"]
    if "result" in reply:
        send({"id": rid, "result": reply["result"]})
    else:
        send({"id": rid, "error": f"{peer[:10]}… could not answer ({reply['code']}): {reply['error']}"})
