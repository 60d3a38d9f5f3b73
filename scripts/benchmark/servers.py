"""The server under test: a `python -m bunpulse` or gunicorn started here (pinned to CPUs), or
one already running on this machine, given by URL. Only loopback addresses are accepted."""
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, urlparse

from . import BenchError
from .loadgen import signed_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loopback_only(host):
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise SystemExit(f"bench: cannot resolve {host}") from None
    if not address.is_loopback:
        raise SystemExit(f"bench: {host} is not a loopback address: this tool only loads "
                         "servers on this machine (127.0.0.0/8)")
    return str(address)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url, proc=None, timeout=20):
    deadline = time.monotonic() + timeout
    parsed = urlparse(url)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{url} did not answer within {timeout}s")


class ServerUnderTest:
    """Where the load goes: host, ports, credentials, and the server's pids when known."""

    name = "url"
    app_id, key, secret = "1", "bench-key", "bench-secret"

    def __init__(self, ws_url, http_url, app_id, key, secret, pids=()):
        ws, api = urlparse(ws_url), urlparse(http_url)
        self.ws_address = (loopback_only(ws.hostname), ws.port or 80)
        self.http_address = (loopback_only(api.hostname), api.port or 80)
        self.ws_prefix = ws.path.rstrip("/")
        self.app_id, self.key, self.secret = app_id, key, secret
        self._pids = list(pids)
        self.http_url = http_url

    def pids(self):
        """The processes that serve sockets (workers), whose CPU and memory are measured."""
        return [pid for pid in self._pids if os.path.exists(f"/proc/{pid}")]

    def cpu_pids(self):
        return self.pids()

    def ws_request(self):
        path = f"{self.ws_prefix}/app/{self.key}?protocol=7&client=bench&version=1.0"
        return (f"GET {path} HTTP/1.1\r\nHost: {self.ws_address[0]}:{self.ws_address[1]}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "\r\n").encode()

    def api_get(self, path, extra=None):
        """A signed GET on the HTTP API, outside the measured phases (blocking)."""
        conn = http.client.HTTPConnection(*self.http_address, timeout=10)
        try:
            conn.request("GET", signed_path("GET", path, b"", self.key, self.secret, extra))
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise BenchError(f"GET {path}: {response.status} {body[:200]!r}")
        return json.loads(body)

    def channel_info(self, name, info=None):
        extra = {"info": info} if info else None
        return self.api_get(f"/apps/{self.app_id}/channels/{quote(name, safe='')}", extra)

    def stop(self):
        pass


class LocalServer(ServerUnderTest):
    """`python -m bunpulse` in a subprocess, pinned to `cpus`."""

    name = "local"

    def __init__(self, cpus, env=None, command=None, label="local", root=ROOT):
        self.name = label
        port = free_port()
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="bunpulse-bench-",
                                                    suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BUNPULSE_", "PUSHER_"))}
        full_env.update({"PUSHER_APP_ID": self.app_id, "PUSHER_APP_KEY": self.key,
                         "PUSHER_APP_SECRET": self.secret, "BUNPULSE_HOST": "127.0.0.1",
                         "BUNPULSE_PORT": str(port), "BUNPULSE_LOG_LEVEL": "warning",
                         "BUNPULSE_ENV_FILE": os.devnull, "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})

        def pin():
            if cpus:
                os.sched_setaffinity(0, cpus)

        command = command or [sys.executable, "-m", "bunpulse"]
        self.proc = subprocess.Popen(command, cwd=root, env=full_env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=pin,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url, self.proc)
        except BenchError:
            tail = self.log_tail()  # before stop() removes the log
            self.stop()
            raise BenchError(f"the server did not start:\n{tail}") from None
        super().__init__(f"ws://127.0.0.1:{port}", url, self.app_id, self.key, self.secret,
                         [self.proc.pid])

    def log_tail(self, lines=30):
        with open(self.log_file.name) as handle:
            return "".join(handle.readlines()[-lines:])

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log_file.close()
        os.unlink(self.log_file.name)


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


class GunicornServer(LocalServer):
    """`gunicorn -c gunicorn.conf.py` with N workers (N > 1 needs Redis: given or started)."""

    def __init__(self, cpus, workers, redis_url=None, root=ROOT, env=None):
        self.redis = None
        env = dict(env or {}, BUNPULSE_WORKERS=str(workers))
        if workers > 1 and not redis_url:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("bench: --workers above 1 needs Redis: install redis-server "
                                 "or pass --redis-url")
            port = free_port()
            self.redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            redis_url = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.2)
        if redis_url:
            env["BUNPULSE_REDIS_URL"] = redis_url
        self.workers = workers
        super().__init__(cpus, env, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                         label=f"gunicorn-{workers}w", root=root)
        deadline = time.monotonic() + 20
        while len(children(self.proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)

    def pids(self):
        return children(self.proc.pid)

    def cpu_pids(self):
        # The master, the workers, and the redis-server started here: the whole deployment.
        return [self.proc.pid] + self.pids() + ([self.redis.pid] if self.redis else [])

    def stop(self):
        super().stop()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(5)


