"""7. Federated relays with the Python package at either end: a caller that knows only
relay A reaches agents homed on relay B, found through the relays' DHT.

Fixture: two `oonode relay --swarm-listen` (B first, A joined through B's swarm address,
both with --forward-private as they are on loopback); on B, an oonode node (translator)
with no HTTP port and a connectonion `host()` agent. Neither agent ever talks to A.
"""

import unittest

import harness
from harness import Checks, call_answer, check_sealed_and_fast, check_turns, py_conversation

fx = {}
SWARM = "/ip4/127.0.0.1/tcp/0"


def setUpModule():
    _, b = harness.start_relay("t7-relay-b", "--swarm-listen", SWARM, "--forward-private")
    swarm = b.get("swarm") or []
    if not swarm:
        raise AssertionError(f"relay B reported no swarm address: {b}")
    _, a = harness.start_relay("t7-relay-a", "--swarm-listen", SWARM, "--forward-private",
                               "--bootstrap", swarm[0])
    fx["a"], fx["b"] = a["url"], b["url"]
    _, node = harness.start_node("t7-node", "translator", relay=fx["b"], http=False)
    fx["node"] = node["address"]
    _, fx["py"], _ = harness.start_py_host("t7-py-host", fx["b"])
    for address in (fx["node"], fx["py"]):
        harness.wait_listed(fx["b"], address, 15)
        # A lists them once it has found their home-relay records in the DHT.
        info = harness.wait_listed(fx["a"], address, 15)
        if info.get("home_relay") != fx["b"]:
            raise AssertionError(f"relay A names {info.get('home_relay')} as the home of "
                                 f"{address[:12]}…, not B ({fx['b']})")


class PythonClientThroughTheOtherRelay(unittest.TestCase):
    def test_signed_sealed_multi_turn_to_an_oonode_node_homed_on_b(self):
        keys = harness.new_py_keys("t7-caller")
        agent, turns, probe = py_conversation(
            fx["node"], fx["a"],
            ["Translate hello to Spanish", "My name is John", "What is my name?"], keys)
        c = Checks(self)
        c.true(agent._resolved_endpoint is None, f"expected a relay path, got {agent._resolved_endpoint}")
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "through relay A to B")
        check_sealed_and_fast(c, turns, probe, "through relay A to B")
        c.done()


class OonodeCallsAPythonHostOnTheOtherRelay(unittest.TestCase):
    def test_call_via_relay_a(self):
        out = call_answer(self, fx["py"], "hello across relays", "--via", "relay",
                          "--relay", fx["a"])
        self.assertEqual(out["result"], "py-agent heard: hello across relays (turn 1)")
        self.assertEqual(out["path"], "relay")


if __name__ == "__main__":
    unittest.main()
