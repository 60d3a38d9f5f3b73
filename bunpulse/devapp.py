"""The development app's rule: its secret (`app-secret`) is published, so it is served only on
loopback.

Where a driver sees every address it listens on (`python -m bunpulse`, BunPulse's gunicorn
worker, gunicorn.conf.py) a public bind stops start-up. Where BunPulse cannot see its bind
(gevent-websocket's stock worker, `flask run`, mounted in a host application under another
server), its credentials are accepted only from loopback peers with no forwarded-for header,
and one line says so at the first request.
"""
import ipaddress
import logging

from .config import uses_dev_app

log = logging.getLogger("bunpulse")

REFUSED = ("the development app (app-key/app-secret) is served to loopback clients only: set "
           "PUSHER_APP_ID, PUSHER_APP_KEY and PUSHER_APP_SECRET (or --apps-file) to serve "
           "others")


def is_loopback(host):
    """Whether a listening or peer address is loopback ("" is a unix socket: local)."""
    if host in ("", "localhost") or str(host).startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


class DevAppGuard:
    """`refuses(environ)`: whether a request must not be served the development app."""

    def __init__(self, settings):
        self.active = uses_dev_app(settings)  # until a driver shows its bind is loopback
        self._said = False

    def bound_to(self, hosts):
        """A driver's listening hosts: all loopback, the guard is not needed; else False
        (the driver stops start-up)."""
        if not self.active:
            return True
        if all(is_loopback(host) for host in hosts):
            self.active = False
            return True
        return False

    def refuses(self, environ):
        if not self.active:
            return False
        if not self._said:
            self._said = True
            log.warning("NO CREDENTIALS CONFIGURED and the listening address is unknown here: "
                        "the development app is served to loopback clients only")
        return bool(environ.get("HTTP_X_FORWARDED_FOR") or environ.get("HTTP_FORWARDED")) \
            or not is_loopback(environ.get("REMOTE_ADDR", ""))
