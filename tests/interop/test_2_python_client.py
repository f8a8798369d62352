"""2. The Python client → an oonode node: signed and anonymous HTTP `POST /input`, the
direct `/ws` that `connect()` finds in the relay's directory, and the relay.

Fixture: one `oonode relay`; node A (translator) with HTTP on 127.0.0.1 and announced on
the relay, so its directory entry lists `http://127.0.0.1:PORT`; node B (translator)
with no HTTP port at all, reachable through the relay only. The translator remembers a
name told earlier in the session, which is how a second turn shows it saw the first.
"""

import json
import time
import unittest

import harness
from harness import Checks, check_sealed_and_fast, check_turns, py_conversation

fx = {}


def setUpModule():
    relay, ready = harness.start_relay("t2-relay")
    fx["relay"] = ready["url"]
    _, a = harness.start_node("t2-node-a", "translator", relay=fx["relay"])
    _, b = harness.start_node("t2-node-b", "translator", relay=fx["relay"], http=False)
    fx["a"], fx["a_http"], fx["b"] = a["address"], a["http"].rstrip("/"), b["address"]
    harness.wait_listed(fx["relay"], fx["a"], 10)
    harness.wait_listed(fx["relay"], fx["b"], 10)


def canonical(value) -> bytes:
    """Form A, as the package writes it for what it signs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def signed_input(keys, to, prompt, session=None):
    from connectonion import address
    payload = {"prompt": prompt, "timestamp": int(time.time()), "to": to}
    body = {"payload": payload, "from": keys["address"],
            "signature": address.sign(keys, canonical(payload)).hex()}
    if session is not None:
        body["session"] = session
    return body


def reply_signed_by(body, signer) -> bool:
    """A flat reply: every field but `signature` signed, in form A, by `signer`."""
    from connectonion import address
    rest = {k: v for k, v in body.items() if k != "signature"}
    try:
        return address.verify(signer, canonical(rest), bytes.fromhex(body["signature"]))
    except (KeyError, ValueError):
        return False


class HttpInput(unittest.TestCase):
    def test_signed_post_input_multi_turn(self):
        keys = harness.new_py_keys("t2-http-caller")
        a, url = fx["a"], fx["a_http"] + "/input"
        c = Checks(self)
        status, first = harness.post_json(url, signed_input(keys, a, "Translate hello to Spanish"))
        c.equal(status, 200, "signed POST /input status")
        c.equal(first.get("result"), "Hola", "signed answer")
        c.equal(first.get("status"), "done", "status field")
        c.equal(first.get("from"), a, "reply's from")
        c.equal(first.get("to"), keys["address"], "reply's to (the signed caller)")
        c.true(reply_signed_by(first, a), f"reply signature does not verify with the package: {first}")
        status, one = harness.post_json(url, signed_input(keys, a, "My name is John"))
        c.equal(status, 200, "turn 1 status")
        session = one.get("session")
        c.true(isinstance(session, dict) and session.get("session_id"), f"turn 1 has no session: {one}")
        status, two = harness.post_json(url, signed_input(keys, a, "What is my name?", session=session))
        c.equal(status, 200, f"turn 2 status ({two})")
        c.equal(two.get("result"), "Your name is John", "turn 2 sees turn 1")
        c.equal(two.get("session_id"), one.get("session_id"), "same session across turns")
        c.done()

    def test_anonymous_post_input_multi_turn(self):
        url = fx["a_http"] + "/input"
        c = Checks(self)
        status, first = harness.post_json(url, {"prompt": "Translate hello to Spanish"})
        c.equal(status, 200, "anonymous POST /input status")
        c.equal(first.get("result"), "Hola", "anonymous answer")
        status, one = harness.post_json(url, {"prompt": "My name is John"})
        status, two = harness.post_json(url, {"prompt": "What is my name?", "session": one.get("session")})
        c.equal(status, 200, f"turn 2 status ({two})")
        c.equal(two.get("result"), "Your name is John", "turn 2 sees turn 1")
        c.done()

    def test_signature_for_another_node_is_refused(self):
        keys = harness.new_py_keys("t2-http-wrong-to")
        other = harness.new_py_keys("t2-other-node")["address"]
        status, body = harness.post_json(fx["a_http"] + "/input",
                                         signed_input(keys, other, "Translate hello to Spanish"))
        self.assertEqual((status, body.get("code")), (401, "wrong_recipient"), body)


class DirectWebSocket(unittest.TestCase):
    """connect() finds node A's direct endpoint in the relay's directory and uses it."""

    def test_signed_direct_ws_sealed_multi_turn(self):
        keys = harness.new_py_keys("t2-ws-caller")
        agent, turns, probe = py_conversation(
            fx["a"], fx["relay"],
            ["Translate hello to Spanish", "My name is John", "What is my name?"], keys)
        c = Checks(self)
        c.equal(agent._resolved_endpoint, f"{fx['a_http'].replace('http://', 'ws://')}/ws",
                "the direct endpoint connect() resolved from the directory")
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "direct /ws")
        check_sealed_and_fast(c, turns, probe, "direct /ws")
        c.done()

    def test_anonymous_direct_ws(self):
        agent, turns, probe = py_conversation(
            fx["a"], fx["relay"], ["Translate hello to Spanish", "My name is John",
                                   "What is my name?"], False)
        c = Checks(self)
        c.true(agent._resolved_endpoint is not None, "connect() did not resolve the direct endpoint")
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "anonymous direct /ws")
        c.done()


class ThroughTheRelay(unittest.TestCase):
    """Node B has no port: connect() finds no endpoint and goes through the relay."""

    def test_signed_relay_sealed_multi_turn_under_a_second(self):
        keys = harness.new_py_keys("t2-relay-caller")
        agent, turns, probe = py_conversation(
            fx["b"], fx["relay"],
            ["Translate hello to Spanish", "My name is John", "What is my name?"], keys)
        c = Checks(self)
        c.true(agent._resolved_endpoint is None, f"expected the relay path, got {agent._resolved_endpoint}")
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "relayed")
        check_sealed_and_fast(c, turns, probe, "relayed")
        c.done()

    def test_anonymous_relay_multi_turn(self):
        agent, turns, probe = py_conversation(
            fx["b"], fx["relay"], ["Translate hello to Spanish", "My name is John",
                                   "What is my name?"], False)
        c = Checks(self)
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "anonymous relayed")
        for i, (_, took) in enumerate(turns):
            c.true(took < 1.0, f"anonymous relayed turn {i + 1} took {took:.2f} s")
        c.done()


if __name__ == "__main__":
    unittest.main()
