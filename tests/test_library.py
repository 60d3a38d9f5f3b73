"""The library API: start_bunpulse() inside this (unpatched) pytest process, where the server
runs in a thread of its own: publish, callbacks, stop, and the vacancy webhook."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pusher
import pytest

from bunpulse import start_bunpulse
from conftest import APP_ID, KEY, SECRET, RawClient, connected, raw_subscribe, wait_until

# An exception in the server's thread (a LoopExit on stop, say) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


class Recorder:
    """Callback that records (connection socket_id, data) from the server's thread."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, conn, data):
        with self.lock:
            self.calls.append((conn.socket_id, data))

    def wait(self, predicate=lambda call: True, count=1):
        return wait_until(lambda: len([c for c in list(self.calls) if predicate(c)]) >= count
                          and [c for c in list(self.calls) if predicate(c)],
                          message="callback")


@pytest.fixture
def library_server():
    """Factory: start_bunpulse(port=0, ...) with the test app; stopped after the test."""
    from gevent import monkey
    assert not monkey.is_module_patched("socket"), "the test process must not be patched"
    servers = []

    def start(**options):
        options = dict({"host": "127.0.0.1", "app_id": APP_ID, "app_key": KEY,
                        "app_secret": SECRET, "env_file": os.devnull}, **options)
        server = start_bunpulse(port=0, **options)
        server.stopped = False
        servers.append(server)
        return server

    yield start
    for server in servers:
        if not server.stopped:
            server.stop()


def ws_url(server):
    return f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7"


def test_runs_in_its_own_thread(library_server):
    server = library_server()
    assert server.port > 0 and server.host == "127.0.0.1"
    assert server._hub is not None and server._hub.thread is not threading.current_thread()
    client = RawClient(ws_url(server))
    try:
        assert connected(client)
    finally:
        client.close()


def test_pusher_js_receives_server_publish(library_server, node_for):
    server = library_server()
    node = node_for(SimpleNamespace(host="127.0.0.1", port=server.port))
    node.connect("a")
    node.subscribe("a", "my-channel")
    server.publish("my-channel", {"event": "my-event", "data": {"message": "hello", "n": [1]}})
    assert node.wait_event("a", "my-event", "my-channel")["data"] == {"message": "hello",
                                                                       "n": [1]}
    # A list of channels, and string data forwarded as it is.
    node.subscribe("a", "other-channel")
    server.publish(["my-channel", "other-channel"], {"event": "both", "data": "text"})
    node.wait_event("a", "both", "my-channel")
    assert node.wait_event("a", "both", "other-channel")["data"] == "text"


def test_callbacks(library_server, node_for):
    server = library_server()
    recorders = {name: Recorder() for name in
                 ("connection", "disconnect", "pusher:subscribe", "client_event")}
    for name, recorder in recorders.items():
        server.on(name, recorder)
    node = node_for(SimpleNamespace(host="127.0.0.1", port=server.port))
    a = node.connect("a")
    b = node.connect("b")
    assert {sid for sid, _ in recorders["connection"].wait(count=2)} == {a, b}
    assert all(data is None for _, data in recorders["connection"].calls)

    node.subscribe("a", "private-chat")
    node.subscribe("b", "private-chat")
    subscribed = recorders["pusher:subscribe"].wait(lambda c: c[0] == a)
    assert subscribed[0][1]["channel"] == "private-chat"
    assert subscribed[0][1]["auth"].startswith(KEY + ":")

    node.call("trigger", id="a", channel="private-chat", event="client-typing",
              data={"who": "a"})
    assert node.wait_event("b", "client-typing")["data"] == {"who": "a"}
    calls = recorders["client_event"].wait()
    assert calls == [(a, {"event": "client-typing", "channel": "private-chat",
                          "data": {"who": "a"}})]

    node.call("disconnect", id="a")
    assert recorders["disconnect"].wait(lambda c: c[0] == a)[0] == (a, None)


def test_failing_callback_is_logged_and_the_server_keeps_working(library_server, node_for,
                                                                  caplog):
    server = library_server()
    failures = []

    def broken(conn, data):
        failures.append(conn.socket_id)
        raise RuntimeError("callback bug")
    server.on("pusher:subscribe", broken)
    server.on("connection", broken)
    later = Recorder()
    server.on("pusher:subscribe", later)  # callbacks after a failing one still run

    node = node_for(SimpleNamespace(host="127.0.0.1", port=server.port))
    with caplog.at_level(logging.ERROR, logger="bunpulse"):
        node.connect("a")
        node.subscribe("a", "still-working")
        later.wait()
        server.publish("still-working", {"event": "ok", "data": {}})
        node.wait_event("a", "ok")
        wait_until(lambda: len([r for r in caplog.records if r.exc_info]) >= 2,
                   message="logged failures")
    assert len(failures) == 2
    logged = [r for r in caplog.records if r.exc_info]
    assert all(r.exc_info[0] is RuntimeError for r in logged)
    assert "pusher:subscribe" in "\n".join(r.getMessage() for r in logged)


def test_stop_closes_clients_with_4200_and_frees_the_port(library_server):
    server = library_server()
    port = server.port
    clients = [RawClient(ws_url(server)) for _ in range(3)]
    try:
        for client in clients:
            connected(client)
        server.stop()
        server.stopped = True
        for client in clients:
            assert client.recv_close()[0] == 4200
    finally:
        for client in clients:
            client.close()
    assert not server._hub.thread.is_alive()
    with socket.socket() as sock:  # nothing listens there any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    again = start_bunpulse(port=port, host="127.0.0.1", app_id=APP_ID, app_key=KEY,
                           app_secret=SECRET, env_file=os.devnull)
    try:
        assert again.port == port
        client = RawClient(ws_url(again))
        connected(client)
        client.close()
    finally:
        again.stop()


def test_subscription_vacancy_webhook(library_server, webhook_receiver):
    server = library_server(subscription_vacancy_url=webhook_receiver.url, webhook_delay_ms=0)
    client = RawClient(ws_url(server))
    try:
        raw_subscribe(client, connected(client), "vacancy")
        client.recv_event("pusher_internal:subscription_succeeded")
        client.send({"event": "pusher:unsubscribe", "data": {"channel": "vacancy"}})
        webhook_receiver.wait_events("channel_vacated")
    finally:
        client.close()
    request = webhook_receiver.requests[0]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    validator = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)
    body = validator.validate_webhook(headers["x-pusher-key"], headers["x-pusher-signature"],
                                      request["body"].decode())
    assert body is not None, "signature refused by the PyPI library"
    assert body["events"] == [{"name": "channel_vacated", "channel": "vacancy"}]
    # The vacancy URL gets channel_vacated only (no channel_occupied before it).
    assert {e["name"] for e in webhook_receiver.events()} == {"channel_vacated"}
    # A tampered body is refused by the same validator.
    assert validator.validate_webhook(headers["x-pusher-key"], headers["x-pusher-signature"],
                                      request["body"].decode().replace("vacancy", "other")) is None
    assert json.loads(request["body"])["time_ms"] > 0


def test_connections_live_outside_the_flask_request_context(library_server):
    """A socket's long life runs after the Flask view returned: no request context (and none
    of its memory) is held by an idle connection."""
    import flask
    server = library_server()
    seen = []
    server.on("connection", lambda conn, data: seen.append(flask.has_request_context()))
    client = RawClient(ws_url(server))
    try:
        connected(client)
        wait_until(lambda: seen, message="the connection hook")
        assert seen == [False]
    finally:
        client.close()


def test_importing_the_package_is_cheap_and_the_library_never_imports_gunicorn():
    code = ("import sys, bunpulse\n"
            "assert 'flask' not in sys.modules and 'gevent' not in sys.modules\n"
            "import bunpulse.serving.embedded, bunpulse.server\n"
            "assert not [m for m in sys.modules if m.startswith('gunicorn')]\n"
            "import bunpulse.worker\n"
            "assert 'gunicorn' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # gunicorn's master imports the worker class before gevent patches its workers: Flask
    # imported then leaves a lock that breaks every worker's exit (a traceback at each stop).
    code = "import sys, bunpulse.worker\nassert 'flask' not in sys.modules, 'Flask imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
