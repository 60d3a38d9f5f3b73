"""Where Flask and WSGI users already are, end to end with pusher-js and the official libraries:
`flask --app bunpulse run` (with and without --debug), gunicorn's stock gevent-websocket worker
and BunPulse's own serving `bunpulse:create_app()`, and BunPulse mounted at /realtime in a Flask
application and in a Django project under both workers.

Each way gets the same checks: a connection, an unknown key closed with 4001, a public event, a
private channel authorized through bunpulse.authorizer, a presence channel with the host's user,
a signin, and a publish from the host application's code. A standalone BunPulse has no host: a
Flask app in this test process plays it (the helper signs with the app's credentials, and
publishes with the PyPI library). One server and one pusher-js driver serve a way's checks."""
import json
import os
import signal
import socket
import sys
import threading
import time

import pusher
import pytest
import requests
from flask import Flask, request
from werkzeug.serving import make_server

from bunpulse.apps import App
from bunpulse.authorizer import auth_blueprint
from conftest import (APP_ID, KEY, MASTER_KEY, ROOT, SECRET, NodeDriver, RawClient,
                      ServerProcess, free_port, gunicorn_workers, only_worker, raw_signin,
                      read_json_answer, signed_query)

STOCK = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
OWN = "bunpulse.worker.PusherWorker"
GUNICORN = [sys.executable, "-m", "gunicorn"]
FLASK_RUN = [sys.executable, "-m", "flask"]
PREFIX = "/realtime"
HOSTS_PATH = os.pathsep.join([ROOT, os.path.join(ROOT, "tests", "hosts"),
                              os.path.join(ROOT, "tests", "django_host")])

# way: (command, args after the port is known, mounted at PREFIX)
WAYS = {
    "flask run": (FLASK_RUN, lambda port: ["--app", "bunpulse", "run", "--port", str(port)],
                  False),
    "flask run --debug": (FLASK_RUN, lambda port: ["--app", "bunpulse", "run", "--debug",
                                                   "--port", str(port)], False),
    "stock worker": (GUNICORN, lambda port: ["-k", STOCK, "-b", f"127.0.0.1:{port}",
                                             "bunpulse:create_app()"], False),
    "own worker": (GUNICORN, lambda port: ["-k", OWN, "-b", f"127.0.0.1:{port}",
                                           "bunpulse:create_app()"], False),
    "flask host, stock worker": (GUNICORN, lambda port: ["-k", STOCK, "-b", f"127.0.0.1:{port}",
                                                         "flask_host:app"], True),
    "flask host, own worker": (GUNICORN, lambda port: ["-k", OWN, "-b", f"127.0.0.1:{port}",
                                                       "flask_host:app"], True),
    "flask host, flask run --debug": (FLASK_RUN, lambda port: [
        "--app", "flask_host", "run", "--debug", "--port", str(port)], True),
    "django, stock worker": (GUNICORN, lambda port: [
        "-k", STOCK, "-b", f"127.0.0.1:{port}", "hostproject.wsgi:application"], True),
    "django, own worker": (GUNICORN, lambda port: [
        "-k", OWN, "-b", f"127.0.0.1:{port}", "hostproject.wsgi:application"], True),
}

HOST_ENV = {"PYTHONPATH": HOSTS_PATH, "FLASK_SKIP_DOTENV": "1", "BUNPULSE_WORKERS": "1",
            "HOST_ENCRYPTION_MASTER_KEY": MASTER_KEY,
            # Limits the checks below reach quickly: 1009 past 4 KiB, 4201 after 2.5 s of silence.
            "BUNPULSE_MAX_MESSAGE_SIZE": "4096", "BUNPULSE_HEARTBEAT_INTERVAL": "1000",
            "BUNPULSE_HEARTBEAT_TIMEOUT": "2500"}


def start_way(name, env=None):
    command, args, mounted = WAYS[name]
    port = free_port()
    server = ServerProcess(command=command, args=args(port), port=port,
                           env=dict(HOST_ENV, **(env or {})),
                           health=(PREFIX if mounted else "") + "/health")
    server.prefix = PREFIX if mounted else ""
    return server


class StandaloneHost:
    """The host application of a standalone BunPulse, in this process: the helper with the
    app's credentials, and a publish through the PyPI library."""

    def __init__(self):
        app = Flask("standalone_host")
        app.register_blueprint(auth_blueprint(
            App(id=APP_ID, key=KEY, secret=SECRET), current_user,
            encryption_master_key=MASTER_KEY, allow=may_join))

        @app.post("/notify")
        def notify():
            message = request.get_json()
            library = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1",
                                    port=message["port"], ssl=False)
            library.trigger(message["channel"], message["event"], message["data"])
            return {"published": message["channel"]}

        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def current_user(request):
    name = request.headers.get("X-User")
    return None if name is None else {"id": name, "user_info": {"name": name.title()}}


def may_join(user, channel):
    """The hosts' rule (tests/hosts/flask_host.py, the README's): own user channel only."""
    if channel.startswith("private-user-"):
        return channel == f"private-user-{user['id']}"
    return True


@pytest.fixture(scope="module")
def standalone_host():
    host = StandaloneHost()
    yield host
    host.close()


class Way:
    """A running way: its server, a pusher-js driver for it, where pusher-js authorizes, and
    how the host application publishes."""

    def __init__(self, name, server, host):
        self.name, self.server = name, server
        self.prefix = server.prefix
        self.node = NodeDriver(server, prefix=self.prefix)
        self.auth_base = server.url if self.prefix else host.url

    def connect(self, id, user=None):
        headers = {"X-User": user} if user else {}
        return self.node.connect(id, authBase=self.auth_base, headers=headers)

    def publish_from_host(self, channel, event, data):
        answer = requests.post(self.auth_base + "/notify", json={
            "channel": channel, "event": event, "data": data, "port": self.server.port},
            timeout=10)
        assert answer.status_code == 200, answer.text

    def close(self):
        self.node.close()
        self.server.stop()


@pytest.fixture(scope="module", params=list(WAYS))
def way(request, standalone_host):
    running = Way(request.param, start_way(request.param), standalone_host)
    yield running
    running.close()
    log = running.server.log()
    assert "Traceback" not in log and "Error on request" not in log, log[-3000:]


def test_connects_and_an_unknown_key_is_closed_with_4001(way):
    assert way.connect("plain")
    way.node.call("connect", id="badkey", key="no-such-key")
    error = way.node.wait(lambda r: r.get("type") == "error" and r["id"] == "badkey")
    assert error["error"]["error"]["data"]["code"] == 4001
    way.node.wait(lambda r: r.get("type") == "state" and r["id"] == "badkey"
                  and r["current"] in ("disconnected", "failed"), what="badkey given up")
    raw = RawClient(way.server.ws_url + way.prefix + "/app/no-such-key?protocol=7")
    try:
        assert raw.recv()["data"]["code"] == 4001
        assert raw.recv_close()[0] == 4001
    finally:
        raw.close()


def test_public_event_from_the_official_libraries(way):
    way.connect("pub")
    way.node.subscribe("pub", "public-news")
    way.node.call("api", method="trigger", args=["public-news", "from-npm", {"n": 1}])
    assert way.node.wait_event("pub", "from-npm")["data"] == {"n": 1}
    if not way.prefix:  # the PyPI library has no path prefix (see test_http_api_under_the_prefix)
        library = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1",
                                port=way.server.port, ssl=False)
        started = time.monotonic()
        library.trigger("public-news", "from-pypi", {"n": 2})
        assert time.monotonic() - started < 2  # answered at once, not when the client gives up
        assert way.node.wait_event("pub", "from-pypi")["data"] == {"n": 2}


def test_private_and_encrypted_channels_through_the_helper(way):
    way.connect("alice-1", user="alice")
    way.connect("bob-1", user="bob")
    way.connect("nobody")
    for client in ("alice-1", "bob-1"):
        way.node.subscribe(client, "private-room")
    way.node.call("trigger", id="bob-1", channel="private-room", event="client-hi", data={"a": 1})
    assert way.node.wait_event("alice-1", "client-hi")["data"] == {"a": 1}
    way.node.call("subscribe", id="nobody", channel="private-room")
    refusal = way.node.wait_event("nobody", "pusher:subscription_error", "private-room")
    assert refusal["data"]["status"] == 403
    # The host's rule: a user's own channel is theirs only.
    way.node.subscribe("alice-1", "private-user-alice")
    way.node.call("subscribe", id="alice-1", channel="private-user-bob")
    refusal = way.node.wait_event("alice-1", "pusher:subscription_error", "private-user-bob")
    assert refusal["data"]["status"] == 403
    way.node.subscribe("alice-1", "private-encrypted-room")
    way.node.call("api", method="trigger", args=["private-encrypted-room", "secret", {"s": 1}])
    assert way.node.wait_event("alice-1", "secret", "private-encrypted-room")["data"] == {"s": 1}


def test_presence_channel_with_the_host_user(way):
    way.connect("alice-2", user="alice")
    way.connect("bob-2", user="bob")
    joined = way.node.subscribe("alice-2", "presence-room")["data"]
    assert joined["me"] == {"id": "alice", "info": {"name": "Alice"}}
    way.node.subscribe("bob-2", "presence-room")
    added = way.node.wait_event("alice-2", "pusher:member_added", "presence-room")
    assert added["data"] == {"id": "bob", "info": {"name": "Bob"}}


def test_signin_with_the_host_user(way):
    way.connect("alice-3", user="alice")
    way.node.call("signin", id="alice-3")
    success = way.node.wait(lambda r: r.get("type") == "message" and r["id"] == "alice-3"
                            and r["event"] == "pusher:signin_success", what="signin_success")
    assert json.loads(success["data"]["user_data"]) == {"id": "alice",
                                                         "user_info": {"name": "Alice"}}


def test_publish_from_the_host_application_code(way):
    way.connect("reader")
    way.node.subscribe("reader", "public-host")
    way.publish_from_host("public-host", "from-host", {"hello": "world"})
    assert way.node.wait_event("reader", "from-host")["data"] == {"hello": "world"}


def test_http_api_under_the_prefix(way):
    """Signed over the full path as sent, or over the path below the prefix: both accepted."""
    if not way.prefix:
        pytest.skip("not mounted")
    below = f"/apps/{APP_ID}/channels"
    for signed in (way.prefix + below, below):
        answer = requests.get(way.server.url + way.prefix + below,
                              params=signed_query("GET", signed), timeout=5)
        assert answer.status_code == 200, (signed, answer.text)
    answer = requests.get(way.server.url + way.prefix + below,
                          params=signed_query("GET", "/elsewhere" + below), timeout=5)
    assert answer.status_code == 401


# ------------------------------------------------------------------------ the same transport

def raw_client(way, key=KEY):
    client = RawClient(way.server.ws_url + way.prefix + f"/app/{key}?protocol=7", timeout=10)
    client.socket_id = json.loads(client.recv_event("pusher:connection_established")
                                  ["data"])["socket_id"]
    return client


def test_an_oversized_message_is_closed_with_1009(way):
    client = raw_client(way)
    try:
        client.send({"event": "client-big", "data": "x" * 5000})
        assert client.recv_close()[0] == 1009
    finally:
        client.close()


def test_a_silent_client_is_closed_with_4201(way):
    client = raw_client(way)
    try:
        assert client.recv_event("pusher:ping")  # and no pong: the timeout closes it
        assert client.recv_close()[0] == 4201
    finally:
        client.close()


def test_terminated_user_is_closed_with_4009(way):
    client = raw_client(way)
    try:
        raw_signin(client, client.socket_id, {"id": "doomed"})
        client.recv_event("pusher:signin_success")
        reply = way.node.call("api", method="terminateUserConnections", args=["doomed"])
        assert reply["ok"] and reply["result"]["status"] == 200, reply
        assert client.recv_close()[0] == 4009
    finally:
        client.close()


# ------------------------------------------------------------------------ HTTP bodies

def raw_request(way, head, body=b"", half_close=False):
    with socket.create_connection(("127.0.0.1", way.server.port), timeout=5) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_json_answer(sock)


def test_a_body_is_read_to_its_content_length_and_answered_at_once(way):
    """The connection stays open after the body: the server must not wait for more."""
    body = json.dumps({"name": "e", "channel": "c", "data": "{}"}).encode()
    started = time.monotonic()
    answer = raw_request(way, (signed_publish(way, body) + f"Content-Length: {len(body)}\r\n\r\n")
                         .encode(), body)
    assert answer.startswith("HTTP/1.1 200"), answer
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("head, body, status, error", [
    (b"Content-Length: 20000000", b"x" * 65536, 413, "Request body is larger than"),
    (b"Content-Length: 1000", b"{}", 400, "Incomplete request body"),
])
def test_bad_bodies_get_a_clear_answer(way, head, body, status, error):
    answer = raw_request(way, f"POST {way.prefix}/apps/{APP_ID}/events HTTP/1.1\r\nHost: x\r\n"
                              .encode() + head + b"\r\n\r\n", body, half_close=True)
    assert answer.startswith(f"HTTP/1.1 {status}"), answer
    assert error in answer
    assert requests.get(way.server.url + way.prefix + "/health", timeout=5).status_code == 200


# ------------------------------------------------------------------------ stopping, scaling

def test_stock_worker_tells_clients_to_reconnect_when_it_stops():
    """The stock worker tells the application nothing: BunPulse sees its server close."""
    server = start_way("stock worker")
    # Said once, at start-up: before any WebSocket has connected.
    assert server.log().count("BunPulse is served by gevent-websocket's stock handler") == 1
    try:
        clients = [RawClient(server.ws_url + f"/app/{KEY}?protocol=7", timeout=10)
                   for _ in range(3)]
        for client in clients:
            client.recv_event("pusher:connection_established")
        server.signal(signal.SIGTERM)
        for client in clients:
            assert client.recv_event("pusher:error")["data"]["code"] == 4200
            assert client.recv_close()[0] == 4200
            client.close()
        assert server.proc.wait(10) == 0
    finally:
        server.stop()
    assert server.log().count("BunPulse is served by gevent-websocket's stock handler") == 1


@pytest.mark.parametrize("name", ["flask host, stock worker", "django, own worker"])
def test_host_publish_reaches_clients_on_every_worker(name, redis_server):
    server = start_way(name, env={"BUNPULSE_WORKERS": "2", "BUNPULSE_REDIS_URL": redis_server.url})
    clients = []
    try:
        prefixes = []
        for worker in gunicorn_workers(server):  # a client on each worker, reached on purpose
            with only_worker(server, worker):
                clients.append(RawClient(server.ws_url + PREFIX + f"/app/{KEY}?protocol=7",
                                         timeout=10))
                socket_id = json.loads(clients[-1].recv_event(
                    "pusher:connection_established")["data"])["socket_id"]
            prefixes.append(socket_id.split(".")[0])  # the worker's own part of the id
            clients[-1].send({"event": "pusher:subscribe", "data": {"channel": "public-all"}})
            clients[-1].recv_event("pusher_internal:subscription_succeeded")
        assert len(set(prefixes)) == 2
        for n in range(2):
            answer = requests.post(server.url + "/notify", json={
                "channel": "public-all", "event": "everywhere", "data": {"n": n}}, timeout=10)
            assert answer.status_code == 200, answer.text
            for client in clients:
                assert json.loads(client.recv_event("everywhere")["data"]) == {"n": n}
    finally:
        for client in clients:
            client.close()
        server.stop()


def signed_publish(way, body, method="POST"):
    """The request line and head of a signed publish of `body` to the way's HTTP API."""
    path = f"{way.prefix}/apps/{APP_ID}/events"
    query = "&".join(f"{k}={v}" for k, v in signed_query(method, path, body).items())
    return f"{method} {path}?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_flask_run_reads_chunked_bodies_and_refuses_a_bad_content_length(way):
    """Werkzeug hands these to the application as they come; pywsgi answers them itself."""
    if "flask run" not in way.name:
        pytest.skip("gunicorn's pywsgi parses bodies itself")
    way.connect("chunked")
    way.node.subscribe("chunked", "public-chunked")
    body = json.dumps({"name": "in-chunks", "channel": "public-chunked", "data": "{}"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    answer = raw_request(way, (signed_publish(way, body) + "Transfer-Encoding: chunked\r\n\r\n")
                         .encode(), chunks + b"0\r\n\r\n")
    assert answer.startswith("HTTP/1.1 200"), answer
    assert way.node.wait_event("chunked", "in-chunks")
    answer = raw_request(way, (signed_publish(way, body) + "Content-Length: ten\r\n\r\n")
                         .encode(), body, half_close=True)
    assert answer.startswith("HTTP/1.1 400") and "Invalid Content-Length" in answer, answer


def test_a_percent_encoded_channel_signed_as_sent(way):
    """Libraries percent-encode `@ , ; =` in a channel's path and sign what they send; pywsgi
    (the stock worker) keeps no raw path, so its usual encoding is tried."""
    sent = f"/apps/{APP_ID}/channels/public-a%40b%2Cc"
    for signed in ((way.prefix + sent, sent) if way.prefix else (sent,)):
        answer = requests.get(way.server.url + way.prefix + sent,
                              params=signed_query("GET", signed), timeout=5)
        assert answer.status_code == 200, (signed, answer.text)
        assert answer.json()["occupied"] is False
