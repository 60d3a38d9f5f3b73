"""The public name of BunPulse's gunicorn worker (`-k bunpulse.worker.PusherWorker`, and
gunicorn.conf.py's worker_class): the code is serving/gunicorn_worker.py."""
from .serving.gunicorn_worker import PusherWorker

__all__ = ["PusherWorker"]
