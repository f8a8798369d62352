#!/usr/bin/env python3
"""benches/compare: oonode and connectonion's Python `host()`, measured side by side.

    compare.py --oonode BIN [--secs 10] [--ws-turns 1000] [--fsync-secs 3] [--json FILE]

Run it through run.sh, which makes the venv, installs wrk, keeps the package off the
network and ends this process on exit. Every host is started fresh for each measurement
(so a run never sees the store an earlier run left behind), on 127.0.0.1, with an echo
agent, trust `open`, relay off; the two hosts take turns, and the order flips from one
measurement to the next so that background load falls on both alike. Prints the machine,
then one markdown table: figure, Python host, oonode, ratio (how many times better oonode
is; below 1 it is worse).
"""

import argparse
import copy
import http.client
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "load.lua"
PY_HOST = HERE / "py_host.py"
PYTHON = sys.executable
TICK = os.sysconf("SC_CLK_TCK")

READY_LIMIT = 60.0        # seconds for a host to answer /health (Python imports are slow)
WRK_TIMEOUT = "10s"       # wrk's per-request timeout (the Python host queues at c=64)
WS_LIMIT = 300.0          # seconds for the WS turns of one host (the Python host may not finish)
# Signed bodies to pre-sign per second of a run, by host and concurrency: above what each
# host can do here, so no thread runs out (a run that does is flagged, not hidden).
BODY_RATE = {("oonode", 1): 10000, ("oonode", 64): 16000,
             ("python", 1): 600, ("python", 64): 600}

# The longest signed run: its bodies, stamped when signing begins (which takes up to a
# minute for the longest runs), must stay fresh (±300 s) to its end.
MAX_SIGNED_SECS = 200
SIGNED_STEPS = {"new1", "new64", "cont1", "cont64"}

_children = []            # every process started here, ended by PID at exit


# --- processes ------------------------------------------------------------------------

def spawn(argv, **kw):
    p = subprocess.Popen([str(a) for a in argv], **kw)
    _children.append(p)
    return p


def end(p, grace=5.0):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    if p in _children:
        _children.remove(p)


_MAIN_PID = os.getpid()


def end_all(*_):
    if os.getpid() != _MAIN_PID:
        return
    for p in list(_children):
        try:
            end(p, grace=2.0)
        except Exception as e:  # keep going: the others must end too
            print(f"compare: could not end pid {p.pid}: {e}", file=sys.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def machine_busy_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle


def get(port, path, timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def post(port, path, body, timeout=30.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# COMPARE_DURABILITY: oonode's `--durability` (default: the node's own default).
DURABILITY = os.environ.get("COMPARE_DURABILITY", "")


class Host:
    """One fresh host: its process, port, address, start-to-healthy and idle RSS."""

    def __init__(self, kind, scratch, oonode):
        self.kind = kind
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
        co = self.dir / "co"
        work = self.dir / "work"
        work.mkdir()
        self.log = open(self.dir / "log", "w")
        if kind == "oonode":
            argv = [oonode, "host", "--agent", "echo", "--no-p2p", "--no-relay",
                    "--bind", "127.0.0.1", "--port", self.port, "--co-dir", co,
                    "--ready-json", "--trust", "open"]
            if DURABILITY:
                argv += ["--durability", DURABILITY]
            env = dict(os.environ, RUST_LOG="warn")
        else:
            argv = [PYTHON, PY_HOST, "--port", self.port, "--co-dir", co, "--trust", "open"]
            env = dict(os.environ)
        began = time.monotonic()
        self.proc = spawn(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                          stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"compare: {kind} host exited ({self.proc.returncode}); "
                                 f"see {self.dir / 'log'}")
            try:
                if get(self.port, "/health", timeout=0.5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - began > READY_LIMIT:
                raise SystemExit(f"compare: {kind} host not healthy in {READY_LIMIT:.0f} s")
            time.sleep(0.005)
        self.start_ms = (time.monotonic() - began) * 1000
        time.sleep(1.0)  # let start-up settle before reading the idle RSS
        self.idle_rss_kib = vm_rss_kib(self.pid)
        self.address = json.loads(get(self.port, "/info")[1])["address"]

    def stop(self):
        end(self.proc)
        self.log.close()


# --- signing --------------------------------------------------------------------------

_keys = None


def caller_keys(scratch):
    """The bench's caller: a key made and loaded by the package itself."""
    from connectonion import address
    d = Path(scratch) / "caller"
    (d / "keys").mkdir(parents=True, exist_ok=True)
    key = d / "keys" / "agent.key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
    return address.load(d)


def canonical(value):
    """Form A, as the package writes what it signs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _worker_init():
    # A signing worker is forked from the driver: it must not run the driver's SIGTERM
    # handler (which ends the hosts), nor own its children.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _children.clear()


def _sign_chunk(job):
    key_dir, to, tag, start, stop, sessions, now = job
    from connectonion import address
    keys = address.load(Path(key_dir))
    lines = []
    for i in range(start, stop):
        payload = {"prompt": f"hello world {tag}-{i}", "timestamp": now, "to": to}
        if sessions:
            payload["session"] = {"session_id": sessions[i % len(sessions)]}
        sig = address.sign(keys, canonical(payload)).hex()
        lines.append(json.dumps({"payload": payload, "from": keys["address"],
                                 "signature": sig}, separators=(",", ":")))
    return lines


def signed_bodies(scratch, to, count, path, sessions=None):
    """`count` bodies in the Python client's shape, each signed once, freshly stamped;
    body i names sessions[i % len(sessions)] when sessions are given."""
    tag = uuid.uuid4().hex[:8]
    now = int(time.time())
    step = max(1, (count + 7) // 8)
    jobs = [(str(Path(scratch) / "caller"), to, tag, s, min(count, s + step), sessions, now)
            for s in range(0, count, step)]
    # spawn, not fork: the driver may have threads (asyncio's resolver) holding locks.
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(min(len(jobs), os.cpu_count() or 1), initializer=_worker_init)
    try:
        chunks = pool.map(_sign_chunk, jobs)
    finally:
        pool.close()
        pool.join()
    with open(path, "w") as f:
        for chunk in chunks:
            f.write("\n".join(chunk) + "\n")
    return path


def one_signed(keys, to, prompt, session_id=None):
    payload = {"prompt": prompt, "timestamp": int(time.time()), "to": to}
    if session_id:
        payload["session"] = {"session_id": session_id}
    from connectonion import address
    return json.dumps({"payload": payload, "from": keys["address"],
                       "signature": address.sign(keys, canonical(payload)).hex()}).encode()


# --- wrk ------------------------------------------------------------------------------

# COMPARE_WRK_CPUS=H,W: every wrk run with the host's threads on CPU H and wrk on CPU W.
# Unpinned, CPU per request moves by about ±7% between runs of one build with where the
# scheduler puts the threads on two cores; pinned, runs agree within about 6%, so an A/B
# of two builds can see a smaller change (BENCHMARKS.md, 2026-12-05). The table's figures
# are unpinned unless this is set.
WRK_CPUS = tuple(int(c) for c in os.environ["COMPARE_WRK_CPUS"].split(",")) \
    if os.environ.get("COMPARE_WRK_CPUS") else None


def wrk(host, path, conns, secs, body_file=None, mode="once"):
    """One bounded wrk run; returns its counts plus the host's CPU ticks and the CPU
    the rest of the machine used meanwhile."""
    threads = 1 if conns == 1 else 2
    argv = ["timeout", str(secs + 30), "wrk", "-t", threads, "-c", conns, "-d", f"{secs}s",
            "--timeout", WRK_TIMEOUT]
    if body_file:
        argv += ["-s", LUA, f"http://127.0.0.1:{host.port}{path}", "--", body_file, mode, threads]
    else:
        argv += ["-s", LUA, f"http://127.0.0.1:{host.port}{path}"]
    if WRK_CPUS:
        pin(host.pid, WRK_CPUS[0])
        argv = ["taskset", "-c", str(WRK_CPUS[1])] + argv
    host_before, busy_before, t0 = cpu_ticks(host.pid), machine_busy_ticks(), time.monotonic()
    p = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = p.stdout.read()
    err = p.stderr.read()
    # wait4 gives the CPU of `timeout` and of wrk, which it waited for.
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    _children.remove(p)
    elapsed = time.monotonic() - t0
    host_ticks = cpu_ticks(host.pid) - host_before
    busy = machine_busy_ticks() - busy_before
    m = re.search(r"^COMPARE (\{.*\})$", out, re.M)
    if not m:
        raise SystemExit(f"compare: wrk gave no result line (exit {p.returncode}): {err.strip()}")
    r = json.loads(m.group(1))
    r["host_cpu_ms"] = host_ticks * 1000 / TICK
    r["busy_cpu_ms"] = busy * 1000 / TICK
    r["wrk_cpu_ms"] = (ru.ru_utime + ru.ru_stime) * 1000
    r["elapsed_s"] = elapsed
    metrics = node_metrics(host)
    r["slowest_sync_ms"] = slowest_sync_ms(metrics)
    r["behind_waits"] = node_counter(metrics, "oonode_store_behind_waits_total")
    r["ok_rps"] = r["ok"] / (r["duration_us"] / 1e6)
    r["non2xx"] = sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    r["sock_errors"] = sum(r["errors"].values())
    return r


def node_metrics(host):
    """An oonode host's /metrics text, read once after a run (None for the Python host)."""
    if host.kind != "oonode":
        return None
    try:
        status, body = get(host.port, "/metrics")
    except OSError:
        return None
    return body.decode(errors="replace") if status == 200 else None


def node_counter(text, name):
    """A counter from an oonode host's /metrics text."""
    m = text and re.search(rf"^{name} (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def slowest_sync_ms(text):
    """The bucket bound of the slowest sync of its log that an oonode host timed since it
    started (`oonode_store_flush_seconds` on /metrics), in ms: in `sync` mode every
    answer waiting meanwhile waits for that sync, so a disk's stall shows in p99."""
    if text is None:
        return None
    m = re.search(r"^oonode_store_flush_seconds_count (\d+)$", text, re.M)
    if not m or int(m.group(1)) == 0:
        return None
    total = int(m.group(1))
    for le, count in re.findall(r'^oonode_store_flush_seconds_bucket\{le="([^"]+)"\} (\d+)$',
                                text, re.M):
        if int(count) >= total:
            return float(le) * 1000 if le != "+Inf" else float("inf")
    return None


# --- WebSocket turns ------------------------------------------------------------------

def ws_frame_connect(keys, to):
    """CONNECT as the package's client builds it for a direct socket."""
    from connectonion import address
    ts = int(time.time())
    payload = {"to": to, "timestamp": ts, "signed_commands": 1}
    return {"type": "CONNECT", "timestamp": ts, "payload": payload, "from": keys["address"],
            "signature": address.sign(keys, canonical(payload)).hex()}


def ws_frame_input(keys, to, prompt):
    """INPUT as the package's client builds it (a signed command with a nonce)."""
    from connectonion import address
    command = {"type": "INPUT", "input_id": str(uuid.uuid4()), "prompt": prompt,
               "timestamp": int(time.time()), "nonce": str(uuid.uuid4()), "to": to}
    frame = copy.deepcopy(command)
    frame["payload"] = command
    frame["from"] = keys["address"]
    frame["signature"] = address.sign(keys, canonical(command)).hex()
    return frame


class RawWs:
    """A minimal blocking WebSocket client, so that the driver's own cost per turn stays
    small beside the hosts' (the `websockets` package on asyncio costs about 0.3 ms a
    turn here, as much as the node). Text frames only; the client's mask is all zeros
    (allowed by RFC 6455: payload XOR 0 is the payload), which spares XOR-ing in Python."""

    def __init__(self, port, path="/ws", timeout=10.0):
        import base64
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.buf, self.at = bytearray(), 0
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n")
        head, self.at = bytes(self.buf[:end]), end + 4
        if not head.startswith(b"HTTP/1.1 101"):
            raise SystemExit(f"compare: WebSocket upgrade refused: {head[:200]!r}")

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the host closed the WebSocket")
        if self.at > 1 << 16:  # drop what was read, now and then, not per frame
            del self.buf[:self.at]
            self.at = 0
        self.buf += chunk

    def _need(self, n):
        while len(self.buf) - self.at < n:
            self._fill()

    def send(self, text):
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(head + b"\0\0\0\0" + data)

    def recv(self):
        """The next text message (a ping answered, other control frames skipped)."""
        message = b""
        while True:
            self._need(2)
            b0, b1 = self.buf[self.at], self.buf[self.at + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                self._need(4)
                n, head = int.from_bytes(self.buf[self.at + 2:self.at + 4], "big"), 4
            elif n == 127:
                self._need(10)
                n, head = int.from_bytes(self.buf[self.at + 2:self.at + 10], "big"), 10
            self._need(head + n)
            start = self.at + head
            payload = bytes(self.buf[start:start + n])
            self.at = start + n
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError(f"the host closed the WebSocket: {payload[2:]!r}")
            if opcode == 9:  # ping: the Python host closes a socket that does not answer
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            if opcode in (0, 1, 2):
                message += payload
                if b0 & 0x80:
                    return message

    def close(self):
        self.sock.close()


def _ws_turns(host, keys, turns, limit):
    times, errors = [], []
    deadline = time.monotonic() + limit
    ws = RawWs(host.port)
    try:
        ws.send(json.dumps(ws_frame_connect(keys, host.address)))
        while True:
            f = json.loads(ws.recv())
            if f.get("type") == "CONNECTED":
                break
            if f.get("type") == "ERROR":
                raise SystemExit(f"compare: {host.kind} refused CONNECT: {f}")
        ws.sock.settimeout(30)
        for i in range(turns):
            if time.monotonic() > deadline:
                break
            frame = json.dumps(ws_frame_input(keys, host.address, f"hello world {i}"))
            t0 = time.perf_counter()
            ws.send(frame)
            while True:
                f = json.loads(ws.recv())
                kind = f.get("type")
                if kind in ("OUTPUT", "ERROR"):
                    break
            took = time.perf_counter() - t0
            if kind == "ERROR":
                errors.append(f)
                continue
            times.append(took)
    finally:
        ws.close()
    return times, errors


def pin(pid, cpu):
    """Every thread of `pid` onto CPU `cpu` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def ws_pinning(cpu):
    if not cpu:
        return "no"
    cpus = cpu.split(",")
    if len(cpus) == 1 or cpus[0] == cpus[-1]:
        return f"host and client on CPU {cpus[0]}"
    return f"host on CPU {cpus[0]}, client on CPU {cpus[-1]}"


def ws_turns(host, keys, turns):
    # COMPARE_WS_CPU=N: the host and this client on CPU N for the WS turns; =H,C: the
    # host on CPU H, the client on CPU C (as a client on another machine would be). On
    # two cores a turn costs about 0.15 ms with both on one CPU and 0.22 ms on two, and
    # unpinned the kernel moves them at no set turn: pinned, last ÷ first measures the
    # session's growth, not where the scheduler put the threads (BENCHMARKS.md).
    cpu = os.environ.get("COMPARE_WS_CPU")
    if cpu is not None:
        cpus = [int(c) for c in cpu.split(",")]
        host_cpu, client_cpu = cpus[0], cpus[-1]
        mine = os.sched_getaffinity(0)
        pin(host.pid, host_cpu)
        os.sched_setaffinity(0, {client_cpu})
    try:
        times, errors = _ws_turns(host, keys, turns, WS_LIMIT)
    finally:
        if cpu is not None:
            os.sched_setaffinity(0, mine)
    r = {"turns": len(times), "errors": len(errors),
         "first_error": errors[0] if errors else None}
    if times:
        ms = sorted(t * 1000 for t in times)
        r["p50_ms"] = pct(ms, 50)
        r["p99_ms"] = pct(ms, 99)
        k = min(100, len(times) // 2)
        if k:
            r["last_over_first"] = statistics.mean(times[-k:]) / statistics.mean(times[:k])
            r["window"] = k
            # In the JSON only: a step (the kernel moving the client or the host) reads
            # differently from growth turn by turn.
            r["medians_per_window_ms"] = [round(statistics.median(times[i:i + k]) * 1000, 3)
                                          for i in range(0, len(times) - k + 1, k)]
    return r


def pct(sorted_values, p):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


# --- fsyncs ---------------------------------------------------------------------------

SYNC_CALLS = "fsync,fdatasync,sync_file_range,sync,syncfs,msync"


def fsyncs_per_request(host, scratch, secs, conns):
    """A short signed POST run (new sessions) with strace counting the host's sync calls
    (all its threads) from 1 s before the run to 0.5 s after it."""
    out = Path(host.dir) / "strace.txt"
    tracer = spawn(["timeout", str(secs + 40), "strace", "-f", "-c", "-e", f"trace={SYNC_CALLS}",
                    "-o", out, "-p", host.pid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach to every thread first
    n = BODY_RATE[(host.kind, conns)] * secs
    bodies = signed_bodies(scratch, host.address, n, Path(host.dir) / "fsync-bodies.txt")
    r = wrk(host, "/input", conns, secs, bodies)
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()
    _children.remove(tracer)
    by_call = {}
    for line in out.read_text(errors="replace").splitlines():
        parts = line.split()
        if parts and parts[-1] in SYNC_CALLS.split(","):
            # columns: % time, seconds, usecs/call, calls, [errors], syscall
            by_call[parts[-1]] = int(parts[3])
    calls = sum(by_call.values())
    return {"sync_calls": calls, "by_call": by_call, "ok": r["ok"],
            "per_request": calls / r["ok"] if r["ok"] else None}


# --- the machine ----------------------------------------------------------------------

def fsync_latency(scratch, n=200):
    """write(4 KiB) + fdatasync, n times, on the scratch directory's disk."""
    path = Path(scratch) / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = os.urandom(4096)
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return pct(times, 50), pct(times, 99)


def machine_lines(oonode, fsync):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ver = subprocess.run([oonode, "--version"], capture_output=True, text=True).stdout.strip()
    import importlib.metadata as md
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    wrk_v = (wrk_v.stdout or wrk_v.stderr).splitlines()[0].split(" Copyright")[0]
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"- nproc: {os.cpu_count()}, CPU: {model}, kernel {platform.release()}",
        f"- disk (scratch dir): write 4 KiB + fdatasync p50 {fsync[0]:.2f} ms, p99 {fsync[1]:.2f} ms",
        f"- load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}",
        f"- pinned: wrk runs {'host on CPU %d, wrk on CPU %d' % WRK_CPUS if WRK_CPUS else 'no'}; "
        f"WS turns {ws_pinning(os.environ.get('COMPARE_WS_CPU'))}",
        f"- {ver} (durability: {DURABILITY or 'default'}); connectonion {md.version('connectonion')} on Python {platform.python_version()}; {wrk_v}",
    ]


# --- the run --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oonode", required=True)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--ws-turns", type=int, default=1000)
    ap.add_argument("--fsync-secs", type=int, default=3)
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--only", help="run only these figures (comma-separated step names: "
                    "health64,new1,new64,cont1,cont64,ws,fsync1,fsync64,unsigned1)")
    ap.add_argument("--hosts", default="python,oonode",
                    help="measure only these hosts (with --only: the table is side by side); "
                    "for long development runs of oonode alone, never for a claim")
    ap.add_argument("--scratch", required=True)
    args = ap.parse_args()
    hosts = args.hosts.split(",")
    if not hosts or any(h not in ("python", "oonode") for h in hosts):
        ap.error("--hosts takes python, oonode or both")
    if len(set(hosts)) < 2 and not args.only:
        ap.error("--hosts with one host needs --only: the table compares both")
    signal.signal(signal.SIGTERM, lambda *_: (end_all(), sys.exit(143)))
    scratch = Path(args.scratch)
    keys = caller_keys(scratch)
    fs = fsync_latency(scratch)
    header = machine_lines(args.oonode, fs)
    secs = args.secs
    res = {h: {} for h in hosts}
    starts = {h: [] for h in hosts}
    rss = {h: [] for h in hosts}
    others = []   # CPU % of one core used by other processes during each wrk run
    order = [h for h in ("python", "oonode") if h in hosts]

    def fresh(kind):
        h = Host(kind, scratch, args.oonode)
        starts[kind].append(h.start_ms)
        rss[kind].append(h.idle_rss_kib)
        return h

    def note_others(r):
        rest = r["busy_cpu_ms"] - r["host_cpu_ms"] - r["wrk_cpu_ms"]
        others.append(max(0.0, 100 * rest / 1000 / r["elapsed_s"]))
        return r

    only = set(args.only.split(",")) if args.only else None
    # Bodies are signed before their run, stamped with that time: a host refuses them as
    # stale 300 s later, so a longer run would measure refusals.
    if secs > MAX_SIGNED_SECS and (only is None or only & SIGNED_STEPS):
        ap.error(f"--secs {secs}: signed runs last at most {MAX_SIGNED_SECS} s (their "
                 "pre-signed bodies go stale 300 s after signing)")

    def step(name, fn):
        if only is not None and name not in only:
            return
        for kind in order:
            print(f"compare: {name}: {kind}", file=sys.stderr, flush=True)
            h = fresh(kind)
            try:
                res[kind][name] = fn(kind, h)
            finally:
                h.stop()
        order.reverse()

    def health(kind, h):
        return note_others(wrk(h, "/health", 64, secs))

    def signed_new(conns):
        def run(kind, h):
            n = BODY_RATE[(kind, min(conns, 64))] * secs
            b = signed_bodies(scratch, h.address, n, h.dir / "bodies.txt")
            return note_others(wrk(h, "/input", conns, secs, b))
        return run

    def signed_continued(conns):
        def run(kind, h):
            sessions = []
            for i in range(1 if conns == 1 else 2 * conns):
                status, body = post(h.port, "/input", one_signed(keys, h.address, f"open {i}"))
                if status != 200:
                    raise SystemExit(f"compare: {kind} did not open a session: {status} {body[:200]}")
                sessions.append(json.loads(body)["session_id"])
            n = BODY_RATE[(kind, min(conns, 64))] * secs
            b = signed_bodies(scratch, h.address, n, h.dir / "bodies.txt", sessions=sessions)
            return note_others(wrk(h, "/input", conns, secs, b))
        return run

    def unsigned(kind, h):
        f = h.dir / "plain.txt"
        f.write_text(json.dumps({"prompt": "hello world"}) + "\n")
        if kind == "python":  # the package refuses unsigned input at every trust level
            status, body = post(h.port, "/input", f.read_bytes())
            return {"refused": status, "body": body[:120].decode(errors="replace")}
        return note_others(wrk(h, "/input", 1, secs, f, mode="repeat"))

    step("health64", health)
    step("new1", signed_new(1))
    step("new64", signed_new(64))
    step("cont1", signed_continued(1))
    step("cont64", signed_continued(64))
    step("ws", lambda kind, h: ws_turns(h, keys, args.ws_turns))
    step("fsync1", lambda kind, h: fsyncs_per_request(h, scratch, args.fsync_secs, 1))
    step("fsync64", lambda kind, h: fsyncs_per_request(h, scratch, args.fsync_secs, 64))
    step("unsigned1", unsigned)
    for kind in res:
        res[kind]["start_ms"] = statistics.median(starts[kind])
        res[kind]["idle_rss_kib"] = statistics.median(rss[kind])
        res[kind]["starts"] = starts[kind]
        res[kind]["rss"] = rss[kind]
    res["others_pct"] = others
    res["machine"] = header
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if only is not None:  # a partial run has no whole table: its measurements as they are
        print("\n".join(header))
        print(json.dumps({k: {s: res[k][s] for s in only if s in res[k]} for k in order},
                         indent=1, default=str))
        return
    print_table(res, header, secs, args.ws_turns)


def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    elif abs(v) >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s + unit


def ratio(py, oo, higher_better):
    if py is None or oo is None or isinstance(py, str) or isinstance(oo, str):
        return "—"
    if (oo == 0 if higher_better else py == 0) or (py == 0 if higher_better else oo == 0):
        return "—"
    r = oo / py if higher_better else py / oo
    return f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def sync_cell(r):
    if not r["ok"]:
        return "—"
    if not r["by_call"]:
        return "0"
    parts = ", ".join(f"{k} {v / r['ok']:.2f}" for k, v in sorted(r["by_call"].items()))
    return f"{fmt(r['per_request'])} ({parts})"


def print_table(res, header, secs, ws_turns):
    py, oo = res["python"], res["oonode"]
    rows = []

    def row(label, a, b, unit="", higher_better=False, no_ratio=False):
        rows.append((label, fmt(a, unit), fmt(b, unit),
                     "—" if no_ratio else ratio(a, b, higher_better)))

    def wrk_rows(key, label):
        a, b = py[key], oo[key]
        row(f"{label}: successful req/s", a["ok_rps"], b["ok_rps"], higher_better=True)
        row(f"{label}: p50", a["p50_us"] / 1000, b["p50_us"] / 1000, " ms")
        row(f"{label}: p99", a["p99_us"] / 1000, b["p99_us"] / 1000, " ms")
        row(f"{label}: non-2xx / socket errors", f"{a['non2xx']} / {a['sock_errors']}",
            f"{b['non2xx']} / {b['sock_errors']}", no_ratio=True)

    def slowest_sync(key, label):
        v = oo[key].get("slowest_sync_ms")
        rows.append((f"{label}: oonode's slowest log sync (≤, from /metrics)", "—",
                     "none" if v is None else fmt(v, " ms"), "—"))

    wrk_rows("new1", "signed POST /input, new session, c=1")
    wrk_rows("new64", "signed POST /input, new session, c=64")
    slowest_sync("new64", "signed POST /input, new session, c=64")
    wrk_rows("cont1", "signed POST /input, continued session, c=1")
    wrk_rows("cont64", "signed POST /input, continued sessions, c=64")
    slowest_sync("cont64", "signed POST /input, continued sessions, c=64")
    a, b = py["ws"], oo["ws"]
    n = f"{ws_turns:,}"
    row(f"WS {n} turns, one socket, one session: p50", a.get("p50_ms"), b.get("p50_ms"), " ms")
    row(f"WS {n} turns: p99", a.get("p99_ms"), b.get("p99_ms"), " ms")
    k = min(100, ws_turns // 2)
    row(f"WS {n} turns: mean of last {k} ÷ mean of first {k}", a.get("last_over_first"),
        b.get("last_over_first"), no_ratio=True)
    row(f"WS {n} turns: turns done / errors", f"{a['turns']} / {a['errors']}",
        f"{b['turns']} / {b['errors']}", no_ratio=True)
    a, b = py["health64"], oo["health64"]
    row("GET /health, c=64: req/s", a["ok_rps"], b["ok_rps"], higher_better=True)
    row("GET /health, c=64: p50", a["p50_us"] / 1000, b["p50_us"] / 1000, " ms")
    row("GET /health, c=64: p99", a["p99_us"] / 1000, b["p99_us"] / 1000, " ms")
    row("idle RSS (median of fresh starts)", py["idle_rss_kib"] / 1024, oo["idle_rss_kib"] / 1024, " MiB")
    row("start to healthy (median of fresh starts)", py["start_ms"], oo["start_ms"], " ms")
    for key, label in (("new1", "c=1"), ("new64", "c=64")):
        a, b = py[key], oo[key]
        row(f"host CPU per signed request, new session, {label}",
            a["host_cpu_ms"] / a["ok"] if a["ok"] else None,
            b["host_cpu_ms"] / b["ok"] if b["ok"] else None, " ms")
    for key, label in (("fsync1", "c=1"), ("fsync64", "c=64")):
        a, b = py[key], oo[key]
        rows.append((f"sync calls per signed request, new session, {label} (strace)",
                     sync_cell(a), sync_cell(b), "—"))
    a, b = py["unsigned1"], oo["unsigned1"]
    rows.append(("unsigned POST /input, c=1: p50 (oonode only)",
                 f"refused ({a.get('refused')})", fmt(b["p50_us"] / 1000, " ms"), "—"))

    print("\n".join(header))
    o = sorted(res["others_pct"])
    print(f"- CPU used by other processes (not the host, not wrk) during the wrk runs, % of one core: "
          f"median {statistics.median(o):.0f}, max {max(o):.0f}")
    for kind in ("python", "oonode"):
        for key, r in res[kind].items():
            if isinstance(r, dict) and r.get("exhausted"):
                print(f"- WARNING: {kind} {key}: a wrk thread ran out of signed bodies; "
                      f"that run's figures are not usable (raise BODY_RATE)")
    print(f"- each wrk run {secs} s; every figure from a fresh host; ratio = how many times "
          f"better oonode is (below 1: worse)\n")
    print("| figure | Python host | oonode | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        end_all()
