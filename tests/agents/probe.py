#!/usr/bin/env python3
"""A test agent whose prompt says what to do, good or bad (tests/exec_agent.rs).

    request        answer with the request it got (less its id), as JSON
    pid            answer with its pid
    crash          exit at once, status 3
    hang           never answer
    garbage        write a line that is not JSON
    huge           write a line of 17 MiB
    wrong-id       answer another request
    fail           answer with an error line
    stderr         write a line on stderr, then answer "ok"
    env NAME       answer with the environment variable NAME ("" if unset)
    cwd            answer with its working directory
    call ADDR TEXT ask the agent at ADDR, answer with the call_result as JSON
    anything else  echo it
"""
import json
import os
import sys
import time


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


send({"ready": True, "name": "probe", "summary": "A test agent.", "examples": ["pid"],
      "tools": ["probe"]})

for line in sys.stdin:
    request = json.loads(line)
    rid, prompt = request["id"], request["prompt"]
    if prompt == "request":
        del request["id"]
        send({"id": rid, "result": json.dumps(request)})
    elif prompt == "pid":
        send({"id": rid, "result": str(os.getpid())})
    elif prompt == "crash":
        sys.exit(3)
    elif prompt == "hang":
        time.sleep(3600)
    elif prompt == "garbage":
        print("this is not JSON", flush=True)
    elif prompt == "huge":
        send({"id": rid, "result": "x" * (17 << 20)})
    elif prompt == "wrong-id":
        send({"id": "another", "result": "?"})
    elif prompt == "fail":
        send({"id": rid, "error": "I was asked to fail"})
    elif prompt == "stderr":
        print("a line on stderr", file=sys.stderr, flush=True)
        send({"id": rid, "result": "ok"})
    elif prompt.startswith("env "):
        send({"id": rid, "result": os.environ.get(prompt[4:], "")})
    elif prompt == "cwd":
        send({"id": rid, "result": os.getcwd()})
    elif prompt.startswith("call "):
        _, to, text = prompt.split(" ", 2)
        send({"id": rid, "call": {"to": to, "prompt": text}})
        reply = json.loads(sys.stdin.readline())
        assert reply["id"] == rid, reply
        send({"id": rid, "result": json.dumps(reply["call_result"])})
    else:
        send({"id": rid, "chunk": prompt})
        send({"id": rid, "result": prompt})
