"""Log lines for operators: text or JSON (`--log-format`), and throttled warnings for limits
that clients hit (one hostile client must not flood the log)."""
import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else was passed in `extra` and goes into JSON.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `extra` fields."""

    def format(self, record):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {"time": f"{stamp}.{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(log_format):
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level, log_format):
    """The embedded server's logging: one handler on stderr in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def gunicorn_logconfig(level, log_format):
    """gunicorn's logconfig_dict: its own lines and BunPulse's in the same format."""
    fmt = ({"()": "bunpulse.logs.JsonFormatter"} if log_format == "json"
           else {"format": TEXT_FORMAT})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"bunpulse": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "bunpulse",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"],
                               "propagate": False},
            "gunicorn.access": {"level": level.upper(), "handlers": ["stderr"],
                                "propagate": False},
            "bunpulse": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


class Throttled:
    """A warning logged at most once per `every` seconds per key, saying how many were held
    back since the last line."""

    def __init__(self, logger, every=60.0):
        self._log = logger
        self._every = every
        self._last = {}   # key -> (time of the last line, occurrences held back since)

    def warning(self, key, message, *args, **extra):
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._every:
            self._last[key] = (last[0], last[1] + 1)
            return
        held = last[1] if last is not None else 0
        if len(self._last) > 10000:  # bounded however many keys clients make up
            self._last.clear()
        self._last[key] = (now, 0)
        if held:
            message += f" ({held} more since the last report)"
        self._log.warning(message, *args, extra=dict(extra, held_back=held))
