"""gunicorn -c gunicorn.conf.py: BunPulse with gevent WebSocket workers.

Settings come from the same environment variables and .env file as `python -m bunpulse`.
Reloads: `kill -HUP <master>` starts new workers with the new configuration; `kill -USR2
<master>` starts a new master (new code), then `kill -TERM <old master>`. Either way the old
workers tell their clients 4200 and the clients reconnect to the new ones.
"""
import logging
import os
import shutil
import sys
import tempfile

from bunpulse.apps import load_apps
from bunpulse.config import ConfigError, check_processes, listen_host, load_settings
from bunpulse.devapp import REFUSED, DevAppGuard
from bunpulse.logs import gunicorn_logconfig
from bunpulse.startup import log_startup

try:
    _settings = load_settings([])
    from bunpulse.tls import server_context
    server_context(_settings)  # a bad certificate stops start-up with one clear line
except ConfigError as exc:
    sys.exit(f"bunpulse: configuration error: {exc}")

_host = listen_host(_settings)
bind = [_host if _host.startswith("unix:") else f"{_host}:{_settings.port}"]
workers = _settings.workers     # BUNPULSE_WORKERS; -w overrides it (checked in on_starting);
                                # WEB_CONCURRENCY, which platforms set by themselves, is not read
worker_class = "bunpulse.worker.PusherWorker"
worker_connections = 20000      # requests being read at once (upgraded sockets leave the pool)
wsgi_app = "bunpulse.wsgi:create_app()"
timeout = 30                    # the hub never blocks; a stuck worker is restarted
# On a reload, old workers wait up to 7 s for a new one to answer, then tell their clients
# 4200 and take BUNPULSE_SHUTDOWN_GRACE_MS (3 s by default) for them to leave.
graceful_timeout = 7 + -(-_settings.shutdown_grace_ms // 1000)
keepalive = 5
backlog = _settings.backlog     # BUNPULSE_BACKLOG: gunicorn's own default is 2048 too
loglevel = _settings.log_level
accesslog = None                # --access-log is BunPulse's own, for the HTTP API only
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format)
if _settings.ssl_cert:
    certfile, keyfile = _settings.ssl_cert, _settings.ssl_key

    def ssl_context(config, default_ssl_context_factory):
        return server_context(_settings)  # with the key's passphrase, which gunicorn lacks

# Metrics: every worker writes its counters to files in one directory (its own temporary one
# unless PROMETHEUS_MULTIPROC_DIR is set) and the master serves them all from one listener.
# The directory is emptied once per master, not on HUP (this file is read again) nor by a
# master that USR2 started (the old workers still write there until they stop).
_OWNER = "BUNPULSE_METRICS_MASTER"
if _settings.metrics_port is not None and os.environ.get(_OWNER) != str(os.getpid()):
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bunpulse-metrics-")
        os.environ["BUNPULSE_METRICS_TMP"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    elif "GUNICORN_FD" not in os.environ:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    os.environ[_OWNER] = str(os.getpid())


def on_starting(server):
    try:
        apps = load_apps(_settings)
        check_processes(_settings, server.cfg.workers, "-w or BUNPULSE_WORKERS")
    except ConfigError as exc:
        sys.exit(f"bunpulse: configuration error: {exc}")
    hosts = [bind.rpartition(":")[0] if not bind.startswith("unix:") else bind
             for bind in server.cfg.bind]
    if not DevAppGuard(_settings).bound_to(hosts):
        sys.exit(f"bunpulse: configuration error: {', '.join(server.cfg.bind)}: {REFUSED}")
    # What gunicorn will do, command-line flags included (-b, -w override this file).
    log_startup(_settings, apps, ", ".join(server.cfg.bind), server.log,
                workers=server.cfg.workers)


def when_ready(server):
    if _settings.metrics_port is not None:
        # Workers forked while the listener's thread runs cannot import a codec: gevent's
        # resolver (Redis connects through it) needs idna, so the master loads it first.
        import encodings.idna  # noqa: F401
        from bunpulse import metrics
        metrics.set_worker_pids(lambda: list(server.WORKERS))
        metrics.serve_in_thread(_settings.metrics_host, _settings.metrics_port)


def on_reload(server):
    server.log.info("reloading: new workers with the new configuration; the old ones tell "
                    "their clients to reconnect (4200)", extra={"event": "reload"})


def post_fork(server, worker):
    # BunPulse's own loggers write through gunicorn's error log, at BUNPULSE_LOG_LEVEL.
    bunpulse_log = logging.getLogger("bunpulse")
    bunpulse_log.handlers = list(worker.log.error_log.handlers)
    bunpulse_log.setLevel(_settings.log_level.upper())
    bunpulse_log.propagate = False


def child_exit(server, worker):
    if _settings.metrics_port is not None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)  # its gauges leave the sums


def on_exit(server):
    if os.environ.get("BUNPULSE_METRICS_TMP"):
        shutil.rmtree(os.environ["BUNPULSE_METRICS_TMP"], ignore_errors=True)
    server.log.info("BunPulse stopped", extra={"event": "stop"})
