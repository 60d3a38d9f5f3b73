#!/usr/bin/env python3
"""The `hostile` scenario: while one client floods the server as fast as it can (WebSocket
pings, pusher:ping messages, client events, all pipelined), do the other clients still get
served? Measures other clients' connect time (TCP connect to connection_established) and
pusher:ping round trip, p50/p99/max, and counts the events they keep receiving from a
steady publisher. Target: p99 under 50 ms for both, every event delivered.

    .venv/bin/python scripts/bench_hostile.py [--seconds 10] [--flooders 1] [--url ws://...]

Without --url it starts `python -m bunpulse` from this checkout (pinned to CPU 0, the
generator to CPU 1, as scripts/bench.py does). Prints one JSON line.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ID, KEY, SECRET = "hostile", "hostile-key", "hostile-secret"


def client_frame(payload, opcode=0x1):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode,))
    head += bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def message(obj):
    return client_frame(json.dumps(obj).encode())


def handshake(host, port, timeout=10):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    return sock


class Reader:
    """Server frames from one blocking socket."""

    def __init__(self, sock):
        self.sock, self.data = sock, b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.data += chunk

    def head(self):
        while b"\r\n\r\n" not in self.data:
            self._fill()
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        return head

    def frame(self):
        while True:
            data = self.data
            if len(data) >= 2:
                n, at = data[1] & 0x7F, 2
                if n == 126 and len(data) >= 4:
                    n, at = int.from_bytes(data[2:4], "big"), 4
                elif n == 127 and len(data) >= 10:
                    n, at = int.from_bytes(data[2:10], "big"), 10
                if n < 126 and len(data) >= at + n:
                    self.data = data[at + n:]
                    return data[0] & 0x0F, data[at:at + n]
            self._fill()

    def event(self, name):
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                raise ConnectionError(f"closed {payload[:2].hex()} {payload[2:]!r}")
            if opcode == 0x1 and json.loads(payload).get("event") == name:
                return json.loads(payload)


def connect(host, port):
    """(socket, reader, socket_id, seconds from TCP connect to connection_established)."""
    start = time.perf_counter()
    sock = handshake(host, port)
    reader = Reader(sock)
    reader.head()
    established = reader.event("pusher:connection_established")
    took = time.perf_counter() - start
    return sock, reader, json.loads(established["data"])["socket_id"], took


def channel_auth(socket_id, channel):
    sig = hmac.new(SECRET.encode(), f"{socket_id}:{channel}".encode(), hashlib.sha256)
    return f"{KEY}:{sig.hexdigest()}"


def flood(host, port, stop, counts):
    """Send pings, pusher:pings and client events as fast as the socket takes them, and read
    (and drop) whatever comes back, so the server never evicts us for not reading."""
    sock, reader, socket_id, _ = connect(host, port)
    channel = "private-flood"
    sock.sendall(message({"event": "pusher:subscribe", "data": {
        "channel": channel, "auth": channel_auth(socket_id, channel)}}))
    burst = (client_frame(b"", 0x9) * 200
             + message({"event": "pusher:ping", "data": {}}) * 200
             + message({"event": "client-flood", "channel": channel, "data": {"x": 1}}) * 200)
    sock.setblocking(False)
    pending = memoryview(b"")
    while not stop.is_set():
        readable, writable, _ = select.select([sock], [sock], [], 0.1)
        if readable:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                chunk = b"x"
            if not chunk:
                counts["flooder_closed"] += 1
                sock.close()
                sock, reader, socket_id, _ = connect(host, port)
                sock.setblocking(False)
                pending = memoryview(b"")
                continue
            counts["flood_bytes_in"] += len(chunk)
        if writable:
            if not pending:
                pending = memoryview(burst)
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                counts["flooder_closed"] += 1
                sock.close()
                sock, reader, socket_id, _ = connect(host, port)
                sock.setblocking(False)
                pending = memoryview(b"")
                continue
            counts["flood_bytes_out"] += sent
            pending = pending[sent:]
    sock.close()


def publish(http, channel, n):
    path = f"/apps/{APP_ID}/events"
    body = json.dumps({"name": "tick", "channel": channel, "data": str(n)}).encode()
    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
              "body_md5": hashlib.md5(body).hexdigest()}
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    params["auth_signature"] = hmac.new(SECRET.encode(), f"POST\n{path}\n{query}".encode(),
                                        hashlib.sha256).hexdigest()
    http.sendall(f"POST {path}?{urllib.parse.urlencode(params)} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = http.recv(4096)
        if not chunk:
            raise ConnectionError("API connection closed")
        answer += chunk
    return answer.startswith(b"HTTP/1.1 200")


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def measure(host, port, seconds, flooders):
    counts = {"flood_bytes_in": 0, "flood_bytes_out": 0, "flooder_closed": 0}
    witness, reader, socket_id, _ = connect(host, port)
    witness.sendall(message({"event": "pusher:subscribe", "data": {"channel": "calm"}}))
    reader.event("pusher_internal:subscription_succeeded")
    http = socket.create_connection((host, port), timeout=10)
    http.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stop = threading.Event()
    threads = [threading.Thread(target=flood, args=(host, port, stop, counts), daemon=True)
               for _ in range(flooders)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the flood is on
    rtts, connects, published, received = [], [], 0, 0
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        start = time.perf_counter()
        witness.sendall(message({"event": "pusher:ping", "data": {}}))
        reader.event("pusher:pong")
        rtts.append(time.perf_counter() - start)
        if n % 3 == 0:
            sock, _, _, took = connect(host, port)
            connects.append(took)
            sock.close()
        if n % 5 == 0:
            published += publish(http, "calm", n)
            reader.event("tick")  # the fan-out goes on: the event arrives
            received += 1
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(5)
    return {"scenario": "hostile", "seconds": seconds, "flooders": flooders,
            "ping_rtt_ms": {"n": len(rtts), "p50": pct(rtts, 0.5), "p99": pct(rtts, 0.99),
                            "max": pct(rtts, 1.0)},
            "connect_ms": {"n": len(connects), "p50": pct(connects, 0.5),
                           "p99": pct(connects, 0.99), "max": pct(connects, 1.0)},
            "events_published": published, "events_received": received,
            "flood_mb_sent": round(counts["flood_bytes_out"] / 1e6, 1),
            "flood_mb_received": round(counts["flood_bytes_in"] / 1e6, 1),
            "flooder_reconnects": counts["flooder_closed"],
            "ok": (pct(rtts, 0.99) or 1e9) < 50 and (pct(connects, 0.99) or 1e9) < 50
            and received == published}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--url", help="ws://HOST:PORT of a running server (app "
                        f"{APP_ID}/{KEY}/{SECRET}); default: start one")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--gen-cpus", default="1")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    server = None
    if args.url:
        parsed = urllib.parse.urlparse(args.url)
        host, port = parsed.hostname, parsed.port
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            host, port = "127.0.0.1", probe.getsockname()[1]
        env = dict(os.environ, PUSHER_APP_ID=APP_ID, PUSHER_APP_KEY=KEY,
                   PUSHER_APP_SECRET=SECRET, BUNPULSE_HOST=host, BUNPULSE_PORT=str(port),
                   BUNPULSE_ENV_FILE=os.devnull, BUNPULSE_LOG_LEVEL="warning")
        command = [sys.executable, "-m", "bunpulse"]
        if args.server_cpus != "none":
            command = ["taskset", "-c", args.server_cpus] + command
            os.sched_setaffinity(0, {int(c) for c in args.gen_cpus.split(",")})
        server = subprocess.Popen(command, cwd=ROOT, env=env)
        for _ in range(200):
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
    try:
        print(json.dumps(measure(host, port, args.seconds, args.flooders)), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
