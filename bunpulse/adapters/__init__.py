"""Adapters: where a worker's hub meets the rest of the deployment.

Every adapter offers the interface of LocalAdapter. The local one serves one process; a
cluster adapter (Redis) overrides the same methods so that delivery, counts, presence and
occupied/vacated are decided for the whole deployment.
"""
from .local import LocalAdapter


def make_adapter(settings, hub):
    if settings.redis_url:
        from .redis import RedisAdapter  # imported only when used: redis is optional here
        return RedisAdapter(hub, settings)
    return LocalAdapter(hub)


__all__ = ["LocalAdapter", "make_adapter"]
