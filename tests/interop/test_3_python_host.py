"""3. A Python `host()` agent on an oonode relay ← oonode callers (and, as a check of the
relay alone, the Python client).

Fixture: one `oonode relay`; tests/interop/py_host.py (a connectonion Agent with a
scripted model, hosted by the package's `host()`, trust open) announcing on it. The
agent answers "py-agent heard: <prompt> (turn <user turns so far>)".
"""

import unittest

import harness
from harness import Checks, call_answer, check_sealed_and_fast, check_turns, py_conversation

fx = {}


def heard(prompt, turn):
    return f"py-agent heard: {prompt} (turn {turn})"


def setUpModule():
    _, ready = harness.start_relay("t3-relay")
    fx["relay"] = ready["url"]
    _, fx["py"], fx["port"] = harness.start_py_host("t3-py-host", fx["relay"])
    harness.wait_listed(fx["relay"], fx["py"], 15)


class PythonHostOnOonodeRelay(unittest.TestCase):
    def test_announce_accepted_and_listed(self):
        status, info = harness.get_json(f"{harness.ws_to_http(fx['relay'])}/api/agents/{fx['py']}")
        c = Checks(self)
        c.equal(status, 200, "directory status")
        c.equal(info.get("online"), True, "online")
        # host() announces AGENT_PUBLIC_DOMAIN's endpoints (run.py sets it).
        c.equal(info.get("endpoints"), ["https://interop.invalid", "wss://interop.invalid/ws"],
                "the endpoints the package announced")
        c.true("repeats what it hears" in (info.get("summary") or ""), f"summary: {info}")
        c.done()


class OonodeCallsPythonHost(unittest.TestCase):
    def test_call_via_relay(self):
        out = call_answer(self, fx["py"], "hello from oonode", "--via", "relay", "--relay", fx["relay"])
        self.assertEqual(out["result"], heard("hello from oonode", 1))
        self.assertEqual(out["path"], "relay")

    def test_call_direct(self):
        out = call_answer(self, fx["py"], "hello directly", "--via", "direct",
                          "--endpoint", f"http://127.0.0.1:{fx['port']}")
        self.assertEqual(out["result"], heard("hello directly", 1))
        self.assertEqual(out["path"], "direct")

    def test_call_by_signed_post_input(self):
        # The package's host answers POST /input unsigned; on loopback that is the agent's.
        out = call_answer(self, fx["py"], "hello over http", "--via", "http",
                          "--endpoint", f"http://127.0.0.1:{fx['port']}")
        self.assertEqual(out["result"], heard("hello over http", 1))
        self.assertEqual(out["path"], "http")

    def test_call_by_signed_post_input_multi_turn_with_session_file(self):
        self._two_turns("--via", "http", "--endpoint", f"http://127.0.0.1:{fx['port']}")

    def _two_turns(self, *via):
        co = harness.fresh_dir("t3-session-caller")
        session = harness.fresh_dir("t3-session") / "session.json"
        one = call_answer(self, fx["py"], "first words", *via, "--session", session, co_dir=co)
        two = call_answer(self, fx["py"], "second words", *via, "--session", session, co_dir=co)
        c = Checks(self)
        c.equal(one["result"], heard("first words", 1), "turn 1")
        c.equal(two["result"], heard("second words", 2), "turn 2 sees turn 1")
        c.equal(two["session_id"], one["session_id"], "one session across the calls")
        c.done()

    def test_call_via_relay_multi_turn_with_session_file(self):
        self._two_turns("--via", "relay", "--relay", fx["relay"])

    def test_call_direct_multi_turn_with_session_file(self):
        self._two_turns("--via", "direct", "--endpoint", f"http://127.0.0.1:{fx['port']}")


class PythonClientThroughOonodeRelay(unittest.TestCase):
    """Both ends are the package: only oonode's relay is under test."""

    def test_python_host_refuses_anonymous_through_oonode_relay(self):
        # connectonion 1.9.2's host refuses an unsigned CONNECT at every trust level,
        # `open` included ("ALL requests must be signed", network/host/auth.py). Its
        # refusal coming back is what shows the relay carried plain frames both ways.
        agent, turns, probe = py_conversation(fx["py"], fx["relay"], ["plain one"], False)
        self.assertEqual(turns[0][0], "ERROR: ConnectionError: Auth error: unauthorized: "
                                      "signed request required")

    def test_python_client_to_python_host_sealed(self):
        keys = harness.new_py_keys("t3-py-caller")
        agent, turns, probe = py_conversation(fx["py"], fx["relay"], ["ping one", "ping two"], keys)
        c = Checks(self)
        c.true(agent._resolved_endpoint is None, f"expected the relay path, got {agent._resolved_endpoint}")
        check_turns(c, turns, [heard("ping one", 1), heard("ping two", 2)], "python→oonode relay→python")
        check_sealed_and_fast(c, turns, probe, "python→oonode relay→python")
        c.done()


if __name__ == "__main__":
    unittest.main()
