"""The deployment files in deploy/: nginx and Caddy in front of BunPulse on loopback, each run
for real (Debian's packages, installed by scripts/test) with pusher-js over wss:// and both
server libraries over https:// through it; and the systemd unit, checked by systemd-analyze."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pusher
import pytest

from conftest import APP_ID, KEY, ROOT, SECRET, free_port, wait_until

DEPLOY = os.path.join(ROOT, "deploy")
MAX_ACTIVITY_TIMEOUT = 120  # seconds a pusher-js client may stay silent before it pings


def read(name):
    with open(os.path.join(DEPLOY, name)) as handle:
        return handle.read()


def binary(name):
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs Debian's {name})")
    return path


class Proxy:
    """A reverse proxy in a subprocess, listening with TLS on a free port of 127.0.0.1; what
    NodeDriver needs to connect through it (host, port, tls, ca)."""

    host = "127.0.0.1"
    tls = True

    def __init__(self, command, port, ca, env=None):
        self.port, self.ca = port, ca
        self.log_file = open(os.path.join(os.path.dirname(command[-1]), "proxy.log"), "w+")
        self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        wait_until(self._listening, 15, message=f"{command[0]} listening")

    def _listening(self):
        if self.proc.poll() is not None:
            self.log_file.seek(0)
            raise AssertionError(f"the proxy exited: {self.log_file.read()}")
        try:
            socket.create_connection((self.host, self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        self.log_file.close()


def start_nginx(tmp_path, upstream, certificates):
    port = free_port()
    site = (read("nginx.conf")
            .replace("127.0.0.1:6001", f"127.0.0.1:{upstream}")
            .replace("listen 443 ssl", f"listen 127.0.0.1:{port} ssl")
            .replace("/etc/ssl/bunpulse/fullchain.pem", certificates.cert)
            .replace("/etc/ssl/bunpulse/privkey.pem", certificates.key))
    (tmp_path / "site.conf").write_text(site)
    temp = {name: tmp_path / name for name in ("client", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {temp['client']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    include {tmp_path}/site.conf;
}}
""")
    return Proxy([binary("nginx"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                 port, certificates.ca)


def start_caddy(tmp_path, upstream, certificates):
    port = free_port()
    site = (read("Caddyfile")
            .replace("pusher.example.com", f"https://127.0.0.1:{port}")
            .replace("127.0.0.1:6001", f"127.0.0.1:{upstream}")
            .replace("/etc/ssl/bunpulse/fullchain.pem", certificates.cert)
            .replace("/etc/ssl/bunpulse/privkey.pem", certificates.key))
    # No admin endpoint and no redirect listener on :80: tests run side by side.
    config = tmp_path / "Caddyfile"
    config.write_text("{\n\tadmin off\n\tauto_https disable_redirects\n}\n\n" + site)
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    return Proxy([binary("caddy"), "run", "--adapter", "caddyfile", "--config", str(config)],
                 port, certificates.ca, env=env)


@pytest.mark.parametrize("start_proxy", [start_nginx, start_caddy], ids=["nginx", "caddy"])
def test_pusher_clients_through_the_proxy(start_proxy, start_server, node_for, certificates,
                                          tmp_path):
    server = start_server(env={"BUNPULSE_ACCESS_LOG": "true"})
    proxy = start_proxy(tmp_path, server.port, certificates)
    try:
        node = node_for(proxy)  # pusher-js over wss:// and the npm library over https://
        node.connect("a", presence={"user_id": "u1", "user_info": {"name": "A"}})
        node.connect("b")
        node.subscribe("a", "presence-proxied")
        node.subscribe("b", "private-proxied")
        node.subscribe("a", "private-proxied")  # receives b's client event
        reply = node.call("api", method="trigger", args=["private-proxied", "npm", {"n": 1}])
        assert reply["ok"], reply
        assert node.wait_event("b", "npm", "private-proxied")["data"] == {"n": 1}
        api = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host=proxy.host,
                            port=proxy.port, ssl=True)
        api._pusher_client.http.options["verify"] = certificates.ca
        api.trigger("presence-proxied", "pypi", {"n": 2})
        assert node.wait_event("a", "pypi", "presence-proxied")["data"] == {"n": 2}
        assert api.channel_info("presence-proxied", ["user_count"])["user_count"] == 1
        node.call("trigger", id="b", channel="private-proxied", event="client-x", data={"n": 3})
        assert node.wait_event("a", "client-x", "private-proxied")["data"] == {"n": 3}
        api._pusher_client.http.session.close()
        # the client's address reaches BunPulse's access log through the proxy
        wait_until(lambda: "(forwarded for 127.0.0.1)" in server.log(), message="access log")
        assert re.search(r"POST /apps/1/events 200 .* from 127\.0\.0\.1 \(forwarded for "
                         r"127\.0\.0\.1\)", server.log())
    finally:
        proxy.stop()


def test_proxy_timeouts_outlast_the_heartbeat():
    nginx = read("nginx.conf")
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = int(re.search(rf"^\s*{directive} (\d+)s;", nginx, re.M).group(1))
        assert seconds > MAX_ACTIVITY_TIMEOUT, directive
    caddy = read("Caddyfile")
    for directive in ("read_timeout", "write_timeout"):
        seconds = int(re.search(rf"^\s*{directive} (\d+)s$", caddy, re.M).group(1))
        assert seconds > MAX_ACTIVITY_TIMEOUT, directive
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx


def gunicorn_graceful_timeout(**env):
    """gunicorn.conf.py's graceful_timeout under the default settings and `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BUNPULSE_", "PUSHER_"))}
    answer = subprocess.run(
        [sys.executable, "-c", "import runpy; print(runpy.run_path('gunicorn.conf.py')"
                               "['graceful_timeout'])"],
        cwd=ROOT, env={**clean, "BUNPULSE_ENV_FILE": os.devnull, **env}, capture_output=True,
        text=True, timeout=30)
    assert answer.returncode == 0, answer.stderr
    return int(answer.stdout)


def test_graceful_timeout_makes_room_for_the_shutdown_grace():
    assert gunicorn_graceful_timeout(BUNPULSE_SHUTDOWN_GRACE_MS="12500") == 7 + 13


def test_the_systemd_unit_verifies_and_stops_gracefully(tmp_path):
    analyze = shutil.which("systemd-analyze")
    unit = read("bunpulse.service")
    assert re.search(r"^LimitNOFILE=\d{5,}$", unit, re.M)
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    graceful = gunicorn_graceful_timeout()
    assert graceful >= 10  # 7 s for a successor on a reload, and the default shutdown grace
    assert stop_timeout > graceful  # systemd never kills workers still saying goodbye
    if analyze is None:
        pytest.skip("systemd-analyze is not available here")
    # The paths the unit names, made real: verify checks that the command exists.
    local = unit.replace("/opt/bunpulse/.venv", os.path.join(ROOT, ".venv")).replace(
        "/opt/bunpulse", ROOT)
    path = tmp_path / "bunpulse.service"
    path.write_text(local)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # and it does find mistakes
    path.write_text(local.replace("ExecStart=", "ExecStrat="))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 or "ExecStrat" in result.stderr
