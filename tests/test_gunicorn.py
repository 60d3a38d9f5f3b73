"""`gunicorn -c gunicorn.conf.py` with one worker: pusher-js, the HTTP API, and SIGTERM telling
every client to reconnect (4200)."""
import json
import os
import signal
import socket
import sys
import time

import subprocess

import pytest

from conftest import KEY, ROOT, RawClient, connected, pusher_api

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


@pytest.fixture
def gunicorn(start_server):
    return start_server(command=GUNICORN, env={"BUNPULSE_WORKERS": "1"})


def test_serves_pusher_js_and_the_http_api(gunicorn, node_for):
    node = node_for(gunicorn)
    node.connect("a", presence={"user_id": "1", "user_info": {}})
    node.connect("b")
    for channel in ("gunicorn-public", "private-gunicorn", "presence-gunicorn"):
        node.subscribe("a", channel)
    node.subscribe("b", "private-gunicorn")
    api = pusher_api(gunicorn)
    api.trigger(["gunicorn-public", "private-gunicorn", "presence-gunicorn"], "ev", {"n": 1})
    for channel in ("gunicorn-public", "private-gunicorn", "presence-gunicorn"):
        assert node.wait_event("a", "ev", channel)["data"] == {"n": 1}
    node.call("trigger", id="b", channel="private-gunicorn", event="client-x", data={"c": 1})
    assert node.wait_event("a", "client-x")["data"] == {"c": 1}
    assert api.channel_info("presence-gunicorn", ["user_count"])["user_count"] == 1
    assert "worker" in gunicorn.log().lower()
    assert "POST /apps" not in gunicorn.log()  # no access log line: accesslog is off
    # An idle keep-alive HTTP connection would hold the worker's shutdown for its
    # graceful_timeout: close the library's session.
    api._pusher_client.http.session.close()


@pytest.mark.parametrize("target", ["master", "process group"])
def test_sigterm_closes_every_client_with_4200(gunicorn, target):
    clients = [RawClient(gunicorn.ws_url + f"/app/{KEY}?protocol=7", timeout=10)
               for _ in range(5)]
    try:
        for client in clients:
            connected(client)
        if target == "master":
            os.kill(gunicorn.proc.pid, signal.SIGTERM)
        else:
            gunicorn.signal(signal.SIGTERM)
        for client in clients:
            error = client.recv_event("pusher:error")
            assert error["data"]["code"] == 4200
            assert client.recv_close()[0] == 4200
    finally:
        for client in clients:
            client.close()
    assert gunicorn.proc.wait(10) == 0, gunicorn.log()


def test_the_worker_closes_silent_clients_and_answers_431(start_server):
    server = start_server(command=GUNICORN, env={"BUNPULSE_WORKERS": "1",
                                                 "BUNPULSE_HANDSHAKE_TIMEOUT": "500"})
    silent = socket.create_connection((server.host, server.port), timeout=5)
    start = time.monotonic()
    assert silent.recv(100) == b""  # closed by the worker, not by our timeout
    assert time.monotonic() - start < 3
    silent.close()
    big = socket.create_connection((server.host, server.port), timeout=5)
    big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n" + b" b\r\n" * 20000)
    assert big.recv(100).startswith(b"HTTP/1.1 431")
    big.close()
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7", timeout=10)
    try:
        assert connected(client)  # the upgraded socket is served after its handler returned
        client.send({"event": "pusher:subscribe", "data": {"channel": "after"}})
        assert client.recv_event("pusher_internal:subscription_succeeded")
        pusher_api(server).trigger("after", "ev", {"n": 1})
        assert json.loads(client.recv_event("ev")["data"]) == {"n": 1}
    finally:
        client.close()


CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("BUNPULSE_", "PUSHER_")) and k != "WEB_CONCURRENCY"}
STOCK = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
OWN = "bunpulse.worker.PusherWorker"


@pytest.mark.parametrize("args, env", [
    (["-c", "gunicorn.conf.py", "-w", "2"], {}),
    (["-k", STOCK, "-w", "2"], {}),
    (["-k", STOCK], {"WEB_CONCURRENCY": "2"}),
    (["-k", STOCK, "--preload", "-w", "2"], {}),
    (["-k", OWN, "-w", "2"], {}),
    (["-k", OWN], {"WEB_CONCURRENCY": "3"}),
], ids=["-c -w 2", "stock -w 2", "stock WEB_CONCURRENCY", "stock --preload", "own -w 2",
        "own WEB_CONCURRENCY"])
def test_several_workers_without_redis_are_refused(args, env, tmp_path):
    """Each worker would have its own hub: an event published to one would never reach the
    clients of another (issue 24). Every way gunicorn can be told to run several workers stops
    at start-up, naming BUNPULSE_REDIS_URL. Run outside the checkout unless -c names the file,
    so that gunicorn does not pick up gunicorn.conf.py by itself."""
    configured = "-c" in args
    command = [sys.executable, "-m", "gunicorn", *args]
    if not configured:
        command += ["-b", "127.0.0.1:0", "bunpulse:create_app()"]
    proc = subprocess.run(command, cwd=ROOT if configured else tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(
                              CLEAN_ENV, BUNPULSE_ENV_FILE=os.devnull, BUNPULSE_PORT="0",
                              PUSHER_APP_ID="1", PUSHER_APP_KEY="k", PUSHER_APP_SECRET="s",
                              PYTHONPATH=str(ROOT), **env))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "need BUNPULSE_REDIS_URL" in output, output[-2000:]
