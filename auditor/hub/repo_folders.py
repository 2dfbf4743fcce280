"""Repositories on disk for the local Hub server: plain folders or git repositories.

A plain folder's revision is a 40-hex content hash of (relpath, content) so it changes
whenever a file does; per-file hashes are cached by (size, mtime) so a multi-GB file is
hashed once. A git repository is served at a commit, reading blobs with ``git cat-file``.
Every path is checked so nothing outside the repo folder can be served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from auditor.bounded import load_json_file, loads_json
from auditor.errors import AuditorError

HUBMETA = ".hubmeta.json"
CHUNK = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".pkl",
                ".msgpack", ".npz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 25_000_000
_MAX_COUNT = 2**53  # parameter counts stay exact JSON numbers


class RepoLookupError(Exception):
    """Raised by the store; ``code`` is the Hub's X-Error-Code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    oid: str  # git blob sha1
    sha256: str
    lfs: bool


@dataclass(frozen=True)
class Snapshot:
    """One repo at one revision."""

    repo_id: str
    sha: str
    files: dict[str, FileEntry]
    created_at: datetime
    last_modified: datetime
    meta: dict[str, Any]


def valid_name(part: str) -> bool:
    return bool(_NAME_RE.match(part)) and ".." not in part and "--" not in part


def safe_relpath(path: str) -> str | None:
    """A normalised repo-relative POSIX path, or None when it could escape the repo."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        return None
    parts = PurePosixPath(path).parts
    if any(p in ("..", ".", "") for p in parts) or ".git" in parts:
        return None
    return "/".join(parts)


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _hash_stream(chunks: Iterator[bytes], size: int) -> tuple[str, str]:
    sha1 = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    sha256 = hashlib.sha256()
    for chunk in chunks:
        sha1.update(chunk)
        sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def lfs_pointer_oid(sha256: str, size: int) -> str:
    """The git blob id of an LFS file: the sha1 of its pointer file (what the Hub lists as
    ``blobId``), computed from the content's sha256 with no second pass over the bytes."""
    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
               f"size {size}\n").encode()
    return hashlib.sha1(f"blob {len(pointer)}\0".encode() + pointer,
                        usedforsecurity=False).hexdigest()


def _sha256_stream(chunks: Iterator[bytes]) -> str:
    sha256 = hashlib.sha256()
    for chunk in chunks:
        sha256.update(chunk)
    return sha256.hexdigest()


def _file_chunks(path: Path, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            want = CHUNK if remaining is None else min(CHUNK, remaining)
            data = fh.read(want)
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            yield data


class RepoStore:
    """All repos under ``root`` (``root/<org>/<name>``)."""

    def __init__(self, root: Path, *, hash_memo: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        # (abs path, size, mtime_ns) -> (sha1 oid, sha256)
        self._hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        # Optional file that keeps those hashes across processes (like git's index), so a
        # multi-GB local folder is hashed once, not on every audit that names it.
        self._hash_memo = hash_memo
        self._memo_loaded = hash_memo is None
        # git blob oid -> sha256
        self._git_sha256: dict[str, str] = {}
        # (repo dir, sha) -> Snapshot, for git (immutable commits)
        self._git_snapshots: dict[tuple[str, str], Snapshot] = {}
        self._st_params: dict[tuple[str, str], dict[str, int] | None] = {}

    # ----- discovery ---------------------------------------------------------
    def repo_dir(self, org: str, name: str) -> Path:
        if not (valid_name(org) and valid_name(name)):
            raise RepoLookupError("RepoNotFound", "invalid repo id")
        path = self.root / org / name
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            raise RepoLookupError("RepoNotFound", "repository not found") from None
        if not resolved.is_relative_to(self.root) or not resolved.is_dir():
            raise RepoLookupError("RepoNotFound", "repository not found")
        return resolved

    def repo_ids(self) -> list[str]:
        out = []
        for org in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not org.is_dir() or not valid_name(org.name):
                continue
            for repo in sorted(org.iterdir()):
                if repo.is_dir() and valid_name(repo.name):
                    out.append(f"{org.name}/{repo.name}")
        return out

    def meta(self, repo_dir: Path) -> dict[str, Any]:
        path = repo_dir / HUBMETA
        try:
            data = load_json_file(path, name=HUBMETA) if path.is_file() else {}
        except AuditorError:
            return {}
        return data if isinstance(data, dict) else {}

    # ----- snapshots ---------------------------------------------------------
    def snapshot(self, repo_id: str, revision: str = "main") -> Snapshot:
        org, _, name = repo_id.partition("/")
        repo_dir = self.repo_dir(org, name)
        meta = self.meta(repo_dir)
        if (repo_dir / ".git").exists():
            return self._git_snapshot(repo_id, repo_dir, revision, meta)
        return self.folder_snapshot(repo_id, repo_dir, revision, meta)

    def folder_snapshot(
        self, repo_id: str, repo_dir: Path, revision: str, meta: dict[str, Any]
    ) -> Snapshot:
        files: dict[str, FileEntry] = {}
        mtimes: list[float] = []
        for dirpath, dirnames, filenames in os.walk(repo_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                rel = full.relative_to(repo_dir).as_posix()
                if rel == HUBMETA or safe_relpath(rel) is None:
                    continue
                try:
                    real = full.resolve(strict=True)
                except OSError:
                    continue
                # A symlink pointing outside the repo must never be served.
                if not real.is_relative_to(repo_dir) or not real.is_file():
                    continue
                st = real.stat()
                lfs = is_lfs(rel, st.st_size)
                oid, sha256 = self._hash_file(real, st.st_size, st.st_mtime_ns, lfs=lfs)
                files[rel] = FileEntry(rel, st.st_size, oid, sha256, lfs)
                mtimes.append(st.st_mtime)
        digest = hashlib.sha1(usedforsecurity=False)
        for rel in sorted(files):
            digest.update(rel.encode() + b"\0" + files[rel].oid.encode() + b"\n")
        sha = digest.hexdigest()
        if revision not in ("main", sha):
            raise RepoLookupError("RevisionNotFound", f"revision {revision!r} not found")
        now = datetime.now(UTC).timestamp()
        created = parse_iso(meta.get("createdAt")) or datetime.fromtimestamp(
            min(mtimes, default=now), UTC
        )
        modified = parse_iso(meta.get("lastModified")) or datetime.fromtimestamp(
            max(mtimes, default=now), UTC
        )
        return Snapshot(repo_id, sha, files, created, modified, meta)

    def _hash_file(self, path: Path, size: int, mtime_ns: int, *,
                   lfs: bool) -> tuple[str, str]:
        key = (str(path), size, mtime_ns)
        with self._lock:
            self._load_memo()
            cached = self._hash_cache.get(key)
        if cached is None:
            if lfs:
                # One hash over a multi-GB weight file, not two: its blob id is the
                # pointer's (as on the Hub), derived from the sha256.
                sha256 = _sha256_stream(_file_chunks(path))
                cached = (lfs_pointer_oid(sha256, size), sha256)
            else:
                cached = _hash_stream(_file_chunks(path), size)
            with self._lock:
                self._hash_cache[key] = cached
                self._append_memo(key, cached)
        return cached

    def _load_memo(self) -> None:
        if self._memo_loaded or self._hash_memo is None:
            return
        self._memo_loaded = True
        try:
            lines = self._hash_memo.read_text(encoding="utf-8").splitlines()
        except OSError:
            return
        for line in lines:
            try:
                p, size, mtime, oid, sha = json.loads(line)
                self._hash_cache[(str(p), int(size), int(mtime))] = (str(oid), str(sha))
            except (ValueError, TypeError):
                continue  # a torn line from a crash: ignored, rehashed when needed

    def _append_memo(self, key: tuple[str, int, int], value: tuple[str, str]) -> None:
        if self._hash_memo is None or key[1] < 1 << 20:
            return  # small files hash faster than the memo is read
        try:
            self._hash_memo.parent.mkdir(parents=True, exist_ok=True)
            with self._hash_memo.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps([*key, *value]) + "\n")
        except OSError:
            pass

    def _git(self, repo_dir: Path, *args: str) -> bytes:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            ["git", "-C", str(repo_dir), *args],  # noqa: S607
            capture_output=True,
            check=False,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RepoLookupError("RevisionNotFound", "git lookup failed")
        return proc.stdout

    def _git_snapshot(
        self, repo_id: str, repo_dir: Path, revision: str, meta: dict[str, Any]
    ) -> Snapshot:
        if revision.startswith("-") or not revision or "\x00" in revision:
            raise RepoLookupError("RevisionNotFound", f"revision {revision!r} not found")
        candidates = [revision]
        if revision == "main":
            candidates.append("HEAD")  # repos created with master as default branch
        sha = None
        for cand in candidates:
            try:
                sha = self._git(repo_dir, "rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}")
                break
            except RepoLookupError:
                continue
        if sha is None:
            raise RepoLookupError("RevisionNotFound", f"revision {revision!r} not found")
        commit = sha.decode().strip()
        key = (str(repo_dir), commit)
        with self._lock:
            cached = self._git_snapshots.get(key)
        if cached is not None:
            return Snapshot(cached.repo_id, commit, cached.files, cached.created_at,
                            cached.last_modified, meta)
        files: dict[str, FileEntry] = {}
        listing = self._git(repo_dir, "ls-tree", "-r", "-l", "-z", commit)
        for record in listing.split(b"\0"):
            if not record:
                continue
            info, _, raw_path = record.partition(b"\t")
            mode, kind, oid, size = info.decode().split()
            rel = raw_path.decode("utf-8", errors="replace")
            # Symlinks (120000) and submodules are not served: they may point anywhere.
            if kind != "blob" or mode == "120000" or rel == HUBMETA or safe_relpath(rel) is None:
                continue
            nbytes = int(size)
            files[rel] = FileEntry(rel, nbytes, oid, "", is_lfs(rel, nbytes))
        dates = self._git(repo_dir, "log", "--format=%cI", commit).decode().split()
        created = parse_iso(meta.get("createdAt")) or parse_iso(dates[-1]) or datetime.now(UTC)
        modified = parse_iso(meta.get("lastModified")) or parse_iso(dates[0]) or created
        snap = Snapshot(repo_id, commit, files, created, modified, meta)
        with self._lock:
            self._git_snapshots[key] = snap
        return snap

    # ----- file access ---------------------------------------------------------
    def _is_git(self, snap: Snapshot) -> bool:
        org, _, name = snap.repo_id.partition("/")
        return (self.repo_dir(org, name) / ".git").exists()

    def entry(self, snap: Snapshot, path: str) -> FileEntry:
        rel = safe_relpath(path)
        entry = snap.files.get(rel) if rel is not None else None
        if entry is None:
            raise RepoLookupError("EntryNotFound", f"{path!r} not found")
        return entry

    def sha256(self, snap: Snapshot, entry: FileEntry) -> str:
        if entry.sha256:
            return entry.sha256
        with self._lock:
            cached = self._git_sha256.get(entry.oid)
        if cached is None:
            cached = _hash_stream(self.iter_bytes(snap, entry), entry.size)[1]
            with self._lock:
                self._git_sha256[entry.oid] = cached
        return cached

    def iter_bytes(
        self, snap: Snapshot, entry: FileEntry, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Stream a file's bytes (never the whole file in memory)."""
        org, _, name = snap.repo_id.partition("/")
        repo_dir = self.repo_dir(org, name)
        if not (repo_dir / ".git").exists():
            real = (repo_dir / entry.path).resolve(strict=True)
            if not real.is_relative_to(repo_dir):
                raise RepoLookupError("EntryNotFound", "path escapes the repository")
            yield from _file_chunks(real, offset, length)
            return
        yield from self._git_blob_chunks(repo_dir, entry.oid, offset, length)

    def _git_blob_chunks(
        self, repo_dir: Path, oid: str, offset: int, length: int | None
    ) -> Iterator[bytes]:
        if not _HEX40.match(oid):
            raise RepoLookupError("EntryNotFound", "bad blob id")
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            ["git", "-C", str(repo_dir), "cat-file", "blob", oid],  # noqa: S607
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            skip = offset
            remaining = length
            while remaining is None or remaining > 0:
                data = proc.stdout.read(CHUNK)
                if not data:
                    break
                if skip:
                    if len(data) <= skip:
                        skip -= len(data)
                        continue
                    data = data[skip:]
                    skip = 0
                if remaining is not None:
                    data = data[:remaining]
                    remaining -= len(data)
                yield data
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()

    def read_range(self, snap: Snapshot, entry: FileEntry, offset: int, length: int) -> bytes:
        return b"".join(self.iter_bytes(snap, entry, offset, length))

    def safetensors_parameters(self, snap: Snapshot) -> dict[str, int] | None:
        """Per-dtype parameter counts from the safetensors headers (None when no file)."""
        key = (snap.repo_id, snap.sha)
        with self._lock:
            if key in self._st_params:
                return self._st_params[key]
        totals: dict[str, int] = {}
        found = False
        for entry in snap.files.values():
            if not entry.path.endswith(".safetensors") or entry.size < 8:
                continue
            try:
                (hlen,) = struct.unpack("<Q", self.read_range(snap, entry, 0, 8))
                if hlen > min(MAX_SAFETENSORS_HEADER, entry.size - 8):
                    continue
                header = loads_json(self.read_range(snap, entry, 8, hlen), name=entry.path)
            except (AuditorError, ValueError, OSError, struct.error):
                continue
            if not isinstance(header, dict):
                continue
            found = True
            for tname, info in header.items():
                if tname == "__metadata__" or not isinstance(info, dict):
                    continue
                shape = info.get("shape")
                dtype = info.get("dtype")
                if not isinstance(dtype, str) or not isinstance(shape, list) or len(dtype) > 16:
                    continue
                count = 1
                for dim in shape:
                    count *= dim if isinstance(dim, int) and 0 <= dim < _MAX_COUNT else 0
                if count >= _MAX_COUNT:  # an absurd shape: not a parameter count to publish
                    continue
                totals[dtype] = min(totals.get(dtype, 0) + count, _MAX_COUNT)
        result = totals if found else None
        with self._lock:
            self._st_params[key] = result
        return result
