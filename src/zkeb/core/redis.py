"""The optional Redis client (`REDIS_URL`) and the key-value stores built on it."""

from __future__ import annotations

from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.stores.redis import RedisStore
from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from zkeb.settings import Settings

__all__ = ("create_redis", "create_store")


def create_redis(settings: Settings) -> Redis | None:
    """A Redis client for `REDIS_URL` with short timeouts and bounded retries, or None when unset."""
    if not settings.redis_url:
        return None
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.redis_max_retries),
        retry_on_timeout=True,
    )


def create_store(redis: Redis | None, namespace: str) -> Store:
    """A Litestar store in Redis (shared by every process) or, without Redis, in this process's memory."""
    if redis is None:
        return MemoryStore()
    return RedisStore(redis, namespace=f"zkeb:{namespace}", handle_client_shutdown=False)
