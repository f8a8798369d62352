#!/usr/bin/env python3
"""Runs the interop suite (tests/interop/test_*.py) and prints one line per test.

    run.py [-k SUBSTRING]... [--deadline SECONDS] [--keep]

Run it with the Python of a venv that has connectonion (tests/interop.sh does). It
makes a scratch directory, points HOME and the working directory there, keeps the
package off the network (its backend URL and any https:// traffic go to a closed local
port), runs the tests, ends every process they started by PID, and prints a summary.
Exit status 0 when every test passed, 1 otherwise, 2 when the deadline passed.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent


def closed_port():
    """A local port nothing listens on: where the package's outside traffic is sent."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolate(scratch: Path):
    (scratch / "home").mkdir()
    (scratch / "work").mkdir()
    dead = f"http://127.0.0.1:{closed_port()}"
    env = os.environ
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OONODE_RELAY", "OPENONION_API_KEY",
                 "OPENONION_API_URL", "OPENONION_BASE_URL", "OPENONION_DEV", "ENVIRONMENT",
                 "AGENT_PORT", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env.update({
        "INTEROP_SCRATCH": str(scratch),
        "HOME": str(scratch / "home"),
        # The package's default relay and backend (connect(), host(), the trust and
        # balance clients) are this closed port unless a test names its own relay.
        "CONNECTONION_BACKEND_URL": dead,
        # Anything else bound for the internet (https://, e.g. the public-IP lookup)
        # goes to the same closed port and fails at once; local http:// and ws:// do not.
        "HTTPS_PROXY": dead, "https_proxy": dead,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        # host() announces these instead of this machine's interfaces: a Python client
        # that resolves them fails at once (through the proxy above) and takes the relay.
        "AGENT_PUBLIC_DOMAIN": "interop.invalid",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
    })
    os.chdir(scratch / "work")


RESULTS = []  # the Recorder of the run, for a summary when the deadline cuts it short


class Recorder(unittest.TextTestResult):
    """Keeps (status, name, seconds, reason) for the summary."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = []
        self._started = {}
        RESULTS.append(self)

    def startTest(self, test):
        self._started[test.id()] = time.monotonic()
        super().startTest(test)

    def _row(self, test, status, err=None):
        began = self._started.get(test.id())
        took = time.monotonic() - began if began else 0.0
        reason = ""
        if err is not None:
            exc = err[1]
            text = str(exc) if isinstance(exc, AssertionError) else \
                "".join(traceback.format_exception_only(err[0], exc)).strip()
            reason = text
        name = test.id().replace("test_", "", 1) if hasattr(test, "id") else str(test)
        self.rows.append((status, name, took, reason))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._row(test, "PASS")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._row(test, "FAIL", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._row(test, "ERROR", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.rows.append(("SKIP", test.id(), 0.0, reason))


def select(suite, patterns):
    if not patterns:
        return suite
    out = unittest.TestSuite()
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            sub = select(item, patterns)
            if sub.countTestCases():
                out.addTest(sub)
        elif any(p in item.id() for p in patterns):
            out.addTest(item)
    return out


def print_rows(rows):
    print("\n== interop summary")
    for status, name, took, reason in rows:
        first = reason.strip().splitlines()[0] if reason.strip() else ""
        print(f"{status:5} {name}  ({took:.1f} s){'  -- ' + first if first else ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run tests whose id has this")
    parser.add_argument("--deadline", type=float, default=170.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="oonode-interop-"))
    isolate(scratch)
    sys.path.insert(0, str(HERE))
    import harness  # noqa: E402  (needs the environment above)

    # The package's client imports its socket and crypto libraries lazily, on a first
    # call: import them now, so that no test's timing counts it.
    import connectonion.network.sealed  # noqa: F401
    import websockets.asyncio.client  # noqa: F401

    if not harness.OONODE.exists():
        print(f"interop: {harness.OONODE} is missing: cargo build --bin oonode", file=sys.stderr)
        return 1

    def out_of_time(signum, frame):
        print(f"\ninterop: the suite passed its {args.deadline:.0f} s deadline; stopping",
              file=sys.stderr, flush=True)
        harness.stop_all()
        if RESULTS:
            print_rows(RESULTS[0].rows)
        print(f"interop: logs kept in {scratch}/logs", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2)

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.deadline))

    started = time.monotonic()
    suite = select(unittest.defaultTestLoader.discover(str(HERE), pattern="test_*.py",
                                                      top_level_dir=str(HERE)), args.k)
    runner = unittest.TextTestRunner(verbosity=2, resultclass=Recorder, stream=sys.stdout)
    try:
        result = runner.run(suite)
    finally:
        harness.stop_all()
        signal.alarm(0)

    print_rows(result.rows)
    # Errors outside a test (setUpModule, setUpClass) have no row of their own.
    for test, text in result.errors:
        if not hasattr(test, "_testMethodName"):
            print(f"ERROR {test}  -- {text.strip().splitlines()[-1]}")
    ok = result.wasSuccessful()
    passed = sum(1 for r in result.rows if r[0] == "PASS")
    print(f"== {passed} passed, {result.testsRun - passed} not, in "
          f"{time.monotonic() - started:.0f} s")
    if ok and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"== logs of every process: {scratch}/logs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
