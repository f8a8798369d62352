"""Shared pieces of the interop suite: the scratch directory, the processes it starts,
free ports, keys, and small clients for the relay directory and `oonode call`.

Everything listens on 127.0.0.1. Every process is started through `spawn`, which keeps
its PID; `stop_all` ends them by PID (SIGTERM, then SIGKILL), and run.py calls it at the
end whatever happened. Every wait is bounded.
"""

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OONODE = Path(os.environ.get("OONODE_BIN", ROOT / "target" / "debug" / "oonode"))
PYTHON = sys.executable

# Bounds of the suite's waits, in seconds.
READY_LIMIT = 20.0   # an oonode process to print its ready line
PY_READY_LIMIT = 45.0  # a Python process (importing connectonion is slow on a small machine)
CALL_LIMIT = 10      # `oonode call --timeout`: seconds per reply frame
CALL_WALL = 25.0     # the wall-clock bound of one `oonode call` process

_procs = []
_lock = threading.Lock()


def scratch() -> Path:
    """The suite's scratch directory (run.py makes it and points HOME at it)."""
    return Path(os.environ["INTEROP_SCRATCH"])


def fresh_dir(name: str) -> Path:
    base = scratch() / "dirs"
    base.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        d = base / (name if n == 0 else f"{name}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stdout lines arrive on a queue and are also logged."""

    def __init__(self, name, argv, cwd=None, env=None):
        self.name = name
        self.log_path = scratch() / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.err_path = scratch() / "logs" / f"{name}.err"
        self._err = open(self.err_path, "w")
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err,
            cwd=str(cwd or scratch() / "work"), env=env or os.environ.copy(),
            text=True, encoding="utf-8", errors="replace",
        )
        self.pid = self.proc.pid
        with _lock:
            _procs.append(self)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.lines.put(line)
        self.lines.put(None)

    def wait_json(self, pred, limit):
        """The first stdout line that is a JSON object satisfying pred."""
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no ready line within {limit:.0f} s; "
                                     f"stderr: {self.stderr_tail()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{self.name} exited ({self.proc.wait()}) before it was "
                                     f"ready; stderr: {self.stderr_tail()}")
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and pred(obj):
                return obj

    def stderr_tail(self, n=15):
        try:
            lines = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err.close()


def stop(proc):
    if proc is None:
        return
    proc.stop()
    with _lock:
        if proc in _procs:
            _procs.remove(proc)


def stop_all():
    with _lock:
        procs = list(_procs)
        _procs.clear()
    for p in procs:
        try:
            p.stop()
        except Exception as e:  # keep going: every other process must end too
            print(f"interop: could not stop {p.name} (pid {p.pid}): {e}", file=sys.stderr)


# --- keys -----------------------------------------------------------------------------

def write_seed(co_dir: Path, seed: bytes) -> None:
    """A key file as both implementations read it: the raw 32-byte seed, mode 0600."""
    keys = Path(co_dir) / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    path = keys / "agent.key"
    path.write_bytes(seed)
    path.chmod(0o600)


def py_keys(co_dir: Path):
    """The package's own identity object for a co_dir (what connect() signs with)."""
    from connectonion import address
    keys = address.load(Path(co_dir))
    if keys is None:
        raise AssertionError(f"connectonion could not load a key from {co_dir}")
    return keys


def new_py_keys(name: str):
    d = fresh_dir(name)
    write_seed(d, os.urandom(32))
    return py_keys(d)


# --- oonode ---------------------------------------------------------------------------

def start_relay(name="relay", *extra):
    """`oonode relay` on a free port; returns (proc, ready) with ready's url and http."""
    p = Proc(name, [OONODE, "relay", "--listen", "127.0.0.1:0", "--ready-json", *extra])
    ready = p.wait_json(lambda o: o.get("event") == "ready", READY_LIMIT)
    return p, ready


def start_node(name, agent, relay=None, http=True, trust=None, extra=()):
    """`oonode host` with a built-in agent; returns (proc, ready)."""
    co = fresh_dir(name)
    argv = [OONODE, "host", "--agent", agent, "--co-dir", co, "--no-p2p", "--ready-json",
            *extra]
    if http:
        argv += ["--bind", "127.0.0.1", "--port", "0"]
    else:
        argv += ["--no-http"]
    argv += ["--relay", relay] if relay else ["--no-relay"]
    if trust:
        argv += ["--trust", trust]
    p = Proc(name, argv)
    ready = p.wait_json(lambda o: o.get("event") == "ready", READY_LIMIT)
    return p, ready


def oonode_call(address, prompt, *args, co_dir=None):
    """Runs `oonode call … --json`; returns (exit status, parsed JSON or None, stdout, stderr)."""
    co = co_dir or fresh_dir("caller")
    argv = [str(OONODE), "call", address, prompt, "--json", "--timeout", str(CALL_LIMIT),
            "--co-dir", str(co), *[str(a) for a in args]]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CALL_WALL,
                              cwd=str(scratch() / "work"))
    except subprocess.TimeoutExpired as e:
        return None, None, e.stdout or "", f"oonode call did not end within {CALL_WALL:.0f} s"
    out = None
    for line in done.stdout.splitlines():
        try:
            out = json.loads(line)
        except ValueError:
            continue
    return done.returncode, out, done.stdout, done.stderr


def call_answer(testcase, address, prompt, *args, co_dir=None):
    """`oonode call` that must succeed; returns its JSON (result, session_id, path…)."""
    started = time.monotonic()
    code, out, stdout, stderr = oonode_call(address, prompt, *args, co_dir=co_dir)
    took = time.monotonic() - started
    if code != 0 or out is None:
        testcase.fail(f"oonode call {' '.join(map(str, args))} failed after {took:.1f} s "
                      f"(exit {code}): {stderr.strip()[-600:] or stdout.strip()[-600:]}")
    out["took"] = took  # wall-clock seconds of the whole process
    return out


# --- the relay's directory and a node's HTTP ------------------------------------------

def get_json(url, timeout=3.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read().decode())


def post_json(url, body, timeout=10.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text}


def ws_to_http(url: str) -> str:
    return url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).rstrip("/")


def wait_listed(relay_url, address, limit):
    """Waits until the relay's directory says the agent is reachable through it."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        try:
            status, info = get_json(f"{ws_to_http(relay_url)}/api/agents/{address}")
            last = info
            if status == 200 and (info.get("online") or (info.get("online") is None and info.get("relay"))):
                return info
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.2)
    raise AssertionError(f"{address[:12]}… not listed on {relay_url} within {limit:.0f} s "
                         f"(last answer: {last})")


def wait_http(url, limit, proc=None):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}); "
                                 f"stderr: {proc.stderr_tail()}")
        try:
            return get_json(url, timeout=1.0)[1]
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {limit:.0f} s")


# --- Python processes of the suite ----------------------------------------------------

def start_py_host(name, relay, trust="open"):
    """tests/interop/py_host.py: a connectonion host() agent; returns (proc, address, port)."""
    co = fresh_dir(name)
    write_seed(co, os.urandom(32))
    address = py_keys(co)["address"]
    port = free_port()
    # Its own working directory, so that the package's project lookup finds nothing
    # but what we give it.
    cwd = fresh_dir(name + "-cwd")
    p = Proc(name, [PYTHON, HERE / "py_host.py", "--port", port, "--relay", relay,
                    "--co-dir", co, "--trust", trust], cwd=cwd)
    wait_http(f"http://127.0.0.1:{port}/info", PY_READY_LIMIT, proc=p)
    return p, address, port


def start_py_relay(name="py-relay"):
    p = Proc(name, [PYTHON, HERE / "py_relay.py", "--port", "0"])
    ready = p.wait_json(lambda o: o.get("event") == "ready", PY_READY_LIMIT)
    return p, ready


# --- the Python client's seal, observed -----------------------------------------------

class SealProbe:
    """Records whether each socket the Python client opened was sealed.

    Wraps RemoteAgent._offer_seal (the client's only way to seal) without changing what
    it does: the result is passed through; only its type is noted.
    """

    def __init__(self):
        self.outcomes = []

    def __enter__(self):
        import importlib
        from connectonion.network.sealed import SealedSocket
        # The module, not the function of the same name the package re-exports.
        self._cls = importlib.import_module("connectonion.network.connect").RemoteAgent
        self._orig = self._cls._offer_seal
        probe, orig = self, self._orig

        async def offer_seal(agent_self, ws):
            started = time.monotonic()
            result = await orig(agent_self, ws)
            probe.outcomes.append((isinstance(result, SealedSocket), time.monotonic() - started))
            return result

        self._cls._offer_seal = offer_seal
        return self

    def __exit__(self, *exc):
        self._cls._offer_seal = self._orig
        return False

    def all_sealed(self):
        return bool(self.outcomes) and all(s for s, _ in self.outcomes)

    def describe(self):
        return ", ".join(f"{'sealed' if s else 'NOT sealed'} ({t:.2f} s)" for s, t in self.outcomes) \
            or "no seal offered"


# --- assertions that report every problem of a test at once ---------------------------

class Checks:
    """Collects failed checks so that one run shows all that is wrong, not the first."""

    def __init__(self, testcase):
        self.testcase = testcase
        self.failed = []

    def true(self, cond, what):
        if not cond:
            self.failed.append(what)
        return cond

    def equal(self, got, want, what):
        return self.true(got == want, f"{what}: got {got!r}, want {want!r}")

    def done(self):
        if self.failed:
            self.testcase.fail("; ".join(self.failed))


def py_conversation(address, relay, prompts, keys, timeout=15.0):
    """Runs prompts in turn on one Python RemoteAgent; returns (agent, [(text or error,
    seconds)], SealProbe). A turn that raises is recorded as 'ERROR: …' and ends it."""
    from connectonion import connect
    agent = connect(address, keys=keys, relay_url=relay)
    turns = []
    with SealProbe() as probe:
        for prompt in prompts:
            began = time.monotonic()
            try:
                text = agent.input(prompt, timeout=timeout).text
            except Exception as e:  # the test reports it with the rest
                turns.append((f"ERROR: {type(e).__name__}: {e}", time.monotonic() - began))
                break
            turns.append((text, time.monotonic() - began))
    return agent, turns, probe


def check_turns(checks, turns, wants, what):
    for i, want in enumerate(wants):
        got = turns[i][0] if i < len(turns) else "(no answer: an earlier turn failed)"
        checks.equal(got, want, f"{what} turn {i + 1}")


def check_sealed_and_fast(checks, turns, probe, what, limit=1.0):
    checks.true(probe.all_sealed(), f"{what}: not sealed end to end ({probe.describe()})")
    for i, (_, took) in enumerate(turns):
        checks.true(took < limit, f"{what} turn {i + 1} took {took:.2f} s (limit {limit} s)")
