"""Pytest fixtures for the hub area: tiny repos on disk and a real local Hub server.

``make_repo(root, repo_id, tensors, card)`` writes ``root/<org>/<name>`` the way the Hub
lays a model out; ``hub_server(root, ...)`` (a fixture factory) starts ``HubServer`` on
127.0.0.1 and stops it at teardown. Other areas reuse both.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

# huggingface_hub reads these at import time; set them before anything imports it.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")


def card_text(card: Mapping[str, Any] | str | None, body: str = "# Model\n") -> str:
    """A README.md: YAML front matter from a mapping (or a raw string used as is)."""
    if card is None:
        return body
    if isinstance(card, str):
        return card
    return "---\n" + yaml.safe_dump(dict(card), sort_keys=False) + "---\n" + body


def make_repo(
    root: Path,
    repo_id: str,
    tensors: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | str | None = None,
    *,
    files: Mapping[str, bytes | str] | None = None,
    meta: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    weights_name: str = "model.safetensors",
    git: bool = False,
) -> Path:
    """Write a model repo at ``root/repo_id`` and return its folder.

    ``tensors`` (name -> torch.Tensor) go to ``weights_name`` via safetensors; ``card`` is
    README front matter; ``files`` are extra files (relpath -> content); ``meta`` becomes
    ``.hubmeta.json``; ``git=True`` makes it a git repo with one commit.
    """
    repo = Path(root) / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(repo / weights_name))
    if config is not None:
        (repo / "config.json").write_text(json.dumps(dict(config)))
    if card is not None:
        (repo / "README.md").write_text(card_text(card), encoding="utf-8")
    for rel, content in (files or {}).items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    if meta is not None:
        (repo / ".hubmeta.json").write_text(json.dumps(dict(meta)))
    if git:
        git_commit(repo, "initial commit")
    return repo


def git_commit(repo: Path, message: str) -> str:
    """Commit everything in ``repo`` (initialising it if needed); returns the commit sha."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", message],
                   check=True, env=env)
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, env=env,
                         capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    return root


@pytest.fixture
def hub_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``hub_server(root, tokens=..., faults=..., page_size=...)`` -> running HubServer."""
    from auditor_testkit.hub.server import HubServer

    servers: list[HubServer] = []

    def start(root: Path, **kwargs: Any) -> HubServer:
        server = HubServer(root, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    path = tmp_path / "hf-cache"
    path.mkdir()
    return path
