"""Compatibility: names old deployments import from here (`bunpulse.server:create_app()`)."""
from .run import BunPulseServer, serve_forever, start_bunpulse
from .wsgi import create_app

__all__ = ["create_app", "start_bunpulse", "BunPulseServer", "serve_forever"]
