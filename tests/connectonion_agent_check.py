#!/usr/bin/env python3
"""Drives examples/connectonion_agent.py over its JSON Lines protocol, as the node's
--exec side would, with ConnectOnion's LLM pointed at the mock OpenAI-compatible server
(examples/mock_llm.rs). Run by tests/connectonion_agent.sh, which builds the mock and
makes the venv with connectonion.

    connectonion_agent_check.py --python VENV/bin/python --mock target/debug/examples/mock_llm

Checks: the ready line; a plain answer; the history handed over as the session (the mock
counts the messages it got); a tool call, its progress chunk and the answer built from
the tool's result; an upstream error as one error line, after which the agent goes on.
Every wait is bounded; exit 0 on success, 1 with a reason otherwise.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "examples", "connectonion_agent.py")
# Importing ConnectOnion and building the agent takes a few seconds on a slow machine.
READY_LIMIT = 60.0
TURN_LIMIT = 30.0


class Failure(Exception):
    pass


def lines_of(stream, into):
    for line in stream:
        into.put(line)
    into.put(None)


class Process:
    """A child whose stdout lines arrive on a queue, so every read can be bounded."""

    def __init__(self, name, argv, env):
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            env=env, text=True, encoding="utf-8",
        )
        self.lines = queue.Queue()
        threading.Thread(target=lines_of, args=(self.proc.stdout, self.lines), daemon=True).start()

    def next_json(self, limit):
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"{self.name}: no line within {limit:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise Failure(f"{self.name} closed its stdout (exit {self.proc.poll()})")
            try:
                return json.loads(line)
            except ValueError:
                raise Failure(f"{self.name} printed a line that is not JSON: {line!r}")

    def send(self, message):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def turn(agent, request_id, prompt, messages=(), session_id="s1"):
    """Sends one request; returns (chunks, final line)."""
    agent.send({
        "id": request_id, "prompt": prompt, "session_id": session_id,
        "messages": list(messages), "files": [], "caller": None,
    })
    chunks = []
    while True:
        line = agent.next_json(TURN_LIMIT)
        if line.get("id") != request_id:
            raise Failure(f"a line for another request: {line}")
        if "chunk" in line:
            chunks.append(line["chunk"])
        elif "result" in line or "error" in line:
            return chunks, line
        else:
            raise Failure(f"neither chunk, result nor error: {line}")


def expect(condition, what):
    if not condition:
        raise Failure(what)
    print(f"ok: {what.split(':')[0]}")


def check(python, mock_bin):
    mock = Process("mock", [mock_bin, "0"], os.environ.copy())
    agent = None
    try:
        base_url = mock.next_json(30)["base_url"]
        env = os.environ.copy()
        env.update({
            "OPENAI_BASE_URL": base_url,
            "CO_MODEL": "mock-model",
            "OPENAI_API_KEY": "",
            "PYTHONUNBUFFERED": "1",
        })
        agent = Process("agent", [python, AGENT], env)

        ready = agent.next_json(READY_LIMIT)
        expect(ready.get("ready") is True and ready.get("name") == "weather-desk"
               and sorted(ready.get("tools", [])) == ["get_weather", "word_count"],
               f"the ready line names the agent and its tools: {ready}")

        _, first = turn(agent, "r1", "Hello there")
        expect(first.get("result") == "You said: Hello there [2 messages]",
               f"a plain answer through the mock (system + prompt): {first}")

        history = [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first["result"]},
        ]
        _, second = turn(agent, "r2", "And again", history)
        expect(second.get("result") == "You said: And again [4 messages]",
               f"the history reaches the model (system + 2 + prompt): {second}")

        chunks, third = turn(agent, "r3", 'call get_weather {"city": "Lisbon"}')
        expect(chunks == ["[get_weather: success]\n"],
               f"the tool call streams a progress chunk: {chunks}")
        expect(third.get("result") == "The tool said: It is sunny and 21 degrees in Lisbon.",
               f"the model answers from the tool's result: {third}")

        _, failed = turn(agent, "r4", "status 400")
        expect("error" in failed and "400" in failed["error"],
               f"an upstream 400 is one error line: {failed}")

        _, after = turn(agent, "r5", "still there?", session_id="s2")
        expect(after.get("result") == "You said: still there? [2 messages]",
               f"the agent goes on after a failed turn: {after}")
    finally:
        if agent:
            agent.stop()
        mock.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", required=True, help="a Python with connectonion installed")
    parser.add_argument("--mock", required=True, help="the built examples/mock_llm binary")
    args = parser.parse_args()
    try:
        check(args.python, args.mock)
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("connectonion agent: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
