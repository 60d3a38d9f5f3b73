"""Shared fixtures: real servers in subprocesses, the official clients, raw sockets, a real
webhook receiver and a real redis-server. No mocks."""
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

import pusher
import pytest
import requests
import websocket

from bunpulse.signatures import sign_api_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS_DIR = os.path.join(ROOT, "tests", "js")
APP_ID, KEY, SECRET = "1", "test-key", "test-secret"
MASTER_KEY = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="  # 32 bytes, base64


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout=5.0, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def unix_socket(path, timeout=5):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def unix_request(path, request_line, timeout=2):
    """One HTTP/1.1 request over a unix socket; the raw answer (status line first)."""
    with unix_socket(path, timeout) as sock:
        sock.sendall(f"{request_line} HTTP/1.1\r\nHost: localhost\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def read_json_answer(sock):
    """A raw HTTP answer with a JSON body: pywsgi sends the headers and the body in two
    writes, which may arrive as two segments."""
    answer = b""
    while not answer.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer.decode("latin-1")


# ------------------------------------------------------------------------ servers

class ServerProcess:
    """`python -m bunpulse` (or gunicorn) in a subprocess, with its log kept for assertions."""

    def __init__(self, env=None, args=(), port=None, command=None, metrics=False, ca=None,
                 health="/health"):
        """metrics: serve /metrics on a free port; ca: the CA file that verifies its TLS;
        health: where it answers once ready (a host app mounts BunPulse deeper)."""
        self.port = port or free_port()
        self.health = health
        self.host = "127.0.0.1"
        self.ca = ca
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="bunpulse-", suffix=".log",
                                                    delete=False)
        full_env = self.base_env(self.port)
        if metrics:  # a port of its own: two free_port() calls may return the same one
            full_env["BUNPULSE_METRICS_PORT"] = str(next(
                port for port in iter(free_port, None) if port != self.port))
        full_env.update(env or {})
        self.env = full_env
        command = command or [sys.executable, "-m", "bunpulse"]
        self.proc = subprocess.Popen(list(command) + list(args), cwd=ROOT, env=full_env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready()

    @staticmethod
    def base_env(port):
        """The environment of a test server: the test app on 127.0.0.1:port."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BUNPULSE_", "PUSHER_", "PROMETHEUS_"))}
        env.update({"PUSHER_APP_ID": APP_ID, "PUSHER_APP_KEY": KEY,
                    "PUSHER_APP_SECRET": SECRET, "BUNPULSE_HOST": "127.0.0.1",
                    "BUNPULSE_PORT": str(port), "PYTHONUNBUFFERED": "1",
                    "BUNPULSE_ENV_FILE": os.devnull})
        return env

    @property
    def tls(self):
        return bool(self.env.get("BUNPULSE_SSL_CERT"))

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ws_url(self):
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.env['BUNPULSE_METRICS_PORT']}"

    def metrics(self):
        """The samples of one scrape of /metrics: {(name, ((label, value), ...)): value}."""
        from prometheus_client.parser import text_string_to_metric_families
        text = requests.get(self.metrics_url + "/metrics", timeout=5).text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}

    def metric(self, name, **labels):
        """The sum of a metric's samples whose labels include `labels` (0 if none)."""
        return sum(value for (sample, sample_labels), value in self.metrics().items()
                   if sample == name and set(labels.items()) <= set(sample_labels))

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.unix_path is not None:
                    if unix_request(self.unix_path, "GET /health").startswith(b"HTTP/1.1 200"):
                        return
                elif requests.get(self.url + self.health, timeout=0.5,
                                  verify=self.ca or True).status_code == 200:
                    return
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    @property
    def unix_path(self):
        """The socket path when BUNPULSE_HOST is unix:PATH, else None."""
        host = self.env.get("BUNPULSE_HOST", "")
        return host[len("unix:"):] if host.startswith("unix:") else None

    def log(self):
        with open(self.log_file.name) as handle:
            return handle.read()

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def stop(self):
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # The rest of its session too, even when the first process is gone already: a gunicorn
        # master started by USR2 would otherwise outlive the test and keep its port.
        try:
            self.signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log_file.close()


@pytest.fixture
def start_server():
    """Factory: start_server(env={...}, args=[...]) -> ServerProcess, stopped after the test."""
    started = []

    def start(**kwargs):
        server = ServerProcess(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------------ gunicorn workers

def _stat(pid):
    """(state letter, parent pid) of a process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(entry)
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def gunicorn_workers(server, count=2, timeout=15):
    """The pids of the `count` workers of a gunicorn master (a ServerProcess), once it has
    forked them all; they may still be booting."""
    return wait_until(lambda: len(pids := _children(server.proc.pid)) == count and pids,
                      timeout, 0.05, f"{count} gunicorn workers")


@contextlib.contextmanager
def only_worker(server, pid, timeout=20):
    """While the block runs, gunicorn's worker `pid` is the only one that accepts on the
    listener its siblings share: they are stopped (SIGSTOP, SIGCONT after), so every new
    connection reaches that worker, where the kernel would otherwise hand it to any of them.
    The worker has answered `server.health` when the block starts (one still booting is
    waited for). Keep blocks short: the master replaces a worker silent for its timeout."""
    siblings = _children(server.proc.pid)
    assert pid in siblings, f"{pid} is not a worker of {server.proc.pid}"
    siblings.remove(pid)
    stopped = []
    try:
        for sibling in siblings:
            os.kill(sibling, signal.SIGSTOP)
            stopped.append(sibling)
        for sibling in siblings:  # stopped, not merely signalled, before anything connects
            wait_until(lambda s=sibling: (_stat(s) or ("T",))[0] == "T", 5, 0.01,
                       f"worker {sibling} stopped")
        answer = requests.get(server.url + server.health, timeout=timeout, verify=server.ca or True)
        assert answer.status_code == 200, answer.text
        yield
    finally:
        for sibling in stopped:
            try:
                os.kill(sibling, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server():
    """One server per test module, with the test app and fast heartbeats off."""
    process = ServerProcess(env={"BUNPULSE_WEBHOOK_DELAY_MS": "0"})
    yield process
    process.stop()


def pusher_api(server, **kwargs):
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host=server.host,
                         port=server.port, ssl=False, **kwargs)


@pytest.fixture
def api(server):
    return pusher_api(server)


# ------------------------------------------------------------------------ a browser

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright (which never downloads a browser)."""
    from playwright import sync_api as playwright_api
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed (scripts/test installs it)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


# ------------------------------------------------------------------------ pusher-js

class NodeDriver:
    """pusher-js and the npm `pusher` library in one Node process (tests/js/driver.js), or
    another script of tests/js that speaks the same line protocol (`script`, with `env`)."""

    def __init__(self, server, app_id=APP_ID, key=KEY, secret=SECRET, prefix="",
                 script="driver.js", env=None):
        extra = env or {}
        env = dict(os.environ, BP_HOST=server.host, BP_PORT=str(server.port), BP_APP_ID=app_id,
                   BP_KEY=key, BP_SECRET=secret, BP_MASTER_KEY=MASTER_KEY, BP_PREFIX=prefix)
        if getattr(server, "tls", False):
            env.update(BP_TLS="1", NODE_EXTRA_CA_CERTS=server.ca)
        env.update(extra)
        self.proc = subprocess.Popen(["node", script], cwd=JS_DIR, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.reports = []
        self._lock = threading.Condition()
        self._seq = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            message["at"] = time.monotonic()  # when the test saw it
            with self._lock:
                self.reports.append(message)
                self._lock.notify_all()

    def call(self, op, timeout=10, fails=False, **kwargs):
        """Run a command; return its reply ({"ok": True, "result": ...}). A failed command
        raises, unless the caller expects it to fail (`fails`): then its reply ({"ok": False,
        "error", "status", "body"}) is returned, and a success raises."""
        self._seq += 1
        seq = self._seq
        self.proc.stdin.write(json.dumps(dict(kwargs, op=op, seq=seq)) + "\n")
        self.proc.stdin.flush()
        reply = self.wait(lambda r: r.get("type") == "reply" and r.get("seq") == seq, timeout,
                          f"reply to {op}")
        if reply["ok"] == fails:
            raise AssertionError(f"{op} {kwargs} {'succeeded' if fails else 'failed'}: {reply}")
        return reply

    def wait(self, predicate, timeout=10, what="report"):
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for report in self.reports:
                    if predicate(report):
                        return report
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; reports: "
                                         f"{self.reports[-20:]}")
                self._lock.wait(left)

    def events(self, id=None, event=None, channel=None):
        with self._lock:
            return [r for r in self.reports if r.get("type") == "event"
                    and (id is None or r["id"] == id) and (event is None or r["event"] == event)
                    and (channel is None or r["channel"] == channel)]

    def wait_event(self, id, event, channel=None, timeout=10):
        return self.wait(lambda r: r.get("type") == "event" and r["id"] == id
                         and r["event"] == event and (channel is None or r["channel"] == channel),
                         timeout, f"{event} on {id}")

    def connect(self, id, timeout=10, **kwargs):
        self.call("connect", id=id, **kwargs)
        return self.wait(lambda r: r.get("type") == "connected" and r["id"] == id, timeout,
                         f"{id} connected")["socket_id"]

    def subscribe(self, id, channel, timeout=10):
        self.call("subscribe", id=id, channel=channel)
        return self.wait_event(id, "pusher:subscription_succeeded", channel, timeout)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit", "seq": 0}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


@pytest.fixture
def node(server):
    driver = NodeDriver(server)
    yield driver
    driver.close()


@pytest.fixture
def node_for():
    """Factory: node_for(server, ...) -> NodeDriver for another server or app."""
    drivers = []

    def make(server, **kwargs):
        driver = NodeDriver(server, **kwargs)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()


# ------------------------------------------------------------------------ raw sockets

class RawClient:
    """A plain WebSocket client for what the official clients will not send."""

    def __init__(self, url, timeout=5, **options):
        # options go to websocket.create_connection (e.g. socket=unix_socket(path))
        self.ws = websocket.create_connection(url, timeout=timeout, **options)

    def recv(self):
        opcode, data = self.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return ("close", int.from_bytes(data[:2], "big") if len(data) >= 2 else None,
                    data[2:].decode("utf-8", "replace"))
        return json.loads(data)

    def recv_event(self, event, limit=20):
        for _ in range(limit):
            message = self.recv()
            if isinstance(message, tuple):
                raise AssertionError(f"closed {message} while waiting for {event}")
            if message.get("event") == event:
                return message
        raise AssertionError(f"no {event} in {limit} messages")

    def recv_close(self, limit=20):
        for _ in range(limit):
            message = self.recv()
            if isinstance(message, tuple):
                return message[1], message[2]
        raise AssertionError("no close frame")

    def send(self, message):
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def raw(server):
    """Factory: raw(path="/app/KEY?protocol=7") -> RawClient connected to the module server."""
    clients = []

    def connect(path=f"/app/{KEY}?protocol=7&client=py&version=1.0", target=None, **options):
        client = RawClient((target or server).ws_url + path, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def connected(raw_client):
    """Read connection_established; return the socket id."""
    message = raw_client.recv_event("pusher:connection_established")
    return json.loads(message["data"])["socket_id"]


def raw_subscribe(raw_client, socket_id, channel, channel_data=None, key=KEY, secret=SECRET):
    """Send pusher:subscribe signed as a backend would (bunpulse.signatures.channel_auth)."""
    from bunpulse.apps import App
    from bunpulse.signatures import channel_auth
    data = {"channel": channel}
    if channel_data is not None or channel.startswith(("private-", "presence-")):
        data["auth"] = channel_auth(App(id="0", key=key, secret=secret), socket_id, channel,
                                    channel_data)
    if channel_data is not None:
        data["channel_data"] = channel_data
    raw_client.send({"event": "pusher:subscribe", "data": data})


def library_subscribe(client, api, channel, member=None, socket_id=None):
    """Subscribe a raw client, signing with the PyPI library's authenticate()."""
    data = {"channel": channel}
    if channel.startswith(("private-", "presence-")):
        data.update(api.authenticate(channel, socket_id, member))
    client.send({"event": "pusher:subscribe", "data": data})
    return client.recv_event("pusher_internal:subscription_succeeded")


def raw_signin(raw_client, socket_id, user, key=KEY, secret=SECRET):
    """Send pusher:signin for `user` (a dict, or user_data as a string); return user_data."""
    from bunpulse.apps import App
    from bunpulse.signatures import user_auth
    user_data = user if isinstance(user, str) else json.dumps(user)
    raw_client.send({"event": "pusher:signin", "data": {
        "auth": user_auth(App(id="0", key=key, secret=secret), socket_id, user_data),
        "user_data": user_data}})
    return user_data


def until_pong(client, limit=100):
    """Ping; return what arrives before the pong: the answers to every earlier frame (the
    server handles one connection's frames in order)."""
    client.send({"event": "pusher:ping", "data": {}})
    seen = []
    for _ in range(limit):
        message = client.recv()
        assert not isinstance(message, tuple), f"closed: {message}"
        if message.get("event") == "pusher:pong":
            return seen
        seen.append(message)
    raise AssertionError(f"no pong after {limit} messages")


def assert_alive(client):
    """The connection is open and served: a ping gets its pong."""
    client.send({"event": "pusher:ping", "data": {}})
    assert client.recv_event("pusher:pong") == {"event": "pusher:pong", "data": "{}"}


def churn(client, names, batch=250):
    """Subscribe to each public channel of `names` and leave it at once, as a client that makes
    up channel names would; returns once all were served (each cache channel's
    pusher:cache_miss read, the connection still open)."""
    for start in range(0, len(names), batch):
        part = names[start:start + batch]
        for name in part:
            client.send({"event": "pusher:subscribe", "data": {"channel": name}})
            client.send({"event": "pusher:unsubscribe", "data": {"channel": name}})
        for name in part:
            client.recv_event("pusher:cache_miss" if "cache-" in name
                              else "pusher_internal:subscription_succeeded")
    assert_alive(client)  # answered after every unsubscribe before it


# ------------------------------------------------------------------------ HTTP API

def signed_query(method, path, raw=b"", params=None, key=KEY, secret=SECRET, timestamp=None,
                 body_md5=None):
    """The query of an HTTP API request signed as the Pusher libraries sign it
    (bunpulse.signatures); `raw` is the body as sent."""
    query = dict(params or {}, auth_key=key, auth_version="1.0",
                 auth_timestamp=str(int(time.time()) if timestamp is None else timestamp))
    if raw:
        query["body_md5"] = body_md5 or hashlib.md5(raw).hexdigest()
    query["auth_signature"] = sign_api_request(secret, method, path, query)
    return query


def signed_request(server, method, path, body=None, params=None, tamper=None, headers=None,
                   timeout=5, **signing):
    """A raw HTTP API request signed by signed_query. body: JSON-able or bytes; tamper(query)
    may spoil the signed query before it is sent; signing: signed_query's options."""
    raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    query = signed_query(method, path, raw or b"", params, **signing)
    if tamper:
        tamper(query)
    return requests.request(method, server.url + path, params=query, data=raw or None,
                            headers={"Content-Type": "application/json", **(headers or {})},
                            timeout=timeout)


def publish_request(path, body, secret=SECRET, extra=b"", version="HTTP/1.1", **params):
    """A signed publish as raw bytes: (head without its blank line, body). `extra`: more head
    lines; `params`: more of the query (signed too)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    query = {"auth_key": KEY, "auth_version": "1.0", "auth_timestamp": str(int(time.time())),
             "body_md5": hashlib.md5(raw).hexdigest(), **params}
    query["auth_signature"] = sign_api_request(secret, "POST", path, query)
    return (f"POST {path}?{urlencode(query)} {version}\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n").encode() + \
        extra, raw


class WholePublisher:
    """Publishes on one keep-alive connection, each request sent whole in one write and
    answered before the next: what BunPulse's event loop serves in its own callback
    (serving/loop.py) when the server is in_the_loop's kind (own app, local adapter, no
    dashboard viewer, no connection hook) and the request is small (one read)."""

    def __init__(self, server):
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.path = f"/apps/{APP_ID}/events"
        self._data = b""

    def publish(self, channel, name, data):
        head, body = publish_request(self.path, {"name": name, "channels": [channel],
                                                 "data": data})
        request = head + b"\r\n" + body
        assert len(request) < 16384, "larger than the loop's first read: not served there"
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self._data:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the publishing connection"
            self._data += chunk
        top, _, rest = self._data.partition(b"\r\n\r\n")
        assert top.startswith(b"HTTP/1.1 200"), top
        length = int(re.search(rb"\r\nContent-Length: (\d+)", top).group(1))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self._data = rest[length:]

    def close(self):
        self.sock.close()


def assert_signatures_kept(response):
    """The answer to a signed request gives away neither the signature sent nor the right one."""
    sent = urlsplit(response.request.url)
    query = dict(parse_qsl(sent.query))
    if "auth_signature" in query:
        right = sign_api_request(SECRET, response.request.method, sent.path, query)
        assert query["auth_signature"] not in response.text and right not in response.text


# ------------------------------------------------------------------------ in-process

def bunpulse_bytes(snapshot, since):
    """Bytes allocated by bunpulse's own code (any line of it on the stack's top frame) that
    are still held in tracemalloc's `snapshot` and were not in `since`."""
    import tracemalloc
    mine = [tracemalloc.Filter(True, "*/bunpulse/*")]
    stats = snapshot.filter_traces(mine).compare_to(since.filter_traces(mine), "filename")
    return sum(stat.size_diff for stat in stats)


def server_frames(data):
    """(opcode, payload) of the whole (unmasked) server frames in `data`, and the bytes after
    them."""
    frames, at = [], 0
    while len(data) - at >= 2:
        n, head = data[at + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[at + 2:at + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[at + 2:at + 10], "big"), 10
        if len(data) - at < head + n:
            break
        frames.append((data[at] & 0x0F, data[at + head:at + head + n]))
        at += head + n
    return frames, data[at:]


class SocketClient:
    """A real bunpulse Connection on one end of a real socket pair, written by its real
    PusherWebSocket and Outbox as they write any client (no core serves it), and the client's
    end, read here. A unix SOCK_SEQPACKET pair: each write of the outbox arrives as one
    record, so a test also sees which frames left together."""

    def __init__(self, app, socket_id):
        from bunpulse.connection import Connection
        from bunpulse.websocket import PusherWebSocket
        served, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        served.setblocking(False)
        self.sock.setblocking(False)
        self.conn = Connection(None, app, PusherWebSocket(served), socket_id)
        self.writes = []  # the records read so far: one per write of the outbox
        self.ended = False  # the server's end shut its writing side (after a close frame)

    def read(self):
        """Take what has arrived (the outbox wrote it before returning, from a greenlet)."""
        while not self.ended:
            try:
                record = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if record:
                self.writes.append(record)
            else:
                self.ended = True
        return self

    def frames(self):
        """(opcode, payload) of every frame received so far; they must all be whole."""
        frames, rest = server_frames(b"".join(self.read().writes))
        assert rest == b"", f"a frame cut short: {rest[:40]!r}"
        return frames

    def messages(self):
        """The payloads of the text frames received so far."""
        return [payload for opcode, payload in self.frames() if opcode == 0x1]

    def close_code(self):
        """The code of the server's close frame, None if none came."""
        closes = [payload for opcode, payload in self.frames() if opcode == 0x8]
        return int.from_bytes(closes[0][:2], "big") if closes else None

    def close(self):
        self.sock.close()
        self.conn.outbox.shutdown()
        self.conn.outbox.release()


@pytest.fixture
def socket_client():
    """Factory: socket_client(app, socket_id) -> SocketClient, closed after the test."""
    made = []

    def make(app, socket_id):
        made.append(SocketClient(app, socket_id))
        return made[-1]

    yield make
    for client in made:
        client.close()


# ------------------------------------------------------------------------ webhooks

class WebhookReceiver:
    """A real HTTP server that records webhook requests; it can be told to fail."""

    def __init__(self):
        self.requests = []
        self.fail_next = 0          # answer 500 to this many requests
        self.fail_status = 500
        self.fail_location = None  # the Location of a failing (3xx) answer
        self.delay = 0.0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._cond:
                    failing = receiver.fail_next > 0
                    if failing:
                        receiver.fail_next -= 1
                    receiver.requests.append({"headers": dict(self.headers), "body": body,
                                              "failed": failing, "at": time.monotonic(),
                                              "method": self.command, "path": self.path})
                    receiver._cond.notify_all()
                self.send_response(receiver.fail_status if failing else 200)
                if failing and receiver.fail_location:
                    self.send_header("Location", receiver.fail_location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST  # noqa: N815 - recorded too: a redirect followed as a GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # a quick shutdown

    def events(self, name=None):
        with self._cond:
            delivered = [r for r in self.requests if not r["failed"] and r["method"] == "POST"]
        out = []
        for request in delivered:
            out.extend(e for e in json.loads(request["body"])["events"]
                       if name is None or e["name"] == name)
        return out

    def wait_events(self, name, count=1, timeout=10):
        return wait_until(lambda: len(self.events(name)) >= count and self.events(name),
                          timeout, message=f"{count} {name} webhook(s)")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


class TricklingReceiver:
    """A real HTTP receiver on a plain socket that answers the first `trickle` requests one
    byte every `every` seconds, never finishing (a receiver that holds the sender), and the
    others at once with 200. Requests are recorded as WebhookReceiver records them."""

    def __init__(self, trickle=1, every=0.2):
        self.trickle, self.every = trickle, every
        self.requests = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        with sock:
            reader = sock.makefile("rb")
            while not self._stop.is_set():
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = reader.read(length)
                trickled = self.trickle > 0
                self.trickle -= trickled
                self.requests.append({"body": body, "failed": trickled,
                                      "at": time.monotonic()})
                if not trickled:
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                try:
                    sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not self._stop.wait(self.every):  # a header line that never ends
                        sock.sendall(b"x")
                except OSError:  # the sender gave up on it
                    pass
                return

    def events(self, name=None):
        return [e for r in self.requests if not r["failed"]
                for e in json.loads(r["body"])["events"] if name is None or e["name"] == name]

    def close(self):
        self._stop.set()
        self._listener.close()


@pytest.fixture
def trickling_receiver():
    receiver = TricklingReceiver()
    yield receiver
    receiver.close()


# ------------------------------------------------------------------------ redis

def redis_answers(port, command=b"PING", expect=b"+PONG"):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(command + b"\r\n")
            return expect in sock.recv(4096)
    except OSError:
        return False


def start_redis(port, *options):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: redis_answers(port), 5, message="redis-server")
    return proc


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout


def stop_redis(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(5)


class RedisServer:
    """One redis-server. `env` is what a BunPulse node needs to use it."""
    cluster = False

    def __init__(self, port=None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {"BUNPULSE_REDIS_URL": self.url}
        self.start()

    def start(self):
        self.proc = start_redis(self.port)

    def stop(self):
        stop_redis(self.proc)

    def cli(self, *args):
        return redis_cli(self.port, *args)

    def listeners(self, channel):
        """How many connections are subscribed to a pub/sub channel."""
        return int(self.cli("pubsub", "numsub", channel).split()[1])


class RedisClusterServer:
    """A Redis Cluster of three masters and one replica (of the first master), each a
    redis-server in cluster mode; a BunPulse node gets the first master as its seed."""
    cluster = True
    NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica takes over

    def __init__(self):
        if redis_server_version() < (7, 0):
            pytest.skip("Redis Cluster's sharded pub/sub needs redis-server 7.0 or later")
        self.dir = tempfile.mkdtemp(prefix="bunpulse-cluster-")
        self.ports = []
        while len(self.ports) < 4:
            port = free_port()  # each node also listens on port + 10000, its cluster bus
            if port < 55000 and port not in self.ports and _port_free(port + 10000):
                self.ports.append(port)
        self.procs = {}
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self):
        for port in self.ports:
            self._start(port)
        masters = [f"127.0.0.1:{port}" for port in self.ports[:3]]
        subprocess.run(["redis-cli", "--cluster", "create", *masters, "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        self.wait_ok(self.ports[:3])
        master_id = self.cli(self.ports[0], "cluster", "myid").strip()
        subprocess.run(["redis-cli", "--cluster", "add-node", f"127.0.0.1:{self.ports[3]}",
                        masters[0], "--cluster-slave", "--cluster-master-id", master_id],
                       check=True, capture_output=True, timeout=30)
        wait_until(lambda: "master_link_status:up" in self.cli(self.ports[3], "info",
                                                               "replication"),
                   15, interval=0.1, message="the replica in sync")
        self.wait_ok()
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"
        self.env = {"BUNPULSE_REDIS_URL": self.url, "BUNPULSE_REDIS_CLUSTER": "true"}

    def _start(self, port):
        self.procs[port] = start_redis(
            port, "--cluster-enabled", "yes", "--dir", self.dir,
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS))

    def cli(self, port, *args):
        return redis_cli(port, *args)

    def listeners(self, channel):
        """How many connections are subscribed to a sharded pub/sub channel."""
        return int(self.cli(self.master_of(channel), "pubsub", "shardnumsub",
                            channel).split()[1])

    def wait_ok(self, ports=None, timeout=20):
        for port in ports or [p for p, proc in self.procs.items() if proc.poll() is None]:
            wait_until(lambda: "cluster_state:ok" in self.cli(port, "cluster", "info"),
                       timeout, interval=0.1, message=f"cluster state ok on {port}")

    def master_of(self, key):
        """The port of the master that owns key's slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key))
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no master owns {key}")

    def flush(self):
        for port, proc in self.procs.items():
            if proc.poll() is None and "role:master" in self.cli(port, "info", "replication"):
                self.cli(port, "flushall")

    def kill(self, port):
        stop_redis(self.procs[port], signal.SIGKILL)

    def start(self):
        """Start every stopped node again (the cluster's layout is kept in its files)."""
        for port, proc in self.procs.items():
            if proc.poll() is not None:
                self._start(port)
        self.wait_ok()

    def stop(self):
        for proc in self.procs.values():
            stop_redis(proc)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_server_version():
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    version = out.split("v=")[1].split()[0]
    return tuple(int(part) for part in version.split(".")[:2])


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


# ------------------------------------------------------------------------ TLS

class Certificates:
    """A certificate authority made for the test run, and a server certificate it signed for
    127.0.0.1 and localhost: ca, cert, key (PEM files) and encrypted_key (passphrase
    `password`)."""

    password = "correct horse"

    def __init__(self, directory):
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)

        def name(common):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        def build(subject, issuer, public_key):
            return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                    .public_key(public_key).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=2)))

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (build(name("BunPulse test CA"), name("BunPulse test CA"), ca_key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (build(name("localhost"), ca_cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))

        def write(filename, data):
            path = os.path.join(directory, filename)
            with open(path, "wb") as handle:
                handle.write(data)
            return path

        pem = serialization.Encoding.PEM
        self.ca = write("ca.pem", ca_cert.public_bytes(pem))
        self.cert = write("server.pem", cert.public_bytes(pem))
        self.key = write("server.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.encrypted_key = write("server-encrypted.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self.password.encode())))

    def env(self, encrypted=False):
        """The server settings that serve TLS with this certificate."""
        env = {"BUNPULSE_SSL_CERT": self.cert,
               "BUNPULSE_SSL_KEY": self.encrypted_key if encrypted else self.key}
        if encrypted:
            env["BUNPULSE_SSL_KEY_PASSWORD"] = self.password
        return env


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    return Certificates(str(tmp_path_factory.mktemp("tls")))
