#!/usr/bin/env python3
"""Many idle connections held by one server process: `python -m bunpulse` (or one gunicorn
worker) holding N subscribed WebSocket connections (default 100,000), with its RSS.

    .venv/bin/python scripts/bench_idle.py [--connections 100000] [--gunicorn]

Raises the descriptor limits (server and generator; needs root past the hard limit), spreads
the clients over several loopback source addresses (one address gives ~28,000 ports), opens
them with at most --window handshakes in flight, each subscribed to one of 1000 channels, then
checks that a sample still answers pusher:ping and publishes one event to a channel. Prints one
JSON line: RSS before and after, KiB per connection, connects/s, server CPU per connect.
"""
import argparse
import base64
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "idle-key"
PER_ADDRESS = 25000


def frame(obj):
    payload = json.dumps(obj).encode()
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload  # a zero mask: the payload goes as it is


def proc_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next(int(line.split()[1]) for line in handle
                              if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def proc_cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def server_pids(proc):
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    return [proc.pid] + [int(pid) for pid in children]


def open_connections(port, count, window, channels):
    """Open `count` subscribed connections; return (sockets, seconds)."""
    selector = selectors.DefaultSelector()
    done, socks, started, in_flight = 0, [], 0, 0
    start = time.monotonic()
    upgrade = (f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ")
    while done < count:
        while in_flight < window and started < count:
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + started // PER_ADDRESS}", 0))
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            key = base64.b64encode(os.urandom(16)).decode()
            request = (upgrade + key + "\r\n\r\n").encode() + frame(
                {"event": "pusher:subscribe", "data": {"channel": f"idle-{started % channels}"}})
            selector.register(sock, selectors.EVENT_WRITE, [request, b""])
            socks.append(sock)
            started += 1
            in_flight += 1
        for key, events in selector.select(10):
            sock, state = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                sock.send(state[0])
                selector.modify(sock, selectors.EVENT_READ, state)
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit(f"a connection was closed during set-up ({done} done)")
            state[1] += chunk
            if b"subscription_succeeded" in state[1]:
                selector.unregister(sock)
                done += 1
                in_flight -= 1
        if time.monotonic() - start > 600:
            raise SystemExit(f"timed out after {done} connections")
    return socks, time.monotonic() - start


def ping_sample(socks, sample):
    step = max(1, len(socks) // sample)
    alive = 0
    for sock in socks[::step][:sample]:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(frame({"event": "pusher:ping", "data": {}}))
        data = b""
        while b"pusher:pong" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        alive += b"pusher:pong" in data
    return alive


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--gunicorn", action="store_true", help="one gunicorn worker")
    args = parser.parse_args()
    limit = args.connections + 1024
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
    except (ValueError, OSError):
        sys.exit(f"bench_idle: {args.connections} connections need {limit} descriptors in the "
                 f"server and in this generator, and the hard limit here is {hard} (raising "
                 "it needs root with CAP_SYS_RESOURCE): try --connections "
                 f"{max(hard - 1024, 0)}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PUSHER_APP_ID="1", PUSHER_APP_KEY=KEY, PUSHER_APP_SECRET="s",
               BUNPULSE_HOST="127.0.0.1", BUNPULSE_PORT=str(port), BUNPULSE_WORKERS="1",
               BUNPULSE_ENV_FILE=os.devnull, BUNPULSE_LOG_LEVEL="warning",
               # The clients stay silent: heartbeats long enough for the whole run.
               BUNPULSE_HEARTBEAT_INTERVAL="600000", BUNPULSE_HEARTBEAT_TIMEOUT="1200000")
    command = ([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"] if args.gunicorn
               else [sys.executable, "-m", "bunpulse"])
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        pids = server_pids(server)
        rss0, cpu0 = proc_rss_kib(pids), proc_cpu(pids)
        socks, seconds = open_connections(port, args.connections, args.window, args.channels)
        cpu1 = proc_cpu(pids)
        time.sleep(3)
        rss1 = proc_rss_kib(pids)
        alive = ping_sample(socks, args.sample)
        print(json.dumps({
            "scenario": "idle", "target": "gunicorn (1 worker)" if args.gunicorn else "local",
            "connections": len(socks), "rss_before_kib": rss0, "rss_after_kib": rss1,
            "kib_per_connection": round((rss1 - rss0) / len(socks), 2),
            "connects_per_s": round(len(socks) / seconds),
            "server_us_per_connect": round((cpu1 - cpu0) / len(socks) * 1e6),
            "sample_alive": f"{alive}/{min(args.sample, len(socks))}"}), flush=True)
        for sock in socks:
            sock.close()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
