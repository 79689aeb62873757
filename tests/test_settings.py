"""Worker settings: the API key from the environment or from a mounted secret file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings


def test_key_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    secret = tmp_path / "moonshot_api_key"
    secret.write_text("sk-from-file-123\n")
    settings = Settings(moonshot_api_key_file=str(secret))
    assert settings.moonshot_api_key is not None
    assert settings.moonshot_api_key.get_secret_value() == "sk-from-file-123"
    assert "sk-from-file" not in repr(settings)
    # The environment's key wins over the file.
    env_key = Settings(moonshot_api_key="sk-env", moonshot_api_key_file=str(secret)).moonshot_api_key
    assert env_key is not None and env_key.get_secret_value() == "sk-env"


@pytest.mark.parametrize(("content", "says"), [(None, "No such file"), ("  \n", "is empty")])
def test_a_bad_secret_file_is_named_without_its_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, says: str
) -> None:
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    secret = tmp_path / "key"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ValidationError, match=says) as err:
        Settings(moonshot_api_key_file=str(secret))
    assert str(secret) in str(err.value)


def test_celerys_success_line_is_off_unless_asked_for() -> None:
    """Celery reads its tracer's log level once, as the worker starts: the app sets it when it is made."""
    import logging

    from worker.app import create_app

    trace = logging.getLogger("celery.app.trace")
    before = trace.level
    try:
        create_app(Settings(celery_success_log=True))
        assert trace.level == logging.NOTSET  # the worker's --loglevel decides, as in plain Celery
        create_app(Settings())
        assert trace.level == logging.WARNING
    finally:
        trace.setLevel(before)
