"""The debug dashboard in a real headless Chromium (Debian's, driven by Playwright), against
real servers, pusher-js clients and (for the deployment-wide view) gunicorn with two workers
on a real redis-server.

Screenshots of each view go to $BUNPULSE_SCREENSHOT_DIR when set (the README's come from
`BUNPULSE_SCREENSHOT_DIR=docs scripts/test tests/test_dashboard.py`)."""
import json
import os
import re
import socket
import sys
import threading
import time

import pytest
import requests
from playwright import sync_api as playwright_api

from conftest import (APP_ID, KEY, SECRET, RawClient, ServerProcess, connected,
                      gunicorn_workers, only_worker, pusher_api, raw_subscribe, wait_until)

DASHBOARD_ENV = {"BUNPULSE_DASHBOARD": "true", "BUNPULSE_WEBHOOK_DELAY_MS": "0"}
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
INJECTION = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(10000)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: message.type == "error" and not message.text.startswith(
        "Failed to load resource") and errors.append(message.text))  # refusals are tested
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"),
                                      dialog.dismiss()))
    page.errors = errors
    yield page
    context.close()


@pytest.fixture(scope="module")
def dashboard_server():
    process = ServerProcess(env=DASHBOARD_ENV)
    yield process
    process.stop()


def screenshot(page, name):
    target = os.environ.get("BUNPULSE_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        page.screenshot(path=os.path.join(target, f"dashboard-{name}.png"), full_page=True)


def sign_in(page, server, app_id=APP_ID, secret=SECRET):
    page.goto(server.url + "/dashboard")
    page.get_by_label("App ID", exact=True).fill(app_id)
    page.get_by_label("Secret", exact=True).fill(secret)
    page.get_by_role("button", name="Sign in").click()


def wait_live(page):
    playwright_api.expect(page.get_by_role("status").first).to_have_text("Live")


def log_text(page):
    return page.locator("#log").inner_text()


def wait_log(page, pattern, timeout=10):
    """Wait until the live log's text matches the regular expression."""
    return wait_until(lambda: re.search(pattern, log_text(page)), timeout, 0.1,
                      f"{pattern!r} in the live log")


def channel_row(page, name):
    return page.locator("#channels tbody tr").filter(
        has=page.get_by_role("rowheader", name=name, exact=True))


# ------------------------------------------------------------------------ one server

def test_signs_in_and_shows_connections_subscriptions_members_and_publishes(
        page, dashboard_server, node_for):
    page.goto(dashboard_server.url + "/dashboard")
    screenshot(page, "signin")
    sign_in(page, dashboard_server)
    wait_live(page)
    node = node_for(dashboard_server)
    socket_id = node.connect("reader")
    node.subscribe("reader", "news")
    wait_log(page, rf"connection\s+socket {re.escape(socket_id)}")
    wait_log(page, rf"subscribed\s+socket {re.escape(socket_id)} · channel news")
    wait_log(page, r"occupied\s+channel news")
    playwright_api.expect(channel_row(page, "news").locator("td").first).to_have_text("1")

    node.connect("ada", presence={"user_id": "ada", "user_info": {"name": "Ada Lovelace"}})
    node.subscribe("ada", "presence-lab")
    playwright_api.expect(channel_row(page, "presence-lab")).to_contain_text(
        'ada: {"name":"Ada Lovelace"}')
    wait_log(page, r'member_added\s+channel presence-lab · user ada · user_info '
                   r'\{"name":"Ada Lovelace"\}')

    node.subscribe("reader", "cache-weather")
    pusher_api(dashboard_server).trigger("cache-weather", "forecast", {"sun": True})
    playwright_api.expect(channel_row(page, "cache-weather")).to_contain_text(
        'cached forecast: {"sun": true}')

    # The event creator publishes through the HTTP API's path: pusher-js receives it.
    page.get_by_label("Channel", exact=True).fill("news, presence-lab")
    page.get_by_label("Event", exact=True).fill("greeting")
    page.get_by_label("Data", exact=True).fill('{"hello": "world"}')
    page.get_by_role("button", name="Send").click()
    playwright_api.expect(page.locator("#ec-result")).to_have_text(
        "Sent to news, presence-lab")
    assert node.wait_event("reader", "greeting", "news")["data"] == {"hello": "world"}
    assert node.wait_event("ada", "greeting", "presence-lab")["data"] == {"hello": "world"}
    wait_log(page, r"api_message\s+channels news, presence-lab · event greeting · 18 B")

    # ... with the API's limits and errors, shown in the page.
    page.get_by_label("Data", exact=True).fill(json.dumps({"big": "x" * 11000}))
    page.get_by_role("button", name="Send").click()
    playwright_api.expect(page.locator("#ec-result")).to_have_text(
        "Error 413: Event data is larger than 10240 bytes")
    page.get_by_label("Data", exact=True).fill("not json")
    page.get_by_role("button", name="Send").click()
    playwright_api.expect(page.locator("#ec-result")).to_have_text(
        "Error 400: Data is not valid JSON")

    # Client events, unsubscribes and the close code reach the log too.
    node.subscribe("ada", "private-room")
    node.subscribe("reader", "private-room")
    node.call("trigger", id="ada", channel="private-room", event="client-typing",
              data={"on": True})
    wait_log(page, r'client_event\s+socket [\d.]+ · channel private-room · event client-typing')
    node.call("unsubscribe", id="reader", channel="news")
    wait_log(page, r"unsubscribed\s+socket [\d.]+ · channel news")
    wait_log(page, r"vacated\s+channel news")

    # Charts: the last hour's samples, drawn as SVG lines from the server's ring buffer.
    pusher_api(dashboard_server).trigger("presence-lab", "tick", {})
    wait_until(lambda: page.locator("#now-connections").inner_text() == "now 2", 6, 0.2,
               "the connections chart's latest figure")
    for chart in ("chart-connections", "chart-messages", "chart-api"):
        assert page.locator(f"#{chart} polyline").count() >= 1
    assert page.locator("#chart-messages polyline").count() == 2
    points = page.locator("#chart-connections polyline").get_attribute("points").split()
    assert len(points) >= 301 and len({p.split(",")[1] for p in points}) > 1

    # Filters, pause and clear.
    page.get_by_label("Filter by type").select_option("member_added")
    assert set(page.locator("#log .type").all_inner_texts()) == {"member_added"}
    page.get_by_label("Filter by type").select_option("")
    page.get_by_label("Filter by channel").fill("presence-lab")
    assert "channel news" not in log_text(page) and "presence-lab" in log_text(page)
    page.get_by_label("Filter by channel").fill("")
    screenshot(page, "live")
    page.get_by_role("button", name="Pause").click()
    before = page.locator("#log li").count()
    pusher_api(dashboard_server).trigger("presence-lab", "while-paused", {})
    wait_until(lambda: "1 waiting" in page.locator("#log-count").inner_text(), 5, 0.1,
               "a held record")
    assert page.locator("#log li").count() == before
    page.get_by_role("button", name="Resume").click()
    wait_log(page, r"event while-paused")
    page.get_by_role("button", name="Clear").click()
    assert page.locator("#log li").count() == 0

    assert SECRET not in page.content()
    assert page.errors == []


def test_wrong_secret_is_refused(page, dashboard_server):
    sign_in(page, dashboard_server, secret="not-the-secret")
    playwright_api.expect(page.get_by_role("alert")).to_have_text("Wrong app ID or secret.")
    assert page.get_by_label("Secret", exact=True).input_value() == ""
    screenshot(page, "refused")
    sign_in(page, dashboard_server, app_id="no-such-app", secret=SECRET)
    playwright_api.expect(page.get_by_role("alert")).to_have_text("Wrong app ID or secret.")
    assert page.request.get(dashboard_server.url + "/dashboard/api/channels").status == 401
    assert page.request.get(dashboard_server.url + "/dashboard/events").status == 401


def test_event_data_and_names_are_shown_as_text(page, dashboard_server, node_for):
    sign_in(page, dashboard_server)
    wait_live(page)
    node = node_for(dashboard_server)
    node.connect("html", presence={"user_id": INJECTION, "user_info": {"bio": INJECTION}})
    node.subscribe("html", "presence-html")
    api = pusher_api(dashboard_server)
    api.trigger("presence-html", INJECTION, {"html": INJECTION})
    node.wait_event("html", INJECTION)
    wait_log(page, re.escape(f"event {INJECTION}"))
    wait_until(lambda: any("<img src=x onerror=" in text and '"html"' in text
                           for text in page.locator("#log .data").all_inner_texts()),
               5, 0.1, "the event's data as text")
    playwright_api.expect(channel_row(page, "presence-html")).to_contain_text(INJECTION)
    # The event creator's answer is text too.
    page.get_by_label("Channel", exact=True).fill(INJECTION)
    page.get_by_label("Event", exact=True).fill("x")
    page.get_by_role("button", name="Send").click()
    playwright_api.expect(page.locator("#ec-result")).to_contain_text("Invalid channel name")
    time.sleep(0.3)  # an image load error would have run its handler by now
    screenshot(page, "injection")
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []


def test_sign_out_ends_the_stream_and_the_session(page, dashboard_server):
    sign_in(page, dashboard_server)
    wait_live(page)
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    # The same session read by another client: its stream ends when the page signs out.
    stream = requests.get(dashboard_server.url + "/dashboard/events", cookies=cookies,
                          stream=True, timeout=10)
    assert stream.status_code == 200
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(stream.iter_lines(decode_unicode=True)))
    reader.start()
    wait_until(lambda: "event: ready" in lines, 5, message="the stream's ready event")
    page.get_by_role("button", name="Sign out").click()
    playwright_api.expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    reader.join(5)
    assert not reader.is_alive(), "the stream outlived its session"
    assert "event: end" in lines
    # The old cookie is revoked, not merely forgotten by the browser.
    again = requests.get(dashboard_server.url + "/dashboard/api/channels", cookies=cookies,
                         timeout=5)
    assert again.status_code == 401


def test_forms_need_the_csrf_token(dashboard_server):
    http = requests.Session()
    page = http.get(dashboard_server.url + "/dashboard", timeout=5)
    assert page.status_code == 200
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    refused = http.post(dashboard_server.url + "/dashboard/sign-in",
                        data={"app_id": APP_ID, "secret": SECRET}, timeout=5)
    assert refused.status_code == 403
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    signed_in = http.post(dashboard_server.url + "/dashboard/sign-in", timeout=5,
                          data={"app_id": APP_ID, "secret": SECRET, "csrf_token": token})
    assert signed_in.status_code == 200 and "Live log" in signed_in.text
    publish = http.post(dashboard_server.url + "/dashboard/api/publish", timeout=5,
                        json={"channels": "x", "event": "e", "data": "{}"})
    assert publish.status_code == 403
    assert http.post(dashboard_server.url + "/dashboard/sign-out", timeout=5).status_code == 403


def test_off_unless_enabled(server):
    assert requests.get(server.url + "/dashboard", timeout=5).status_code == 404


# ------------------------------------------------------------------------ deployment-wide

def test_shows_the_whole_deployment_under_gunicorn_with_two_workers(
        browser, start_server, redis_server, node_for):
    env = dict(DASHBOARD_ENV, BUNPULSE_REDIS_URL=redis_server.url, BUNPULSE_WORKERS="2")
    server = start_server(env=env, command=GUNICORN)
    workers = gunicorn_workers(server)
    for worker in workers:  # both booted before the viewer signs in, so both hear of it
        with only_worker(server, worker):
            pass
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(10000)
    try:
        sign_in(page, server)
        wait_live(page)
        node = node_for(server)
        socket_ids = []
        for n in range(4):  # two connections on each worker, reached on purpose
            name = f"c{n}"
            with only_worker(server, workers[n % 2]):
                socket_ids.append(node.connect(name, presence={
                    "user_id": name, "user_info": {"seat": n}}))
            node.subscribe(name, "presence-hall")
        # A socket id is `<its worker's own prefix>.<a counter>`: each landed where sent.
        prefixes = [socket_id.split(".")[0] for socket_id in socket_ids]
        assert prefixes[0] != prefixes[1] and prefixes == prefixes[:2] * 2, socket_ids
        total = len(socket_ids)
        for socket_id in socket_ids:  # records from both workers reach the page
            wait_log(page, rf"connection\s+socket {re.escape(socket_id)}")
        row = channel_row(page, "presence-hall")
        playwright_api.expect(row.locator("td").first).to_have_text(str(total))
        playwright_api.expect(row).to_contain_text('c1: {"seat":1}')
        playwright_api.expect(page.locator("#channel-total")).to_contain_text(
            f"{total} connection(s)")
        wait_until(lambda: page.locator("#now-connections").inner_text() == f"now {total}",
                   8, 0.2, "both workers' samples summed in the chart")
        screenshot(page, "cluster")
        # Whichever worker serves the page: reloads agree, and each worker, asked on
        # purpose, counts the whole deployment.
        for _ in range(3):
            page.reload()
            wait_live(page)
            playwright_api.expect(row.locator("td").first).to_have_text(str(total))
        cookies = {c["name"]: c["value"] for c in context.cookies()}
        for worker in workers:
            with only_worker(server, worker):
                answer = requests.get(server.url + "/dashboard/api/channels", cookies=cookies,
                                      timeout=5).json()
            assert answer["connections"] == total
            assert [(c["name"], c["subscription_count"], c["user_count"])
                    for c in answer["channels"]] == [("presence-hall", total, total)]
        page.get_by_label("Channel", exact=True).fill("presence-hall")
        page.get_by_label("Event", exact=True).fill("everyone")
        page.get_by_label("Data", exact=True).fill('{"n": 1}')
        page.get_by_role("button", name="Send").click()
        playwright_api.expect(page.locator("#ec-result")).to_have_text("Sent to presence-hall")
        for n in range(total):
            node.wait_event(f"c{n}", "everyone")
        wait_log(page, r"api_message\s+channels presence-hall · event everyone")
        # Signing out revokes the session in every worker, each asked on purpose.
        page.get_by_role("button", name="Sign out").click()
        playwright_api.expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        for worker in workers:
            with only_worker(server, worker):
                assert requests.get(server.url + "/dashboard/api/channels", cookies=cookies,
                                    timeout=5).status_code == 401
    finally:
        context.close()


# ------------------------------------------------------------------------ the feed, without a browser

class LogReader:
    """A signed-in session reading the live log's event stream in a thread."""

    def __init__(self, url, app_id=APP_ID, secret=SECRET):
        self.http = requests.Session()
        page = self.http.get(url + "/dashboard", timeout=5).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        self.http.post(url + "/dashboard/sign-in", timeout=5, data={
            "app_id": app_id, "secret": secret, "csrf_token": token}).raise_for_status()
        self.records, self.ready = [], threading.Event()
        self.response = self.http.get(url + "/dashboard/events", stream=True, timeout=10)
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(5), "no ready event"

    def _read(self):
        try:
            for line in self.response.iter_lines(chunk_size=65536, decode_unicode=True):
                if line == "event: ready":
                    self.ready.set()
                elif line.startswith("data: ["):
                    self.records.extend(json.loads(line[6:]))
        except (requests.RequestException, AttributeError, ValueError):
            pass  # closed by the test

    def wait(self, **fields):
        return wait_until(lambda: next((r for r in list(self.records) if all(
            r.get(k) == v for k, v in fields.items())), None), 5, message=f"record {fields}")

    def close(self):
        self.response.close()


@pytest.fixture
def library_dashboard(webhook_receiver):
    from gevent import monkey

    from bunpulse import start_bunpulse
    assert not monkey.is_module_patched("socket"), "the test process must not be patched"
    server = start_bunpulse(port=0, host="127.0.0.1", app_id=APP_ID, app_key="test-key",
                            app_secret=SECRET, env_file=os.devnull, dashboard=True,
                            webhook_url=webhook_receiver.url, webhook_batch_ms=0,
                            webhook_delay_ms=0, max_message_size=1024, max_buffer=65536)
    yield server
    server.stop()


def test_reports_only_while_someone_watches(library_dashboard, webhook_receiver, raw):
    core = library_dashboard.core
    client = RawClient(f"ws://127.0.0.1:{library_dashboard.port}/app/{KEY}?protocol=7")
    connected(client)
    assert core.watching == {}  # nobody watches: the core builds no record
    reader = LogReader(library_dashboard.url)
    assert core.watching == {APP_ID: True}
    try:
        socket_id = connected(other := RawClient(
            f"ws://127.0.0.1:{library_dashboard.port}/app/{KEY}?protocol=7"))
        reader.wait(type="connection", socket_id=socket_id)
        raw_subscribe(other, socket_id, "room")
        reader.wait(type="subscribed", socket_id=socket_id, channel="room")
        sent = reader.wait(type="webhook_sent")  # channel_occupied reached the receiver
        assert "channel_occupied" in sent["events"] and sent["channels"] == ["room"]
        webhook_receiver.wait_events("channel_occupied")
        other.send("x" * 2000)  # past max_message_size: the server closes with 1009
        closed = reader.wait(type="disconnection", socket_id=socket_id)
        assert closed["code"] == 1009 and closed["closed_by"] == "server"
        reader.wait(type="vacated", channel="room")
        # A client that stops reading is evicted (4100).
        stalled = RawClient(f"ws://127.0.0.1:{library_dashboard.port}/app/{KEY}?protocol=7",
                            sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
        stalled_id = connected(stalled)
        raw_subscribe(stalled, stalled_id, "firehose")
        stalled.recv_event("pusher_internal:subscription_succeeded")
        for _ in range(800):  # 7 MB: far past what loopback buffers absorb
            library_dashboard.publish("firehose", {"event": "big", "data": "z" * 9000})
            if any(r.get("type") == "eviction" for r in list(reader.records)):
                break
        evicted = reader.wait(type="eviction", socket_id=stalled_id)
        assert evicted["code"] == 4100 and evicted["reason"] == "Client too slow"
        reader.wait(type="disconnection", socket_id=stalled_id, code=4100, closed_by="evicted")
        stalled.close()
    finally:
        reader.close()
        client.close()
    # The stream's end is seen at its next write (a keep-alive at the latest).
    wait_until(lambda: core.watching == {}, 15, 0.1, "the viewer's departure")


# ------------------------------------------------------------------------ sessions, plain HTTP

TOKEN = re.compile(r'(?:name="csrf_token" value|data-csrf)="([^"]+)"')


class Visitor:
    """A browser-like HTTP client of one server's dashboard: cookies and the page's token."""

    def __init__(self, server, headers=None):
        self.server = server
        self.http = requests.Session()
        self.http.headers.update(headers or {})

    def page(self):
        return self.http.get(self.server.url + "/dashboard", timeout=5,
                             verify=self.server.ca or True)

    def sign_in(self, app_id=APP_ID, secret=SECRET):
        """The sign-in form's answer (the dashboard's page once signed in)."""
        token = TOKEN.search(self.page().text).group(1)
        return self.http.post(self.server.url + "/dashboard/sign-in", timeout=5,
                              verify=self.server.ca or True, data={
            "app_id": app_id, "secret": secret, "csrf_token": token})

    def sign_out(self):
        token = TOKEN.search(self.page().text).group(1)
        return self.http.post(self.server.url + "/dashboard/sign-out", timeout=5,
                              data={"csrf_token": token})

    def get(self, path="/dashboard/api/channels"):
        return self.http.get(self.server.url + path, timeout=5)

    def stream_status(self):
        """The event stream's status, without waiting for a stream that never ends."""
        with self.http.get(self.server.url + "/dashboard/events", timeout=5,
                           stream=True) as answer:
            return answer.status_code

    def publish(self, **body):
        token = TOKEN.search(self.page().text).group(1)
        return self.http.post(self.server.url + "/dashboard/api/publish", timeout=5,
                              json=body, headers={"X-CSRF-Token": token})

    def copy(self):
        """Another client holding the same cookie (a copied or stolen one)."""
        other = Visitor(self.server, dict(self.http.headers))
        other.http.cookies.update(self.http.cookies)
        return other

    def moved_to(self, server):
        """The same cookies against another server (a restart, another port)."""
        self.server = server
        return self


def signed_in(server, **kwargs):
    visitor = Visitor(server, **kwargs)
    answer = visitor.sign_in()
    assert answer.status_code == 200 and "Live log" in answer.text, answer.text[:300]
    return visitor


def restart(start_server, server, **kwargs):
    server.stop()
    return start_server(port=server.port, **kwargs)


def test_a_restart_without_redis_signs_everyone_out(start_server):
    server = start_server(env=DASHBOARD_ENV)
    signed_out, kept = signed_in(server), signed_in(server)
    out = signed_out.copy()  # the cookie as it was: signing out clears only the browser's
    assert signed_out.sign_out().status_code == 200
    assert (out.get().status_code, kept.get().status_code) == (401, 200)
    server = restart(start_server, server, env=DASHBOARD_ENV)
    # The signed-out cookie stays dead: no revocation list to forget, the session is gone.
    assert out.moved_to(server).get().status_code == 401
    assert kept.moved_to(server).get().status_code == 401
    assert "Sign in" in kept.page().text
    assert signed_in(server).get().status_code == 200


def test_with_redis_sessions_outlive_a_restart_and_a_sign_out_does_not(start_server,
                                                                       redis_server):
    env = dict(DASHBOARD_ENV, **redis_server.env)
    server = start_server(env=env)
    signed_out, kept = signed_in(server), signed_in(server)
    out = signed_out.copy()  # the cookie as it was: signing out clears only the browser's
    assert signed_out.sign_out().status_code == 200
    server = restart(start_server, server, env=env)
    assert out.moved_to(server).get().status_code == 401
    assert kept.moved_to(server).get().status_code == 200


def test_a_redis_error_refuses_every_session_instead_of_letting_a_revoked_one_in(
        start_server, redis_server):
    env = dict(DASHBOARD_ENV, **redis_server.env)
    server = start_server(env=env)
    signed_out, kept = signed_in(server), signed_in(server)
    out = signed_out.copy()  # the cookie as it was: signing out clears only the browser's
    assert signed_out.sign_out().status_code == 200
    # A fresh process (or another worker): what it knows of the sign-out is in Redis only.
    server = restart(start_server, server, env=env)
    out.moved_to(server)
    kept.moved_to(server)
    redis_server.stop()
    for visitor in (out, kept):  # neither can be checked: both refused, and told why
        answer = visitor.get()
        assert answer.status_code == 503, answer.text
        assert answer.json() == {"error": "Sessions cannot be checked now (Redis does not "
                                          "answer): try again shortly"}
        assert visitor.stream_status() == 503
        assert visitor.publish(channels="news", event="e", data="{}").status_code == 503
    assert kept.page().status_code == 503
    assert kept.sign_out().status_code == 503  # not signed out: it says so, keeps the cookie
    assert Visitor(server).sign_in().status_code == 503


def failures_until_refused(visitor, limit=30):
    """Wrong secrets sent until a 429 (or `limit` of them): how many got 401, and the 429."""
    for n in range(limit):
        answer = visitor.sign_in(secret=f"guess-{n}")
        if answer.status_code == 429:
            return n, answer
        assert answer.status_code == 401, answer.text[:300]
    return limit, None


def test_sign_in_is_rate_limited_per_address_and_overall(start_server):
    # A trusted proxy forwards each client's address: one address, then many.
    server = start_server(env=dict(DASHBOARD_ENV, BUNPULSE_TRUST_PROXY="127.0.0.1"))
    guesser = Visitor(server, headers={"X-Forwarded-For": "203.0.113.7"})
    failures, refused = failures_until_refused(guesser)
    assert failures == 5 and refused is not None
    assert 1 <= int(refused.headers["Retry-After"]) <= 12
    assert "Too many wrong secrets" in refused.text
    # Limited, even the right secret is not tried: nothing tells a good guess from a bad one.
    assert guesser.sign_in().status_code == 429
    assert guesser.get().status_code == 401
    # Another address still signs in ...
    assert signed_in(server, headers={"X-Forwarded-For": "198.51.100.1"}).get().status_code \
        == 200
    # ... until wrong secrets from many addresses use up the overall allowance.
    total = failures
    for n in range(2, 40):
        rotating = Visitor(server, headers={"X-Forwarded-For": f"198.51.100.{n}"})
        sent, refused = failures_until_refused(rotating, limit=4)
        total += sent
        if refused is not None:
            break
    assert refused is not None and 20 <= total <= 30, total  # the burst, and its refill
    assert int(refused.headers["Retry-After"]) == 1
    assert Visitor(server, headers={"X-Forwarded-For": "192.0.2.99"}).sign_in().status_code \
        == 429


def test_the_sign_in_limit_keeps_a_bounded_table():
    from bunpulse.dashboard.signin_limit import SignInLimit
    now = [0.0]
    limit = SignInLimit(per_address=(2, 0.5), overall=(1000, 1000.0), max_addresses=3,
                        clock=lambda: now[0])
    for address in ("a", "a"):
        assert limit.retry_after(address) == 0
        limit.failed(address)
    assert limit.retry_after("a") == 2
    for address in ("b", "c", "d"):  # "a" is the least recently seen: forgotten
        limit.failed(address)
    assert len(limit._addresses) == 3 and "a" not in limit._addresses
    now[0] += 2
    limit.failed("d")
    assert limit.retry_after("d") == 0  # refilled by one, then one taken: one left


def cookie_of(answer):
    return answer.headers["Set-Cookie"]


def test_the_cookie_is_secure_over_tls_and_behind_a_trusted_https_proxy(start_server,
                                                                         certificates):
    tls = start_server(env=dict(DASHBOARD_ENV, **certificates.env()), ca=certificates.ca)
    cookie = cookie_of(Visitor(tls).page())
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" in cookie_of(Visitor(tls).sign_in())
    plain = start_server(env=DASHBOARD_ENV)
    assert "Secure" not in cookie_of(Visitor(plain).page())
    # X-Forwarded-Proto counts only from a trusted proxy.
    https = {"X-Forwarded-Proto": "https"}
    assert "Secure" not in cookie_of(Visitor(plain, headers=https).page())
    proxied = start_server(env=dict(DASHBOARD_ENV, BUNPULSE_TRUST_PROXY="127.0.0.1"))
    assert "Secure" in cookie_of(Visitor(proxied, headers=https).page())
    assert "Secure" not in cookie_of(Visitor(proxied, headers={
        "X-Forwarded-Proto": "http"}).page())
    assert "Secure" not in cookie_of(Visitor(proxied).page())


def test_a_disabled_app_can_neither_sign_in_nor_use_its_session(start_server, redis_server,
                                                               tmp_path, node_for):
    apps = tmp_path / "apps.json"

    def serve(enabled):
        apps.write_text(json.dumps([{"id": "2", "key": "key-2", "secret": "secret-2",
                                     "enabled": enabled}]))
        return dict(DASHBOARD_ENV, BUNPULSE_APPS_FILE=str(apps), **redis_server.env)

    server = start_server(env=serve(True))
    visitor = Visitor(server)
    assert visitor.sign_in("2", "secret-2").status_code == 200
    assert visitor.publish(channels="news", event="e", data="{}").status_code == 200
    server = restart(start_server, server, env=serve(False))
    visitor.moved_to(server)
    for answer in (visitor.get(), visitor.get("/dashboard/api/stats")):
        assert (answer.status_code, answer.json()) == (403, {"error": "This app is disabled"})
    assert visitor.stream_status() == 403
    page = visitor.page()
    assert page.status_code == 403 and "This app is disabled" in page.text
    assert visitor.http.post(server.url + "/dashboard/api/publish", timeout=5, json={
        "channels": "news", "event": "e", "data": "{}"}).status_code == 403
    answer = Visitor(server).sign_in("2", "secret-2")
    assert answer.status_code == 403 and "This app is disabled." in answer.text
    # A wrong secret says nothing about the app being disabled.
    answer = Visitor(server).sign_in("2", "wrong")
    assert answer.status_code == 401 and "disabled" not in answer.text
