"""Keep the huggingface_hub download cache under a disk budget (LRU by last access).

Eviction goes through huggingface_hub's own cache manager (``scan_cache_dir`` and
``delete_revisions``) so blobs shared by several revisions are only removed when no kept
revision still links to them, and the cache stays valid for the client.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)


def enforce_disk_budget(
    cache_dir: Path, budget_bytes: int, *, protect: Collection[str] = ()
) -> int:
    """Evict least-recently-used revisions until the cache fits ``budget_bytes``.

    ``protect`` holds commit hashes or repo ids never evicted (e.g. the revision being
    audited). Returns the number of bytes freed.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return 0
    total = info.size_on_disk
    if total <= budget_bytes:
        return 0
    protected = set(protect)
    candidates = []
    for repo in info.repos:
        if repo.repo_id in protected:
            continue
        for rev in repo.revisions:
            if rev.commit_hash in protected:
                continue
            # Last access of any of its files; mtime as a floor on noatime mounts.
            last_used = max(
                [f.blob_last_accessed for f in rev.files] + [rev.last_modified], default=0.0
            )
            candidates.append((last_used, rev.commit_hash))
    candidates.sort()
    to_delete: list[str] = []
    for _, commit in candidates:
        if total <= budget_bytes:
            break
        to_delete.append(commit)
        total = info.size_on_disk - info.delete_revisions(*to_delete).expected_freed_size
    if not to_delete:
        return 0
    strategy = info.delete_revisions(*to_delete)
    freed = strategy.expected_freed_size
    strategy.execute()
    log.info("cache: evicted %d revision(s), freed %d bytes", len(to_delete), freed)
    return freed
