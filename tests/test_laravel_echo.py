"""Laravel Echo against BunPulse, set up exactly as docs/laravel.md shows (issue 24, item 4).

The page's `.env` and `resources/js/echo.js` blocks are read out of it, for both of Laravel's
connections (`pusher` and `reverb`): BunPulse runs with the .env's app on its host, with only
the port changed (a free one); Laravel's server side is the official `pusher` library built from
the .env as config/broadcasting.php builds pusher-php-server; Echo (laravel-echo 2.5.0 with
pusher-js, tests/js/echo_driver.js) is built from the echo.js block with the .env's VITE_*
values, as Vite builds it. /broadcasting/auth and /broadcasting/user-auth are answered as
Laravel's BroadcastController answers them, signed by the official library.
"""
import json
import os
import re
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import pusher
import pytest

from conftest import ROOT, NodeDriver, free_port

DOC = os.path.join(ROOT, "docs", "laravel.md")
# The names Laravel reads for each connection (config/broadcasting.php, and the VITE_* ones its
# install commands write for echo.js), exactly.
ENV_NAMES = {
    "pusher": {"BROADCAST_CONNECTION", "PUSHER_APP_ID", "PUSHER_APP_KEY", "PUSHER_APP_SECRET",
               "PUSHER_HOST", "PUSHER_PORT", "PUSHER_SCHEME", "PUSHER_APP_CLUSTER",
               "VITE_PUSHER_APP_KEY", "VITE_PUSHER_HOST", "VITE_PUSHER_PORT",
               "VITE_PUSHER_SCHEME", "VITE_PUSHER_APP_CLUSTER"},
    "reverb": {"BROADCAST_CONNECTION", "REVERB_APP_ID", "REVERB_APP_KEY", "REVERB_APP_SECRET",
               "REVERB_HOST", "REVERB_PORT", "REVERB_SCHEME", "VITE_REVERB_APP_KEY",
               "VITE_REVERB_HOST", "VITE_REVERB_PORT", "VITE_REVERB_SCHEME"},
}
PREFIX = {"pusher": "PUSHER_", "reverb": "REVERB_"}
EVENT = "App\\Events\\OrderShipped"  # the name Laravel broadcasts an event class under


def doc_block(name):
    """The fenced block after `<!-- tests/test_laravel_echo.py: NAME -->` in docs/laravel.md."""
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    marker = f"<!-- tests/test_laravel_echo.py: {name} -->"
    found = re.findall(re.escape(marker) + r"\n```\w*\n(.*?)\n```", text, re.S)
    assert len(found) == 1, f"docs/laravel.md: {len(found)} blocks after {marker}"
    return found[0]


def read_dotenv(text, **override):
    """A .env's NAME=value lines, quotes dropped and ${NAME} expanded, as Laravel (phpdotenv)
    and Vite (dotenv-expand) read them; `override` replaces values before expansion."""
    raw = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"not a .env line: {line}"
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        raw[name] = override.get(name, value)
    return {name: re.sub(r"\$\{(\w+)\}", lambda m: raw[m.group(1)], value)
            for name, value in raw.items()}


def laravel_publisher(env, connection):
    """The server library as config/broadcasting.php configures pusher-php-server."""
    p = PREFIX[connection]
    cluster = env.get("PUSHER_APP_CLUSTER") if connection == "pusher" else None
    host = env.get(p + "HOST") or (f"api-{cluster or 'mt1'}.pusher.com" if cluster else None)
    return pusher.Pusher(app_id=env[p + "APP_ID"], key=env[p + "APP_KEY"],
                         secret=env[p + "APP_SECRET"], host=host,
                         port=int(env.get(p + "PORT") or 443),
                         ssl=(env.get(p + "SCHEME") or "https") == "https", cluster=cluster)


class LaravelApp:
    """Laravel's broadcasting routes, answered as BroadcastController does. The session is
    known by the page's CSRF token (Node's XHR sends no cookie); the rules are a
    routes/channels.php: `orders.{id}` is its owner's, `chat.{room}` every signed-in user's
    (on the presence channel with their id and name)."""

    USERS = {"token-ada": {"id": 1, "name": "Ada"}, "token-bob": {"id": 2, "name": "Bob"}}

    def __init__(self, publisher):
        self.publisher = publisher
        self.requests = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                app.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "form": dict(parse_qsl(body))})
                status, answer = app.answer(self.path, self.headers, dict(parse_qsl(body)))
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def rule(user, channel):
        """routes/channels.php, for a channel name without its private-/presence- prefix:
        False refuses, True allows, an array is the presence member's info."""
        kind, name = channel.split("-", 1) if channel.startswith(("private-", "presence-")) \
            else ("", channel)
        if name.startswith("orders."):
            return name == f"orders.{user['id']}"
        if name.startswith("chat."):
            return {"id": user["id"], "name": user["name"]} if kind == "presence" else True
        return False

    def answer(self, path, headers, form):
        user = self.USERS.get(headers.get("X-CSRF-TOKEN"))
        if user is None:  # a guest: AccessDeniedHttpException
            return 403, {"message": "This action is unauthorized."}
        if path == "/broadcasting/auth":
            channel, socket_id = form["channel_name"], form["socket_id"]
            allowed = self.rule(user, channel)
            if not allowed:
                return 403, {"message": "This action is unauthorized."}
            if channel.startswith("presence-"):
                member = {"user_id": user["id"], "user_info": allowed}
                return 200, self.publisher.authenticate(channel, socket_id, member)
            return 200, self.publisher.authenticate(channel, socket_id)
        if path == "/broadcasting/user-auth":  # Broadcast::resolveAuthenticatedUserUsing()
            return 200, self.publisher.authenticate_user(
                form["socket_id"], {"id": str(user["id"]), "name": user["name"]})
        return 404, {"message": "Not Found"}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Echo(NodeDriver):
    """Echo instances, each made by running the doc's echo.js (tests/js/echo_driver.js)."""

    def __init__(self, server, echo_js, env, page):
        super().__init__(server, script="echo_driver.js")
        self.echo_js, self.page = echo_js, page
        self.vite_env = {name: value for name, value in env.items() if name.startswith("VITE_")}

    def start(self, id, csrf_token=None):
        """A page that runs echo.js; its socket_id once connected."""
        self.call("start", id=id, echoJs=self.echo_js, viteEnv=self.vite_env, origin=self.page,
                  csrfToken=csrf_token)
        return self.wait(lambda r: r.get("type") == "connected" and r["id"] == id, 10,
                         f"{id} connected")["socket_id"]

    def subscribe(self, id, kind, name, timeout=10):
        """Echo.channel/private/join(name); wait until it is subscribed."""
        self.call("subscribe", id=id, kind=kind, name=name)
        return self.wait_for("subscribed", id, name, timeout)

    def wait_for(self, type, id, name, timeout=10):
        return self.wait(lambda r: r.get("type") == type and r["id"] == id and r["name"] == name,
                         timeout, f"{type} on {id} {name}")

    def seen(self, type, id=None):
        with self._lock:
            return [r for r in self.reports if r.get("type") == type
                    and (id is None or r["id"] == id)]


@pytest.fixture(params=["pusher", "reverb"])
def laravel(request, start_server):
    """A Laravel app on `pusher` or `reverb` with BunPulse, all from docs/laravel.md."""
    connection, p = request.param, PREFIX[request.param]
    port = free_port()
    env = read_dotenv(doc_block(f".env {connection}"), **{p + "PORT": str(port)})
    server = start_server(port=port, env={
        "PUSHER_APP_ID": env[p + "APP_ID"], "PUSHER_APP_KEY": env[p + "APP_KEY"],
        "PUSHER_APP_SECRET": env[p + "APP_SECRET"], "BUNPULSE_HOST": env[p + "HOST"]})
    publisher = laravel_publisher(env, connection)
    app = LaravelApp(publisher)
    echo = Echo(server, doc_block(f"echo.js {connection}"), env, app.url)
    yield types.SimpleNamespace(connection=connection, env=env, server=server,
                                publisher=publisher, app=app, echo=echo)
    echo.close()
    app.close()


# ------------------------------------------------------------------------ the doc itself

@pytest.mark.parametrize("connection", ["pusher", "reverb"])
def test_the_doc_uses_laravels_names_and_its_echo_js_reads_only_them(connection):
    env = read_dotenv(doc_block(f".env {connection}"))
    assert set(env) == ENV_NAMES[connection]
    assert env["BROADCAST_CONNECTION"] == connection
    echo_js = doc_block(f"echo.js {connection}")
    assert re.search(rf"broadcaster: '{connection}',", echo_js)
    read = set(re.findall(r"import\.meta\.env\.(\w+)", echo_js))
    assert read and read <= set(env), f"echo.js reads what the .env lacks: {read - set(env)}"


# ------------------------------------------------------------------------ Echo, both ways

def test_a_public_channel_receives_what_laravel_broadcasts(laravel):
    echo = laravel.echo
    echo.start("page")
    echo.subscribe("page", "channel", "orders")
    echo.call("listen", id="page", kind="channel", name="orders", event="OrderShipped")
    echo.call("listen", id="page", kind="channel", name="orders", event=".order.shipped")
    order = {"order": {"id": 1, "status": "shipped", "total": 12.5}}
    # PusherBroadcaster::broadcast: trigger([channels], $event, $payload, $parameters)
    laravel.publisher.trigger(["orders"], EVENT, order)
    got = echo.wait(lambda r: r.get("type") == "listened" and r["event"] == "OrderShipped",
                    10, "OrderShipped")
    assert got["data"] == order
    laravel.publisher.trigger(["orders"], "order.shipped", order)  # an event's broadcastAs()
    got = echo.wait(lambda r: r.get("type") == "listened" and r["event"] == ".order.shipped",
                    10, ".order.shipped")
    assert got["data"] == order


def test_a_private_channel_is_authorized_by_broadcasting_auth(laravel):
    echo, app = laravel.echo, laravel.app
    socket_id = echo.start("ada", csrf_token="token-ada")
    echo.subscribe("ada", "private", "orders.1")
    echo.call("listen", id="ada", kind="private", name="orders.1", event="OrderShipped")
    request = next(r for r in app.requests if r["form"].get("channel_name") == "private-orders.1")
    assert request["path"] == "/broadcasting/auth"
    assert request["form"] == {"socket_id": socket_id, "channel_name": "private-orders.1"}
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert request["headers"]["X-CSRF-TOKEN"] == "token-ada"
    laravel.publisher.trigger(["private-orders.1"], EVENT, {"order": {"id": 1}})
    got = echo.wait(lambda r: r.get("type") == "listened" and r["name"] == "orders.1", 10,
                    "the private event")
    assert got["data"] == {"order": {"id": 1}}

    # Someone else's order: Laravel answers 403, Echo's .error() hears it, and BunPulse never
    # holds the subscription.
    echo.call("subscribe", id="ada", kind="private", name="orders.2")
    refused = echo.wait_for("subscription_error", "ada", "orders.2")
    assert refused["error"]["status"] == 403
    assert laravel.publisher.channel_info("private-orders.2")["occupied"] is False
    assert not [r for r in echo.seen("subscribed") if r["name"] == "orders.2"]


def test_a_presence_channel_calls_here_joining_and_leaving(laravel):
    echo = laravel.echo
    echo.start("ada", csrf_token="token-ada")
    echo.start("bob", csrf_token="token-bob")
    echo.subscribe("ada", "join", "chat.1")
    assert echo.wait_for("here", "ada", "chat.1")["users"] == [{"id": 1, "name": "Ada"}]
    echo.subscribe("bob", "join", "chat.1")
    here = echo.wait_for("here", "bob", "chat.1")["users"]
    assert sorted(here, key=lambda u: u["id"]) == [{"id": 1, "name": "Ada"},
                                                   {"id": 2, "name": "Bob"}]
    assert echo.wait_for("joining", "ada", "chat.1")["user"] == {"id": 2, "name": "Bob"}
    echo.call("leave", id="bob", name="chat.1")  # Echo.leave('chat.1')
    assert echo.wait_for("leaving", "ada", "chat.1")["user"] == {"id": 2, "name": "Bob"}


def test_a_whisper_reaches_the_others_on_a_private_channel(laravel):
    echo = laravel.echo
    for id, token in (("ada", "token-ada"), ("bob", "token-bob")):
        echo.start(id, csrf_token=token)
        echo.subscribe(id, "private", "chat.1")
        echo.call("listenForWhisper", id=id, kind="private", name="chat.1", event="typing")
    echo.call("whisper", id="ada", kind="private", name="chat.1", event="typing",
              data={"name": "Ada"})
    got = echo.wait(lambda r: r.get("type") == "whisper" and r["id"] == "bob", 10, "the whisper")
    assert got["data"] == {"name": "Ada"}
    # An event published after the whisper reaches Ada after it would have: none for her.
    echo.call("listen", id="ada", kind="private", name="chat.1", event="OrderShipped")
    laravel.publisher.trigger(["private-chat.1"], EVENT, {"after": True})
    echo.wait(lambda r: r.get("type") == "listened" and r["id"] == "ada", 10, "the marker")
    assert echo.seen("whisper", "ada") == []
    assert not [r for r in echo.seen("message") if r["event"] == "pusher:error"]


def test_to_others_leaves_out_the_socket_that_sent_the_request(laravel):
    echo = laravel.echo
    sockets = {id: echo.start(id) for id in ("sender", "other")}
    for id in sockets:
        echo.subscribe(id, "channel", "orders")
        echo.call("listen", id=id, kind="channel", name="orders", event="OrderShipped")
    assert echo.call("socket_id", id="sender")["result"] == sockets["sender"]
    # broadcast(...)->toOthers(): the request's X-Socket-Id becomes the trigger's socket_id
    laravel.publisher.trigger(["orders"], EVENT, {"n": 1}, socket_id=sockets["sender"])
    laravel.publisher.trigger(["orders"], EVENT, {"n": 2})
    for n in (1, 2):
        echo.wait(lambda r: r.get("type") == "listened" and r["id"] == "other"
                  and r["data"] == {"n": n}, 10, f"event {n} on other")
    echo.wait(lambda r: r.get("type") == "listened" and r["id"] == "sender", 10, "event 2")
    assert [r["data"] for r in echo.seen("listened", "sender")] == [{"n": 2}]


def test_user_sign_in_goes_through_broadcasting_user_auth(laravel):
    echo = laravel.echo
    socket_id = echo.start("ada", csrf_token="token-ada")
    echo.call("signin", id="ada")
    success = echo.wait(lambda r: r.get("type") == "message" and r["id"] == "ada"
                        and r["event"] == "pusher:signin_success", 10, "signin_success")
    assert json.loads(success["data"]["user_data"]) == {"id": "1", "name": "Ada"}
    request = next(r for r in laravel.app.requests if r["path"] == "/broadcasting/user-auth")
    assert request["form"] == {"socket_id": socket_id}


def test_laravel_signing_with_another_secret_is_refused_by_bunpulse(laravel):
    """BunPulse checks Laravel's signature: an app on another secret gets
    pusher:subscription_error 401, which Echo's .error() hears."""
    env, p = laravel.env, PREFIX[laravel.connection]
    wrong = LaravelApp(laravel_publisher(dict(env, **{p + "APP_SECRET": "not-the-secret"}),
                                         laravel.connection))
    echo = Echo(laravel.server, laravel.echo.echo_js, env, wrong.url)
    try:
        echo.start("ada", csrf_token="token-ada")
        echo.call("subscribe", id="ada", kind="private", name="orders.1")
        refused = echo.wait_for("subscription_error", "ada", "orders.1")
        assert refused["error"]["status"] == 401
        assert refused["error"]["error"].startswith("Invalid signature")
        assert len([r for r in wrong.requests if r["path"] == "/broadcasting/auth"]) == 1
    finally:
        echo.close()
        wrong.close()
