"""The worker's typed settings, read from the environment once at the entry point.

Units are in the names. Only this module (and ``producers.settings``, which it extends)
reads the environment; everything else gets a ``Settings`` passed in.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr

from producers.settings import ClientSettings


class Settings(ClientSettings):
    """Everything a worker node needs; the API key lives here and nowhere else."""

    moonshot_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MOONSHOT_API_KEY", "moonshot_api_key")
    )
    moonshot_base_url: str = Field(
        default="https://api.moonshot.ai/v1", validation_alias=AliasChoices("MOONSHOT_BASE_URL", "moonshot_base_url")
    )
    # Fleet-wide limits (None = no limit); enforced from the next work item on.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_inflight: int | None = Field(default=None, ge=1)
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    # Jobs one node runs at once. LLM calls wait on the network, not the CPU: a node holds
    # many in flight on an asyncio loop, each Celery thread only waits for its job's future.
    concurrency: int = Field(default=64, ge=1)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Longest silence allowed between two stream chunks (thinking models pause before answering).
    read_timeout_s: float = Field(default=300.0, gt=0)
    # A whole attempt, first byte to [DONE]; k3 answers may run for many minutes.
    attempt_timeout_s: float = Field(default=1800.0, gt=0)
