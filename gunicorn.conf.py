"""gunicorn -c gunicorn.conf.py: BunPulse with gevent WebSocket workers.

Settings come from the same environment variables and .env file as `python -m bunpulse`.
"""
import logging
import sys

from bunpulse.apps import load_apps
from bunpulse.config import ConfigError, listen_host, load_settings
from bunpulse.startup import log_startup

try:
    _settings = load_settings([])
except ConfigError as exc:
    sys.exit(f"bunpulse: configuration error: {exc}")

_host = listen_host(_settings)
bind = [_host if _host.startswith("unix:") else f"{_host}:{_settings.port}"]
workers = _settings.workers
worker_class = "bunpulse.worker.PusherWorker"
worker_connections = 20000      # requests being read at once (upgraded sockets leave the pool)
wsgi_app = "bunpulse.wsgi:create_app()"
timeout = 30                    # the hub never blocks; a stuck worker is restarted
graceful_timeout = 5            # clients are told 4200 first, then reconnect elsewhere
keepalive = 5
loglevel = _settings.log_level
accesslog = None


def on_starting(server):
    try:
        apps = load_apps(_settings)
    except ConfigError as exc:
        sys.exit(f"bunpulse: configuration error: {exc}")
    log_startup(_settings, apps, ", ".join(bind), server.log, workers=workers)


def post_fork(server, worker):
    # BunPulse's own loggers write through gunicorn's error log, at BUNPULSE_LOG_LEVEL.
    bunpulse_log = logging.getLogger("bunpulse")
    bunpulse_log.handlers = list(worker.log.error_log.handlers)
    bunpulse_log.setLevel(_settings.log_level.upper())
    bunpulse_log.propagate = False
