"""The HTTP API's query string, parsed once into the parameters that are both signed and read.

Pusher signs the query as `key=value` pairs, keys lower-cased and sorted, joined by `&`, values
not escaped (pusher-protocol.md, section 7). A query that could be read two ways lets one
signature stand for another request: `FILTER_BY_PREFIX=x` signs as `filter_by_prefix=x` while a
handler reading `filter_by_prefix` finds nothing, and a key `filter_by_prefix%3Dpresence-%26info`
with the value `user_count` signs exactly as the two pairs it hides. So only a canonical query
is accepted: each key once, plain lower-case (never percent-encoded), and no `&` in a value.
The official libraries (PyPI and npm `pusher`) send nothing else.
"""
import re
from urllib.parse import unquote_plus

_KEY = re.compile(r"[a-z0-9_.~-]+\Z")  # lower-case and URL-unreserved: nothing to decode
# The keys the official libraries send, canonical by sight: no pattern to match for them (a
# publish carries five, and the match cost more than the rest of the parse).
_USUAL = frozenset(("auth_key", "auth_timestamp", "auth_version", "auth_signature", "body_md5",
                    "info", "filter_by_prefix"))


class NonCanonicalQuery(ValueError):
    """A query whose keys or values could be signed one way and read another."""


def parse_query(query_string):
    """`QUERY_STRING` (a WSGI string) as {key: decoded value}; raise NonCanonicalQuery."""
    params = {}
    for part in query_string.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in _USUAL and not _KEY.match(key):
            raise NonCanonicalQuery(_bad_key(key))
        if key in params:
            raise NonCanonicalQuery(f"Non-canonical query: {key!r} appears more than once")
        if "%" in value or "+" in value or not value.isascii():
            value = unquote_plus(value.encode("latin-1").decode("utf-8", "replace"))
            if "&" in value:  # only decoding can make one: the query was split at the others
                raise NonCanonicalQuery(f"Non-canonical query: the value of {key!r} contains "
                                        "an encoded '&'")
        params[key] = value
    return params


def _bad_key(key):
    shown = repr(key[:40])
    if key and key.lower() != key and _KEY.match(key.lower()):
        return (f"Non-canonical query: key {shown} is not lower-case (keys are signed "
                "lower-cased: send them so)")
    return (f"Non-canonical query: key {shown} is not a plain lower-case name (a-z, 0-9, "
            "'_', '.', '~', '-'; nothing percent-encoded)")


def string_to_sign(params):
    """The QUERY part of the string an API request signs: every parameter but auth_signature,
    keys lower-cased and sorted, `k=v` joined by `&`, values not escaped."""
    return "&".join(f"{k}={v}" for k, v in sorted(
        (k.lower(), v) for k, v in params.items() if k.lower() != "auth_signature"))
