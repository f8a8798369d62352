#!/usr/bin/env python3
"""The Python side of benches/compare: an echo agent served by connectonion's own `host()`.

    py_host.py --port PORT --co-dir DIR [--trust open]

The agent is a real `connectonion.Agent` whose model is a stand-in that answers with the
latest user message, so each turn goes through the package's whole path (signature,
trust, replay ledger, session claim and storage, the agent's loop) without a model server.
The relay is off (`relay_url=None`). `host()` binds 0.0.0.0; the bench talks to
127.0.0.1 only, and this wrapper narrows uvicorn's bind to 127.0.0.1 so that nothing
else can reach it. Run it with HOME and the working directory in a scratch directory,
and the package's backend pointed at a closed port (run.sh does).
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--co-dir", required=True)
    parser.add_argument("--trust", default="open")
    args = parser.parse_args()

    import uvicorn
    from connectonion import Agent, host
    from connectonion.core.llm import LLM, LLMResponse

    class EchoLLM(LLM):
        """Answers with the text of the latest user message."""

        def __init__(self):
            self.model = "echo-bench"

        def complete(self, messages, tools=None, **kwargs):
            text = ""
            for m in reversed(messages):
                if m.get("role") == "user":
                    text = m.get("content") or ""
                    break
            if isinstance(text, list):
                text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
            return LLMResponse(content=text, tool_calls=[], raw_response=None)

        def structured_complete(self, messages, output_schema, **kwargs):
            raise NotImplementedError("the bench's echo agent has no structured output")

    real_run = uvicorn.run

    def run_on_loopback(app, *a, **kw):
        kw["host"] = "127.0.0.1"
        return real_run(app, *a, **kw)

    uvicorn.run = run_on_loopback

    co_dir = Path(args.co_dir)
    agent = Agent("echo", llm=EchoLLM(), system_prompt="You repeat what you hear.",
                  quiet=True, log=False, co_dir=co_dir)
    host(agent, port=args.port, trust=args.trust, relay_url=None, co_dir=co_dir,
         summary="benches/compare: echoes the prompt.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
