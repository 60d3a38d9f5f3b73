"""What the apps file, re-read in place (--apps-file-reload), takes away or adds while the
server runs (issue 22, items 1 and 7, for the file store): the open connections of an app it
disables or removes are closed as a connect of that app is refused (pusher:error, then 4003 or
4001) and its API calls answered so; the dashboard signs in a new app, with any of its active
secrets, and refuses a removed app's session; metrics count a new app under its own labels."""
import sys
import time

import pusher
import pytest
import requests

from conftest import RawClient, connected, gunicorn_workers, wait_until
from test_apps import write_apps
from test_dashboard import DASHBOARD_ENV, Visitor
from test_keys import RELOAD, replace_file

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
APPS = [{"id": n, "key": f"key-{n}", "secret": f"secret-{n}"} for n in ("40", "41", "42")]
DISABLED, REMOVED, KEPT = APPS


def reload_env(path, **extra):
    return {"BUNPULSE_APPS_FILE": path, "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD), **extra}


def raw_client(server, app):
    client = RawClient(f"{server.ws_url}/app/{app['key']}?protocol=7&client=py&version=1.0",
                       timeout=4 * RELOAD + 2)
    connected(client)
    return client


def library(server, app):
    return pusher.Pusher(app_id=app["id"], key=app["key"], secret=app["secret"],
                         host=server.host, port=server.port, ssl=False, timeout=5)


# ------------------------------------------------------------------------ connections closed

def check_gone_apps_closed(server, path, node_for, per_app=4):
    """Disable one app and remove another with clients of each open (several raw clients,
    so that under gunicorn each worker holds some); nothing else looks the file up: every
    worker's own look must close them."""
    js = node_for(server, app_id=DISABLED["id"], key=DISABLED["key"], secret=DISABLED["secret"])
    js.connect("d1")
    clients = {app["id"]: [raw_client(server, app) for _ in range(per_app)] for app in APPS}
    try:
        replace_file(path, [dict(DISABLED, enabled=False), KEPT])
        for app, code in ((DISABLED, 4003), (REMOVED, 4001)):
            for client in clients[app["id"]]:
                error = client.recv_event("pusher:error")
                assert error["data"]["code"] == code, error
                assert client.recv_close()[0] == code
        error = js.wait(lambda r: r.get("type") == "error" and r["id"] == "d1")
        assert error["error"]["data"]["code"] == 4003, error
        js.wait(lambda r: r.get("type") == "state" and r["id"] == "d1"
                and r["current"] in ("disconnected", "failed"), what="d1 given up")
        # Their API calls get what a disabled or unknown app gets.
        with pytest.raises(pusher.errors.PusherForbidden):
            library(server, DISABLED).trigger("c", "e", {})
        with pytest.raises(pusher.errors.PusherBadStatus, match="404"):
            library(server, REMOVED).trigger("c", "e", {})
        # The app kept is not touched: its clients are open and get its events.
        for client in clients[KEPT["id"]]:
            client.send({"event": "pusher:subscribe", "data": {"channel": "kept"}})
            client.recv_event("pusher_internal:subscription_succeeded")
        library(server, KEPT).trigger("kept", "still", {})
        for client in clients[KEPT["id"]]:
            assert client.recv_event("still")["channel"] == "kept"
    finally:
        for group in clients.values():
            for client in group:
                client.close()


def test_a_reload_closes_a_disabled_or_removed_apps_connections(start_server, tmp_path,
                                                                node_for):
    path = write_apps(tmp_path, APPS)
    server = start_server(env=reload_env(path))
    check_gone_apps_closed(server, path, node_for)
    assert "removed 41; changed 40" in server.log(), server.log()


def test_under_gunicorn_each_worker_closes_its_own(start_server, tmp_path, node_for,
                                                   redis_server):
    path = write_apps(tmp_path, APPS)
    server = start_server(command=GUNICORN, env=reload_env(path, BUNPULSE_WORKERS="2",
                                                           **redis_server.env))
    gunicorn_workers(server)
    check_gone_apps_closed(server, path, node_for, per_app=6)
    assert server.log().count("apps file reloaded") == 2, server.log()


# ------------------------------------------------------------------------ the dashboard

ADDED = {"id": "43", "key": "key-43", "secret": "secret-43",
         "keys": [{"key": "key-43b", "secret": "secret-43b"}]}


def test_the_dashboard_signs_in_an_app_added_live_and_ends_a_removed_ones(start_server,
                                                                          tmp_path):
    path = write_apps(tmp_path, [KEPT])
    server = start_server(env=reload_env(path, **DASHBOARD_ENV))
    assert Visitor(server).sign_in("43", "secret-43").status_code == 401
    replace_file(path, [KEPT, ADDED])
    # Any active secret of the new app signs in: the primary and the rotation's second.
    primary, second = Visitor(server), Visitor(server)
    for visitor, secret in ((primary, "secret-43"), (second, "secret-43b")):
        answer = visitor.sign_in("43", secret)
        assert answer.status_code == 200 and "Live log" in answer.text, answer.text[:300]
        assert visitor.get().status_code == 200
    with second.http.get(server.url + "/dashboard/events", timeout=10, stream=True) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines) == "retry: 3000"
        replace_file(path, [KEPT])
        # The removed app's session is refused, and its open stream ends.
        for visitor in (primary, second):
            assert visitor.get().status_code == 401
            assert "Sign in" in visitor.page().text
        deadline = time.monotonic() + 10  # pings every 3 s give the loop a turn
        for line in lines:
            if line == "event: end":
                break
            assert time.monotonic() < deadline, "the removed app's stream did not end"
    assert Visitor(server).sign_in("43", "secret-43b").status_code == 401


# ------------------------------------------------------------------------ metrics

def test_metrics_count_an_app_added_live_and_stop_with_its_removal(start_server, tmp_path):
    path = write_apps(tmp_path, [KEPT])
    server = start_server(env=reload_env(path), metrics=True)
    m = server.metric
    replace_file(path, [KEPT, ADDED])
    client = raw_client(server, ADDED)
    client.send({"event": "pusher:subscribe", "data": {"channel": "news"}})
    client.recv_event("pusher_internal:subscription_succeeded")
    library(server, ADDED).trigger("news", "e", {})
    client.recv_event("e")
    wait_until(lambda: m("bunpulse_events_published_total", app_id="43") == 1,
               message="the new app's publish counted")
    assert m("bunpulse_connections", app_id="43") == 1
    assert m("bunpulse_subscriptions", app_id="43") == 1
    assert m("bunpulse_connections", app_id=KEPT["id"]) == 0
    replace_file(path, [KEPT])
    assert client.recv_close()[0] == 4001
    wait_until(lambda: m("bunpulse_connections", app_id="43") == 0,
               message="the removed app's connection closed")
    assert m("bunpulse_connections_closed_total", app_id="43", code="4001") == 1
    with pytest.raises(pusher.errors.PusherBadStatus, match="404"):
        library(server, ADDED).trigger("news", "e", {})
    time.sleep(1.2)  # a flush of the batched counts: the refused publish added none
    assert m("bunpulse_events_published_total", app_id="43") == 1
    assert m("bunpulse_subscriptions", app_id="43") == 0
