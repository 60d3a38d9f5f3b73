"""BunPulse: a self-hosted Pusher Channels server on gevent."""

__version__ = "0.1.0"


def start_bunpulse(port=6001, **options):
    """Start a server and return it; see bunpulse.serving.embedded.start_bunpulse."""
    from .serving.embedded import start_bunpulse as start
    return start(port=port, **options)


def create_app(settings=None, core=None):
    """The WSGI application (`gunicorn "bunpulse:create_app()"`); see bunpulse.wsgi.create_app.
    Imported on call, so that importing bunpulse stays cheap."""
    from .wsgi import create_app as create
    return create(settings, core)


def publish(realtime, channels, event, data, socket_id=None, app_id=None):
    """Publish from the application that hosts BunPulse, without HTTP; see bunpulse.wsgi.publish."""
    from .wsgi import publish as publish_here
    return publish_here(realtime, channels, event, data, socket_id, app_id)


__all__ = ["create_app", "publish", "start_bunpulse", "__version__"]
