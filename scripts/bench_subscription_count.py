#!/usr/bin/env python3
"""The cost of pusher_internal:subscription_count on a busy channel: one `python -m bunpulse`
holding N subscribers of one channel (default 10,000) while churners join and leave it at
--rate changes a second, run twice in one go, with the app's subscription_count off and on.

    .venv/bin/python scripts/bench_subscription_count.py [--subscribers 10000] [--rate 200]

For each run, prints one JSON line: server CPU during the churn (seconds per second), the
count messages a sample of subscribers got per second (the throttle's bound: 1), the last
count they saw and the channel's real one. Not a test: numbers for docs/benchmarks.md.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_idle import KEY, frame, open_connections, proc_cpu, server_pids  # noqa: E402

CHANNEL = "idle-0"  # bench_idle's first channel: every subscriber is in it
COUNT = re.compile(rb'subscription_count\\":(\d+)')


def start(port, counts):
    env = dict(os.environ, PUSHER_APP_ID="1", PUSHER_APP_KEY=KEY, PUSHER_APP_SECRET="s",
               BUNPULSE_HOST="127.0.0.1", BUNPULSE_PORT=str(port), BUNPULSE_WORKERS="1",
               BUNPULSE_ENV_FILE=os.devnull, BUNPULSE_LOG_LEVEL="warning",
               BUNPULSE_SUBSCRIPTION_COUNT="true" if counts else "false",
               BUNPULSE_HEARTBEAT_INTERVAL="600000", BUNPULSE_HEARTBEAT_TIMEOUT="1200000")
    server = subprocess.Popen([sys.executable, "-m", "bunpulse"], env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def drain(sock, seen):
    """Read what is waiting; append each count it carries to `seen`."""
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            seen.extend(int(n) for n in COUNT.findall(chunk))
    except BlockingIOError:
        pass


def run(counts, args):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start(port, counts)
    try:
        pids = server_pids(server)
        socks, _ = open_connections(port, args.subscribers, 500, 1)
        churners, _ = open_connections(port, args.churners, args.churners, 1)
        for sock in socks + churners:
            sock.setblocking(False)
        time.sleep(2)  # the set-up's own messages are sent
        sample = socks[::max(1, len(socks) // args.sample)][:args.sample]
        seen = {sock: [] for sock in sample}
        for sock in socks:
            drain(sock, [])
        pairs_per_tick = max(1, round(args.rate / 2 / 10))  # 10 ticks a second
        cpu0, start_at = proc_cpu(pids), time.monotonic()
        joined = set(churners)  # open_connections subscribed them
        tick = 0
        while time.monotonic() - start_at < args.seconds:
            for n in range(pairs_per_tick):  # each churner: leave, or join again
                sock = churners[(tick * pairs_per_tick + n) % len(churners)]
                event = "pusher:unsubscribe" if sock in joined else "pusher:subscribe"
                sock.send(frame({"event": event, "data": {"channel": CHANNEL}}))
                joined.symmetric_difference_update((sock,))
            for sock in churners:
                drain(sock, [])
            for sock in sample:
                drain(sock, seen[sock])
            tick += 1
            time.sleep(max(0.0, start_at + tick / 10 - time.monotonic()))
        seconds = time.monotonic() - start_at
        cpu = proc_cpu(pids) - cpu0
        during = max(len(v) for v in seen.values())
        time.sleep(2)  # the trailing message
        for sock in sample:
            drain(sock, seen[sock])
        got = [len(v) for v in seen.values()]
        expected = args.subscribers + len(joined)
        print(json.dumps({
            "scenario": "subscription_count", "subscription_count": counts,
            "subscribers": args.subscribers, "changes_per_s": round(tick * pairs_per_tick * 2
                                                                    / seconds),
            "server_cpu_per_s": round(cpu / seconds, 3),
            "count_messages_per_subscriber_per_s": round(during / seconds, 2),
            "count_messages_per_subscriber": max(got),
            "last_count_seen": sorted({v[-1] for v in seen.values() if v}),
            "channel_count": expected}), flush=True)
        for sock in socks + churners:
            sock.close()
    finally:
        server.terminate()
        server.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--churners", type=int, default=20, help="connections that churn "
                        "(each under the 100 messages a second limit)")
    parser.add_argument("--rate", type=int, default=200, help="subscription changes a second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--sample", type=int, default=100)
    args = parser.parse_args()
    for counts in (False, True):
        run(counts, args)


if __name__ == "__main__":
    main()
