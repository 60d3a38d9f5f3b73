"""TLS on the public port (wss:// and https://) from `python -m bunpulse` and from gunicorn,
with a certificate authority made for the test: pusher-js (forceTLS), the npm and PyPI server
libraries, and the errors a bad certificate setting gets."""
import json
import socket
import ssl
import subprocess
import sys
import time

import pusher
import pytest
import requests

from conftest import APP_ID, KEY, ROOT, SECRET, RawClient, ServerProcess, connected, free_port

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


def tls_api(server):
    api = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host=server.host,
                        port=server.port, ssl=True)
    # With ssl=True the library verifies against its own CA bundle, passed to requests as
    # `verify`: the test's CA replaces it there.
    api._pusher_client.http.options["verify"] = server.ca
    return api


def exercise(server, node_for):
    """pusher-js over wss://, triggered by both server libraries over https://."""
    node = node_for(server)
    node.connect("a", presence={"user_id": "u1", "user_info": {}})
    node.subscribe("a", "private-secure")
    node.subscribe("a", "presence-secure")
    assert node.call("state", id="a")["result"] == "connected"
    reply = node.call("api", method="trigger", args=["private-secure", "from-npm", {"n": 1}])
    assert reply["ok"], reply
    assert node.wait_event("a", "from-npm", "private-secure")["data"] == {"n": 1}
    api = tls_api(server)
    api.trigger("private-secure", "from-pypi", {"n": 2})
    assert node.wait_event("a", "from-pypi", "private-secure")["data"] == {"n": 2}
    assert api.channel_info("presence-secure", ["user_count"])["user_count"] == 1
    reply = node.call("api", method="get", args=[{"path": "/channels"}])
    assert reply["ok"] and "private-secure" in reply["result"]["body"]["channels"], reply
    api._pusher_client.http.session.close()  # no idle keep-alive to hold a gunicorn stop


def test_embedded_server_serves_wss_and_https(start_server, certificates, node_for):
    server = start_server(env=certificates.env(), ca=certificates.ca)
    exercise(server, node_for)
    assert "wss://127.0.0.1" in server.log()


def test_gunicorn_serves_wss_and_https_with_an_encrypted_key(start_server, certificates,
                                                             node_for):
    server = start_server(command=GUNICORN, env=certificates.env(encrypted=True),
                          ca=certificates.ca)
    exercise(server, node_for)


def test_the_certificate_is_the_one_configured_and_plain_ws_is_refused(start_server,
                                                                      certificates):
    server = start_server(env=certificates.env(encrypted=True), ca=certificates.ca)
    context = ssl.create_default_context(cafile=certificates.ca)
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7", sslopt={"context": context})
    try:
        connected(client)
    finally:
        client.close()
    with pytest.raises(requests.exceptions.SSLError):  # not signed by a CA the client trusts
        requests.get(server.url + "/health", timeout=5)
    with pytest.raises(Exception):  # noqa: B017 - a plain handshake on a TLS port fails
        RawClient(f"ws://{server.host}:{server.port}/app/{KEY}?protocol=7", timeout=3)
    assert requests.get(server.url + "/health", timeout=5, verify=certificates.ca).ok


@pytest.mark.parametrize("command", [None, GUNICORN], ids=["python -m", "gunicorn"])
def test_on_a_tls_port_the_deadline_covers_the_tls_handshake_and_the_request(
        start_server, certificates, command):
    """A silent TCP connection, one that stops mid-TLS-handshake and one that completes TLS
    but sends half a request are all closed within --handshake-timeout of their accept; the
    server serves others meanwhile."""
    server = start_server(command=command, ca=certificates.ca, env={
        **certificates.env(), "BUNPULSE_HANDSHAKE_TIMEOUT": "1000"})
    context = ssl.create_default_context(cafile=certificates.ca)
    silent = socket.create_connection((server.host, server.port), timeout=5)
    halfway = socket.create_connection((server.host, server.port), timeout=5)
    halfway.sendall(b"\x16\x03\x01\x00\xc8\x01")  # the start of a ClientHello, no more
    partial = context.wrap_socket(socket.create_connection((server.host, server.port),
                                                           timeout=5),
                                  server_hostname="localhost")
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: incomplete
    started = time.monotonic()
    assert requests.get(server.url + "/health", timeout=5, verify=certificates.ca).ok
    for sock in (silent, halfway, partial):
        try:
            data = sock.recv(4096)
            while data and not data.startswith(b"HTTP/1.1 408"):
                data = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            pass
        sock.close()
    assert time.monotonic() - started < 3.5  # 1 s, and slack for a loaded machine


@pytest.mark.parametrize("case, expected", [
    ("missing key", "--ssl-cert and --ssl-key must be set together"),
    ("missing file", "No such file or directory"),
    ("no passphrase", "--ssl-key is encrypted: set --ssl-key-password"),
    ("wrong passphrase", "cannot use --ssl-cert="),
])
def test_a_bad_tls_setting_stops_start_up_with_one_clear_line(certificates, case, expected):
    env = {"missing key": {"BUNPULSE_SSL_CERT": certificates.cert},
           "missing file": {"BUNPULSE_SSL_CERT": certificates.cert,
                            "BUNPULSE_SSL_KEY": "/nonexistent/server.key"},
           "no passphrase": {"BUNPULSE_SSL_CERT": certificates.cert,
                             "BUNPULSE_SSL_KEY": certificates.encrypted_key},
           "wrong passphrase": dict(certificates.env(encrypted=True),
                                    BUNPULSE_SSL_KEY_PASSWORD="wrong")}[case]
    for command in ([sys.executable, "-m", "bunpulse"], GUNICORN):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30,
                                env=dict(ServerProcess.base_env(free_port()), **env))
        assert result.returncode != 0
        assert expected in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr


def test_events_larger_than_the_socket_buffers_arrive_whole_and_in_order(start_server,
                                                                       certificates):
    # Writes that do not fit go through the outbox's writer: TLS records must be written
    # again from their start, or the client sees a corrupt stream.
    server = start_server(env=certificates.env(), ca=certificates.ca)
    api = tls_api(server)
    context = ssl.create_default_context(cafile=certificates.ca)
    clients = [RawClient(server.ws_url + f"/app/{KEY}?protocol=7", timeout=20,
                         sslopt={"context": context},
                         sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
               for _ in range(3)]
    try:
        for client in clients:
            connected(client)
            client.send({"event": "pusher:subscribe", "data": {"channel": "bulk"}})
            client.recv_event("pusher_internal:subscription_succeeded")
        for n in range(6):
            api.trigger_batch([{"channel": "bulk", "name": "big",
                                "data": json.dumps({"n": n * 10 + i, "blob": "x" * 9000})}
                               for i in range(10)])
        for client in clients:
            numbers = [json.loads(client.recv_event("big")["data"])["n"] for _ in range(60)]
            assert numbers == list(range(60))
    finally:
        for client in clients:
            client.close()
