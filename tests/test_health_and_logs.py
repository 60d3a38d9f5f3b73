"""GET /health and GET /ready, and the log lines an operator acts on (text or JSON, the
access log, throttled limit warnings)."""
import json
import logging
import os
import re
import signal
import socket
import sys

import pytest
import requests

from conftest import APP_ID, KEY, RawClient, connected, pusher_api, wait_until


def test_health_and_ready_answer_json(server):
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"ok": True, "status": "alive"}
    ready = requests.get(server.url + "/ready", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "redis": "not configured"}
    assert ready.headers["Content-Type"] == "application/json"


def test_health_and_ready_say_503_while_the_server_stops(start_server):
    server = start_server()
    # A client that never answers the close frame holds the shutdown for a second: the
    # window in which the server still answers HTTP but is on its way out.
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    connected(client)
    session = requests.Session()
    assert session.get(server.url + "/ready", timeout=5).status_code == 200
    server.signal(signal.SIGTERM)
    ready = wait_until(lambda: (r := session.get(server.url + "/ready", timeout=5))
                       .status_code == 503 and r.json(), timeout=3, message="/ready: 503")
    assert ready == {"ready": False, "reason": "stopping", "redis": "not configured"}
    health = session.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json() == {"ok": False, "status": "stopping"}
    session.close()
    client.close()
    assert server.proc.wait(10) == 0


def json_lines(server):
    lines = [line for line in server.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_one_object_a_line(start_server):
    server = start_server(env={"BUNPULSE_LOG_FORMAT": "json", "BUNPULSE_ACCESS_LOG": "true"})
    api = pusher_api(server)
    api.trigger("news", "ev", {})
    requests.get(server.url + f"/apps/{APP_ID}/channels", timeout=5)  # unsigned: 401
    entries = wait_until(lambda: (e := json_lines(server)) and
                         sum(x["logger"] == "bunpulse.access" for x in e) == 2 and e)
    events = [e.get("event") for e in entries]
    assert "start" in events and "apps_loaded" in events
    start = next(e for e in entries if e.get("event") == "start")
    assert start["level"] == "info" and start["time"].endswith("Z")
    assert start["address"] == f"127.0.0.1:{server.port}" and start["tls"] is False
    access = [e for e in entries if e["logger"] == "bunpulse.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", f"/apps/{APP_ID}/events", 200), ("GET", f"/apps/{APP_ID}/channels", 401)]
    assert access[0]["remote_addr"] == "127.0.0.1" and access[0]["duration_ms"] >= 0
    assert "auth_signature" not in json.dumps(access)  # the query string is not logged
    api._pusher_client.http.session.close()
    server.stop()
    assert json_lines(server)[-1]["event"] == "stop"


def test_text_logs_and_no_access_log_by_default(start_server):
    server = start_server()
    pusher_api(server).trigger("news", "ev", {})
    log = server.log()
    assert "INFO bunpulse: BunPulse listening on" in log and "1 app(s) loaded" in log
    assert "bunpulse.access" not in log
    server.stop()
    assert server.log().rstrip().endswith("BunPulse stopped")


def test_a_limit_hit_is_logged_once_a_minute_not_once_a_client(start_server):
    server = start_server(env={"BUNPULSE_MAX_CONNECTIONS": "1", "BUNPULSE_LOG_FORMAT": "json"})
    first = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    connected(first)
    for _ in range(5):
        refused = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
        assert refused.recv_event("pusher:error")["data"]["code"] == 4004
        refused.close()
    first.close()
    warnings = [e for e in json_lines(server) if e.get("limit") == "max_connections"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning" and warnings[0]["app_id"] == APP_ID
    assert "connection limit" in warnings[0]["message"]


def test_the_log_format_is_checked(start_server):
    import subprocess
    import sys

    from conftest import ROOT, ServerProcess, free_port
    result = subprocess.run([sys.executable, "-m", "bunpulse", "--log-format", "xml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env=ServerProcess.base_env(free_port()))
    assert result.returncode == 2
    assert "invalid --log-format='xml': must be text or json" in result.stderr


def test_json_logs_under_gunicorn_too(start_server):
    import sys
    server = start_server(command=[sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                          env={"BUNPULSE_LOG_FORMAT": "json", "BUNPULSE_ACCESS_LOG": "true"})
    api = pusher_api(server)
    api.trigger("news", "ev", {})
    api._pusher_client.http.session.close()  # an idle keep-alive would hold the stop
    wait_until(lambda: any(e["logger"] == "bunpulse.access" for e in json_lines(server)))
    server.stop()
    entries = json_lines(server)  # gunicorn's own lines as well as BunPulse's
    loggers = {e["logger"] for e in entries}
    assert {"gunicorn.error", "bunpulse.access"} <= loggers
    events = [e.get("event") for e in entries]
    assert "start" in events and "apps_loaded" in events and "stop" in events


# ------------------------------------------------------------------ forged lines (issue 21, 9)

FORGED = "2030-01-01 00:00:00,000 WARNING bunpulse: forged"
# A path that would start a line of its own, and other control characters, as a client sends
# them: percent-encoded (a line feed, a carriage return, a terminal escape, NEL, U+2028).
HOSTILE_PATH = (f"/apps/{APP_ID}/nowhere%0A{FORGED.replace(' ', '%20')}%0D%1B[2J%C2%85%E2%80%A8"
                "end")
LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def send_raw(server, head):
    """The whole answer to a request head sent as is (with Connection: close)."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer.decode("latin-1")


def hostile_requests(server):
    answer = send_raw(server, f"GET {HOSTILE_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith("HTTP/1.1 404"), answer[:80]
    # Raw control bytes in a header value: refused (400) by the request reader, or logged
    # escaped; never written as they are.
    answer = send_raw(server, f"GET /apps/{APP_ID}/raw HTTP/1.1\r\nHost: x\r\n"
                              "X-Forwarded-For: 10.0.0.1\x0b\x1b[31m\r\n\r\n".encode())
    assert answer.startswith(("HTTP/1.1 404", "HTTP/1.1 400")), answer[:80]


@pytest.mark.parametrize("command", [None, "gunicorn"])
def test_a_client_cannot_forge_a_text_log_line(start_server, command):
    command = None if command is None else [sys.executable, "-m", "gunicorn", "-c",
                                            "gunicorn.conf.py"]
    server = start_server(command=command, env={"BUNPULSE_ACCESS_LOG": "true"})
    hostile_requests(server)
    wait_until(lambda: "nowhere" in server.log(), message="the access line")
    lines = server.log().splitlines()
    assert all(LINE_START.match(line) for line in lines), \
        [line for line in lines if not LINE_START.match(line)]
    access = next(line for line in lines if "nowhere" in line)
    assert "nowhere\\n2030-01-01" in access and "forged\\r\\x1b[2J\\x85\\u2028end" in access
    # a header value with a control character: refused (400) or logged escaped
    assert "\x0b" not in server.log() and "\x1b" not in server.log()


def test_json_logs_stay_one_object_a_line_whatever_the_client_sends(start_server):
    server = start_server(env={"BUNPULSE_LOG_FORMAT": "json", "BUNPULSE_ACCESS_LOG": "true"})
    hostile_requests(server)
    entries = wait_until(lambda: (e := json_lines(server)) and
                         any(x["logger"] == "bunpulse.access" for x in e) and e)
    access = next(e for e in entries if e["logger"] == "bunpulse.access")
    assert "\n" not in access["message"] and "\u2028" not in access["message"]
    assert access["path"].startswith(f"/apps/{APP_ID}/nowhere\\n2030")


def test_a_host_applications_own_formatter_gets_escaped_fields_too():
    """Mounted in a host application, BunPulse's lines go through the host's formatter: the
    fields a client chose are escaped before they reach it."""
    from bunpulse.config import load_settings
    from bunpulse.wsgi import create_app
    app = create_app(load_settings(None, environ={}, overrides={
        "app_id": APP_ID, "app_key": KEY, "app_secret": "s", "env_file": os.devnull,
        "access_log": True}))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter("%(message)s").format(record))
    access = logging.getLogger("bunpulse.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        app.test_client().get(HOSTILE_PATH, headers={"X-Forwarded-For": "1.2.3.4\x1b[2J"})
    finally:
        access.removeHandler(handler)
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0], lines
    assert "nowhere\\n2030" in lines[0] and "1.2.3.4\\x1b[2J" in lines[0]
