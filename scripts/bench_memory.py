#!/usr/bin/env python3
"""What an idle, subscribed BunPulse connection holds in memory.

    .venv/bin/python scripts/bench_memory.py [--connections 2000] [--frames 25]

Runs the server in this process under tracemalloc, opens the connections from a child process
(scripts/benchmark's load generator: raw sockets, each subscribed to one of 100 channels), and
compares snapshots taken before and after: memory per connection by the library that allocated
it (the innermost frame), by line, and the Python objects added per connection. RSS is read too;
what RSS grew by beyond what tracemalloc saw is memory Python's tracer cannot see (greenlet C
stacks are copied to the heap with the raw allocator, libev watchers, malloc overhead).
"""
import sys

if "--client" not in sys.argv:  # the client side is the benchmark's plain epoll loop
    from gevent import monkey
    monkey.patch_all()

import argparse  # noqa: E402 - after monkey-patching, as gevent requires
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402
from gevent import subprocess  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def rss_kib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def category(filename):
    """The library a frame belongs to."""
    for marker, name in (("/bunpulse/", None), ("/geventwebsocket/", "geventwebsocket"),
                         ("/gevent/", "gevent"), ("/greenlet/", "greenlet"),
                         ("/flask/", "flask"), ("/werkzeug/", "werkzeug"),
                         ("/email/", "email (pywsgi headers)"), ("/http/", "http.client"),
                         ("/urllib/", "urllib"), ("socket.py", "socket.py")):
        if marker in filename:
            if name is None:
                return "bunpulse/" + filename.rsplit("/bunpulse/", 1)[1]
            return name
    return os.path.basename(filename)


def short(frame):
    name = frame.filename
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in name:
            name = name.rsplit(marker, 1)[1]
            break
    return f"{name}:{frame.lineno}"


def object_census():
    return Counter(type(o).__name__ for o in gc.get_objects())


# ---------------------------------------------------------------- the client side

def clients(port, count):
    """Child process: open `count` subscribed connections, say so, hold them until stdin
    closes."""
    # The load generator, imported only here (it is not the process being measured).
    from benchmark.loadgen import raise_fd_limit
    from benchmark.scenarios import Scenario
    from benchmark.servers import ServerUnderTest
    server = ServerUnderTest(f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}", "1",
                             "mem-key", "mem-secret")
    raise_fd_limit(count + 256)
    scenario = Scenario(server, None)
    channels = [f"idle-{i}" for i in range(100)]
    scenario.open_clients(count, lambda i: channels[i % len(channels)], window=200)
    print("ready", flush=True)
    sys.stdin.read()
    scenario.close()


# ---------------------------------------------------------------- the server side

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=25, help="traceback depth traced")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return clients(args.client, args.connections)

    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections * 2 + 512), hard))
    from bunpulse.config import load_settings
    from bunpulse.serving.embedded import make_wsgi_server

    settings = load_settings([], environ={"PUSHER_APP_ID": "1", "PUSHER_APP_KEY": "mem-key",
                                          "PUSHER_APP_SECRET": "mem-secret",
                                          "BUNPULSE_HOST": "127.0.0.1", "BUNPULSE_PORT": "0",
                                          "BUNPULSE_ENV_FILE": os.devnull})
    server, _core = make_wsgi_server(settings)
    server.start()
    port = server.server_port

    def hold(count):
        child = subprocess.Popen([sys.executable, __file__, "--client", str(port),
                                  "--connections", str(count)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the client process failed ({child.wait()})")
        gevent.sleep(0.5)  # the server finishes what the last handshakes started
        return child

    def release(child):
        child.stdin.close()
        child.wait(30)
        gevent.sleep(1)

    release(hold(200))  # warm-up: imports, caches, first-use allocations
    gc.collect()
    tracemalloc.start(args.frames)
    census0, rss0 = object_census(), rss_kib()
    before = tracemalloc.take_snapshot()
    child = hold(args.connections)
    gc.collect()
    after = tracemalloc.take_snapshot()
    census1, rss1 = object_census(), rss_kib()
    n = args.connections
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(filters), after.filter_traces(filters)

    by_lib, by_line = Counter(), Counter()
    for stat in after.compare_to(before, "traceback"):
        if stat.size_diff == 0:
            continue
        frames = list(reversed(stat.traceback))  # most recent call first
        by_lib[category(frames[0].filename)] += stat.size_diff
        # The innermost frame that is not the stdlib's or gevent's plumbing says why.
        why = next((f for f in frames if "/bunpulse/" in f.filename), frames[0])
        by_line[f"{short(frames[0])} <- {short(why)}"] += stat.size_diff
    traced = sum(by_lib.values())
    objects = {name: round((census1[name] - census0[name]) / n, 2)
               for name in census1 if (census1[name] - census0[name]) / n >= 0.5}
    report = {
        "connections": n, "rss_delta_kib_per_conn": round((rss1 - rss0) / n, 2),
        "traced_bytes_per_conn": round(traced / n),
        "untraced_bytes_per_conn": round(((rss1 - rss0) * 1024 - traced) / n),
        "by_library_bytes_per_conn": {k: round(v / n) for k, v in by_lib.most_common()},
        "top_lines_bytes_per_conn": {k: round(v / n) for k, v in by_line.most_common(25)},
        "objects_per_conn": dict(sorted(objects.items(), key=lambda kv: -kv[1])),
    }
    print(json.dumps(report, indent=1))
    release(child)
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
