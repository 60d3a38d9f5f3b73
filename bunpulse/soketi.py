"""soketi's environment names, read where BunPulse's own are not set, so that the environment
or `.env` of a soketi deployment (`SOKETI_DEFAULT_APP_ID`, `SOKETI_PORT`, ...) runs BunPulse
unchanged, with soketi's own defaults where they differ (client events off). What has no
equivalent is named in one line rather than silently ignored (docs/migrating.md)."""

def _unlimited(value):
    """soketi writes "no limit" as -1, BunPulse as 0."""
    return "0" if str(value).strip() == "-1" else value


def _debug(value):
    return "debug" if str(value).strip().lower() in ("1", "true", "yes", "on") else None


# soketi's name -> BunPulse's, and how soketi's value becomes BunPulse's (None: as it is).
NAMES = {
    "SOKETI_DEFAULT_APP_ID": ("PUSHER_APP_ID", None),
    "SOKETI_DEFAULT_APP_KEY": ("PUSHER_APP_KEY", None),
    "SOKETI_DEFAULT_APP_SECRET": ("PUSHER_APP_SECRET", None),
    "SOKETI_DEFAULT_APP_MAX_CONNS": ("BUNPULSE_MAX_CONNECTIONS", _unlimited),
    "SOKETI_DEFAULT_APP_ENABLE_CLIENT_MESSAGES": ("BUNPULSE_CLIENT_EVENTS", None),
    "SOKETI_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SEC": ("BUNPULSE_MAX_BACKEND_EVENTS_PER_SECOND",
                                                      _unlimited),
    "SOKETI_DEFAULT_APP_MAX_READ_REQ_PER_SEC": ("BUNPULSE_MAX_READ_REQUESTS_PER_SECOND",
                                                _unlimited),
    "SOKETI_HOST": ("BUNPULSE_HOST", None),
    "SOKETI_PORT": ("BUNPULSE_PORT", None),
    "SOKETI_DEBUG": ("BUNPULSE_LOG_LEVEL", _debug),
    "SOKETI_SSL_CERT": ("BUNPULSE_SSL_CERT", None),
    "SOKETI_SSL_KEY": ("BUNPULSE_SSL_KEY", None),
    "SOKETI_SSL_PASS": ("BUNPULSE_SSL_KEY_PASSWORD", None),
    "SOKETI_METRICS_HOST": ("BUNPULSE_METRICS_HOST", None),
    "SOKETI_CHANNEL_CACHE_TTL": ("BUNPULSE_CACHE_TTL", None),
    "SOKETI_SHUTDOWN_GRACE_PERIOD": ("BUNPULSE_SHUTDOWN_GRACE_MS", None),
    "SOKETI_PRESENCE_MAX_MEMBER_SIZE": ("BUNPULSE_MAX_PRESENCE_MEMBER_SIZE_IN_KB", None),
    # soketi prefixes its pub/sub channels and its keys apart; BunPulse has one prefix for both
    "SOKETI_ADAPTER_REDIS_PREFIX": ("BUNPULSE_REDIS_KEY_PREFIX", None),
    "SOKETI_DB_REDIS_KEY_PREFIX": ("BUNPULSE_REDIS_KEY_PREFIX", None),
}
# Read together with others, below: the metrics port only when soketi's metrics are on, the
# Redis connection only with soketi's redis adapter.
COMBINED = ("SOKETI_METRICS_ENABLED", "SOKETI_METRICS_SERVER_PORT", "SOKETI_ADAPTER_DRIVER",
            "SOKETI_DB_REDIS_HOST", "SOKETI_DB_REDIS_PORT", "SOKETI_DB_REDIS_DB",
            "SOKETI_DB_REDIS_USERNAME", "SOKETI_DB_REDIS_PASSWORD")


def translated(source):
    """`source` (an environment or a .env's values) with BunPulse's names added for the soketi
    names it holds, never over a BunPulse name it sets itself; and a note of what was read
    and what was not (None when it holds no soketi name)."""
    given = {name: value for name, value in source.items()
             if name.startswith("SOKETI_") and value not in (None, "")}
    if not given:
        return source, None
    added, read = {}, []

    def add(bunpulse, value, *soketi):
        if value is not None and source.get(bunpulse) in (None, ""):
            added[bunpulse] = str(value)
            read.append(f"{'+'.join(soketi)} as {bunpulse}")

    for name, value in given.items():
        if name in NAMES:
            bunpulse, convert = NAMES[name]
            add(bunpulse, convert(value) if convert else value, name)
    if "SOKETI_DEFAULT_APP_ID" in given and "SOKETI_DEFAULT_APP_ENABLE_CLIENT_MESSAGES" \
            not in given:
        add("BUNPULSE_CLIENT_EVENTS", "false", "soketi's default (client messages off)")
    if given.get("SOKETI_METRICS_ENABLED", "").lower() in ("1", "true"):
        add("BUNPULSE_METRICS_PORT", given.get("SOKETI_METRICS_SERVER_PORT", "9601"),
            "SOKETI_METRICS_ENABLED", "SOKETI_METRICS_SERVER_PORT")
    driver = given.get("SOKETI_ADAPTER_DRIVER", "local").lower()
    if driver == "redis":
        add("BUNPULSE_REDIS_URL", _redis_url(given), "SOKETI_ADAPTER_DRIVER",
            "SOKETI_DB_REDIS_*")
    unsupported = sorted(name for name in given if name not in NAMES and name not in COMBINED)
    if driver not in ("local", "redis"):
        unsupported.insert(0, f"SOKETI_ADAPTER_DRIVER={driver}")
    note = "read soketi's environment: " + (", ".join(read) or "nothing BunPulse uses")
    if unsupported:
        note += "; not supported, ignored (docs/migrating.md): " + ", ".join(unsupported)
    return {**source, **added}, note


def _redis_url(given):
    user = given.get("SOKETI_DB_REDIS_USERNAME", "")
    password = given.get("SOKETI_DB_REDIS_PASSWORD", "")
    credentials = f"{user}:{password}@" if user or password else ""
    host = given.get("SOKETI_DB_REDIS_HOST", "127.0.0.1")
    return (f"redis://{credentials}{host}:{given.get('SOKETI_DB_REDIS_PORT', '6379')}/"
            f"{given.get('SOKETI_DB_REDIS_DB', '0')}")
