"""GET /health and GET /ready, and the log lines an operator acts on (text or JSON, the
access log, throttled limit warnings)."""
import json
import signal

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
