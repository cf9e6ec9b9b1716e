"""optimize.study.storage on its own: URLs are checked and never shown with their password (Optuna's
own storage contract runs in test_storage_contract.py)."""

from __future__ import annotations

import pytest

from optimize.study.storage import StorageError, check_storage_url, open_storage, redact


@pytest.mark.parametrize("url", [
    "postgresql://user:s3cret@host/db", "postgresql://user@host/db?password=s3cret",
    "postgresql:/user:s3cret@host/db", "postgresql://user:s3@cr:et@host/db",
])
def test_redact_never_shows_the_password(url):
    shown = redact(url)
    assert "s3cret" not in shown and "s3@cr:et" not in shown and "cr:et" not in shown
    assert "host" in shown


def test_sqlite_urls_are_checked(tmp_path):
    with pytest.raises(StorageError, match="memory"):
        check_storage_url("sqlite:///:memory:")
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    assert (tmp_path / "a.db").exists() and storage is not None
