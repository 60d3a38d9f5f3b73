"""Adapters: where a worker's hub meets the rest of the deployment (the interface:
base.Adapter)."""
from .base import Adapter
from .local import LocalAdapter


def make_adapter(settings, hub):
    if settings.redis_url:
        from .redis import RedisAdapter  # imported only when used: redis is optional here
        return RedisAdapter(hub, settings)
    return LocalAdapter(hub)


__all__ = ["Adapter", "LocalAdapter", "make_adapter"]
