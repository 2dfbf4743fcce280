"""Pytest fixtures for the zoo area.

``small_zoo``: the "small" zoo (base, three fine-tunes by different owners, a declared
linear merge, an undeclared task-arithmetic merge, a clone) built once into the pytest
cache (``.pytest_cache/d/auditor-zoo-small``) so reruns reuse it without training. A file
lock keeps concurrent pytest processes from building it twice at once.

Use ``small_zoo.root`` (the hub root for ``hub_server``), ``small_zoo.manifest`` (the
ground truth, ``auditor_testkit.factory.zoo.ZooManifest``) and ``small_zoo.path(repo_id)``.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path

import pytest

from auditor_testkit.factory.zoo import ZooManifest


@dataclass(frozen=True)
class BuiltZoo:
    root: Path
    manifest: ZooManifest

    def path(self, repo_id: str) -> Path:
        return self.manifest.path(self.root, repo_id)


def build_cached_zoo(cache_dir: Path, spec: str, seed: int = 0) -> BuiltZoo:
    """Build (or reuse) zoo ``spec`` under ``cache_dir`` while holding a lock file."""
    from auditor_testkit.factory.zoo import build_zoo

    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir.parent / f"{cache_dir.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = build_zoo(cache_dir, spec=spec, seed=seed)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return BuiltZoo(root=cache_dir, manifest=manifest)


@pytest.fixture(scope="session")
def small_zoo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> BuiltZoo:
    """The "small" zoo, built once per checkout (reused from the pytest cache; a session
    temp dir when the cache plugin is off).

    Treat it as read-only: copy a repo to ``tmp_path`` before modifying it.
    """
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        root = Path(cache.mkdir("auditor-zoo-small"))
    else:
        root = tmp_path_factory.mktemp("zoo") / "small"
    return build_cached_zoo(root, "small")
