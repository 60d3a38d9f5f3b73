"""permessage-deflate with the client that negotiates it: pusher-js in a real browser (Debian's
headless Chromium, driven by Playwright), on a page served by a local HTTP server. pusher-js
under Node offers no extension (its bundled faye-websocket client registers none), so only a
browser shows what compressed events do to pusher-js, and to `--max-buffer`, which counts the
bytes that leave the socket: the deflated ones (outbox.py).

What the server answered is read from the browser's own view of the handshake (CDP
`Network.webSocketHandshakeResponseReceived`): no proxy in between."""
import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bunpulse.frames import build_frame, deflated
from bunpulse.protocol import event as event_message
from conftest import APP_ID, JS_DIR, KEY, ServerProcess, WholePublisher, wait_until

PUSHER_JS = os.path.join(JS_DIR, "node_modules", "pusher-js", "dist", "web", "pusher.min.js")
MAX_BUFFER = 256 * 1024  # --max-buffer of the compressing server
NEGOTIATED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
EVICTING = re.compile(r"evicting a client that stopped reading \((\d+) bytes queued\)")

# Every WebSocket's close code is kept, whatever pusher-js does after it (it reconnects).
PAGE = b"""<!doctype html><meta charset="utf-8"><title>compression</title>
<script>
window.closeCodes = [];
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("close", event => window.closeCodes.push(event.code));
  }
};
</script>
<script src="/pusher.min.js"></script>"""

SUBSCRIBE = """([key, port, channel]) => new Promise((subscribed, failed) => {
  window.got = [];
  const pusher = window.pusher = new Pusher(key, {wsHost: "127.0.0.1", wsPort: port,
    forceTLS: false, enabledTransports: ["ws"], cluster: "local", disableStats: true});
  const events = pusher.subscribe(channel);
  events.bind("e", data => window.got.push(data));
  events.bind("pusher:subscription_succeeded", () => subscribed());
  events.bind("pusher:subscription_error", error => failed(JSON.stringify(error)));
})"""


class PageServer:
    """A local HTTP server for the test page and pusher-js's browser build."""

    def __init__(self):
        with open(PUSHER_JS, "rb") as handle:
            files = {"/": (b"text/html; charset=utf-8", PAGE),
                     "/pusher.min.js": (b"text/javascript", handle.read())}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                kind, body = files.get(self.path, (b"text/plain", b"not found"))
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Type", kind.decode())
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def page_server():
    served = PageServer()
    yield served
    served.close()


@pytest.fixture(scope="module")
def compressing():
    process = ServerProcess(env={"BUNPULSE_COMPRESSION": "true",
                                 "BUNPULSE_MAX_BUFFER": str(MAX_BUFFER)}, metrics=True)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain():
    process = ServerProcess(env={"BUNPULSE_COMPRESSION": "false"})
    yield process
    process.stop()


@pytest.fixture
def tab(browser, page_server):
    """A page with pusher-js loaded, and a CDP session that records every WebSocket
    handshake as the browser sent and received it."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10000)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    cdp = context.new_cdp_session(page)
    page.handshakes = []  # (request headers, response headers)
    requests = {}
    cdp.on("Network.webSocketWillSendHandshakeRequest",
           lambda sent: requests.__setitem__(sent["requestId"], sent["request"]["headers"]))
    cdp.on("Network.webSocketHandshakeResponseReceived", lambda got: page.handshakes.append(
        (requests.get(got["requestId"], {}), got["response"]["headers"])))
    cdp.send("Network.enable")
    page.goto(page_server.url)
    page.cdp, page.errors = cdp, errors
    yield page
    context.close()


def header(headers, name):
    """A header of CDP's dictionary, whatever its case (None when absent)."""
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


def subscribe(page, server, channel):
    page.evaluate(SUBSCRIBE, [KEY, server.port, channel])


def wire_sizes(channel, data):
    """(deflated, plain) bytes of the frame the server sends for this event: what a
    compressing socket and a plain one write (the server builds it with these functions)."""
    frame = build_frame(event_message("e", channel, data))
    return len(deflated(frame)), len(frame)


TEXT = "Grüße aus Köln, a naïve café in 東京 ✓ 😀 — " * 150  # UTF-8: 1 to 4 bytes a character


def text_event(n):
    """About 9 KB of UTF-8 that deflates to ~1 % (its publish, escaped, stays one read)."""
    return json.dumps({"n": n, "text": TEXT}, ensure_ascii=False)


def noise_event(n):
    """About 9.4 KB of base64 noise: deflated it stays at ~75 %."""
    return json.dumps({"n": n, "noise": base64.b64encode(os.urandom(7000)).decode()})


def small_event(n):
    """Under frames.DEFLATE_MIN: sent as it is even on a compressing socket."""
    return json.dumps({"n": n, "é": "✓"}, ensure_ascii=False)


# ---------------------------------------------------------------- negotiation and delivery

@pytest.mark.parametrize("compression", [True, False], ids=["compression", "no compression"])
def test_pusher_js_in_a_browser_gets_every_event_whatever_the_compression(
        tab, compressing, plain, compression):
    server = compressing if compression else plain
    subscribe(tab, server, "mixed")
    ((offered, answered),) = tab.handshakes
    # Chromium offers permessage-deflate; the server takes it only with --compression true
    assert "permessage-deflate" in header(offered, "Sec-WebSocket-Extensions")
    assert header(answered, "Sec-WebSocket-Extensions") == (NEGOTIATED if compression else None)
    makers = (small_event, text_event, noise_event)
    sent = [makers[n % 3](n) for n in range(240)]
    publisher = WholePublisher(server)
    try:
        for data in sent:
            publisher.publish("mixed", "e", data)
    finally:
        publisher.close()
    tab.wait_for_function("count => window.got.length >= count", arg=len(sent))
    assert tab.evaluate("window.got") == [json.loads(data) for data in sent]
    assert tab.evaluate("window.closeCodes") == [] and tab.errors == []


# ---------------------------------------------------------------- --max-buffer, deflated

def test_a_paused_tab_is_evicted_once_the_deflated_bytes_queued_pass_max_buffer(
        tab, compressing):
    """The tab's JavaScript is paused (CDP Debugger.pause): Chromium stops reading the socket
    once its own buffers are full, then the kernel's fill, then the server's outbox. Every
    fifth event is noise (deflated ~75 %), the others text (deflated ~1 %).

    Eviction drops the whole frames queued (a frame already begun is finished), so the events
    the tab never gets are exactly what the outbox held when it evicted: their deflated size
    must be --max-buffer to within one frame, while their plain size is several times it."""
    subscribe(tab, compressing, "paused")
    assert header(tab.handshakes[0][1], "Sec-WebSocket-Extensions") == NEGOTIATED
    tab.cdp.send("Debugger.enable")
    tab.cdp.send("Debugger.pause")  # at the next JavaScript: the next event's handler
    sent, evicted = [], None
    publisher = WholePublisher(compressing)
    try:
        while evicted is None:
            assert len(sent) < 20000, "never evicted"
            n = len(sent)
            data = noise_event(n) if n % 5 == 0 else text_event(n)
            publisher.publish("paused", "e", data)
            sent.append(data)
            evicted = EVICTING.search(compressing.log())
    finally:
        publisher.close()
        tab.cdp.send("Debugger.resume")  # within CLOSE_LINGER: what the kernel holds arrives
    tab.wait_for_function("() => window.closeCodes.length > 0")
    assert tab.evaluate("window.closeCodes") == [4100]
    got = tab.evaluate("window.got")  # every message before the close is dispatched by now
    kept = len(got)
    assert got == [json.loads(data) for data in sent[:kept]]  # whole, in order, up to a point
    missing = [wire_sizes("paused", data) for data in sent[kept:]]
    deflated_missing = sum(size for size, _ in missing)
    plain_missing = sum(size for _, size in missing)
    frame = max(wire_sizes("paused", data)[0] for data in sent)
    queued = int(evicted.group(1))  # the outbox's count when it evicted
    # Evicted once past the bound, not before: the last frame took the queue over it.
    assert MAX_BUFFER - frame < deflated_missing <= MAX_BUFFER + frame, \
        (deflated_missing, frame, kept, len(sent))
    # What it counted is what it dropped, plus at most the end of a frame begun
    assert deflated_missing <= queued < deflated_missing + frame
    assert plain_missing > 4 * MAX_BUFFER  # counted before deflating, it would go far sooner
    wait_until(lambda: compressing.metric("bunpulse_evictions_total") == 1,
               message="the eviction counted")
    assert compressing.metric("bunpulse_connections_closed_total", app_id=APP_ID,
                              code="4100") == 1
    # pusher-js takes 4100 as "back off, then reconnect": it comes back and resubscribes
    tab.wait_for_function("() => window.pusher.connection.state === 'connected'")
    assert tab.errors == []
