"""Prometheus metrics on their own listener: what they count, with real clients, from
`python -m bunpulse` and from gunicorn (one scrape covers every worker)."""
import json
import os
import re
import signal
import socket
import sys

import requests

from conftest import (APP_ID, KEY, ROOT, RawClient, connected, gunicorn_workers, only_worker,
                      pusher_api, wait_until)

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


def test_close_codes_a_client_makes_up_share_one_label(start_server):
    """A client closes with any code it likes (3000-4999): one label value per code would be
    a new time series each, thousands per app. Only RFC 6455's and Pusher's codes are named."""
    server = start_server(metrics=True)

    def close_with(code):
        client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
        connected(client)
        client.ws.close(status=code)

    for code in (3000, 3999, 4321, 4999, 4200, 1001):
        close_with(code)
    m = server.metric
    wait_until(lambda: m("bunpulse_connections_closed_total", app_id=APP_ID) == 6,
               message="six connections closed")
    codes = {dict(labels)["code"]: value for (name, labels), value in server.metrics().items()
             if name == "bunpulse_connections_closed_total"}
    assert codes == {"other": 4, "4200": 1, "1001": 1}


def test_off_unless_configured(server):
    assert "metrics on" not in server.log()
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 404
    assert requests.get(server.url + "/stats", timeout=5).status_code == 404


def test_counts_what_clients_and_the_api_do(start_server, node_for):
    server = start_server(metrics=True)
    assert f"metrics on http://127.0.0.1:{server.env['BUNPULSE_METRICS_PORT']}/metrics" in \
        server.log()
    node = node_for(server)
    for id in ("a", "b", "c"):
        node.connect(id)
        node.subscribe(id, "private-room")
    node.subscribe("a", "news")
    api = pusher_api(server)
    api.trigger(["news", "private-room"], "ev", {"n": 1})      # two channels: two events
    for id in ("a", "b", "c"):
        node.wait_event(id, "ev", "private-room")
    node.call("trigger", id="a", channel="private-room", event="client-x", data={})
    node.wait_event("b", "client-x")
    node.wait_event("c", "client-x")
    api.channel_info("private-room", ["subscription_count"])
    response = requests.post(server.url + f"/apps/{APP_ID}/events", json={}, timeout=5)
    assert response.status_code == 401

    m = server.metric
    assert m("bunpulse_connections", app_id=APP_ID) == 3
    assert m("bunpulse_connections_opened_total", app_id=APP_ID) == 3
    assert m("bunpulse_channels", app_id=APP_ID) == 2
    assert m("bunpulse_subscriptions", app_id=APP_ID) == 4
    assert m("bunpulse_events_published_total", app_id=APP_ID) == 2
    assert m("bunpulse_client_events_total", app_id=APP_ID) == 1
    # a, b, c got the event on private-room, a on news; b and c the client event
    sent_events = 4 + 2
    # connection_established and subscription_succeeded (4) were sent one at a time
    assert m("bunpulse_ws_messages_sent_total", app_id=APP_ID) == sent_events + 3 + 4
    assert m("bunpulse_ws_bytes_sent_total", app_id=APP_ID) > 0
    received = m("bunpulse_ws_messages_received_total", app_id=APP_ID)
    assert received >= 5  # 4 subscribes and a client event (and any pings)
    assert m("bunpulse_ws_bytes_received_total", app_id=APP_ID) > 50 * 5
    assert m("bunpulse_http_requests_total", endpoint="events", status="200") == 1
    assert m("bunpulse_http_requests_total", endpoint="events", status="401") == 1
    assert m("bunpulse_http_requests_total", endpoint="channel", status="200") == 1
    assert m("bunpulse_http_request_duration_seconds_count", endpoint="events") == 2
    assert m("process_resident_memory_bytes") > 1e6
    assert m("process_open_fds") > 0

    node.call("disconnect", id="c")
    wait_until(lambda: m("bunpulse_connections", app_id=APP_ID) == 2)
    assert m("bunpulse_connections_closed_total", app_id=APP_ID, code="1000") == 1
    assert m("bunpulse_subscriptions", app_id=APP_ID) == 3
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    connected(client)
    client.ws.sock.close()  # no close frame
    wait_until(lambda: m("bunpulse_connections_closed_total", code="1006") == 1)

    stats = requests.get(server.metrics_url + "/stats", timeout=5).json()
    assert stats["connections"] == 2 and stats["channels"] == 2
    assert stats["events_published_total"] == 2
    assert requests.get(server.metrics_url + "/nothing", timeout=5).status_code == 404
    api._pusher_client.http.session.close()


def test_the_metrics_listener_binds_where_told(start_server):
    # A port free on 127.0.0.2 itself: where loopback addresses share one port space, one
    # found free on 127.0.0.1 may still be taken there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = str(probe.getsockname()[1])
    server = start_server(metrics=True, env={"BUNPULSE_METRICS_HOST": "127.0.0.2",
                                             "BUNPULSE_METRICS_PORT": port})
    assert requests.get(f"http://127.0.0.2:{port}/metrics", timeout=5).ok
    try:
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        raise AssertionError("the listener answered on an address it was not given")
    except requests.ConnectionError:
        pass


def worker_of(socket_id):
    return socket_id.split(".")[0]


def test_one_scrape_covers_every_gunicorn_worker_and_reloads(start_server, redis_server):
    server = start_server(command=GUNICORN, metrics=True, env={
        "BUNPULSE_WORKERS": "2", "BUNPULSE_REDIS_URL": redis_server.url})
    workers = gunicorn_workers(server)
    clients, prefixes = [], []
    try:
        for n in range(6):  # three connections on each worker, reached on purpose
            with only_worker(server, workers[n % 2]):
                clients.append(RawClient(server.ws_url + f"/app/{KEY}?protocol=7", timeout=10))
                prefixes.append(worker_of(connected(clients[-1])))
            clients[-1].send({"event": "pusher:subscribe", "data": {"channel": "everyone"}})
            clients[-1].recv_event("pusher_internal:subscription_succeeded")
        assert prefixes[0] != prefixes[1] and prefixes == prefixes[:2] * 3, prefixes
        count = len(clients)
        m = server.metric
        assert m("bunpulse_connections", app_id=APP_ID) == count
        assert m("bunpulse_subscriptions", app_id=APP_ID) == count
        assert m("bunpulse_redis_up") == 1
        pids = {labels for (name, labels) in server.metrics() if
                name == "process_resident_memory_bytes"}
        assert len(pids) == 3  # the master and both workers
        # the HTTP API's requests count wherever they land
        api = pusher_api(server)
        for n in range(4):
            api.trigger("everyone", "ev", {"n": n})
        for client in clients:
            for n in range(4):
                assert json.loads(client.recv_event("ev")["data"]) == {"n": n}
        # the workers add their counts to the shared files about once a second
        wait_until(lambda: m("bunpulse_events_published_total", app_id=APP_ID) == 4)
        assert m("bunpulse_http_requests_total", endpoint="events", status="200") == 4
        api._pusher_client.http.session.close()

        # HUP: new workers; the old ones' gauges leave the sums, their counters stay
        os.kill(server.proc.pid, signal.SIGHUP)
        for client in clients:
            assert client.recv_close()[0] == 4200
            client.close()
        wait_until(lambda: m("bunpulse_connections", app_id=APP_ID) == 0, timeout=15,
                   message="the old workers' connections to leave the gauge")
        assert m("bunpulse_connections_opened_total", app_id=APP_ID) == count
        assert m("bunpulse_events_published_total", app_id=APP_ID) == 4
        clients = [RawClient(server.ws_url + f"/app/{KEY}?protocol=7", timeout=10)]
        connected(clients[0])
        assert m("bunpulse_connections", app_id=APP_ID) == 1
    finally:
        for client in clients:
            client.close()


def test_redis_up_and_ready_follow_redis(start_server, redis_server):
    server = start_server(metrics=True, env={"BUNPULSE_REDIS_URL": redis_server.url})
    assert server.metric("bunpulse_redis_up") == 1
    assert requests.get(server.url + "/ready", timeout=5).json() == {"ready": True,
                                                                     "redis": "up"}
    redis_server.stop()
    api = pusher_api(server)
    api.trigger("anything", "ev", {})  # a publish that cannot reach the other nodes
    wait_until(lambda: server.metric("bunpulse_redis_up") == 0, timeout=10)
    assert server.metric("bunpulse_redis_relay_errors_total") >= 1
    ready = requests.get(server.url + "/ready", timeout=5)
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reason": "redis unreachable", "redis": "down"}
    assert requests.get(server.url + "/health", timeout=5).status_code == 200  # alive
    redis_server.start()
    wait_until(lambda: server.metric("bunpulse_redis_up") == 1, timeout=15)
    assert requests.get(server.url + "/ready", timeout=5).status_code == 200
    log = server.log()
    assert log.index("lost Redis") < log.index("Redis is back")
    api._pusher_client.http.session.close()


def test_the_readme_table_and_the_dashboard_name_every_metric():
    from bunpulse.metrics import METRICS
    names = {"bunpulse_" + name for name, *_ in METRICS}
    with open(os.path.join(ROOT, "docs", "operations.md")) as handle:
        readme = set(re.findall(r"^\| `(bunpulse_\w+)` \|", handle.read(), re.M))
    assert readme == names
    with open(os.path.join(ROOT, "docs", "grafana-dashboard.json")) as handle:
        dashboard = json.load(handle)
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for panel in dashboard["panels"]
            for target in panel["targets"] for name in re.findall(r"bunpulse_\w+",
                                                                   target["expr"])}
    assert used == names
