"""An app's allowed origins (`allowed_origins`, `--allowed-origins`): which web pages may open
a WebSocket to it, judged by the upgrade's `Origin` header.

Entries, as Reverb and Sockudo take them:
  `*`                         any origin (the default);
  `https://app.example.com`   that scheme, host and port (a default port may be left out);
  `app.example.com`           that host under any scheme and port (Reverb's form);
`*` in an entry stands for any run of characters but `/`: `*.example.com`,
`https://*.example.com`, `http://localhost:*`. A request without `Origin` is not a browser's
(server libraries, curl) and is never refused: the header guards pages, not credentials.
"""
import re
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


class AllowedOrigins:
    """The parsed entries; `allows(origin)` judges an `Origin` header (None when absent)."""

    __slots__ = ("entries", "_full", "_hosts")

    def __init__(self, entries=("*",)):
        self.entries = tuple(entries)
        full, hosts = [], []
        for entry in self.entries:
            check_entry(entry)
            if entry != "*":
                (full if "://" in entry else hosts).append(_pattern(_normal(entry, True)))
        self._full = tuple(full)
        self._hosts = tuple(hosts)

    @property
    def any(self):
        return "*" in self.entries

    def allows(self, origin):
        if origin is None or self.any:
            return True
        normal = _normal(origin)
        if normal is None:  # "null" (a sandboxed page, a file), or not an origin at all
            return False
        host = urlsplit(normal).hostname or ""
        return any(p.fullmatch(normal) for p in self._full) or \
            any(p.fullmatch(host) for p in self._hosts)

    def __eq__(self, other):
        return isinstance(other, AllowedOrigins) and other.entries == self.entries

    def __hash__(self):
        return hash(self.entries)

    def __repr__(self):
        return f"AllowedOrigins({list(self.entries)!r})"


def check_entry(entry):
    """Raise ValueError saying what is wrong with one entry."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("each entry must be a non-empty string")
    if entry != entry.strip() or any(c.isspace() for c in entry):
        raise ValueError(f"{entry!r} has spaces in it")
    if "://" in entry:
        scheme, _, rest = entry.partition("://")
        if scheme.lower() not in _DEFAULT_PORTS:
            raise ValueError(f"{entry!r}: an origin is http:// or https://")
        if not rest or "/" in rest or "?" in rest or "#" in rest:
            raise ValueError(f"{entry!r}: an origin is scheme://host[:port], without a path")
    elif entry != "*" and any(c in entry for c in "/:?#@"):
        raise ValueError(f"{entry!r}: give a host (app.example.com, any scheme and port) or "
                         "an origin (http://localhost:3000)")


ANY = AllowedOrigins()


def parse_list(value):
    """--allowed-origins: comma-separated entries; an AllowedOrigins or ValueError."""
    if isinstance(value, AllowedOrigins):
        return value
    entries = [part.strip() for part in str(value).split(",") if part.strip()]
    if not entries:
        raise ValueError("must name at least one origin, or *")
    return AllowedOrigins(entries)


parse_list.metavar = "ORIGINS"


def _normal(origin, entry=False):
    """`scheme://host[:port]` in lower case without a default port, or None when `origin` is
    not that. An entry may be a host alone, and have `*` for its port."""
    origin = origin.strip().lower()
    if "://" not in origin:
        return origin if entry else None
    scheme, _, rest = origin.partition("://")
    if scheme not in _DEFAULT_PORTS or not rest or any(c in rest for c in "/?#@"):
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or host.startswith("[") and not host.endswith("]"):  # no port, or IPv6 bare
        host, port = rest, ""
    if port and not (port.isdigit() or entry and port == "*"):
        return None
    if port.isdigit() and int(port) == _DEFAULT_PORTS[scheme]:
        port = ""
    return f"{scheme}://{host}{':' + port if port else ''}"


def _pattern(entry):
    return re.compile("[^/]*".join(re.escape(part) for part in entry.split("*")))
