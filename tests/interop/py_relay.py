#!/usr/bin/env python3
"""A stand-in for the Python ecosystem's hosted relay, for the interop suite.

    py_relay.py [--port 0]      # prints {"event":"ready","url","http"} when listening

It behaves as PROTOCOL-NOTES.md describes the hosted relay (whose server is not public),
and no further:

- `/ws/announce`: the first frame is an ANNOUNCE, signed over the message without its
  signature with `json.dumps(sort_keys=True)` (form B); fresh within 300 s. Answer
  `{"type":"ANNOUNCE_OK"}` or `{"type":"ERROR","error"}`. Later ANNOUNCEs on the socket
  (heartbeats) are checked the same way and answered ANNOUNCE_OK. Any other frame from
  the agent goes back to the caller whose `session_id` it names.
- `/ws/input`: the relay reads `to` from the first frame of a socket and forwards that
  frame and everything after it verbatim, adding `session_id` (the first frame's own,
  else a new one) to every frame towards the agent. When the caller's socket ends, the
  agent gets `{"type":"close","session_id"}`. Unknown agent: `{"type":"ERROR","error":
  "Agent not connected"}`.
- `GET /api/agents/{address}`: `{"endpoints","relay","last_seen","online"}`, 404 if the
  address never announced.

The relay never sends an agent a frame without `session_id` other than the answers to
its ANNOUNCEs, and sends no protocol-level PINGs of its own.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import datetime, timezone

import websockets
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from websockets.asyncio.server import serve

FRESHNESS = 300


class Registry:
    def __init__(self):
        self.agents = {}      # address -> {"ws", "endpoints", "last_seen"}
        self.callers = {}     # session_id -> caller socket
        self.public_url = None


def check_announce(frame):
    """None if the ANNOUNCE is good, else why not."""
    if frame.get("type") != "ANNOUNCE":
        return "expected ANNOUNCE"
    address = frame.get("address")
    signature = frame.get("signature")
    if not (isinstance(address, str) and address.startswith("0x") and len(address) == 66):
        return "bad address"
    if not isinstance(signature, str):
        return "missing signature"
    ts = frame.get("timestamp")
    if not isinstance(ts, (int, float)) or abs(time.time() - ts) > FRESHNESS:
        return "stale ANNOUNCE"
    unsigned = {k: v for k, v in frame.items() if k != "signature"}
    signed = json.dumps(unsigned, sort_keys=True).encode()
    try:
        sig = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
        VerifyKey(bytes.fromhex(address[2:])).verify(signed, sig)
    except (BadSignatureError, ValueError, TypeError) as e:
        return f"invalid signature ({type(e).__name__})"
    return None


async def serve_agent(ws, reg):
    address = None
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(frame, dict):
                continue
            if frame.get("type") == "ANNOUNCE":
                why = check_announce(frame)
                if why is None and address not in (None, frame["address"]):
                    why = "one address per connection"
                if why is not None:
                    print(f"py_relay: ANNOUNCE refused: {why}", file=sys.stderr, flush=True)
                    await ws.send(json.dumps({"type": "ERROR", "error": why}))
                    continue
                address = frame["address"]
                reg.agents[address] = {
                    "ws": ws,
                    "endpoints": frame.get("endpoints") or [],
                    "last_seen": datetime.now(timezone.utc).replace(microsecond=0),
                }
                await ws.send(json.dumps({"type": "ANNOUNCE_OK"}))
                continue
            if address is None:
                await ws.send(json.dumps({"type": "ERROR", "error": "ANNOUNCE first"}))
                continue
            sid = frame.get("session_id")
            caller = reg.callers.get(sid)
            if caller is None:
                print(f"py_relay: agent frame for unknown session {sid!r}: {frame.get('type')}",
                      file=sys.stderr, flush=True)
                continue
            try:
                await caller.send(raw)  # verbatim
            except websockets.ConnectionClosed:
                pass
    except websockets.ConnectionClosed:
        pass
    finally:
        if address is not None and reg.agents.get(address, {}).get("ws") is ws:
            reg.agents[address]["ws"] = None


async def serve_caller(ws, reg):
    sid = None
    agent_ws = None
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(frame, dict):
                continue
            if agent_ws is None:
                to = frame.get("to")
                entry = reg.agents.get(to) if isinstance(to, str) else None
                if entry is None or entry["ws"] is None:
                    await ws.send(json.dumps({"type": "ERROR", "error": "Agent not connected"}))
                    return
                agent_ws = entry["ws"]
                sid = frame.get("session_id") or str(uuid.uuid4())
                reg.callers[sid] = ws
            frame["session_id"] = sid
            try:
                await agent_ws.send(json.dumps(frame))
            except websockets.ConnectionClosed:
                await ws.send(json.dumps({"type": "ERROR", "error": "Agent not connected",
                                          "session_id": sid}))
                return
    except websockets.ConnectionClosed:
        pass
    finally:
        if sid is not None and reg.callers.get(sid) is ws:
            del reg.callers[sid]
            if agent_ws is not None:
                try:
                    await agent_ws.send(json.dumps({"type": "close", "session_id": sid}))
                except websockets.ConnectionClosed:
                    pass


def directory(connection, request, reg):
    path = request.path.split("?", 1)[0]
    if path.startswith("/api/agents/"):
        address = path[len("/api/agents/"):]
        entry = reg.agents.get(address)
        if entry is None:
            response = connection.respond(404, json.dumps({"error": "not found"}))
        else:
            online = entry["ws"] is not None
            body = {
                "endpoints": entry["endpoints"],
                "relay": reg.public_url if online else None,
                "last_seen": entry["last_seen"].isoformat().replace("+00:00", "Z"),
                "online": online,
            }
            response = connection.respond(200, json.dumps(body))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response
    if path in ("/ws/announce", "/ws/input"):
        return None  # the WebSocket handshake goes on
    return connection.respond(404, "not found\n")


async def main_async(port):
    reg = Registry()

    async def handler(ws):
        if ws.request.path.startswith("/ws/announce"):
            await serve_agent(ws, reg)
        else:
            await serve_caller(ws, reg)

    async with serve(handler, "127.0.0.1", port,
                     process_request=lambda c, r: directory(c, r, reg)) as server:
        bound = server.sockets[0].getsockname()[1]
        reg.public_url = f"ws://127.0.0.1:{bound}"
        print(json.dumps({"event": "ready", "url": reg.public_url,
                          "http": f"http://127.0.0.1:{bound}"}), flush=True)
        await asyncio.Future()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(main_async(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
