"""The Redis adapter (adapter.py): its keys and scripts (scripts.py), pub/sub between nodes
(bus.py), and node liveness and recovery (nodes.py)."""
from .adapter import RedisAdapter, RedisDown

__all__ = ["RedisAdapter", "RedisDown"]
