"""gunicorn -c gunicorn.conf.py: BunPulse with gevent WebSocket workers.

Settings come from the same environment variables and .env file as `python -m bunpulse`.
"""
import sys

from bunpulse.config import ConfigError, listen_host, load_settings

try:
    _settings = load_settings([])
except ConfigError as exc:
    sys.exit(f"bunpulse: configuration error: {exc}")

_host = listen_host(_settings)
bind = [_host if _host.startswith("unix:") else f"{_host}:{_settings.port}"]
workers = _settings.workers
worker_class = "bunpulse.transport.PusherWorker"
worker_connections = 20000      # gunicorn's default of 1000 would cap sockets per worker
wsgi_app = "bunpulse.server:create_app()"
timeout = 30                    # the hub never blocks; a stuck worker is restarted
graceful_timeout = 5            # clients are told 4200 first, then reconnect elsewhere
keepalive = 5
loglevel = _settings.log_level
accesslog = None


def on_starting(server):
    server.log.info("BunPulse under gunicorn: %d worker(s) on %s", workers, ", ".join(bind))
