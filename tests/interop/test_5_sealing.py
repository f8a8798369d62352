"""5. Sealing: what a relay can read. A recording TCP proxy (tests/interop/tap.py) sits
between the caller and the oonode relay; every prompt holds a marker made for that test,
and the check is that neither the marker nor the echoed answer appears in the recorded
bytes, raw or decoded (unmasked, inflated), when both ends seal.

The control case is an anonymous Python caller: it cannot seal (it has no key to sign a
SEAL with), so its prompt crosses the relay in the clear, and the same search must find
the marker there. If it did not, the capture would prove nothing.

Fixture: one `oonode relay`; node C (echo, no HTTP port) and a Python `host()` agent on it.
"""

import os
import unittest

import harness
from harness import Checks, call_answer, check_turns, py_conversation
from tap import Tap

fx = {}


def setUpModule():
    _, ready = harness.start_relay("t5-relay")
    fx["relay"] = ready["url"]
    fx["relay_port"] = int(ready["url"].rsplit(":", 1)[1])
    _, c = harness.start_node("t5-node-c", "echo", relay=fx["relay"], http=False)
    fx["c"] = c["address"]
    harness.wait_listed(fx["relay"], fx["c"], 10)
    _, fx["py"], _ = harness.start_py_host("t5-py-host", fx["relay"])
    harness.wait_listed(fx["relay"], fx["py"], 15)


def marker():
    return "zq" + os.urandom(8).hex()


class CaptureAtTheRelay(unittest.TestCase):
    def setUp(self):
        self.tap = Tap("127.0.0.1", fx["relay_port"]).start()
        self.via = f"ws://127.0.0.1:{self.tap.port}"

    def tearDown(self):
        self.tap.stop()

    def assert_hidden(self, c, mark, answer_word):
        self.tap.stop()
        types = " ".join(f"{'>' if d == 'up' else '<'}{t}" for d, t in self.tap.frame_types())
        c.true(self.tap.connections() > 0, "nothing went through the tap")
        c.true(not self.tap.contains(mark.encode()), "the marker crossed the relay in the clear")
        c.true(not self.tap.contains(answer_word.encode()), "the answer crossed the relay in the clear")
        c.true(" >SEALED" in f" {types}" and " <SEALED" in f" {types}",
               f"no SEALED frames both ways at the relay (seen: {types})")

    def test_python_client_to_oonode_node_is_opaque(self):
        mark = marker()
        prompt = f"secret {mark} for the echo"
        keys = harness.new_py_keys("t5-py-caller")
        _, turns, probe = py_conversation(fx["c"], self.via, [prompt], keys)
        c = Checks(self)
        check_turns(c, turns, [prompt], "python→oonode echo")
        c.true(probe.all_sealed(), f"the client did not seal ({probe.describe()})")
        self.assert_hidden(c, mark, mark)
        c.done()

    def test_oonode_call_to_oonode_node_is_opaque(self):
        mark = marker()
        prompt = f"secret {mark} for the echo"
        out = call_answer(self, fx["c"], prompt, "--via", "relay", "--relay", self.via)
        c = Checks(self)
        c.equal(out["result"], prompt, "oonode call answer")
        c.true(out["took"] < 1.5, f"oonode call took {out['took']:.2f} s (limit 1.5 s, process included)")
        self.assert_hidden(c, mark, mark)
        c.done()

    def test_oonode_call_to_python_host_is_opaque(self):
        mark = marker()
        prompt = f"secret {mark} for python"
        out = call_answer(self, fx["py"], prompt, "--via", "relay", "--relay", self.via)
        c = Checks(self)
        c.equal(out["result"], f"py-agent heard: {prompt} (turn 1)", "oonode call answer")
        c.true(out["took"] < 1.5, f"oonode call took {out['took']:.2f} s (limit 1.5 s, process included)")
        self.assert_hidden(c, mark, "py-agent heard")
        c.done()

    def test_python_client_to_python_host_is_opaque(self):
        mark = marker()
        prompt = f"secret {mark} for python"
        keys = harness.new_py_keys("t5-py-py-caller")
        _, turns, probe = py_conversation(fx["py"], self.via, [prompt], keys)
        c = Checks(self)
        check_turns(c, turns, [f"py-agent heard: {prompt} (turn 1)"], "python→oonode relay→python")
        self.assert_hidden(c, mark, "py-agent heard")
        c.done()

    def test_control_unsealed_call_is_readable(self):
        mark = marker()
        prompt = f"plain {mark} for the echo"
        _, turns, probe = py_conversation(fx["c"], self.via, [prompt], False)
        self.tap.stop()
        c = Checks(self)
        check_turns(c, turns, [prompt], "anonymous python→oonode echo")
        found = [d for d, payload in self.tap.messages() if mark.encode() in payload]
        c.true("up" in found, "the tap did not find the clear-text prompt going to the relay: "
                              "the capture check would prove nothing")
        c.true("down" in found, "the tap did not find the clear-text answer coming back")
        c.done()


if __name__ == "__main__":
    unittest.main()
