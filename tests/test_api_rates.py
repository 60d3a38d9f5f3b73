"""Per-app HTTP API rates (issue 22, item 4): max_backend_events_per_second and
max_read_requests_per_second, soketi's names and count, 429 with Retry-After past them; the
official libraries raise it; deployment-wide through Redis; held where the event loop answers
a publish itself (serving/loop.py)."""
import json
import re
import socket
import subprocess
import sys
import time

import pusher
import pytest

from conftest import (APP_ID, ROOT, RedisServer, ServerProcess, pusher_api, publish_request,
                      signed_request)

EVENTS, READS = 5, 3  # the environment's app's limits here
LIMITED = {"BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND": str(EVENTS),
           "BUNPULSE_MAX_READ_REQUESTS_PER_SECOND": str(READS)}
OTHER = {"id": "2", "key": "key-two", "secret": "secret-two",
         "max_backend_events_per_second": 2}


def fresh_second():
    """Wait for the next clock second to begin: the limits count clock seconds, and a test's
    requests must all fall in one."""
    time.sleep(1.02 - time.time() % 1)


def trigger(client, channels, n=0):
    """200 or the status of the error the PyPI library raised."""
    try:
        client.trigger(channels, "tick", {"n": n})
        return 200
    except pusher.errors.PusherBadStatus as exc:
        return int(str(exc).split(":")[0])


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    path = tmp_path_factory.mktemp("apps") / "apps.json"
    path.write_text(json.dumps([OTHER]))
    server = ServerProcess(env=dict(LIMITED, BUNPULSE_APPS_FILE=str(path)))
    yield server
    server.stop()


def test_backend_events_python_library(limited):
    client = pusher_api(limited)
    fresh_second()
    statuses = [trigger(client, "rates", n) for n in range(EVENTS + 2)]
    assert statuses == [200] * EVENTS + [429, 429]
    fresh_second()  # the next second: allowed again
    assert trigger(client, "rates") == 200


def test_answer_429_retry_after_and_json(limited):
    fresh_second()
    body = {"name": "tick", "channel": "rates", "data": "{}"}
    answers = [signed_request(limited, "POST", f"/apps/{APP_ID}/events", body)
               for _ in range(EVENTS + 1)]
    refused = answers[-1]
    assert [a.status_code for a in answers] == [200] * EVENTS + [429]
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.json() == {"error": "Too many requests: the app's "
                                       f"max_backend_events_per_second is {EVENTS}"}
    assert "passed max_backend_events_per_second" in limited.log()


def test_each_channel_counts_as_soketi_counts(limited):
    client = pusher_api(limited)
    fresh_second()
    assert trigger(client, ["a", "b", "c"]) == 200  # 3 of 5
    assert trigger(client, ["a", "b", "c"]) == 429  # would be 6: refused whole
    assert trigger(client, ["a", "b"]) == 200       # 5 of 5
    assert trigger(client, "a") == 429
    fresh_second()
    batch = [{"channel": f"c{n}", "name": "tick", "data": "{}"} for n in range(4)]
    assert client.trigger_batch(batch) == {}       # 4 of 5: one per event
    with pytest.raises(pusher.errors.PusherBadStatus, match="429"):
        client.trigger_batch(batch[:2])


def test_a_request_larger_than_the_limit_says_so(limited):
    answer = signed_request(limited, "POST", f"/apps/{APP_ID}/events",
                            {"name": "tick", "channels": [f"c{n}" for n in range(EVENTS + 1)],
                             "data": "{}"})
    assert answer.status_code == 429
    assert f"counts {EVENTS + 1} events, more than the app's max_backend_events_per_second " \
           f"({EVENTS})" in answer.json()["error"]


def test_read_requests(limited):
    paths = [f"/apps/{APP_ID}/channels", f"/apps/{APP_ID}/channels/presence-r",
             f"/apps/{APP_ID}/channels/presence-r/users"]
    fresh_second()
    statuses = [signed_request(limited, "GET", path).status_code for path in paths]
    refused = signed_request(limited, "GET", paths[0])
    assert statuses == [200] * READS and refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "max_read_requests_per_second" in refused.json()["error"]
    assert signed_request(limited, "GET", "/health").status_code == 200  # not an app's read
    # reads and events are counted apart
    assert trigger(pusher_api(limited), "rates") == 200


def test_apps_are_counted_apart(limited):
    other = pusher.Pusher(app_id="2", key="key-two", secret="secret-two", host=limited.host,
                          port=limited.port, ssl=False)
    mine = pusher_api(limited)
    fresh_second()
    assert [trigger(other, "o", n) for n in range(3)] == [200, 200, 429]  # the file's limit: 2
    assert [trigger(mine, "m", n) for n in range(EVENTS)] == [200] * EVENTS
    # reads are unlimited for app 2 (its default, 0)
    assert all(other.channels_info() == {"channels": {}} for _ in range(READS + 2))


def test_node_library_raises_429(limited, node_for):
    node = node_for(limited)
    fresh_second()
    for n in range(EVENTS):
        node.call("api", method="trigger", args=["rates-npm", "tick", {"n": n}])
    reply = node.call("api", method="trigger", args=["rates-npm", "tick", {"n": 9}],
                      fails=True)
    assert reply["status"] == 429, reply
    assert "max_backend_events_per_second" in json.dumps(reply["body"])


def test_held_where_the_event_loop_answers(limited):
    """Whole publishes on one keep-alive connection: python -m bunpulse answers them in the
    event loop's callback (no Redis, no hook, no viewer); the limit holds there too, and the
    connection stays usable after a 429."""
    sock = socket.create_connection((limited.host, limited.port), timeout=5)
    path = f"/apps/{APP_ID}/events"
    data = b""
    statuses = []
    fresh_second()
    for n in range(EVENTS + 2):
        head, body = publish_request(path, {"name": "tick", "channels": ["loop"],
                                            "data": str(n)})
        sock.sendall(head + b"\r\n" + body)
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        top, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", top).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
        data = rest[length:]
        statuses.append(int(top.split()[1]))
        if statuses[-1] == 429:
            assert b"\r\nRetry-After: 1\r\n" in top + b"\r\n", top
    sock.close()
    assert statuses == [200] * EVENTS + [429, 429]


def test_deployment_wide_through_redis(start_server):
    """Two nodes on one Redis share one limit: together they publish at most the limit in a
    second, though each would allow it alone."""
    redis = RedisServer()
    try:
        limit = 40
        env = dict(redis.env, BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND=str(limit))
        nodes = [pusher_api(start_server(env=env)), pusher_api(start_server(env=env))]
        for _ in range(5):  # the 60 publishes must fall in one clock second: a loaded machine
            fresh_second()  # may need another try
            started = time.time()
            statuses = [trigger(nodes[n % 2], "wide", n) for n in range(60)]
            if int(time.time()) == int(started):
                break
        else:
            pytest.fail("60 publishes never fitted in one clock second")
        accepted = statuses.count(200)
        # A node's unspent lease (batches of limit/20 = 2) may lapse with its second.
        assert limit - 2 <= accepted <= limit, statuses
        assert set(statuses) == {200, 429}
        keys = redis.cli("--scan", "--pattern", "bp:{1}:rate:events:*").split()
        assert keys and 0 < int(redis.cli("ttl", keys[0])) <= 10  # it goes with its second
    finally:
        redis.stop()


def test_redis_down_counts_per_node(start_server):
    redis = RedisServer()
    server = start_server(env=dict(redis.env, **LIMITED))
    client = pusher_api(server)
    redis.stop()
    time.sleep(0.5)
    fresh_second()
    statuses = [trigger(client, "down", n) for n in range(EVENTS + 1)]
    assert statuses == [200] * EVENTS + [429]


def test_rejected_settings(tmp_path):
    path = tmp_path / "apps.json"
    path.write_text(json.dumps([dict(OTHER, max_read_requests_per_second=-1)]))
    env = ServerProcess.base_env(0)
    env["BUNPULSE_APPS_FILE"] = str(path)
    done = subprocess.run([sys.executable, "-m", "bunpulse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert "field 'max_read_requests_per_second' must be a whole number of at least 0" \
        in done.stderr
    env["BUNPULSE_APPS_FILE"] = ""
    env["BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND"] = "-1"
    done = subprocess.run([sys.executable, "-m", "bunpulse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND" in done.stderr


def test_soketi_environment_names():
    from bunpulse.soketi import translated
    env, note = translated({"SOKETI_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SEC": "-1",
                            "SOKETI_DEFAULT_APP_MAX_READ_REQ_PER_SEC": "50"})
    assert env["BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND"] == "0"  # soketi's -1: no limit
    assert env["BUNPULSE_MAX_READ_REQUESTS_PER_SECOND"] == "50"
    assert "not supported" not in note
