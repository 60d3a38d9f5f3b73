"""Limits against hostile clients: message rate, subscriptions and connections per address,
the listen backlog, the file-descriptor limit, repeated presence subscriptions and quiet logs
for client mistakes. Real servers, raw clients."""
import json
import socket
import subprocess
import sys
import time

import pytest
import requests
import websocket

from bunpulse.addresses import TrustedProxies, client_address, counted_as
from conftest import (KEY, RawClient, ServerProcess, connected, pusher_api, raw_subscribe,
                      wait_until)

PATH = f"/app/{KEY}?protocol=7&client=py&version=1.0"


def pinged(client, timeout=2.0):
    """Round trip of one pusher:ping, in seconds."""
    start = time.monotonic()
    client.send({"event": "pusher:ping", "data": {}})
    client.recv_event("pusher:pong")
    assert time.monotonic() - start < timeout
    return time.monotonic() - start


# ------------------------------------------------------------------ message rate

@pytest.fixture(scope="module")
def limited():
    server = ServerProcess(env={"BUNPULSE_MAX_MESSAGES_PER_SECOND": "50",
                                "BUNPULSE_MESSAGE_BURST": "100",
                                "BUNPULSE_MAX_SUBSCRIPTIONS": "5",
                                "BUNPULSE_MAX_CONNECTIONS_PER_IP": "3"})
    yield server
    server.stop()


def connect(server, headers=None, trickle=False):
    """A raw WebSocket client; with `trickle`, its handshake goes in many small pieces, so
    that the event loop hands it to a greenlet (serving/loop.py)."""
    if not trickle:
        return RawClient(server.ws_url + PATH, header=headers or [])
    sock = Trickle()
    sock.connect((server.host, server.port))
    client = RawClient(server.ws_url + PATH, header=headers or [], socket=sock)
    sock.trickle = False
    return client


class Trickle(socket.socket):
    """A socket that sends in pieces of 16 bytes, a little apart, while `trickle` is set."""

    trickle = True

    def send(self, data, *flags):
        if not self.trickle:
            return super().send(data, *flags)
        for at in range(0, len(data), 16):
            self.sendall(data[at:at + 16], *flags)
            time.sleep(0.003)
        return len(data)


def test_a_flood_of_pings_gets_pusher_error_then_close_4100(limited):
    flooder, other = connect(limited), connect(limited)
    connected(flooder), connected(other)
    for _ in range(400):
        flooder.ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
    messages = []
    while True:
        message = flooder.recv()
        messages.append(message)
        if isinstance(message, tuple):
            break
    pongs = [m for m in messages[:-1] if m["event"] == "pusher:pong"]
    errors = [m for m in messages[:-1] if m["event"] == "pusher:error"]
    assert 100 <= len(pongs) < 150  # the burst, and what the rate refilled meanwhile
    assert errors == [{"event": "pusher:error", "data": {
        "code": 4100, "message": "Too many messages: at most 50 per second (bursts of 100)"}}]
    assert messages[-1][:2] == ("close", 4100)
    pinged(other)  # the other client was served all along
    flooder.close(), other.close()


def test_websocket_ping_frames_count_too(limited):
    flooder = connect(limited)
    connected(flooder)
    for _ in range(400):
        flooder.ws.ping(b"x")
    pongs = 0
    while True:
        opcode, data = flooder.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        pongs += opcode == websocket.ABNF.OPCODE_PONG
    assert int.from_bytes(data[:2], "big") == 4100
    assert 100 <= pongs < 150
    flooder.close()


def test_messages_served_in_a_greenlet_count_as_those_served_in_the_event_loop(limited):
    # pusher:ping is answered in the event loop; an unknown event's answer comes from the
    # greenlet that messages which may wait get: the two count toward one allowance.
    flooder = connect(limited)
    connected(flooder)
    for n in range(400):
        flooder.ws.send(json.dumps({"event": "pusher:ping" if n % 2 else "no-such-event",
                                    "data": {}}))
    answers, unsupported = 0, 0
    while True:
        message = flooder.recv()
        if isinstance(message, tuple):
            break
        if message["event"] == "pusher:error" and message["data"]["code"] == 4100:
            continue
        answers += 1
        unsupported += "Unsupported event" in json.dumps(message)
    assert message[:2] == ("close", 4100)
    assert 100 <= answers < 150 and 40 <= unsupported <= answers - 40
    flooder.close()


def test_a_client_within_the_rate_is_never_refused(limited):
    client = connect(limited)
    connected(client)
    for _ in range(90):  # most of the burst at once
        client.send({"event": "pusher:ping", "data": {}})
    for _ in range(90):
        client.recv_event("pusher:pong")
    for _ in range(40):  # then under 50 per second for a while
        time.sleep(0.03)
        pinged(client)
    client.close()


# ------------------------------------------------------------------ subscriptions

def test_subscriptions_past_the_limit_get_an_error_and_the_connection_stays(limited):
    client = connect(limited)
    connected(client)
    for n in range(5):
        client.send({"event": "pusher:subscribe", "data": {"channel": f"limit-{n}"}})
        client.recv_event("pusher_internal:subscription_succeeded")
    client.send({"event": "pusher:subscribe", "data": {"channel": "limit-5"}})
    refused = client.recv_event("pusher:subscription_error")
    assert refused["channel"] == "limit-5"
    assert refused["data"]["status"] == 403
    error = client.recv_event("pusher:error")
    assert "at most 5 channels per connection" in error["data"]["message"]
    pinged(client)  # still connected
    client.send({"event": "pusher:unsubscribe", "data": {"channel": "limit-0"}})
    client.send({"event": "pusher:subscribe", "data": {"channel": "limit-5"}})
    assert client.recv_event("pusher_internal:subscription_succeeded")["channel"] == "limit-5"
    client.close()


# ------------------------------------------------------------------ connections per address

def test_connections_per_address_past_the_limit_are_refused_with_4004(limited):
    clients = [connect(limited) for _ in range(3)]
    for client in clients:
        connected(client)
    extra = connect(limited)
    error = extra.recv_event("pusher:error")
    assert error["data"]["code"] == 4004
    assert "Too many connections from your address (at most 3)" in error["data"]["message"]
    assert extra.recv_close()[0] == 4004
    clients.pop().close()
    # the freed place is given again once the server has seen the close
    wait_until(lambda: _admitted(limited), timeout=5, message="a free place")
    for client in clients:
        client.close()


def _admitted(server):
    client = connect(server)
    try:
        message = client.recv()
        return message["event"] == "pusher:connection_established"
    finally:
        client.close()


def test_forwarded_addresses_are_ignored_unless_the_proxy_is_trusted(limited):
    # The server does not trust 127.0.0.1 here: each header names another address, in vain.
    clients = [connect(limited, [f"X-Forwarded-For: 10.0.0.{n}"]) for n in range(3)]
    for client in clients:
        connected(client)
    extra = connect(limited, ["X-Forwarded-For: 10.0.0.99"])
    assert extra.recv_event("pusher:error")["data"]["code"] == 4004
    for client in clients + [extra]:
        client.close()


# An upgrade whose head arrives in many pieces is served in a greenlet, not in the event loop.
@pytest.mark.parametrize("trickle", [False, True], ids=["event loop", "greenlet"])
def test_behind_a_trusted_proxy_each_forwarded_address_has_its_own_quota(start_server, trickle):
    server = start_server(env={"BUNPULSE_MAX_CONNECTIONS_PER_IP": "1",
                               "BUNPULSE_TRUST_PROXY": "127.0.0.0/8, ::1"})
    first = connect(server, ["X-Forwarded-For: 203.0.113.7"], trickle)
    second = connect(server, ["Forwarded: for=198.51.100.2;proto=http"], trickle)
    connected(first), connected(second)
    again = connect(server, ["X-Forwarded-For: 192.0.2.1, 203.0.113.7"], trickle)  # last hop
    assert again.recv_event("pusher:error")["data"]["code"] == 4004
    for client in (first, second, again):
        client.close()


def test_client_address():
    trusted = TrustedProxies("10.0.0.0/8,127.0.0.1")
    env = {"REMOTE_ADDR": "10.1.1.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 1.2.3.4, 10.2.2.2"}
    assert client_address(env, trusted) == "1.2.3.4"  # the nearest hop not of our proxies
    assert client_address({**env, "REMOTE_ADDR": "8.8.8.8"}, trusted) == "8.8.8.8"
    assert client_address(env, TrustedProxies(None)) == "10.1.1.1"
    forwarded = {"REMOTE_ADDR": "127.0.0.1",
                 "HTTP_FORWARDED": 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.5'}
    assert client_address(forwarded, trusted) == "2001:db8::1"
    assert client_address({"REMOTE_ADDR": "127.0.0.1"}, trusted) == "127.0.0.1"
    assert client_address({"REMOTE_ADDR": ""}, TrustedProxies("1")) == ""


def test_a_number_of_proxies_believes_only_the_hops_they_appended():
    one, two = TrustedProxies("1"), TrustedProxies("2")
    # What the client wrote is left of what the proxy appended: it chooses nothing.
    env = {"REMOTE_ADDR": "", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 1.2.3.4"}  # unix socket
    assert client_address(env, one) == "1.2.3.4"
    assert client_address(env, two) == "6.6.6.6"
    assert client_address({**env, "HTTP_X_FORWARDED_FOR": "1.2.3.4"}, two) == ""  # 1 of 2 hops
    assert client_address({"REMOTE_ADDR": "10.0.0.1"}, one) == "10.0.0.1"  # no header: the peer
    forwarded = {"REMOTE_ADDR": "10.0.0.1", "HTTP_FORWARDED": 'for=6.6.6.6, for="[2001:db8::1]"'}
    assert client_address(forwarded, one) == "2001:db8::1"
    with pytest.raises(ValueError, match="number of proxies"):
        TrustedProxies("all")


def test_ipv6_clients_are_counted_by_their_network():
    assert counted_as("2001:db8:1:2:aaaa::1") == counted_as("2001:db8:1:2:bbbb::9") == \
        "2001:db8:1:2::/64"
    assert counted_as("2001:db8:1:3::1") != counted_as("2001:db8:1:2::1")
    assert counted_as("2001:db8:1:2::1", 128) == "2001:db8:1:2::1"
    assert counted_as("2001:DB8:0:0::1", 128) == "2001:db8::1"  # one spelling per address
    assert counted_as("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert counted_as("::ffff:192.0.2.1") == "192.0.2.1"  # a dual-stack socket's IPv4 peer
    assert counted_as("192.0.2.1") == "192.0.2.1"
    assert counted_as("") == ""  # a unix socket's peer


def test_an_ipv6_subscriber_cannot_escape_the_limit_with_new_addresses(start_server):
    server = start_server(env={"BUNPULSE_MAX_CONNECTIONS_PER_IP": "2",
                               "BUNPULSE_TRUST_PROXY": "1"})
    clients = [connect(server, [f"X-Forwarded-For: 2001:db8:1:2::{n:x}"]) for n in range(1, 3)]
    for client in clients:
        connected(client)
    other = connect(server, ["X-Forwarded-For: 2001:db8:1:3::1"])  # another subscriber's /64
    connected(other)
    again = connect(server, ["X-Forwarded-For: 2001:db8:1:2:ffff::3"])
    assert again.recv_event("pusher:error")["data"]["code"] == 4004
    for client in clients + [other, again]:
        client.close()


def test_trust_proxy_all_is_refused_at_start_up():
    proc = subprocess.run([sys.executable, "-m", "bunpulse", "--trust-proxy", "all"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "--trust-proxy" in proc.stderr and "number of proxies" in proc.stderr


def test_trust_proxy_is_checked_at_start_up(start_server):
    proc = subprocess.run([sys.executable, "-m", "bunpulse", "--trust-proxy", "10.0.0.0/33"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "--trust-proxy" in proc.stderr and "IP addresses or networks" in proc.stderr


# ------------------------------------------------------------------ presence

def test_a_repeated_presence_subscribe_never_changes_the_identity(start_server):
    server = start_server()
    client, watcher = connect(server), connect(server)
    socket_id = connected(client)
    raw_subscribe(client, socket_id, "presence-who", json.dumps({"user_id": "alice"}))
    client.recv_event("pusher_internal:subscription_succeeded")
    raw_subscribe(client, socket_id, "presence-who",
                  json.dumps({"user_id": "mallory"}))  # validly signed, another user
    error = client.recv_event("pusher:error")
    assert error["data"] == {"code": None,
                             "message": "Existing subscription to channel presence-who"}
    raw_subscribe(watcher, connected(watcher), "presence-who", json.dumps({"user_id": "w"}))
    roster = json.loads(watcher.recv_event("pusher_internal:subscription_succeeded")["data"])
    assert sorted(roster["presence"]["ids"]) == ["alice", "w"]
    users = pusher_api(server).users_info("presence-who")["users"]
    assert sorted(u["id"] for u in users) == ["alice", "w"]
    # the connection is still alice's: leaving removes alice, nobody else
    client.send({"event": "pusher:unsubscribe", "data": {"channel": "presence-who"}})
    removed = watcher.recv_event("pusher_internal:member_removed")
    assert json.loads(removed["data"]) == {"user_id": "alice"}
    client.close(), watcher.close()


# ------------------------------------------------------------------ listen backlog

@pytest.mark.parametrize("command", [None, [sys.executable, "-m", "gunicorn", "-c",
                                             "gunicorn.conf.py"]], ids=["embedded", "gunicorn"])
def test_listen_backlog_is_configurable(start_server, command):
    server = start_server(env={"BUNPULSE_BACKLOG": "77"}, command=command)
    out = subprocess.run(["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True,
                         text=True, timeout=10).stdout
    assert out.split()[2] == "77", out  # Send-Q of a listening socket: its backlog


# ------------------------------------------------------------------ descriptor limit

NOFILE = 64


@pytest.mark.parametrize("module, args", [("bunpulse", []),
                                          ("gunicorn", ["-c", "gunicorn.conf.py"])],
                         ids=["embedded", "gunicorn"])
def test_at_the_descriptor_limit_one_line_then_recovery(start_server, module, args):
    # The server under a low descriptor limit, set in its own process before it starts.
    command = [sys.executable, "-c",
               f"import resource, runpy, sys; sys.argv[1:] = {args!r}; "
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
               f"runpy.run_module({module!r}, run_name='__main__')"]
    server = start_server(command=command)
    holders = []
    for _ in range(NOFILE + 20):  # more idle connections than descriptors
        sock = socket.create_connection((server.host, server.port), timeout=5)
        holders.append(sock)
    wait_until(lambda: "out of file descriptors" in server.log(), timeout=10,
               message="the descriptor-limit line")
    time.sleep(2.5)  # accept() is retried meanwhile, with back-off
    log = server.log()
    assert log.count("out of file descriptors") == 1, log
    assert "Traceback" not in log and "Too many open files" in log
    for sock in holders:
        sock.close()
    # New clients are served again, and the recovery is said once.
    wait_until(lambda: _served(server), timeout=10, message="a client served again")
    wait_until(lambda: "accepting connections again" in server.log(), timeout=5,
               message="the recovery line")
    client = connect(server)
    connected(client)
    pinged(client)
    client.close()
    assert server.log().count("accepting connections again") == 1
    assert server.log().count("out of file descriptors") == 1


def _served(server):
    try:
        return requests.get(server.url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# ------------------------------------------------------------------ logging

def test_client_mistakes_are_logged_at_info_without_socket_reprs(start_server):
    server = start_server()
    bad_requests = [b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                    b"GET /app/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"]
    for request in bad_requests:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(request)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 4"), answer[:80]
    wait_until(lambda: "bunpulse.clients" in server.log(), message="the info line")
    log = server.log()
    assert "ERROR" not in log and "WARNING bunpulse.clients" not in log
    assert "<gevent." not in log and "fd=" not in log  # no socket reprs
    assert _served(server)


def test_info_lines_are_hidden_at_log_level_warning(start_server):
    server = start_server(env={"BUNPULSE_LOG_LEVEL": "warning"})
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nbroken\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    assert "bunpulse.clients" not in server.log()

