"""Compatibility: names old deployments import from here (`bunpulse.server:create_app()`,
`from bunpulse.server import start_bunpulse`). Kept through the 0.x releases and removed in
1.0: import them from `bunpulse` (create_app, start_bunpulse) or `bunpulse.serving.embedded`."""
from .serving.embedded import BunPulseServer, serve_forever, start_bunpulse
from .wsgi import create_app

__all__ = ["create_app", "start_bunpulse", "BunPulseServer", "serve_forever"]
