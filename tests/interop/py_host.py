#!/usr/bin/env python3
"""A ConnectOnion agent hosted with the package's own `host()`, for the interop suite.

    py_host.py --port PORT --relay ws://127.0.0.1:RELAY --co-dir DIR [--trust open]

The agent is a real `connectonion.Agent`; only its model is a scripted stand-in (an
`LLM` subclass in this file), so no model server and no network are needed. It answers

    py-agent heard: <the latest user message> (turn <user messages in the conversation>)

so a caller sees both that its prompt arrived and whether the session's history did.
The key is the one in DIR/keys/agent.key (the suite writes it); the relay is the one
given, announced on as `host()` does.
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relay", required=True)
    parser.add_argument("--co-dir", required=True)
    parser.add_argument("--trust", default="open")
    args = parser.parse_args()

    from connectonion import Agent, host
    from connectonion.core.llm import LLM, LLMResponse

    class ScriptedLLM(LLM):
        """A model that repeats the last user message and counts the user turns."""

        def __init__(self):
            self.model = "scripted-interop"

        def complete(self, messages, tools=None, **kwargs):
            users = [m for m in messages if m.get("role") == "user"]
            content = users[-1].get("content") if users else ""
            if isinstance(content, list):  # multimodal form: keep the text parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = f"py-agent heard: {content} (turn {len(users)})"
            return LLMResponse(content=text, tool_calls=[], raw_response=None)

        def structured_complete(self, messages, output_schema, **kwargs):
            raise NotImplementedError("the interop agent has no structured output")

    co_dir = Path(args.co_dir)
    agent = Agent(
        "py-interop",
        llm=ScriptedLLM(),
        system_prompt="You repeat what you hear.",
        quiet=True,
        log=False,
        co_dir=co_dir,
    )
    host(
        agent,
        port=args.port,
        trust=args.trust,
        relay_url=args.relay,
        co_dir=co_dir,
        summary="The interop suite's Python agent: it repeats what it hears.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
