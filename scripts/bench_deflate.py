#!/usr/bin/env python3
"""permessage-deflate, measured: bytes on the wire and server CPU per delivery of a ~1 KB JSON
event, with compression negotiated and without (`--compression false`), same clients.

    .venv/bin/python scripts/bench_deflate.py [--subscribers 500] [--events 200]

Starts `python -m bunpulse` twice (pinned to CPU 0, the generator to CPU 1), opens the
subscribers (each offers permessage-deflate as browsers do), publishes the events over the
HTTP API one at a time (each awaited by every subscriber), and prints one JSON line per run.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import selectors
import socket
import subprocess
import sys
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ID, KEY, SECRET = "1", "deflate-key", "deflate-secret"
EVENT = {"items": [{"id": n, "name": f"item number {n}", "price": n * 1.5,
                    "tags": ["alpha", "beta"], "ok": n % 2 == 0} for n in range(12)]}


def frame(obj):
    payload = json.dumps(obj).encode()
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish(port, n):
    path = f"/apps/{APP_ID}/events"
    body = json.dumps({"name": "big", "channel": "deflate", "data": json.dumps(
        dict(EVENT, n=n))}).encode()
    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
              "body_md5": hashlib.md5(body).hexdigest()}
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    params["auth_signature"] = hmac.new(SECRET.encode(), f"POST\n{path}\n{query}".encode(),
                                        hashlib.sha256).hexdigest()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path}?{urllib.parse.urlencode(params)} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return len(body)


def run(compression, subscribers, events):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PUSHER_APP_ID=APP_ID, PUSHER_APP_KEY=KEY, PUSHER_APP_SECRET=SECRET,
               BUNPULSE_HOST="127.0.0.1", BUNPULSE_PORT=str(port), BUNPULSE_ENV_FILE=os.devnull,
               BUNPULSE_COMPRESSION=str(compression).lower(), BUNPULSE_LOG_LEVEL="warning")
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "bunpulse"],
                              cwd=ROOT, env=env)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        selector = selectors.DefaultSelector()
        socks = []
        for _ in range(subscribers):
            sock = socket.create_connection(("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket"
                         f"\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Extensions: "
                         "permessage-deflate; client_max_window_bits\r\n\r\n".encode()
                         + frame({"event": "pusher:subscribe", "data": {"channel": "deflate"}}))
            data = b""
            while b"subscription_succeeded" not in data:
                data += sock.recv(65536)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        received_bytes, frames_seen = 0, 0
        start_cpu, start = cpu(server.pid), time.monotonic()
        body_bytes = 0
        for n in range(events):
            body_bytes += publish(port, n)
            target = (n + 1) * subscribers
            while frames_seen < target:
                for key, _ in selector.select(5):
                    chunk = key.fileobj.recv(1 << 20)
                    received_bytes += len(chunk)
                    frames_seen += _count_frames(key, chunk)
        seconds, server_cpu = time.monotonic() - start, cpu(server.pid) - start_cpu
        deliveries = events * subscribers
        for sock in socks:
            sock.close()
        return {"compression": compression, "subscribers": subscribers, "events": events,
                "event_json_bytes": len(json.dumps(json.dumps(dict(EVENT, n=0)))),
                "wire_bytes_per_delivery": round(received_bytes / deliveries, 1),
                "server_us_per_delivery": round(server_cpu / deliveries * 1e6, 2),
                "deliveries_per_s": round(deliveries / seconds)}
    finally:
        server.terminate()
        server.wait(10)


_partial = {}


def _count_frames(key, chunk):
    """Whole server frames in what this socket has received so far."""
    data = _partial.get(key.fd, b"") + chunk
    count, pos = 0, 0
    while len(data) - pos >= 2:
        n, at = data[pos + 1] & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            n, at = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        if len(data) - pos < at + n:
            break
        pos += at + n
        count += 1
    _partial[key.fd] = data[pos:]
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    for compression in (False, True, False, True):
        _partial.clear()
        print(json.dumps(run(compression, args.subscribers, args.events)), flush=True)


if __name__ == "__main__":
    main()
