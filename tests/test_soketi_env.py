"""A soketi deployment's environment runs BunPulse unchanged (issue 24): soketi's names are read
where BunPulse's are not set, with soketi's defaults where they differ, and one start-up line
says what was read and what is not supported. The .env is Laravel Sail's soketi service, as its
docker-compose.yml passes it."""
import pusher
import pytest

from bunpulse.soketi import translated

SAIL = {"SOKETI_DEBUG": "1", "SOKETI_METRICS_SERVER_PORT": "9601",
        "SOKETI_DEFAULT_APP_ID": "4242", "SOKETI_DEFAULT_APP_KEY": "sail-key",
        "SOKETI_DEFAULT_APP_SECRET": "sail-secret", "SOKETI_PRESENCE_MAX_MEMBERS": "50"}


def test_soketi_names_become_bunpulse_names():
    env, note = translated(dict(SAIL, SOKETI_DEFAULT_APP_MAX_CONNS="-1", PUSHER_APP_KEY="mine"))
    assert env["PUSHER_APP_ID"] == "4242" and env["PUSHER_APP_SECRET"] == "sail-secret"
    assert env["PUSHER_APP_KEY"] == "mine"  # BunPulse's own name wins
    assert env["BUNPULSE_MAX_CONNECTIONS"] == "0"  # soketi's -1, no limit
    assert env["BUNPULSE_CLIENT_EVENTS"] == "false"  # soketi's default
    assert env["BUNPULSE_LOG_LEVEL"] == "debug"
    assert "BUNPULSE_METRICS_PORT" not in env  # soketi's metrics are off unless enabled
    assert "not supported, ignored (docs/migrating.md): SOKETI_PRESENCE_MAX_MEMBERS" in note
    assert "SOKETI_DEFAULT_APP_KEY" not in note  # not read: PUSHER_APP_KEY was set
    env, _ = translated({"SOKETI_ADAPTER_DRIVER": "redis", "SOKETI_DB_REDIS_HOST": "cache",
                         "SOKETI_DB_REDIS_PASSWORD": "pw", "SOKETI_METRICS_ENABLED": "true"})
    assert env["BUNPULSE_REDIS_URL"] == "redis://:pw@cache:6379/0"
    assert env["BUNPULSE_METRICS_PORT"] == "9601"
    env, _ = translated({"SOKETI_SHUTDOWN_GRACE_PERIOD": "5000", "SOKETI_ADAPTER_REDIS_PREFIX":
                         "blue", "SOKETI_PRESENCE_MAX_MEMBER_SIZE": "2"})
    assert (env["BUNPULSE_SHUTDOWN_GRACE_MS"], env["BUNPULSE_REDIS_KEY_PREFIX"],
            env["BUNPULSE_MAX_PRESENCE_MEMBER_SIZE_IN_KB"]) == ("5000", "blue", "2")
    assert translated({"PATH": "/bin"}) == ({"PATH": "/bin"}, None)
    _, note = translated({"SOKETI_ADAPTER_DRIVER": "nats"})
    assert "SOKETI_ADAPTER_DRIVER=nats" in note


@pytest.fixture
def sail(start_server, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in SAIL.items()))
    return start_server(env={"PUSHER_APP_ID": "", "PUSHER_APP_KEY": "", "PUSHER_APP_SECRET": "",
                             "BUNPULSE_ENV_FILE": str(env_file)})


def test_a_soketi_env_file_serves_the_official_clients(sail, node_for):
    assert "read soketi's environment" in sail.log()
    assert "SOKETI_PRESENCE_MAX_MEMBERS" in sail.log()
    node = node_for(sail, app_id="4242", key="sail-key", secret="sail-secret")
    node.connect("a")
    node.connect("b")
    node.subscribe("a", "private-orders")
    node.subscribe("b", "private-orders")
    api = pusher.Pusher(app_id="4242", key="sail-key", secret="sail-secret", host=sail.host,
                        port=sail.port, ssl=False)
    api.trigger("private-orders", "shipped", {"n": 1})
    assert node.wait_event("a", "shipped", "private-orders")["data"] == {"n": 1}
    # soketi's default: client messages off unless SOKETI_DEFAULT_APP_ENABLE_CLIENT_MESSAGES
    node.call("trigger", id="b", channel="private-orders", event="client-x", data={})
    node.subscribe("b", "after-client-x")  # answered after b's client event was handled
    api.trigger("private-orders", "marker", {})
    node.wait_event("a", "marker", "private-orders")
    assert node.events("a", "client-x") == []
