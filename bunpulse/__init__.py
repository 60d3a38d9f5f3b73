"""BunPulse: a self-hosted Pusher Channels server on gevent."""

__version__ = "0.1.0"


def start_bunpulse(port=6001, **options):
    """Start a server and return it; see bunpulse.server.start_bunpulse."""
    from .server import start_bunpulse as start
    return start(port=port, **options)


__all__ = ["start_bunpulse", "__version__"]
