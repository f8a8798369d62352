#!/usr/bin/env python3
"""A ConnectOnion agent (with two tools) hosted by oonode as an exec agent.

The node runs this script as a long-lived child and speaks JSON Lines with it:

  node -> agent, one line per request (on stdin):
    {"id", "prompt", "session_id", "messages": [{"role", "content"}], "files": [...], "caller"}
  agent -> node (on stdout):
    first, once: {"ready": true, "name", "summary", "examples", "tools"}
    per request: any number of {"id", "chunk"}, then one {"id", "result"} or {"id", "error"}

`messages` is the session's history before `prompt`; it is handed to the
ConnectOnion agent as the session to continue, so the agent remembers earlier
turns although the node may send them to any of its worker processes.

Host it:

    pip install connectonion
    oonode host --exec "python3 examples/connectonion_agent.py"

The model is ConnectOnion's (`--model`, or $CO_MODEL; ConnectOnion's default
otherwise). To use any OpenAI-compatible server instead (Ollama, llama.cpp, vLLM,
or the mock in examples/mock_llm.rs), give its base URL:

    python3 examples/connectonion_agent.py --base-url http://localhost:11434/v1 --model llama3.2

(or $OPENAI_BASE_URL; its key, if it needs one, from $OPENAI_API_KEY). ConnectOnion
then talks to that server through its `OpenAICompatibleLLM` (Agent(base_url=...)).

Only protocol lines go to stdout: everything else this process prints (ConnectOnion's
console, the tools, libraries) is sent to stderr, which the node logs.
"""

import argparse
import json
import os
import sys
import traceback

NAME = "weather-desk"
SUMMARY = "A ConnectOnion agent: I know the weather (canned) and count words."
EXAMPLES = [
    "What is the weather in Lisbon?",
    "How many words are in 'to be or not to be'?",
]


def get_weather(city: str) -> str:
    """The current weather in a city (a canned answer: this example makes no network calls)."""
    return f"It is sunny and 21 degrees in {city}."


def word_count(text: str) -> int:
    """The number of words in a text."""
    return len(text.split())


def protocol_stream():
    """The real stdout for protocol lines; fd 1 itself is pointed at stderr, so that a
    stray print (ours, a library's, a subprocess's) cannot corrupt the protocol."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.getenv("CO_MODEL"))
    parser.add_argument("--base-url", default=os.getenv("OPENAI_BASE_URL"))
    args = parser.parse_args()

    out = protocol_stream()

    def send(message: dict) -> None:
        out.write(json.dumps(message, ensure_ascii=False) + "\n")
        out.flush()

    # Imported after stdout is safe: importing ConnectOnion may print.
    from connectonion import Agent, after_each_tool

    current = {"id": None}

    def tool_progress(agent) -> None:
        """Each finished tool call becomes a STREAM chunk, so callers see the work."""
        entry = agent.current_session["trace"][-1]
        if entry.get("type") == "tool_result" and current["id"] is not None:
            send({"id": current["id"], "chunk": f"[{entry['name']}: {entry.get('status')}]\n"})

    options = {}
    if args.model:
        options["model"] = args.model
    if args.base_url:
        options["base_url"] = args.base_url
        options["api_key"] = os.getenv("OPENAI_API_KEY")
    agent = Agent(
        NAME,
        tools=[get_weather, word_count],
        system_prompt="You are a helpful assistant. Use your tools when they help. Be brief.",
        quiet=True,
        log=False,
        on_events=[after_each_tool(tool_progress)],
        **options,
    )
    send({
        "ready": True,
        "name": NAME,
        "summary": SUMMARY,
        "examples": EXAMPLES,
        "tools": agent.list_tools(),
    })

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            request_id = request["id"]
        except (ValueError, KeyError, TypeError) as e:
            print(f"connectonion_agent: not a request ({e}): {line[:200]!r}", file=sys.stderr)
            continue
        current["id"] = request_id
        prompt = request.get("prompt", "")
        files = request.get("files") or []
        if files:
            listed = "\n".join(f"- {f.get('name')} at {f.get('path')} ({f.get('size')} bytes)" for f in files)
            prompt = f"{prompt}\n\nAttached files:\n{listed}"
        session = {
            "session_id": request.get("session_id"),
            "messages": [
                {"role": m["role"], "content": m["content"]}
                for m in request.get("messages") or []
            ],
        }
        try:
            result = agent.input(prompt, session=session)
            send({"id": request_id, "result": "" if result is None else str(result)})
        except Exception as e:  # one failed turn, not a dead agent
            traceback.print_exc(file=sys.stderr)
            send({"id": request_id, "error": f"{type(e).__name__}: {e}"})
        finally:
            current["id"] = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
