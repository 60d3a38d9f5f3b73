"""`python -m bunpulse apps`: the real command, in a subprocess, against temporary apps files;
and a running server that takes what it writes (--apps-file-reload) without a restart."""
import json
import os
import subprocess
import sys

import pusher
import pytest

from conftest import ROOT, RawClient, wait_until

RELOAD = 1  # --apps-file-reload of the running server, seconds


def apps(*args, path=None, env=None):
    """Run `python -m bunpulse apps ARGS`; (status, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("BUNPULSE_", "PUSHER_"))}
    environ.update({"BUNPULSE_ENV_FILE": os.devnull}, **(env or {}))
    command = [sys.executable, "-m", "bunpulse", "apps"] + list(args)
    if path is not None:
        command += ["--apps-file", str(path)]
    out = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True,
                         timeout=30)
    return out.returncode, out.stdout, out.stderr


def ok(*args, path=None, **kwargs):
    status, out, err = apps(*args, path=path, **kwargs)
    assert status == 0, err
    return json.loads(out) if "--json" in args else out


def refused(*args, path=None, **kwargs):
    """The one line of an error, after checking it exits 2."""
    status, out, err = apps(*args, path=path, **kwargs)
    assert status == 2, (status, out, err)
    assert out == "" and err.count("\n") == 1, err
    return err


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "apps.json"
    path.write_text("[]")
    return path


def records(path):
    return json.loads(path.read_text())


def test_add_generates_a_pair_shows_the_secret_once_and_writes_a_file_the_server_loads(path):
    added = ok("add", "--id", "7", "--set", "max_connections=5", "--set", "client_events=false",
               "--json", path=path)
    assert len(added["key"]) == 20 and len(added["secret"]) == 32
    assert records(path) == [{"id": "7", "max_connections": 5, "client_events": False,
                              "key": added["key"], "secret": added["secret"]}]
    listed, shown = ok("list", "--json", path=path), ok("show", "7", "--json", path=path)
    assert listed == [shown] and shown == {"id": "7", "keys": [added["key"]],
                                           "max_connections": 5, "client_events": False}
    text = ok("list", path=path) + ok("show", "7", path=path)
    assert added["secret"] not in text and added["key"] in text
    # The file is what the server's own loader takes.
    from bunpulse.apps import load_apps_file
    [app] = load_apps_file(str(path))
    assert (app.key, app.secret, app.max_connections) == (added["key"], added["secret"], 5)


def test_the_options_go_before_or_after_the_command_and_the_environment_names_the_file(path):
    ok("--apps-file", str(path), "add", "--id", "1", "--key", "k1", "--secret", "s1")
    assert ok("list", "--json", env={"BUNPULSE_APPS_FILE": str(path)})[0]["keys"] == ["k1"]
    assert "BUNPULSE_APPS_FILE" in refused("list")


def test_update_disable_enable_delete(path):
    ok("add", "--id", "3", "--key", "k3", "--secret", "s3", path=path)
    ok("update", "3", "--set", "max_connections=10", "--set",
       'webhooks=[{"url": "https://example.com/hook"}]', path=path)
    ok("disable", "3", path=path)
    assert records(path)[0]["enabled"] is False
    assert records(path)[0]["webhooks"] == [{"url": "https://example.com/hook"}]
    ok("enable", "3", "--json", path=path)
    ok("update", "3", "--unset", "max_connections", path=path)
    assert records(path) == [{"id": "3", "key": "k3", "secret": "s3", "enabled": True,
                              "webhooks": [{"url": "https://example.com/hook"}]}]
    assert ok("delete", "3", "--json", path=path) == {"id": "3", "deleted": True}
    assert records(path) == []


def test_a_rotation_follows_the_documented_steps(path):
    ok("add", "--id", "4", "--key", "old-key", "--secret", "old-secret", path=path)
    new = ok("rotate-secret", "4", "--json", path=path)  # step 1: beside, the old one primary
    assert new["keys"] == ["old-key", new["new_key"]]
    assert records(path)[0]["keys"] == [{"key": new["new_key"], "secret": new["new_secret"]}]
    assert "primary" in refused("retire-key", "4", "old-key", path=path)
    ok("promote-key", "4", new["new_key"], path=path)  # step 3
    record = records(path)[0]
    assert (record["key"], record["secret"]) == (new["new_key"], new["new_secret"])
    assert record["keys"] == [{"key": "old-key", "secret": "old-secret"}]
    assert "primary" in refused("retire-key", "4", new["new_key"], path=path)
    ok("retire-key", "4", "old-key", path=path)  # step 4
    assert records(path) == [{"id": "4", "key": new["new_key"], "secret": new["new_secret"]}]
    assert new["new_secret"] not in ok("show", "4", path=path)


def test_clear_errors_leave_the_file_as_it_was(path, tmp_path):
    ok("add", "--id", "5", "--key", "k5", "--secret", "s5", path=path)
    before = path.read_text()
    assert "exists already" in refused("add", "--id", "5", path=path)
    assert "'key' 'k5' is already used by app 5" in \
        refused("add", "--id", "6", "--key", "k5", path=path)
    assert "PUSHER_APP_ID" in refused("add", "--id", "6", "--key", "env-key", path=path,
                                      env={"PUSHER_APP_ID": "9", "PUSHER_APP_KEY": "env-key",
                                           "PUSHER_APP_SECRET": "env-secret"})
    for command in (["show", "8"], ["disable", "8"], ["delete", "8"], ["rotate-secret", "8"]):
        assert "no app with the id '8'" in refused(*command, path=path)
    assert "no key 'nope'" in refused("retire-key", "5", "nope", path=path)
    assert "unknown field 'max_conections'" in \
        refused("update", "5", "--set", "max_conections=3", path=path)
    assert "'secret' cannot be set here" in refused("update", "5", "--set", "secret=x", path=path)
    assert path.read_text() == before
    path.chmod(0o444)
    assert "read-only" in refused("disable", "5", path=path)
    assert path.read_text() == before
    assert "no such apps file" in refused("list", path=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "1", "key": "k"')
    assert "invalid JSON at line 1" in refused("list", path=bad)
    bad.write_text('[{"id": "1", "key": "k"}]')
    assert "field 'secret' is missing" in refused("add", "--id", "2", path=bad)
    assert bad.read_text() == '[{"id": "1", "key": "k"}]'
    bad.write_text('[{"id": "1", "key": "k", "secret": "a", "secret": "b"}]')
    assert "field 'secret' is given twice" in refused("disable", "1", path=bad)


def test_a_wrapped_file_stays_wrapped_and_keeps_its_mode(path):
    path.write_text('{"apps": []}')
    path.chmod(0o640)
    ok("add", "--id", "1", path=path)
    assert list(records(path)) == ["apps"] and records(path)["apps"][0]["id"] == "1"
    assert path.stat().st_mode & 0o777 == 0o640
    assert [name for name in os.listdir(path.parent)] == ["apps.json"]  # no temp file left


def test_help_documents_every_command_and_option():
    status, text, _ = apps("--help")
    assert status == 0
    for name in ("add", "list", "show", "update", "disable", "enable", "rotate-secret",
                 "promote-key", "retire-key", "delete", "--apps-file", "--json"):
        assert name in text
    status, text, _ = apps("add", "--help")
    assert status == 0 and all(flag in text for flag in ("--id", "--key", "--secret", "--set"))
    main = subprocess.run([sys.executable, "-m", "bunpulse", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30).stdout
    assert "python -m bunpulse apps" in main


def test_a_running_server_takes_an_added_app_and_refuses_a_disabled_ones_connections(
        path, start_server):
    server = start_server(env={"BUNPULSE_APPS_FILE": str(path),
                               "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD)})
    added = ok("add", "--id", "42", "--json", path=path)

    def connects():
        client = RawClient(f"{server.ws_url}/app/{added['key']}?protocol=7")
        try:
            message = client.recv()
            return None if isinstance(message, tuple) or \
                message["event"] == "pusher:error" else client
        except Exception:  # noqa: BLE001 - refused while the file is not reloaded yet
            client.close()
            return None

    client = wait_until(connects, timeout=RELOAD + 5, message="the added app's key connects")
    client.send({"event": "pusher:subscribe", "data": {"channel": "news"}})
    client.recv_event("pusher_internal:subscription_succeeded")
    api = pusher.Pusher(app_id="42", key=added["key"], secret=added["secret"],
                        host=server.host, port=server.port, ssl=False)
    api.trigger("news", "story", {"n": 1})
    story = client.recv_event("story")
    assert json.loads(story["data"]) == {"n": 1}

    ok("disable", "42", path=path)

    def refused_4003():
        refused_client = RawClient(f"{server.ws_url}/app/{added['key']}?protocol=7")
        try:
            message = refused_client.recv()
            return message["event"] == "pusher:error" and message["data"]["code"] == 4003 \
                and refused_client.recv_close()[0] == 4003
        finally:
            refused_client.close()

    wait_until(refused_4003, timeout=RELOAD + 5, message="the disabled app's key refused (4003)")
    with pytest.raises(pusher.errors.PusherError):  # its API calls too (403)
        api.trigger("news", "story", {"n": 2})
