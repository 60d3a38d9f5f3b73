"""What the apps file, re-read in place (--apps-file-reload), takes away or adds while the
server runs (issue 22, items 1 and 7, for the file store): the open connections of an app it
disables or removes are closed as a connect of that app is refused (pusher:error, then 4003 or
4001) and its API calls answered so; the dashboard signs in a new app, with any of its active
secrets, and refuses a removed app's session; metrics count a new app under its own labels."""
import sys

import pusher
import pytest
import requests

from conftest import RawClient, connected, gunicorn_workers, wait_until
from test_apps import write_apps
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
