#!/usr/bin/env python3
"""Memory of a node under hostile input: the measurements of issue 14, repeated.

Starts the real binary (`oonode host --agent echo`, HTTP on 127.0.0.1, no swarm, no
relay) in a fresh co_dir and reads its RSS from /proc while it is sent:

  1. a 64 MB prompt (refused as it arrives: how long, and how much of it was sent),
  2. eight concurrent 20 MB requests (files; bounded by max_body_budget_mb): peak RSS,
  3. a storm of 1,500 malformed bodies,

then reports RSS at idle, at each peak, and some seconds after each burst. Only loopback;
stops by itself. Standard library only.

    python3 benches/memory.py [--bin target/release/oonode] [--json]
"""
import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

MB = 1024 * 1024


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Samples a process's RSS every 10 ms while running; keeps the peak."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak


def post(port, body, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/input", body=body, headers={"content-type": "application/json"})
        res = conn.getresponse()
        data = res.read()
        return res.status, data
    except (ConnectionError, socket.timeout, http.client.HTTPException) as e:
        return None, str(e).encode()
    finally:
        conn.close()


def big_prompt(port, size):
    """Streams a body with a prompt of `size` bytes; returns (status, seconds, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = b'{"prompt": "'
    total = len(head) + size + 2
    sock.sendall(
        f"POST /input HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {total}\r\n\r\n".encode()
    )
    started = time.time()
    sent = 0
    chunk = b"p" * (256 * 1024)
    sock.sendall(head)
    status = None
    try:
        while sent < size:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        line = sock.recv(64).decode(errors="replace")
        status = int(line.split()[1]) if line.startswith("HTTP/1.1") else None
    except (OSError, ValueError, IndexError):
        pass
    sock.close()
    return status, time.time() - started, sent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/oonode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    co_dir = tempfile.mkdtemp(prefix="oonode-mem-")
    node = subprocess.Popen(
        [args.bin, "host", "--agent", "echo", "--bind", "127.0.0.1", "--port", "0",
         "--no-p2p", "--no-relay", "--ready-json", "--co-dir", co_dir],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "error"},
    )
    try:
        ready = json.loads(node.stdout.readline())
        port = int(ready["http"].rsplit(":", 1)[1])
        pid = node.pid
        out = {}
        time.sleep(1)
        out["idle_rss_mb"] = rss_kb(pid) / 1024

        # 1. A 64 MB prompt.
        s = Sampler(pid)
        status, took, sent = big_prompt(port, 64 * MB)
        out["prompt_64mb"] = {"status": status, "seconds": round(took, 3),
                              "mb_sent_before_answer": round(sent / MB, 1),
                              "peak_rss_mb": s.stop() / 1024}

        # 2. Eight concurrent 20 MB requests (two 7.5 MB files each: 20 MB of base64).
        data = base64.b64encode(os.urandom(int(7.5 * MB))).decode()
        body = json.dumps({"prompt": "files", "files": [
            {"name": "a.bin", "data": "data:application/octet-stream;base64," + data},
            {"name": "b.bin", "data": "data:application/octet-stream;base64," + data},
        ]}).encode()
        del data
        statuses = []
        s = Sampler(pid)
        threads = [threading.Thread(target=lambda: statuses.append(post(port, body)[0]))
                   for _ in range(8)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["eight_20mb"] = {"body_mb": round(len(body) / MB, 1),
                             "statuses": sorted(statuses, key=str),
                             "seconds": round(time.time() - started, 2),
                             "peak_rss_mb": s.stop() / 1024}
        del body
        time.sleep(5)
        out["eight_20mb"]["rss_5s_after_mb"] = rss_kb(pid) / 1024

        # 3. 1,500 malformed bodies of many shapes and sizes.
        shapes = [b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": ""}', b"\xff\xfe",
                  b'{"prompt": "x", "files": "no"}', b'{"prompt": "x", "images": [1]}',
                  b'{"payload": {"prompt": "x"}, "signature": "zz", "from": "0x1"}',
                  b'{"prompt": "' + b"y" * (600 * 1024) + b'"}',
                  b"{" * 100_000]
        codes = {}
        s = Sampler(pid)

        def storm(n):
            for i in range(n):
                st, _ = post(port, shapes[i % len(shapes)], timeout=30)
                codes[st] = codes.get(st, 0) + 1

        threads = [threading.Thread(target=storm, args=(300,)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["storm_1500"] = {"statuses": {str(k): v for k, v in sorted(codes.items(), key=str)},
                             "peak_rss_mb": s.stop() / 1024}
        time.sleep(5)
        out["storm_1500"]["rss_5s_after_mb"] = rss_kb(pid) / 1024
        out["final_rss_over_idle"] = round(rss_kb(pid) / 1024 / out["idle_rss_mb"], 2)
    finally:
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
