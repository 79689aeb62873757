"""Configuration a producer needs, read from the environment once.

The worker's ``Settings`` (``worker/settings.py``) extends this with what only workers
need (the API key above all). Names follow DESIGN.md: the well-known ``REDIS_URL``,
``CELERY_BROKER_URL`` and ``MOONSHOT_*`` variables keep their names; moonq's own are
``MOONQ_*``.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producers.keys import Keys
from producers.wire import DEFAULT_QUEUE


class ClientSettings(BaseSettings):
    """Where the queue lives and how long job records are kept."""

    model_config = SettingsConfigDict(env_prefix="MOONQ_", extra="ignore", frozen=True)

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    # Empty means "the same as redis_url" (filled in below).
    broker_url: str = Field(default="", validation_alias=AliasChoices("CELERY_BROKER_URL", "broker_url"))
    prefix: str = Field(default="moonq", min_length=1)
    queue: str = DEFAULT_QUEUE
    # Job records, results and replay logs expire this long after the job ends.
    result_ttl_s: int = Field(default=24 * 3600, ge=60)

    @model_validator(mode="after")
    def _default_broker(self) -> ClientSettings:
        if not self.broker_url:
            object.__setattr__(self, "broker_url", self.redis_url)
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)
