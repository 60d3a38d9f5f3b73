"""BunPulse's benchmark suite, run as `scripts/bench.py` (see docs/benchmarks.md).

    loadgen    the load generator: one epoll loop over raw WebSocket and HTTP clients
    servers    the server under test: started here (local, gunicorn) or given by URL
    scenarios  fanout, latency, connections, http, presence
    measure    CPU and memory of the generator, the server and the machine
    report     the goals, the closing table, py-spy summaries
    cli        the command line
"""
import sys
import time


class BenchError(Exception):
    """A scenario could not finish (timeout, refused connection, server gone)."""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
