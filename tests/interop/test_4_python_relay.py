"""4. An oonode node on a relay shaped like the Python ecosystem's (tests/interop/py_relay.py),
called by the Python client and by `oonode call`.

Fixture: py_relay.py; node D (translator, no HTTP port) announcing on it; and, to show
that the stand-in behaves as the package expects of a relay, a Python `host()` agent on
it too, called by the Python client.
"""

import unittest
from datetime import datetime, timezone

import harness
from harness import Checks, call_answer, check_sealed_and_fast, check_turns, py_conversation

fx = {}
NICE = "Nice to meet you, John! I'll remember your name."


def setUpModule():
    _, ready = harness.start_py_relay("t4-py-relay")
    fx["relay"] = ready["url"]
    node, d = harness.start_node("t4-node-d", "translator", relay=fx["relay"], http=False)
    fx["d"], fx["d_ready"] = d["address"], d
    fx["d_listed"] = harness.wait_listed(fx["relay"], fx["d"], 10)
    _, fx["py"], _ = harness.start_py_host("t4-py-host", fx["relay"])
    harness.wait_listed(fx["relay"], fx["py"], 15)


class OonodeNodeOnPythonRelay(unittest.TestCase):
    def test_announce_accepted_and_listed(self):
        info = fx["d_listed"]
        c = Checks(self)
        c.equal((fx["d_ready"].get("relay") or {}).get("state"), "connected",
                "the node's own view of the link")
        c.equal(info.get("online"), True, "directory: online")
        seen = datetime.fromisoformat(info["last_seen"].replace("Z", "+00:00"))
        c.true(abs((datetime.now(timezone.utc) - seen).total_seconds()) < 60,
               f"directory: last_seen {info['last_seen']} is recent")
        c.done()

    def test_python_client_sealed_multi_turn(self):
        keys = harness.new_py_keys("t4-py-caller")
        agent, turns, probe = py_conversation(
            fx["d"], fx["relay"], ["Translate hello to Spanish", "My name is John", "What is my name?"], keys)
        c = Checks(self)
        check_turns(c, turns, ["Hola", NICE, "Your name is John"], "python→py_relay→oonode")
        check_sealed_and_fast(c, turns, probe, "python→py_relay→oonode")
        c.done()

    def test_python_client_anonymous(self):
        agent, turns, probe = py_conversation(fx["d"], fx["relay"], ["Translate hello to Spanish"], False)
        c = Checks(self)
        check_turns(c, turns, ["Hola"], "anonymous python→py_relay→oonode")
        c.done()

    def test_oonode_call(self):
        out = call_answer(self, fx["d"], "Translate hello to Spanish", "--via", "relay", "--relay", fx["relay"])
        self.assertEqual(out["result"], "Hola")

    def test_oonode_call_multi_turn_with_session_file(self):
        co = harness.fresh_dir("t4-session-caller")
        session = harness.fresh_dir("t4-session") / "session.json"
        via = ("--via", "relay", "--relay", fx["relay"], "--session", session)
        one = call_answer(self, fx["d"], "My name is John", *via, co_dir=co)
        two = call_answer(self, fx["d"], "What is my name?", *via, co_dir=co)
        c = Checks(self)
        c.equal(one["result"], NICE, "turn 1")
        c.equal(two["result"], "Your name is John", "turn 2 sees turn 1")
        c.done()


class StandInMatchesThePackage(unittest.TestCase):
    """The package on both ends through py_relay: the stand-in is a relay it accepts."""

    def test_python_client_to_python_host_sealed(self):
        keys = harness.new_py_keys("t4-py-py-caller")
        agent, turns, probe = py_conversation(fx["py"], fx["relay"], ["one", "two"], keys)
        c = Checks(self)
        check_turns(c, turns, ["py-agent heard: one (turn 1)", "py-agent heard: two (turn 2)"],
                    "python→py_relay→python")
        check_sealed_and_fast(c, turns, probe, "python→py_relay→python")
        c.done()


if __name__ == "__main__":
    unittest.main()
