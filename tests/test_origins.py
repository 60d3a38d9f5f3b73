"""Per-app allowed origins (`allowed_origins`, `--allowed-origins`): a page whose Origin is not
allowed gets pusher:error 4009 and close 4009, and pusher-js in Chromium stops there; a
request without Origin (server libraries) and `*` are never refused."""
import http.server
import json
import os
import threading
import time

import pytest

from conftest import JS_DIR, KEY, RawClient, ServerProcess, connected
from bunpulse.origins import AllowedOrigins, check_entry



# ------------------------------------------------------------------------ the rules

@pytest.mark.parametrize("entries, origin, allowed", [
    (["*"], "https://anything.example", True),
    (["https://app.example.com"], "https://app.example.com", True),
    (["https://app.example.com"], "https://app.example.com:443", True),
    (["https://app.example.com"], "https://APP.example.com", True),
    (["https://app.example.com"], "http://app.example.com", False),
    (["https://app.example.com"], "https://app.example.com:8443", False),
    (["https://app.example.com"], "https://app.example.com.evil.com", False),
    (["app.example.com"], "http://app.example.com:8080", True),  # Reverb's host form
    (["*.example.com"], "https://a.b.example.com", True),
    (["*.example.com"], "https://example.com", False),
    (["*.example.com"], "https://example.com.evil.com", False),
    (["https://*.example.com"], "https://evil.com:1@a.example.com", False),
    (["https://*.example.com"], "https://evil.com:1.example.com", False),
    (["http://localhost:*"], "http://localhost:5173", True),
    (["http://localhost:*"], "https://localhost:5173", False),
    (["https://app.example.com"], "null", False),  # a sandboxed page or a file
    (["https://app.example.com"], None, True),     # no Origin: not a browser
])
def test_rules(entries, origin, allowed):
    assert AllowedOrigins(entries).allows(origin) is allowed


@pytest.mark.parametrize("entry", ["", " a.com", "ftp://a.com", "https://a.com/path",
                                   "a.com/path", "a.com:8080", "https://"])
def test_bad_entries(entry):
    with pytest.raises(ValueError):
        check_entry(entry)


# ------------------------------------------------------------------------ raw clients

@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The environment's app allows https://app.example.com and *.example.org; the apps
    file's app 2 allows one origin, app 3 any."""
    path = tmp_path_factory.mktemp("origins") / "apps.json"
    path.write_text(json.dumps([
        {"id": "2", "key": "key-two", "secret": "s2", "allowed_origins": ["http://good.test"]},
        {"id": "3", "key": "key-three", "secret": "s3", "allowed_origins": ["*"]}]))
    server = ServerProcess(env={"BUNPULSE_ALLOWED_ORIGINS": "https://app.example.com, "
                                                            "*.example.org",
                                "BUNPULSE_APPS_FILE": str(path)})
    yield server
    server.stop()


def dial(server, key=KEY, **options):
    return RawClient(f"{server.ws_url}/app/{key}?protocol=7&client=js&version=8", **options)


@pytest.mark.parametrize("key, origin", [
    (KEY, "https://app.example.com"), (KEY, "http://shop.example.org:8080"),
    ("key-two", "http://good.test"), ("key-three", "https://anyone.test")])
def test_an_allowed_origin_connects(guarded, key, origin):
    client = dial(guarded, key, origin=origin)
    connected(client)
    client.close()


@pytest.mark.parametrize("key, origin", [
    (KEY, "https://evil.test"), (KEY, "http://app.example.com"), (KEY, "null"),
    ("key-two", "https://good.test"), ("key-two", "http://127.0.0.1")])
def test_a_refused_origin_gets_4009(guarded, key, origin):
    client = dial(guarded, key, origin=origin)
    error = client.recv()
    assert error["event"] == "pusher:error", error
    assert error["data"] == {"code": 4009, "message": f"Origin not allowed: {origin}"}
    assert client.recv_close() == (4009, f"Origin not allowed: {origin}")
    assert "a page from" in guarded.log() and "(allowed_origins): 4009" in guarded.log()


def test_no_origin_is_never_refused(guarded):
    # the server libraries and curl send none: the check guards pages, not credentials
    for key in (KEY, "key-two"):
        client = dial(guarded, key, suppress_origin=True)
        connected(client)
        client.close()


def test_a_bad_origin_setting_stops_start_up():
    with pytest.raises(RuntimeError) as failed:
        ServerProcess(env={"BUNPULSE_ALLOWED_ORIGINS": "https://app.example.com/path"})
    assert "invalid BUNPULSE_ALLOWED_ORIGINS='https://app.example.com/path': " \
           "'https://app.example.com/path': an origin is scheme://host[:port], without a path" \
        in str(failed.value)


# ------------------------------------------------------------------------ pusher-js in Chromium

PAGE = b"""<!doctype html><meta charset="utf-8"><script src="/pusher.min.js"></script>
<script>
window.states = []; window.errors = [];
const port = Number(new URLSearchParams(location.search).get("port"));
const pusher = new Pusher(new URLSearchParams(location.search).get("key"), {
  wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"],
  cluster: "mt1", disableStats: true});
pusher.connection.bind("state_change", s => window.states.push(s.current));
pusher.connection.bind("error", e => window.errors.push(JSON.parse(JSON.stringify(e))));
</script>"""
SCRIPT = os.path.join(JS_DIR, "node_modules", "pusher-js", "dist", "web", "pusher.min.js")


class PageSite:
    """PAGE and pusher-js served on a port of its own: an origin of its own."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                script = self.path == "/pusher.min.js"
                with open(SCRIPT, "rb") as handle:
                    body = handle.read() if script else PAGE
                self.send_response(200)
                self.send_header("Content-Type", "text/javascript" if script else "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sites():
    made = [PageSite(), PageSite()]
    yield made
    for site in made:
        site.close()



def open_page(browser, site, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{site.origin}/?port={server.port}&key={KEY}")
    return context, page


def test_pusher_js_in_chromium_from_an_allowed_and_a_refused_page(browser, sites,
                                                                   start_server):
    allowed, refused = sites  # two ports of 127.0.0.1: two origins, the first allowed
    server = start_server(env={"BUNPULSE_ALLOWED_ORIGINS": allowed.origin})
    good_context, good = open_page(browser, allowed, server)
    bad_context, bad = open_page(browser, refused, server)
    try:
        good.wait_for_function("window.states.includes('connected')", timeout=10000)
        bad.wait_for_function("window.errors.length > 0", timeout=10000)
        time.sleep(3)  # pusher-js would have retried by now (1 s, then more)
        assert bad.evaluate("window.errors") == [{"type": "WebSocketError", "error": {
            "type": "PusherError",
            "data": {"code": 4009, "message": f"Origin not allowed: {refused.origin}"}}}]
        # refused (a 4000-4099 close): pusher-js stops, no retry, never connected
        assert bad.evaluate("window.states") == ["connecting", "disconnected"]
        assert good.evaluate("window.states") == ["connecting", "connected"]
        assert server.log().count("a page from") == 1
    finally:
        good_context.close()
        bad_context.close()
