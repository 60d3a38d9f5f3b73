"""The dashboard's pages, event stream and JSON, under /dashboard.

Sessions: a signed cookie (HttpOnly, SameSite=Strict, path /dashboard, and Secure when served
over TLS or a trusted proxy says https) holding a random session id and a CSRF token; the
session itself (app, expiry) is kept on the server (sessions.py), so signing out ends it for
good. The cookie's signing key is derived from every app's secret, so each gunicorn worker (and
each node with the same apps) reads the others' cookies. Wrong secrets are rate limited
(signin_limit.py); a disabled app can neither sign in nor use a session it has."""
import hashlib
import hmac
import secrets
import time

import gevent
import orjson
from flask import (Blueprint, Response, abort, current_app, redirect, render_template, request,
                   session, url_for)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from .. import api
from ..addresses import client_address, counted_as
from ..errors import ApiError
from ..protocol import channel_kind
from .sessions import SessionStoreDown

blueprint = Blueprint("dashboard", __name__, url_prefix="/dashboard",
                      template_folder="templates", static_folder="static")

SESSION_SECONDS = 12 * 3600
PING_EVERY = 3.0      # seconds between keep-alive comments: a closed page is found at a write
POLL = 0.1            # seconds a stream waits for records before looking again
MAX_BATCH = 100       # records in one stream message at most
MAX_CHANNELS = 500    # channels listed at most
MAX_MEMBERS = 100     # presence members listed per channel at most


def configure(flask_app, core):
    digest = hmac.new(b"bunpulse dashboard sessions", digestmod=hashlib.sha256)
    for app in sorted(core.apps, key=lambda a: a.id):
        digest.update(f"{app.id}\0{app.secret}\0".encode())
    flask_app.secret_key = digest.hexdigest()
    flask_app.session_interface = _Cookie()
    flask_app.config.update(SESSION_COOKIE_NAME="bunpulse_dashboard",
                            SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                            PERMANENT_SESSION_LIFETIME=SESSION_SECONDS)


def _core():
    return current_app.extensions["bunpulse"].core


def _feed():
    return current_app.extensions["bunpulse_dashboard"]


class _Cookie(SecureCookieSessionInterface):
    def get_cookie_secure(self, app):
        return _over_https()

    def get_cookie_path(self, app):
        return request.script_root + "/dashboard"  # under a host's prefix when mounted


def _over_https():
    """Whether the browser reached us over https: our own TLS, or a trusted proxy says so
    (anyone else's X-Forwarded-Proto is ignored, as their X-Forwarded-For)."""
    if request.scheme == "https":
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https" and _core().trusted_proxies.trusts(request.remote_addr or "")


STORE_DOWN = "Sessions cannot be checked now (Redis does not answer): try again shortly"
DISABLED = "This app is disabled"


def _signed_in():
    """(app, expires at) of a live session, or (None, None); aborts with 503 when the session
    store does not answer (never a session it cannot check) and 403 when the app is
    disabled."""
    session_id = session.get("sid")
    if session_id is None:
        return None, None
    try:
        live = _feed().sessions.lookup(session_id)
    except SessionStoreDown:
        abort(503, STORE_DOWN)
    app = None if live is None else _core().apps.by_id(live[0])
    if app is None:
        return None, None
    if not app.enabled:
        abort(403, DISABLED)
    return app, live[1]


def _signed_in_app():
    return _signed_in()[0]


def _csrf_token():
    token = session.get("csrf")
    if token is None:
        token = session["csrf"] = secrets.token_urlsafe(24)
    return token


def _check_csrf():
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    expected = session.get("csrf") or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(403, "Invalid or missing CSRF token: reload the page")


def _json(payload, status=200):
    return Response(orjson.dumps(payload), status, mimetype="application/json")


@blueprint.after_request
def _headers(response):
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


# -------------------------------------------------------------------- pages

def _signin_page(error=None, app_id="", status=200, headers=None):
    return render_template("dashboard/signin.html", csrf_token=_csrf_token(), error=error,
                           app_id=app_id), status, headers or {}


@blueprint.get("")
@blueprint.get("/")
def index():
    try:
        app = _signed_in_app()
    except HTTPException as exc:
        return _signin_page(exc.description, status=exc.code)
    if app is None:
        return _signin_page()
    return render_template("dashboard/main.html", app_id=app.id, app_key=app.key,
                           csrf_token=_csrf_token(),
                           max_data=app.max_event_data_size)


@blueprint.post("/sign-in")
def sign_in():
    _check_csrf()
    app_id = request.form.get("app_id", "").strip()
    secret = request.form.get("secret", "")
    limit = _feed().signin_limit
    core = _core()  # an IPv6 guesser is counted by its /64, as the connection limit counts it
    address = counted_as(client_address(request.environ, core.trusted_proxies),
                         core.settings.ipv6_prefix)
    wait = limit.retry_after(address)
    if wait:  # refused before any comparison: no guess is tried while limited
        return _signin_page(f"Too many wrong secrets: try again in {wait} s.", app_id, 429,
                            {"Retry-After": str(wait)})
    app = _core().apps.by_id(app_id)
    # Compared in constant time, and against a stand-in for an unknown id, so that timing
    # tells neither the secret nor which ids exist.
    # Every active secret of the app is compared (a rotation's new one signs in as the old).
    expected = [pair.secret for pair in app.pairs] if app is not None else \
        [secrets.token_hex(16)]
    matches = [hmac.compare_digest(secret.encode(), one.encode()) for one in expected]
    if not any(matches) or app is None:
        limit.failed(address)
        return _signin_page("Wrong app ID or secret.", app_id, 401)
    if not app.enabled:
        return _signin_page(f"{DISABLED}.", app_id, 403)
    try:
        session_id = _feed().sessions.create(app.id, int(time.time()) + SESSION_SECONDS)
    except SessionStoreDown:
        return _signin_page(STORE_DOWN, app_id, 503)
    session.clear()  # a new session id and token: nothing from before sign-in survives
    session.permanent = True
    session.update(sid=session_id, csrf=secrets.token_urlsafe(24))
    return redirect(url_for("dashboard.index"), 303)


@blueprint.post("/sign-out")
def sign_out():
    _check_csrf()
    session_id = session.get("sid")
    if session_id is not None:
        try:
            _feed().revoke(session_id)
        except SessionStoreDown:  # the session may still be live: keep the cookie, say so
            abort(503, STORE_DOWN)
    session.clear()
    return redirect(url_for("dashboard.index"), 303)


# -------------------------------------------------------------------- data

def _require_app():
    app = _signed_in_app()
    if app is None:
        abort(401, "Sign in first")
    return app


@blueprint.get("/events")
def events():
    """The live log as server-sent events: one JSON list of records per message."""
    app, expires = _signed_in()
    if app is None:
        abort(401, "Sign in first")
    feed, session_id, apps = _feed(), session["sid"], _core().apps

    def stream():
        viewer = feed.add_viewer(app.id, session_id, expires)
        try:
            yield "retry: 3000\nevent: ready\ndata: {}\n\n"
            idle = 0.0
            records = viewer.records
            while not viewer.done:
                if records:
                    batch = []
                    while records and len(batch) < MAX_BATCH:
                        batch.append(records.popleft())
                    yield f"data: {orjson.dumps(batch).decode()}\n\n"
                    idle = 0.0
                    continue
                gevent.sleep(POLL)
                idle += POLL
                if idle >= PING_EVERY:
                    live = apps.by_id(app.id)  # removed or disabled since (apps file reloaded)
                    if live is None or not live.enabled:
                        break
                    yield ": ping\n\n"  # finds a closed page: the write fails
                    idle = 0.0
            yield "event: end\ndata: {}\n\n"
        finally:
            feed.remove_viewer(viewer)

    return Response(stream(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@blueprint.get("/api/channels")
def channels():
    """Occupied channels with their counts, presence members and cached events."""
    app = _require_app()
    core = _core()
    counts = core.channel_counts(app)
    listed = []
    for name in sorted(counts)[:MAX_CHANNELS]:
        subscriptions, users = counts[name]
        entry = {"name": name, "subscription_count": subscriptions}
        kind = channel_kind(name)
        if kind.presence:
            members = core.members(app, name)
            entry["user_count"] = len(members)
            entry["members"] = [{"id": uid, "user_info": info}
                                for uid, info in sorted(members.items())[:MAX_MEMBERS]]
        if kind.cache:
            cached = core.cached(app, name)
            if cached is not None:
                entry["cache"] = {"event": cached[0], "data": cached[1][:2048],
                                  "ttl": max(0, int(cached[2]))}
        listed.append(entry)
    return _json({"connections": core.connection_count(app), "channels": listed,
                  "total": len(counts)})


@blueprint.get("/api/stats")
def stats():
    app = _require_app()
    try:
        since = int(request.args.get("since", 0))
    except ValueError:
        since = 0
    return _json({"now": int(time.time()), "samples": _feed().series(app.id, since)})


@blueprint.post("/api/publish")
def publish():
    """The event creator: the HTTP API's own checks and publish path."""
    app = _require_app()
    _check_csrf()
    try:
        body = orjson.loads(request.get_data() or b"{}")
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object")
        data = body.get("data", "")
        if not isinstance(data, str):
            raise ApiError(400, "'data' must be JSON text")
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ApiError(400, "Data is not valid JSON") from None
        channels = body.get("channels")
        if isinstance(channels, str):
            channels = [c.strip() for c in channels.split(",") if c.strip()]
        name, data, channels, _, _ = api._event(
            app, {"name": body.get("event"), "data": data, "channels": channels})
    except orjson.JSONDecodeError:
        return _json({"error": "Malformed JSON body"}, 400)
    except ApiError as exc:
        return _json({"error": exc.message}, exc.status)
    core = _core()
    core.hub.app(app.id).api_calls += 1
    core.trigger(app, channels, name, data)
    return _json({"ok": True, "channels": channels})


@blueprint.errorhandler(401)
@blueprint.errorhandler(403)
@blueprint.errorhandler(503)
def _refused(exc):
    return _json({"error": exc.description}, exc.code)
