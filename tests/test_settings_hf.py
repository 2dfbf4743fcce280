"""Hugging Face conventions: HF_ENDPOINT, HF_TOKEN, the cached login and the standard Hub
cache are reused; AUDITOR_* wins; the token is never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.hub.client import HubClient
from auditor.settings import Settings

SECRET = "hf_conventionSECRET0123456789"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN_PATH",
                 "AUDITOR_HUB_TOKEN", "AUDITOR_HUB_ENDPOINT", "AUDITOR_CACHE_DIR",
                 "AUDITOR_DISK_BUDGET_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return monkeypatch


def test_hf_variables_are_used_and_auditor_ones_win(clean_env: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    s = Settings()
    assert s.hub_endpoint == "https://huggingface.co"
    assert s.token_value() is None
    assert s.resolved_cache_dir == tmp_path / "hf-home" / "hub"
    clean_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9/mirror")
    clean_env.setenv("HF_TOKEN", SECRET)
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "shared-cache"))
    s = Settings()
    assert s.hub_endpoint == "http://127.0.0.1:9/mirror"
    assert s.token_value() == SECRET
    assert s.resolved_cache_dir == tmp_path / "shared-cache"
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    client = HubClient.from_settings(s)
    assert client.cache_dir == tmp_path / "shared-cache"
    assert SECRET not in repr(client)
    clean_env.setenv("AUDITOR_HUB_ENDPOINT", "http://127.0.0.1:8")
    clean_env.setenv("AUDITOR_HUB_TOKEN", "auditor-token")
    clean_env.setenv("AUDITOR_CACHE_DIR", str(tmp_path / "own"))
    s = Settings()
    assert (s.hub_endpoint, s.token_value(), s.resolved_cache_dir) == (
        "http://127.0.0.1:8", "auditor-token", tmp_path / "own")
    # An explicit "no token" is not overridden by HF_TOKEN.
    assert Settings(hub_token=None).token_value() is None


def test_cached_login_token_is_used(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `hf auth login` writes HF_HOME/token; huggingface_hub.get_token() reads it.
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(SECRET, encoding="utf-8")
    assert Settings().token_value() == SECRET


def test_shared_cache_is_only_trimmed_under_an_explicit_budget(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings().effective_disk_budget is None  # never evict the user's models
    assert Settings(cache_dir=tmp_path / "own").effective_disk_budget == 20 * 1024**3
    clean_env.setenv("AUDITOR_DISK_BUDGET_BYTES", "1000")
    assert Settings().effective_disk_budget == 1000
    assert HubClient.from_settings(Settings()).disk_budget_bytes == 1000


def test_client_turns_off_huggingface_hub_download_bars(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    hf_tqdm = sys.modules["huggingface_hub.utils.tqdm"]

    # As on a user's machine where HF_HUB_DISABLE_PROGRESS_BARS is not set.
    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    enable_progress_bars()
    assert not are_progress_bars_disabled()
    HubClient(endpoint="http://127.0.0.1:9", token=None, cache_dir=tmp_path,
              disk_budget_bytes=None)
    assert are_progress_bars_disabled()
