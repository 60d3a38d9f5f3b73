#!/usr/bin/env python3
"""Soak: a long mixed load on one BunPulse worker, sampling its memory and descriptors.

    .venv/bin/python scripts/soak.py                       # 30 minutes
    .venv/bin/python scripts/soak.py --minutes 2 --warmup 0.5   # a quick look

What runs at once, for the whole time (a moderate rate: the point is time, not throughput):
- steady subscribers on every public channel, counting each event's sequence number;
- churners that connect, subscribe to a few public channels and join a presence channel
  (under a user id drawn from a small pool), stay a few seconds and leave, half of them with a
  close frame and half by dropping the socket;
- slow consumers that subscribe to a channel of large events and stop reading until the
  server evicts them (4100), then come back;
- a publisher on the HTTP API (the official `pusher` library).

Every SAMPLE seconds the server's RSS and open descriptors are written as a JSON line. At the
end: every event published must have reached every steady subscriber exactly once and every
churner without a gap, the presence channels must be empty, and RSS and descriptors are
compared between the end of the warm-up and the end of the run.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pusher  # noqa: E402
import requests  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ID, KEY, SECRET = "1", "soak-key", "soak-secret"
SAMPLE = 10.0  # seconds between samples


class Closed(Exception):
    pass


class Socket:
    """A minimal Pusher WebSocket client over a plain socket."""

    def __init__(self, port, rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /app/{KEY}?protocol=7&client=soak&version=1 HTTP/1.1\r\n"
                           f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise Closed(head[:60])
        self.socket_id = json.loads(self.recv_event()["data"])["socket_id"]

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed("eof")
        self.buf += chunk

    def _take(self, n):
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self):
        """The next message as (opcode, payload)."""
        b1, b2 = self._take(2)
        length = b2 & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        return b1 & 0x0F, self._take(length)

    def recv_event(self):
        while True:
            opcode, payload = self.recv()
            if opcode == 0x8:
                raise Closed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
            if opcode == 0x1:
                return json.loads(payload)

    def send(self, message, opcode=0x1):
        payload = json.dumps(message).encode() if opcode == 0x1 else message
        mask = os.urandom(4)
        header = bytes((0x80 | opcode,))
        if len(payload) < 126:
            header += bytes((0x80 | len(payload),))
        else:
            header += bytes((0x80 | 126,)) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def subscribe(self, channel, channel_data=None):
        data = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            text = f"{self.socket_id}:{channel}" + (f":{channel_data}" if channel_data else "")
            data["auth"] = KEY + ":" + hmac.new(SECRET.encode(), text.encode(),
                                                hashlib.sha256).hexdigest()
        if channel_data:
            data["channel_data"] = channel_data
        self.send({"event": "pusher:subscribe", "data": data})

    def close(self, clean=True):
        try:
            if clean:
                self.send(struct.pack("!H", 1000), 0x8)
            self.sock.close()
        except OSError:
            pass


class Soak:
    def __init__(self, args, port):
        self.args = args
        self.port = port
        self.channels = [f"soak-{i}" for i in range(args.channels)]
        self.published = {name: 0 for name in self.channels}
        self.steady_seen = []       # one {channel: last seq} per steady subscriber
        self.steady_errors = []
        self.churn = {"sessions": 0, "events": 0, "gaps": 0, "errors": 0, "presence_joins": 0}
        self.slow = {"sessions": 0, "evicted": 0, "errors": 0}
        self.api = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1",
                                 port=port, ssl=False, timeout=10)
        self.stopping = False

    # ------------------------------------------------------------- clients

    def steady(self, index):
        seen = {name: 0 for name in self.channels}
        self.steady_seen.append(seen)
        ws = Socket(self.port)
        ws.sock.settimeout(None)
        for name in self.channels:
            ws.subscribe(name)
        while True:
            try:
                message = ws.recv_event()
            except (Closed, OSError) as exc:
                self.steady_errors.append(f"steady {index}: {exc!r}")
                return
            event = message.get("event")
            if event == "pusher:ping":
                ws.send({"event": "pusher:pong", "data": {}})
            elif event == "soak":
                seq = json.loads(message["data"])["seq"]
                channel = message["channel"]
                if seq != seen[channel] + 1:
                    self.steady_errors.append(f"steady {index}: {channel} {seen[channel]} "
                                              f"then {seq}")
                seen[channel] = seq

    def churner(self):
        rng = random.Random()
        while not self.stopping:
            try:
                self._one_churn(rng)
            except (Closed, OSError):
                self.churn["errors"] += 1
                gevent.sleep(1)

    def _one_churn(self, rng):
        ws = Socket(self.port)
        self.churn["sessions"] += 1
        channels = rng.sample(self.channels, 3)
        for name in channels:
            ws.subscribe(name)
        user = rng.randrange(self.args.users)
        presence = f"presence-soak-{rng.randrange(5)}"
        ws.subscribe(presence, json.dumps({"user_id": f"u{user}",
                                           "user_info": {"name": f"user {user}"}}))
        last = {}
        deadline = time.monotonic() + rng.uniform(2, 8)
        ws.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                message = ws.recv_event()
            except socket.timeout:
                continue
            event = message.get("event")
            if event == "pusher_internal:subscription_succeeded":
                if message["channel"] == presence:
                    self.churn["presence_joins"] += 1
                else:
                    last[message["channel"]] = None  # the first event may be any number
            elif event == "soak":
                channel, seq = message["channel"], json.loads(message["data"])["seq"]
                self.churn["events"] += 1
                if last.get(channel) is not None and seq != last[channel] + 1:
                    self.churn["gaps"] += 1
                last[channel] = seq
        ws.close(clean=rng.random() < 0.5)

    def slow_consumer(self):
        while not self.stopping:
            try:
                ws = Socket(self.port, rcvbuf=4096)
                self.slow["sessions"] += 1
                ws.subscribe("soak-big")
                gevent.sleep(self.args.slow_pause)  # not reading: the server's queue grows
                ws.sock.settimeout(5)
                try:
                    while True:
                        ws.recv_event()
                except Closed:  # evicted: a 4100 close frame, or only EOF when none fit
                    self.slow["evicted"] += 1
                except socket.timeout:  # drained its backlog without being evicted
                    pass
                ws.close(clean=False)
            except (OSError, Closed):
                self.slow["errors"] += 1
                gevent.sleep(1)

    # ------------------------------------------------------------- publishing

    def publisher(self):
        interval = 1.0 / self.args.rate
        big = "x" * 9000  # the pusher library refuses more than 10 KB
        n = 0
        next_at = time.monotonic()
        while not self.stopping:
            channel = self.channels[n % len(self.channels)]
            seq = self.published[channel] + 1
            self.api.trigger(channel, "soak", {"seq": seq})
            self.published[channel] = seq
            if n % 2 == 0:
                self.api.trigger("soak-big", "big", {"blob": big})
            n += 1
            next_at += interval
            gevent.sleep(max(0, next_at - time.monotonic()))


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, fds, cpu


def window_mean(samples, start, end, key):
    values = [s[key] for s in samples if start <= s["t"] <= end]
    return statistics.mean(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5, help="minutes before the baseline")
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--steady", type=int, default=100, help="steady subscribers")
    parser.add_argument("--churners", type=int, default=30, help="concurrent churners")
    parser.add_argument("--slow", type=int, default=4, help="slow consumers")
    parser.add_argument("--slow-pause", type=float, default=45, help="s a slow consumer stalls")
    parser.add_argument("--users", type=int, default=40, help="presence user ids in the pool")
    parser.add_argument("--rate", type=float, default=20, help="events published per second")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-results", "soak.jsonl"),
                        help="JSON lines of samples")
    args = parser.parse_args()

    port = int(os.environ.get("SOAK_PORT") or 0) or _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNPULSE_", "PUSHER_"))}
    env.update({"PUSHER_APP_ID": APP_ID, "PUSHER_APP_KEY": KEY, "PUSHER_APP_SECRET": SECRET,
                "BUNPULSE_HOST": "127.0.0.1", "BUNPULSE_PORT": str(port),
                "BUNPULSE_MAX_BUFFER": str(256 * 1024), "BUNPULSE_ENV_FILE": os.devnull})
    server = subprocess.Popen([sys.executable, "-m", "bunpulse"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port)
        result = run(args, port, server.pid)
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def run(args, port, pid):
    soak = Soak(args, port)
    greenlets = [gevent.spawn(soak.steady, i) for i in range(args.steady)]
    gevent.sleep(2)  # every steady subscriber is subscribed before the first event
    workers = [gevent.spawn(soak.publisher)]
    workers += [gevent.spawn(soak.churner) for _ in range(args.churners)]
    workers += [gevent.spawn(soak.slow_consumer) for _ in range(args.slow)]
    samples, start = [], time.monotonic()
    end = start + args.minutes * 60
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        while time.monotonic() < end:
            gevent.sleep(SAMPLE)
            rss, fds, cpu = proc_sample(pid)
            sample = {"t": round(time.monotonic() - start, 1), "rss_kib": rss, "fds": fds,
                      "server_cpu_s": round(cpu, 1), "published": sum(soak.published.values()),
                      "churn_sessions": soak.churn["sessions"],
                      "slow_evicted": soak.slow["evicted"]}
            samples.append(sample)
            out.write(json.dumps(sample) + "\n")
            out.flush()
            print(json.dumps(sample), file=sys.stderr, flush=True)
    soak.stopping = True
    gevent.joinall(workers, timeout=10)
    gevent.killall(workers, timeout=5)
    gevent.sleep(3)  # the last events reach the steady subscribers
    leftover_presence = soak.api.channels_info(prefix_filter="presence-")["channels"]
    gevent.killall(greenlets, block=False)

    total = sum(soak.published.values())
    delivered = sum(sum(seen.values()) for seen in soak.steady_seen)
    warm = args.warmup * 60
    base = lambda key: window_mean(samples, warm, warm + 120, key)  # noqa: E731
    last = lambda key: window_mean(samples, samples[-1]["t"] - 120, samples[-1]["t"], key)  # noqa
    rss_growth = (last("rss_kib") - base("rss_kib")) / base("rss_kib") * 100
    fd_growth = (last("fds") - base("fds")) / base("fds") * 100
    result = {
        "minutes": args.minutes, "published": total,
        "steady_subscribers": args.steady, "steady_expected": total * args.steady,
        "steady_delivered": delivered, "steady_errors": soak.steady_errors[:5],
        "churn": soak.churn, "slow": soak.slow, "presence_left": leftover_presence,
        "rss_kib_after_warmup": round(base("rss_kib")), "rss_kib_end": round(last("rss_kib")),
        "rss_growth_pct": round(rss_growth, 2),
        "fds_after_warmup": round(base("fds"), 1), "fds_end": round(last("fds"), 1),
        "fds_growth_pct": round(fd_growth, 2),
        "server_cpu_share": round(samples[-1]["server_cpu_s"] / samples[-1]["t"], 3),
    }
    result["ok"] = (delivered == total * args.steady and not soak.steady_errors
                    and soak.churn["gaps"] == 0 and not leftover_presence
                    and rss_growth < 5 and fd_growth < 5)
    return result


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    sys.exit(main())
