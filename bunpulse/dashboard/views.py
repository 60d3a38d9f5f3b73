"""The dashboard's pages, event stream and JSON, under /dashboard.

Sessions: a signed cookie (HttpOnly, SameSite=Strict, path /dashboard) holding the app id, a
session id, its expiry and a CSRF token. The signing key is derived from every app's secret,
so each gunicorn worker (and each node with the same apps) accepts the others' cookies, and
changing a secret signs everyone out. Sign-out revokes the session id (deployment-wide under
Redis) and ends its streams."""
import hashlib
import hmac
import secrets
import time

import gevent
import orjson
from flask import (Blueprint, Response, abort, current_app, redirect, render_template, request,
                   session, url_for)

from .. import api
from ..errors import ApiError
from ..protocol import channel_kind

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
    flask_app.config.update(SESSION_COOKIE_NAME="bunpulse_dashboard",
                            SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                            SESSION_COOKIE_PATH="/dashboard",
                            PERMANENT_SESSION_LIFETIME=SESSION_SECONDS)


def _core():
    return current_app.extensions["bunpulse"].core


def _feed():
    return current_app.extensions["bunpulse_dashboard"]


def _signed_in_app():
    """The app of a live session, or None."""
    app_id, session_id = session.get("app_id"), session.get("sid")
    if app_id is None or session_id is None or time.time() >= session.get("expires", 0):
        return None
    if _feed().is_revoked(session_id):
        return None
    return _core().apps.by_id(app_id)


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

@blueprint.get("")
@blueprint.get("/")
def index():
    app = _signed_in_app()
    if app is None:
        return render_template("dashboard/signin.html", csrf_token=_csrf_token(), error=None,
                               app_id="")
    return render_template("dashboard/main.html", app_id=app.id, app_key=app.key,
                           csrf_token=_csrf_token(),
                           max_data=app.max_event_data_size)


@blueprint.post("/sign-in")
def sign_in():
    _check_csrf()
    app_id = request.form.get("app_id", "").strip()
    secret = request.form.get("secret", "")
    app = _core().apps.by_id(app_id)
    # Compared in constant time, and against a stand-in for an unknown id, so that timing
    # tells neither the secret nor which ids exist.
    expected = app.secret if app is not None else secrets.token_hex(16)
    if not hmac.compare_digest(secret.encode(), expected.encode()) or app is None:
        return render_template("dashboard/signin.html", csrf_token=_csrf_token(),
                               error="Wrong app ID or secret.", app_id=app_id), 401
    session.clear()  # a new session id and token: nothing from before sign-in survives
    session.permanent = True
    session.update(app_id=app.id, sid=secrets.token_urlsafe(18),
                   expires=int(time.time()) + SESSION_SECONDS,
                   csrf=secrets.token_urlsafe(24))
    return redirect(url_for("dashboard.index"), 303)


@blueprint.post("/sign-out")
def sign_out():
    _check_csrf()
    session_id = session.get("sid")
    if session_id is not None:
        _feed().revoke(session_id)
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
    app = _require_app()
    feed, session_id, expires = _feed(), session["sid"], session["expires"]

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
def _refused(exc):
    return _json({"error": exc.description}, exc.code)
