#!/usr/bin/env python3
"""BunPulse benchmark suite: one command, five scenarios, exact counts.

    .venv/bin/python scripts/bench.py                       # every scenario, local target
    .venv/bin/python scripts/bench.py fanout latency --runs 3
    .venv/bin/python scripts/bench.py --quick               # seconds; exit 1 on an inexact count
    .venv/bin/python scripts/bench.py --target gunicorn --workers 1
    .venv/bin/python scripts/bench.py --target url --ws-url ws://127.0.0.1:6001 \
        --http-url http://127.0.0.1:6001 --app-id 1 --key KEY --secret SECRET [--server-pid PID]

Scenarios: fanout, latency, connections, http, presence (docs/benchmarks.md says what each
measures). Each prints one JSON line to stdout as it ends, and a table closes the run.

The code is the package scripts/benchmark/ (its __init__ lists the modules).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bunpulse

from benchmark.cli import main  # noqa: E402 - after the path that finds bunpulse

if __name__ == "__main__":
    sys.exit(main())
