"""Every setting in one table: its name, environment variable, CLI flag, default, check and doc.

Precedence: CLI flag, then the process environment, then a `.env` file, then the default.
A bad value stops start-up with one line that names the option (ConfigError).
"""
import argparse
import dataclasses
import os
from urllib.parse import urlparse, urlsplit, urlunsplit

from dotenv import dotenv_values

from . import soketi
from .addresses import parse_trusted
from .origins import parse_list as parse_origins


class ConfigError(Exception):
    """Invalid configuration; the message names the option."""


def _int(minimum=0):
    def parse(value):
        try:
            number = int(value)
        except ValueError:  # int()'s own message ("invalid literal ... base 10") helps nobody
            raise ValueError("must be a whole number") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number
    parse.metavar = "N"
    return parse


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


_bool.metavar = "BOOL"


def _url(schemes):
    def parse(value):
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in schemes or not parsed.netloc:
            raise ValueError(f"must be a {'/'.join(schemes)} URL")
        return value
    parse.metavar = "URL"
    return parse


def _choice(*choices):
    def parse(value):
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be {' or '.join(choices)}")
        return text
    parse.metavar = "|".join(choices).upper()
    return parse


def _text(value):
    return None if value in (None, "") else str(value)


_text.metavar = "TEXT"


def _key_prefix(value):
    # In a key, braces would take the Redis Cluster hash tag from the part BunPulse tags.
    text = str(value)
    if not text or any(c in text for c in "{}") or any(c.isspace() for c in text):
        raise ValueError("must be a non-empty name without braces or spaces")
    return text


_key_prefix.metavar = "PREFIX"


def _key_pairs(value):
    """`key:secret,key:secret` as ((key, secret), ...)."""
    if value in (None, ""):
        return None
    pairs = []
    for item in str(value).split(","):
        key, colon, secret = item.strip().partition(":")
        if not colon or not key or not secret:
            raise ValueError("must be key:secret pairs separated by commas")
        pairs.append((key, secret))
    return tuple(pairs)


_key_pairs.metavar = "KEY:SECRET,..."


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    env: str
    default: object
    parse: object
    doc: str
    shown_default: str = None  # what --help says the default is, where None means "it depends"

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    Option("host", "BUNPULSE_HOST", None, _text, "address to listen on",
           shown_default="0.0.0.0, or 127.0.0.1 for the development app"),
    Option("port", "BUNPULSE_PORT", 6001, _int(0), "port for WebSocket and HTTP API (0: any free port)"),
    Option("app_id", "PUSHER_APP_ID", None, _text, "id of the app configured from the environment"),
    Option("app_key", "PUSHER_APP_KEY", None, _text, "public key of that app"),
    Option("app_secret", "PUSHER_APP_SECRET", None, _text, "secret of that app"),
    Option("app_keys", "BUNPULSE_APP_KEYS", None, _key_pairs,
           "more key:secret pairs of that app, comma-separated, active beside "
           "PUSHER_APP_KEY/PUSHER_APP_SECRET (a rotation's overlap)"),
    Option("apps_file", "BUNPULSE_APPS_FILE", None, _text,
           "JSON file with a list of apps (id, key, secret and per-app settings)"),
    Option("apps_file_reload", "BUNPULSE_APPS_FILE_RELOAD", 2, _int(0),
           "seconds between looks at the apps file: a changed file is re-read in place, "
           "without a restart (0: read once at start-up)"),
    Option("client_events", "BUNPULSE_CLIENT_EVENTS", True, _bool,
           "allow client-* events for the app from the environment"),
    Option("max_connections", "BUNPULSE_MAX_CONNECTIONS", 0, _int(0),
           "connection limit of the app from the environment (0: none)"),
    Option("allowed_origins", "BUNPULSE_ALLOWED_ORIGINS", None, parse_origins,
           "pages that may connect to the app from the environment, by the upgrade's Origin: "
           "comma-separated origins (https://app.example.com) or hosts (*.example.com); "
           "others get pusher:error and close 4009, a request without Origin is never refused",
           shown_default="*"),
    Option("max_presence_member_size_in_kb", "BUNPULSE_MAX_PRESENCE_MEMBER_SIZE_IN_KB", 1,
           _int(1), "KB of user_info one presence member of the app from the environment may "
           "have (Pusher's limit: 1)"),
    Option("max_backend_events_per_second", "BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND", 0,
           _int(0),
           "events the app from the environment may trigger through the HTTP API per second, "
           "each channel of each event counted, deployment-wide with Redis (0: no limit); "
           "past it 429 with Retry-After"),
    Option("max_read_requests_per_second", "BUNPULSE_MAX_READ_REQUESTS_PER_SECOND", 0, _int(0),
           "HTTP API reads (GET channels, channel, users) the app from the environment may "
           "make per second, deployment-wide with Redis (0: no limit); past it 429 with "
           "Retry-After"),
    Option("subscription_count", "BUNPULSE_SUBSCRIPTION_COUNT", False, _bool,
           "send pusher_internal:subscription_count to the subscribers of non-presence "
           "channels of the app from the environment when their count changes (at most one "
           "message a second per channel)"),
    Option("heartbeat_interval", "BUNPULSE_HEARTBEAT_INTERVAL", 25000, _int(100),
           "ms without traffic before the server sends pusher:ping"),
    Option("heartbeat_timeout", "BUNPULSE_HEARTBEAT_TIMEOUT", 60000, _int(200),
           "ms without any traffic before the server closes with 4201"),
    Option("max_message_size", "BUNPULSE_MAX_MESSAGE_SIZE", 65536, _int(1024),
           "largest client WebSocket message in bytes; larger ones are closed with 1009"),
    Option("handshake_timeout", "BUNPULSE_HANDSHAKE_TIMEOUT", 10000, _int(100),
           "ms a client has to send a whole request (WebSocket handshake, or HTTP head and "
           "body; on a TLS port the TLS handshake too), from its connection or, kept alive, "
           "from its first byte; past it the connection is closed (408 if it had begun)"),
    Option("keepalive_timeout", "BUNPULSE_KEEPALIVE_TIMEOUT", 5000, _int(100),
           "ms an idle keep-alive HTTP connection is kept open for its next request"),
    Option("compression", "BUNPULSE_COMPRESSION", True, _bool,
           "permessage-deflate with clients that offer it (each event compressed once, for "
           "every socket)"),
    Option("max_buffer", "BUNPULSE_MAX_BUFFER", 1048576, _int(4096),
           "bytes queued for one slow client before it is evicted with 4100"),
    Option("max_messages_per_second", "BUNPULSE_MAX_MESSAGES_PER_SECOND", 100, _int(0),
           "messages one connection may send per second, pings and WebSocket pings included "
           "(0: no limit); a client that keeps flooding gets pusher:error and close 4100"),
    Option("message_burst", "BUNPULSE_MESSAGE_BURST", 2500, _int(1),
           "messages a connection may send at once above that rate: more than "
           "--max-subscriptions, as pusher-js subscribes to all its channels at once on "
           "reconnecting"),
    Option("max_subscriptions", "BUNPULSE_MAX_SUBSCRIPTIONS", 2000, _int(1),
           "channels one connection may hold; past it pusher:error, the connection stays"),
    Option("max_connections_per_ip", "BUNPULSE_MAX_CONNECTIONS_PER_IP", 0, _int(0),
           "concurrent WebSocket connections per client address, per worker (0: no limit); "
           "past it pusher:error and close 4004"),
    Option("trust_proxy", "BUNPULSE_TRUST_PROXY", None, parse_trusted,
           "proxies whose X-Forwarded-For (else Forwarded) header names the client address: "
           "their number in front of BunPulse (1 for one nginx, also on a unix socket), or "
           "their addresses (comma-separated IPs or networks)"),
    Option("ipv6_prefix", "BUNPULSE_IPV6_PREFIX", 64, _int(1),
           "bits of an IPv6 client address that the per-address connection limit counts as "
           "one address (a subscriber holds a whole /64; 128: each address)"),
    Option("backlog", "BUNPULSE_BACKLOG", 2048, _int(1),
           "listen backlog: connections the kernel queues before they are accepted"),
    Option("cache_ttl", "BUNPULSE_CACHE_TTL", 1800, _int(1),
           "seconds a cache channel keeps its last event"),
    Option("subscription_vacancy_url", "BUNPULSE_SUBSCRIPTION_VACANCY_URL", None,
           _url(("http", "https")), "URL that receives a signed channel_vacated webhook"),
    Option("webhook_url", "BUNPULSE_WEBHOOK_URL", None, _url(("http", "https")),
           "URL that receives every webhook event of the app from the environment"),
    Option("webhook_batch_ms", "BUNPULSE_WEBHOOK_BATCH_MS", 250, _int(0),
           "ms a webhook request waits to batch more events"),
    Option("webhook_batch_size", "BUNPULSE_WEBHOOK_BATCH_SIZE", 20, _int(1),
           "most events in one webhook request"),
    Option("webhook_delay_ms", "BUNPULSE_WEBHOOK_DELAY_MS", 3000, _int(0),
           "ms channel_vacated and member_removed wait, cancelled by a quick return"),
    Option("webhook_retry_seconds", "BUNPULSE_WEBHOOK_RETRY_SECONDS", 300, _int(0),
           "how long a failing webhook is retried, with exponential backoff"),
    Option("webhook_timeout_ms", "BUNPULSE_WEBHOOK_TIMEOUT_MS", 5000, _int(100),
           "deadline of one webhook request, all of it: connect, send and the whole answer"),
    Option("webhook_queue_size", "BUNPULSE_WEBHOOK_QUEUE_SIZE", 10000, _int(1),
           "webhook events held per target before new ones are dropped (and counted)"),
    Option("redis_url", "BUNPULSE_REDIS_URL", None, _url(("redis", "rediss", "unix")),
           "Redis for several workers or nodes (pub/sub and shared state)"),
    Option("redis_key_prefix", "BUNPULSE_REDIS_KEY_PREFIX", "bp", _key_prefix,
           "first part of every Redis key and pub/sub channel: two deployments on one Redis "
           "need two prefixes"),
    Option("redis_cluster", "BUNPULSE_REDIS_CLUSTER", False, _bool,
           "the Redis URL is a seed node of a Redis Cluster (sharded pub/sub, Redis 7+)"),
    Option("shutdown_grace_ms", "BUNPULSE_SHUTDOWN_GRACE_MS", 3000, _int(0),
           "ms a stopping worker gives its clients to leave after telling them to reconnect "
           "(4200), and its webhooks to go out, before it exits"),
    Option("dashboard", "BUNPULSE_DASHBOARD", False, _bool,
           "serve the debug dashboard at /dashboard (sign in with an app's id and secret)"),
    Option("workers", "BUNPULSE_WORKERS", 1, _int(1),
           "worker processes under gunicorn -c gunicorn.conf.py (above 1 needs Redis; "
           "python -m bunpulse runs one)"),
    Option("log_level", "BUNPULSE_LOG_LEVEL", "info", _text, "debug, info, warning or error"),
    Option("log_format", "BUNPULSE_LOG_FORMAT", "text", _choice("text", "json"),
           "log lines as text or as one JSON object a line"),
    Option("access_log", "BUNPULSE_ACCESS_LOG", False, _bool,
           "log one line for every HTTP API request"),
    Option("metrics_port", "BUNPULSE_METRICS_PORT", None, _int(0),
           "port of the Prometheus listener (/metrics, /stats); off unless set"),
    Option("metrics_host", "BUNPULSE_METRICS_HOST", "127.0.0.1", _text,
           "address of the Prometheus listener"),
    Option("ssl_cert", "BUNPULSE_SSL_CERT", None, _text,
           "PEM certificate chain: serve wss:// and https:// (with --ssl-key)"),
    Option("ssl_key", "BUNPULSE_SSL_KEY", None, _text, "PEM private key of --ssl-cert"),
    Option("ssl_key_password", "BUNPULSE_SSL_KEY_PASSWORD", None, _text,
           "passphrase of an encrypted --ssl-key"),
    Option("env_file", "BUNPULSE_ENV_FILE", ".env", _text, "dotenv file read at start-up"),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

# A numeric id: the official server libraries accept digits only.
DEV_APP = {"id": "1", "key": "app-key", "secret": "app-secret"}

Settings = dataclasses.make_dataclass(
    "Settings", [(o.name, object, dataclasses.field(default=o.default)) for o in OPTIONS]
    + [("notes", tuple, dataclasses.field(default=()))],
    frozen=True)
Settings.__doc__ = ("The resolved settings (see OPTIONS), and `notes`: what start-up should say "
                    "about where they came from (soketi's names read).")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bunpulse",
        description="BunPulse: a self-hosted Pusher Channels server. Every option can also be "
                    "set by its environment variable or in a .env file.",
        epilog="python -m bunpulse apps COMMAND manages the apps of the apps file (add, list, "
               "show, update, disable, enable, rotate-secret, promote-key, retire-key, "
               "delete): see python -m bunpulse apps --help.",
        argument_default=argparse.SUPPRESS)
    for option in OPTIONS:
        default = option.shown_default or ("none" if option.default is None else option.default)
        parser.add_argument(option.flag, dest=option.name,
                            metavar=getattr(option.parse, "metavar", "VALUE"),
                            help=f"{option.doc} [env {option.env}, default {default}]")
    return parser


def load_settings(argv=None, environ=None, overrides=None):
    """Resolve the settings from CLI arguments, environment, .env file and keyword overrides
    (the library API); raise ConfigError naming the option on a bad value."""
    environ = os.environ if environ is None else environ
    given = vars(build_parser().parse_args(argv)) if argv is not None else {}
    given.update({k: v for k, v in (overrides or {}).items()})
    unknown = set(given) - set(OPTIONS_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown option: {', '.join(sorted(unknown))}")
    env_file = given.get("env_file") or environ.get("BUNPULSE_ENV_FILE") or ".env"
    dotenv = dotenv_values(env_file) if os.path.isfile(env_file) else {}
    # A soketi deployment's environment or .env, under BunPulse's names (soketi.py).
    environ, environ_note = soketi.translated(environ)
    dotenv, dotenv_note = soketi.translated(dotenv)
    notes = tuple(note for note in (environ_note, dotenv_note and f"{env_file}: {dotenv_note}")
                  if note)

    values = {}
    for option in OPTIONS:
        if option.name in given:
            raw, source = given[option.name], option.flag
        elif environ.get(option.env) not in (None, ""):
            raw, source = environ[option.env], option.env
        elif dotenv.get(option.env) not in (None, ""):
            raw, source = dotenv[option.env], f"{option.env} in {env_file}"
        else:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = raw if raw is None else option.parse(raw)
        except (TypeError, ValueError) as exc:
            shown = redacted(str(raw)) if getattr(option.parse, "metavar", "") == "URL" else raw
            raise ConfigError(f"invalid {source}={shown!r}: {exc}") from None
    settings = Settings(**values, notes=notes)
    _check(settings)
    return settings


def _check(settings):
    credentials = (settings.app_id, settings.app_key, settings.app_secret)
    if any(credentials) and not all(credentials):
        raise ConfigError("PUSHER_APP_ID, PUSHER_APP_KEY and PUSHER_APP_SECRET must be set "
                          "together")
    keys = [settings.app_key] + [key for key, _ in settings.app_keys or ()]
    if settings.app_keys and not settings.app_id:
        raise ConfigError("BUNPULSE_APP_KEYS needs PUSHER_APP_ID, PUSHER_APP_KEY and "
                          "PUSHER_APP_SECRET: its pairs are more keys of that app")
    if len(set(keys)) < len(keys):
        raise ConfigError("BUNPULSE_APP_KEYS: a key is given twice (PUSHER_APP_KEY's included)")
    if uses_dev_app(settings) and settings.host not in (None, "127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"--host={settings.host} needs real credentials: the development app "
                          "(app-key/app-secret) is served on 127.0.0.1 only; set "
                          "PUSHER_APP_ID, PUSHER_APP_KEY and PUSHER_APP_SECRET or --apps-file")
    if settings.ipv6_prefix > 128:
        raise ConfigError(f"invalid --ipv6-prefix={settings.ipv6_prefix}: must be at most 128")
    if settings.max_messages_per_second and settings.max_subscriptions >= settings.message_burst:
        raise ConfigError(
            f"--max-subscriptions ({settings.max_subscriptions}) must be below --message-burst "
            f"({settings.message_burst}): pusher-js subscribes to all its channels at once when "
            "it reconnects, so a client holding more channels than the burst would be closed "
            "with 4100 on every reconnect; raise --message-burst or lower --max-subscriptions")
    if settings.heartbeat_interval >= settings.heartbeat_timeout:
        raise ConfigError("--heartbeat-interval must be shorter than --heartbeat-timeout")
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"invalid --log-level={settings.log_level!r}: "
                          "must be debug, info, warning or error")
    if settings.redis_cluster and not settings.redis_url:
        raise ConfigError("--redis-cluster needs BUNPULSE_REDIS_URL: a seed node of the cluster")
    if bool(settings.ssl_cert) != bool(settings.ssl_key):
        raise ConfigError("--ssl-cert and --ssl-key must be set together")
    if settings.ssl_key_password and not settings.ssl_key:
        raise ConfigError("--ssl-key-password needs --ssl-key")
    check_processes(settings, settings.workers, "BUNPULSE_WORKERS")


def check_processes(settings, processes, named):
    """Several processes on the in-process adapter would each have a hub of their own, and an
    event published to one would never reach the clients of another: refused. `named`: where
    the number came from."""
    if processes > 1 and not settings.redis_url:
        raise ConfigError(f"{processes} worker processes ({named}) need BUNPULSE_REDIS_URL: "
                          "each worker has its own hub, and without Redis an event published "
                          "to one never reaches the clients of another")


def redacted(url):
    """A URL fit for logs: its user and password, and its query (where tokens go), as ***."""
    parsed = urlsplit(url)
    host = parsed.netloc.rpartition("@")[2]
    return urlunsplit((parsed.scheme, f"***@{host}" if "@" in parsed.netloc else host,
                       parsed.path, "***" if parsed.query else "", ""))


def uses_dev_app(settings):
    return not settings.app_id and not settings.apps_file


def listen_host(settings):
    if settings.host:
        return settings.host
    return "127.0.0.1" if uses_dev_app(settings) else "0.0.0.0"
