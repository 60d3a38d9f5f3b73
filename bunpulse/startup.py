"""What a server process does as it starts: the start-up log, the same for the embedded
server and gunicorn's master (it imports no server machinery, so gunicorn's master stays light
before it forks its workers), and the garbage collector's settings of a serving process."""
import gc
import logging
import sys

from .config import redacted, uses_dev_app

log = logging.getLogger("bunpulse")


def log_startup(settings, apps, where, logger=log, workers=None):
    """Say where BunPulse listens, its apps, its adapter, and warn about development
    credentials. `where`: the listening address(es) as text."""
    for note in settings.notes:
        logger.info("%s", note, extra={"event": "settings_note"})
    under = f" ({workers} gunicorn worker(s))" if workers is not None else ""
    ws, http = ("wss", "https") if settings.ssl_cert else ("ws", "http")
    logger.info("BunPulse listening on %s%s: WebSocket %s://%s/app/{key}, HTTP API %s://%s/"
                "apps/{id}/..., health %s://%s/health", where, under, ws, where, http, where,
                http, where, extra={"event": "start", "address": where,
                                    "tls": bool(settings.ssl_cert)})
    logger.info("%d app(s) loaded", len(apps), extra={"event": "apps_loaded",
                                                     "apps": [app.id for app in apps]})
    for app in apps:
        logger.info("app id=%s key=%s client_events=%s webhooks=%d", app.id, app.key,
                    app.client_events, len(app.webhooks))
    if uses_dev_app(settings):
        logger.warning("NO CREDENTIALS CONFIGURED: serving the development app (id 1, key "
                       "app-key, secret app-secret) on 127.0.0.1 only. Set PUSHER_APP_ID, "
                       "PUSHER_APP_KEY and PUSHER_APP_SECRET (or --apps-file) for real use.")
    cluster = " (Redis Cluster seed)" if settings.redis_cluster else ""
    logger.info("adapter: %s", f"redis {redacted(settings.redis_url)}{cluster}"
                if settings.redis_url else "local (one process)")


def gunicorn_workers():
    """The number of worker processes of the gunicorn that is loading BunPulse (its -w,
    WEB_CONCURRENCY or configuration file), or None outside gunicorn. gunicorn hands an
    application nothing of its configuration, but while it loads one (in a worker, or in the
    master with --preload) its own objects, which hold it as `cfg`, are on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        cfg = getattr(frame.f_locals.get("self"), "cfg", None)
        if type(cfg).__module__ == "gunicorn.config":
            return cfg.workers
        frame = frame.f_back
    return None


# Every connection allocates a few dozen objects that live as long as it does: with Python's
# default threshold (700) the collector ran every few connections and, as they accumulated,
# re-scanned every live one; it cost about a fifth of the CPU of accepting a connection.
GC_THRESHOLDS = (20000, 20, 20)


def tune_gc():
    """In a process that serves (the embedded server, a gunicorn worker; never a host
    application's, which keeps its own settings): what start-up made is never collected
    again, and the young generation is collected far less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
