"""gunicorn's worker for BunPulse (`worker_class = "bunpulse.worker.PusherWorker"`): the only
module that imports gunicorn, so that the library and the embedded server never do."""
import logging

import gevent
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker

from .transport import PusherWebSocketHandler

log = logging.getLogger("bunpulse.worker")


class PusherWorker(GeventWebSocketWorker):
    """gunicorn's gevent WebSocket worker with our handler; when the worker is told to stop,
    the application's `on_worker_stop` runs first so clients get 4200 and reconnect at once."""

    wsgi_handler = PusherWebSocketHandler

    def run(self):
        gevent.spawn(self._stop_when_told)
        super().run()

    def _stop_when_told(self):
        while self.alive:
            gevent.sleep(0.2)
        stop = getattr(self.wsgi, "on_worker_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("on_worker_stop failed")
