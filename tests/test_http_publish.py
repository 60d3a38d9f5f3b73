"""POST /apps/{id}/events: the PyPI library, Bearer tokens, and every refusal with its status,
built as raw signed requests (bunpulse.signatures) where the library refuses to send them."""
import hashlib
import json
import time

import pusher
import pytest
import requests

from conftest import (APP_ID, KEY, SECRET, assert_signatures_kept, connected, raw_subscribe,
                      read_json_answer, signed_query, signed_request)


def assert_error(response, status):
    """A JSON error with `status` that gives away neither the signature sent nor the right one."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert_signatures_kept(response)
    return body["error"]


def event(name="my-event", channels=("http-publish",), data='{"a":1}', **extra):
    return dict({"name": name, "channels": list(channels), "data": data}, **extra)


@pytest.fixture
def listener(raw):
    """A raw client subscribed to http-publish."""
    client = raw()
    raw_subscribe(client, connected(client), "http-publish")
    client.recv_event("pusher_internal:subscription_succeeded")
    return client


# ---------------------------------------------------------------- accepted

def test_pypi_library_trigger(api, listener):
    assert api.trigger("http-publish", "my-event", {"message": "hello"}) == {}
    frame = listener.recv_event("my-event")
    assert json.loads(frame["data"]) == {"message": "hello"}


def test_signed_raw_request(server, listener):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event(data='{"raw": true}'))
    assert response.status_code == 200 and response.json() == {}
    assert listener.recv_event("my-event")["data"] == '{"raw": true}'


def test_single_channel_field(server, listener):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              {"name": "one", "channel": "http-publish", "data": "x"})
    assert response.status_code == 200, response.text
    assert listener.recv_event("one")["data"] == "x"


def test_bearer_secret_with_object_data(server, listener):
    response = requests.post(server.url + f"/apps/{APP_ID}/events",
                             json={"name": "bearer", "channel": "http-publish",
                                   "data": {"a": 1, "b": ["x"]}},
                             headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
    assert response.status_code == 200 and response.json() == {}
    frame = listener.recv_event("bearer")
    assert isinstance(frame["data"], str)
    assert json.loads(frame["data"]) == {"a": 1, "b": ["x"]}


def test_bearer_with_the_app_key_is_refused(server):
    response = requests.post(server.url + f"/apps/{APP_ID}/events",
                             json=event(), headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert SECRET not in assert_error(response, 401)


def test_bearer_with_a_wrong_secret_is_refused(server):
    response = requests.post(server.url + f"/apps/{APP_ID}/events", json=event(),
                             headers={"Authorization": f"Bearer {SECRET}x"}, timeout=5)
    assert SECRET not in assert_error(response, 401)


def test_no_credentials_at_all(server):
    response = requests.post(server.url + f"/apps/{APP_ID}/events", json=event(), timeout=5)
    assert_error(response, 401)


def test_limits_are_inclusive(server, listener):
    data = "x" * 10240
    channels = ["http-publish"] + [f"limit-{n}" for n in range(99)]
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event("at-limit", channels, data))
    assert response.status_code == 200, response.text
    assert listener.recv_event("at-limit")["data"] == data


def test_info_in_trigger(server, listener):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event(info="subscription_count"))
    assert response.json() == {"channels": {"http-publish": {"subscription_count": 1}}}


def test_health(server):
    response = requests.get(server.url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"ok": True, "status": "alive"}


# ---------------------------------------------------------------- refused

def test_wrong_signature(server):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", event(),
                              secret="not-the-secret")
    assert "signature" in assert_error(response, 401).lower()


def test_tampered_query_after_signing(server):
    def tamper(params):
        params["auth_timestamp"] = str(int(params["auth_timestamp"]) + 1)
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", event(),
                              tamper=tamper)
    assert_error(response, 401)


def test_pypi_library_with_a_wrong_secret(server):
    client = pusher.Pusher(app_id=APP_ID, key=KEY, secret="wrong", host=server.host,
                           port=server.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        client.trigger("http-publish", "x", {})


@pytest.mark.parametrize("skew", [601, -601, 3600])
def test_expired_timestamp(server, skew):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", event(),
                              timestamp=int(time.time()) - skew)
    assert "timestamp" in assert_error(response, 401).lower()


def test_timestamp_within_600_seconds(server):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", event(),
                              timestamp=int(time.time()) - 590)
    assert response.status_code == 200, response.text


def test_body_md5_mismatch(server):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", event(),
                              body_md5=hashlib.md5(b"another body").hexdigest())
    assert "body_md5" in assert_error(response, 401)


def test_unknown_app(server):
    response = signed_request(server, "POST", "/apps/999/events", event())
    assert_error(response, 404)


@pytest.mark.parametrize("path", [f"/apps/{APP_ID}/nothing-here", "/foo", "/"])
def test_unknown_path(server, path):
    response = signed_request(server, "POST", path, event())
    assert_error(response, 404)


def test_wrong_method(server):
    response = requests.get(server.url + f"/apps/{APP_ID}/events", timeout=5)
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", b'"text"', b"\xff\xfe"])
def test_malformed_json(server, body):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", body)
    assert_error(response, 400)


@pytest.mark.parametrize("item", [
    event(channels=["bad name"]),
    event(channels=["x" * 201]),
    event(channels=["#general"]),
    event(channels=[5]),
    event(channels=[]),
    {"name": "x", "channel": "bad:name", "data": "{}"},
    {"name": "x", "data": "{}"},
    {"channels": ["a"], "data": "{}"},
    event(name="n" * 201),
    {"name": "x", "channels": ["a"]},
    event(socket_id="not-a-socket-id"),
    event(socket_id="1.2\n"),
])
def test_bad_events(server, item):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events", item)
    assert_error(response, 400)


def test_too_many_channels(server):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event(channels=[f"c-{n}" for n in range(101)]))
    assert "100" in assert_error(response, 400)


def test_data_too_large(server):
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event(data="x" * 10241))
    assert "10240" in assert_error(response, 413)
    # The limit is in bytes, not characters.
    response = signed_request(server, "POST", f"/apps/{APP_ID}/events",
                              event(data="é" * 5121))
    assert_error(response, 413)


def test_refusals_deliver_nothing(server, listener, api):
    signed_request(server, "POST", f"/apps/{APP_ID}/events", event(name="refused"),
                   secret="wrong")
    signed_request(server, "POST", f"/apps/{APP_ID}/events",
                   event(name="refused", data="x" * 10241))
    api.trigger("http-publish", "after", {})
    assert listener.recv()["event"] == "after"


def test_a_huge_body_is_refused_with_413_before_it_is_read(server):
    """A 20 MB body gets 413 (JSON) without the server reading it all, and the server goes on."""
    import socket as socketlib
    with socketlib.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 20000000\r\n\r\n" + b"x" * 65536)
        answer = read_json_answer(sock)
    assert answer.startswith("HTTP/1.1 413")
    assert '"error"' in answer
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("query", [
    "auth_key=k&auth_timestamp=1&auth_version=1.0&body_md5=ab&auth_signature=cd",
    "info=user_count,subscription_count&filter_by_prefix=presence-",
    "a=1&a=2&b=x%20y&c=d+e&e=&f", "n=%C3%A9&m=%2B%26%3D", "",
])
def test_query_parsing_matches_werkzeug(query):
    """The API's own query parser (it is on every request's path) reads what werkzeug reads."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request
    from bunpulse.api import query_params
    environ = EnvironBuilder(path="/apps/1/events", query_string=query).get_environ()
    assert query_params(environ) == Request(environ).args.to_dict()


def test_chunked_body_is_read(server, listener):
    """A body sent with Transfer-Encoding: chunked (no Content-Length) is published too."""
    raw = json.dumps(event(name="chunked")).encode()
    path = f"/apps/{APP_ID}/events"
    response = requests.post(server.url + path, params=signed_query("POST", path, raw),
                             data=iter([raw[:10], raw[10:]]), timeout=5)
    assert response.status_code == 200, response.text
    assert listener.recv()["event"] == "chunked"


def test_publish_shortcut_answers_as_flask_does(tmp_path):
    """The publish calls skip Flask's request context; every answer, good or bad, is the one
    the Flask route gives for the same request."""
    from flask import Flask
    from werkzeug.test import Client
    from bunpulse.config import load_settings
    from bunpulse.wsgi import create_app

    settings = load_settings([], environ={"PUSHER_APP_ID": APP_ID, "PUSHER_APP_KEY": KEY,
                                          "PUSHER_APP_SECRET": SECRET})
    app = create_app(settings)
    shortcut = Client(app)
    flask_only = Client(Flask.wsgi_app.__get__(app))  # the same app without the middleware

    def signed(path, body, secret=SECRET, **extra):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        query = signed_query("POST", path, raw, extra, secret=secret)
        return {"path": path, "query_string": query, "data": raw}

    events, batch = f"/apps/{APP_ID}/events", f"/apps/{APP_ID}/batch_events"
    cases = [
        signed(events, event()),
        signed(events, event(info="subscription_count")),
        signed(events, event(), secret="wrong"),
        signed(events, b"{not json"),
        signed(events, event(channels=["bad name"])),
        signed(events, event(data="x" * 10241)),
        signed("/apps/999/events", event()),
        signed(batch, {"batch": [{"name": "e", "channel": "a", "data": "x"}] * 11}),
        signed(batch, {"batch": [{"name": "e", "channel": "a", "data": "x", "info": "bogus"}]}),
        {"path": events, "data": json.dumps(event()),
         "headers": {"Authorization": f"Bearer {SECRET}"}},
        {"path": events, "data": json.dumps(event()), "headers": {"Authorization": "Bearer x"}},
        {"path": events, "data": b"x" * (1 << 20)},
    ]
    for case in cases:
        a, b = shortcut.post(**case), flask_only.post(**case)
        assert (a.status, a.headers["Content-Type"], a.get_json()) == \
               (b.status, b.headers["Content-Type"], b.get_json()), case["path"]
    assert shortcut.post(**cases[0]).get_json() == {}
    assert shortcut.post(**cases[2]).status_code == 401
    assert shortcut.post(**cases[-1]).status_code == 413


def test_plain_http_on_the_websocket_endpoint(server):
    """Upgrades skip Flask; plain HTTP still reaches it: 426 on /app/{key}, 404 elsewhere."""
    response = requests.get(server.url + f"/app/{KEY}?protocol=7", timeout=5)
    assert "WebSocket" in assert_error(response, 426)
    assert_error(requests.get(server.url + "/nothing/here", timeout=5), 404)
    response = requests.post(server.url + f"/app/{KEY}", timeout=5)
    assert_error(response, 405)
    assert "GET" in response.headers["Allow"] and "POST" not in response.headers["Allow"]


def test_wrong_method_allows_only_the_route_methods(server):
    response = requests.delete(server.url + f"/apps/{APP_ID}/events", timeout=5)
    assert_error(response, 405)
    assert sorted(response.headers["Allow"].split(", ")) == ["OPTIONS", "POST"]


def test_a_truncated_body_is_a_400_not_a_server_error(server):
    """A client that sends less than its Content-Length and stops gets a 400; nothing is
    logged as a server error and the server goes on."""
    import socket as socketlib
    with socketlib.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
        sock.shutdown(socketlib.SHUT_WR)
        answer = read_json_answer(sock)
    assert answer.startswith("HTTP/1.1 400") and "Incomplete request body" in answer
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert "Error serving" not in server.log()
