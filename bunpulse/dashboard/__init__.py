"""The debug dashboard: /dashboard, off unless --dashboard / BUNPULSE_DASHBOARD=true.

feed.py turns the core's events into a live log for the apps someone watches, stats.py keeps
the charts' per-second samples, relay.py shares both across workers through Redis, and
views.py serves the pages, the event stream and the JSON they read."""
from .feed import Feed
from .views import blueprint, configure


def install_dashboard(flask_app, core):
    """Serve the dashboard from flask_app and let the core report to it."""
    feed = Feed(core)
    flask_app.extensions["bunpulse_dashboard"] = feed
    configure(flask_app, core)
    flask_app.register_blueprint(blueprint)
    feed.start()
    return feed


__all__ = ["install_dashboard"]
