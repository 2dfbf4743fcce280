"""HubClient, RangeFile and the cache budget against the real local server."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from auditor.errors import (
    EntryNotFound,
    GatedRepo,
    HubError,
    RangeNotSupported,
    RepoNotFound,
    RevisionNotFound,
    TransientHubError,
)
from auditor.hub.cache import enforce_disk_budget
from auditor.hub.client import HubClient, ResolvedRepo
from auditor.hub.range import LocalRangeFile, RangeFile, open_range
from auditor.settings import Settings
from auditor.weights.base import ByteSource
from auditor_testkit.hub.server import FaultConfig
from tests.fixtures_hub import make_repo


def _tensors(seed: int, n: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 8, generator=gen)}


@pytest.fixture
def repos(hub_root: Path) -> Path:
    make_repo(hub_root, "org/base", _tensors(0), {"license": "mit"},
              meta={"createdAt": "2024-01-01T00:00:00Z"})
    for i in range(3):
        make_repo(hub_root, f"u{i}/ft", _tensors(i + 1), {"base_model": "org/base"},
                  meta={"createdAt": f"2024-02-0{i + 1}T00:00:00Z"})
    make_repo(hub_root, "org/merge", _tensors(7), {"base_model": ["org/base", "u0/ft"]},
              files={"mergekit_config.yml": "merge_method: ties\nmodels:\n  - model: org/base\n"},
              meta={"createdAt": "2024-03-01T00:00:00Z"})
    make_repo(hub_root, "org/gated", _tensors(8), {"base_model": "org/base"},
              meta={"gated": "auto", "createdAt": "2023-06-01T00:00:00Z"})
    return hub_root


def _client(url: str, cache: Path, *, token: str | None = None,
            budget: int | None = None) -> HubClient:
    return HubClient(endpoint=url, token=token, cache_dir=cache, disk_budget_bytes=budget,
                     backoff_seconds=0.05, max_wait_seconds=0.2)


def test_resolve_remote_and_fetch(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos)
    client = _client(srv.url, hf_cache)
    res = client.resolve("org/merge")
    assert res.repo_id == "org/merge" and len(res.revision) == 40
    assert res.card.base_models == ["org/base", "u0/ft"]
    assert res.mergekit_config == {"merge_method": "ties", "models": [{"model": "org/base"}]}
    assert res.files["model.safetensors"] == (repos / "org/merge/model.safetensors").stat().st_size
    assert res.owner == "org" and res.created_at is not None and res.created_at.year == 2024
    assert not res.is_local and res.gated is False
    path = client.fetch(res, "model.safetensors")
    assert path.read_bytes() == (repos / "org/merge/model.safetensors").read_bytes()
    assert res.revision in str(path)
    with pytest.raises(EntryNotFound):
        client.fetch(res, "nope.bin")


def test_resolve_pins_revision(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos)
    client = _client(srv.url, hf_cache)
    first = client.resolve("u1/ft")
    assert client.resolve("u1/ft", revision=first.revision).revision == first.revision
    (repos / "u1/ft/README.md").write_text("---\nbase_model: org/other\n---\n")
    assert client.resolve("u1/ft").revision != first.revision
    with pytest.raises(RevisionNotFound):
        client.resolve("u1/ft", revision=first.revision)  # plain folders keep no history


def test_resolve_local_folder(repos: Path, hf_cache: Path, tmp_path: Path) -> None:
    client = _client("http://127.0.0.1:9", hf_cache)  # never contacted for folders
    folder = repos / "org/merge"
    res = client.resolve(str(folder))
    assert res.repo_id == "org/merge" and res.local_dir == folder.resolve()
    assert len(res.revision) == 40
    assert res.revision == client.resolve(str(folder)).revision
    assert res.card.base_models == ["org/base", "u0/ft"]
    assert res.mergekit_config is not None
    assert client.fetch(res, "model.safetensors") == folder.resolve() / "model.safetensors"
    (tmp_path / "secret.txt").write_text("x")
    for bad in ("../../secret.txt", "/etc/passwd", "../gated/README.md"):
        with pytest.raises(EntryNotFound):
            client.fetch(res, bad)
    (folder / "escape.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(EntryNotFound):
        client.fetch(res, "escape.txt")
    with pytest.raises(RevisionNotFound):
        client.resolve(str(folder), revision="0" * 40)


def test_error_mapping(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos, tokens=["tok"])
    client = _client(srv.url, hf_cache)
    with pytest.raises(RepoNotFound):
        client.resolve("org/missing")
    with pytest.raises(RepoNotFound):
        client.resolve("not a repo id!")
    with pytest.raises(RevisionNotFound):
        client.resolve("org/base", revision="a" * 40)
    gated = client.resolve("org/gated")
    assert gated.gated == "auto"
    with pytest.raises(GatedRepo):
        client.fetch(gated, "model.safetensors")
    authed = _client(srv.url, hf_cache, token="tok")
    assert authed.fetch(authed.resolve("org/gated"), "model.safetensors").is_file()
    assert "tok" not in repr(authed)


def test_list_derivatives_newest_first(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos, page_size=2)
    client = _client(srv.url, hf_cache)
    ids = [s.repo_id for s in client.list_derivatives("org/base")]
    assert ids == ["org/merge", "u2/ft", "u1/ft", "u0/ft", "org/gated"]
    limited = list(client.list_derivatives("org/base", limit=3))
    assert [s.repo_id for s in limited] == ids[:3]
    assert all(s.sha and len(s.sha) == 40 for s in limited)
    assert "base_model:merge:org/base" in limited[0].tags
    assert [s.repo_id for s in client.list_derivatives("u0/ft")] == ["org/merge"]


def test_client_retries_after_429_on_api(repos: Path, hub_server, hf_cache: Path) -> None:
    faults = FaultConfig(rate_429=1.0, retry_after=0, paths=frozenset({"api"}), max_faults=1)
    srv = hub_server(repos, faults=faults)
    res = _client(srv.url, hf_cache).resolve("org/base")
    assert len(res.revision) == 40
    assert srv.hub.faults.injected == 1


def test_client_gives_up_with_transient_error(repos: Path, hub_server, hf_cache: Path) -> None:
    faults = FaultConfig(rate_5xx=1.0, paths=frozenset({"api"}))
    srv = hub_server(repos, faults=faults)
    client = HubClient(endpoint=srv.url, token=None, cache_dir=hf_cache, disk_budget_bytes=None,
                       max_retries=1, backoff_seconds=0.01)
    start = time.monotonic()
    with pytest.raises(TransientHubError):
        client.resolve("org/base")
    assert time.monotonic() - start < 30


def test_range_file_reads_exact_bytes(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos)
    client = _client(srv.url, hf_cache)
    res = client.resolve("u2/ft")
    original = (repos / "u2/ft/model.safetensors").read_bytes()
    with open_range(client, res, "model.safetensors") as rf:
        assert isinstance(rf, ByteSource)
        assert rf.size == len(original)
        assert rf.read(0, 8) == original[:8]
        assert rf.read(100, 50) == original[100:150]
        assert rf.read(len(original) - 4, 4) == original[-4:]
        with pytest.raises(EntryNotFound):
            rf.read(len(original) - 4, 10)
    local = client.resolve(str(repos / "u2/ft"))
    with open_range(client, local, "model.safetensors") as lf:
        assert isinstance(lf, LocalRangeFile)
        assert lf.read(100, 50) == original[100:150]


def test_range_file_survives_cut_connections(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos, faults=FaultConfig(rate_cut=0.5, seed=3))
    client = _client(srv.url, hf_cache)
    res = client.resolve("u0/ft")
    original = (repos / "u0/ft/model.safetensors").read_bytes()
    rf = RangeFile(client.file_url(res, "model.safetensors"), size=len(original),
                   max_retries=10, backoff_seconds=0.01)
    for offset in range(0, len(original) - 64, 97):
        assert rf.read(offset, 64) == original[offset: offset + 64]
    assert srv.hub.faults.injected > 0
    always = hub_server(repos, faults=FaultConfig(rate_cut=1.0))
    rf2 = RangeFile(f"{always.url}/u0/ft/resolve/main/model.safetensors", size=len(original),
                    max_retries=1, backoff_seconds=0.01)
    with pytest.raises(TransientHubError):
        rf2.read(0, 100)


def test_fetch_survives_cut_download(repos: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(repos, faults=FaultConfig(rate_cut=1.0, max_faults=1))
    client = _client(srv.url, hf_cache)
    res = client.resolve("u1/ft")
    path = client.fetch(res, "model.safetensors")
    assert path.read_bytes() == (repos / "u1/ft/model.safetensors").read_bytes()
    assert srv.hub.faults.injected == 1


class _IgnoresRange(BaseHTTPRequestHandler):
    body = bytes(range(256)) * 4

    def do_GET(self) -> None:  # http.server API name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


class _WrongRange(_IgnoresRange):
    def do_GET(self) -> None:
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-9/{len(self.body)}")
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(self.body[:10])


class _PartialBody(_IgnoresRange):
    def do_GET(self) -> None:  # a 200 that is not the whole file
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(self.body[:10])


def test_range_file_streams_a_server_that_ignores_range() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _IgnoresRange)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/f"
        with RangeFile(url, size=1024) as rf:
            assert rf.read(100, 10) == _IgnoresRange.body[100:110]  # not the body's start
            assert rf.range_ignored
        with RangeFile(url, size=1024, max_stream_bytes=64) as rf:
            assert rf.read(0, 8) == _IgnoresRange.body[:8]
            with pytest.raises(RangeNotSupported):
                rf.read(100, 10)  # would stream past the allowed prefix
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("handler", [_PartialBody, _WrongRange])
def test_range_file_refuses_wrong_answers(handler: type) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        rf = RangeFile(f"http://127.0.0.1:{httpd.server_port}/f", size=1024)
        with pytest.raises(RangeNotSupported):
            rf.read(100, 10)
        rf.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cached(client: HubClient, repo: str) -> tuple[ResolvedRepo, Path]:
    res = client.resolve(repo)
    return res, client.fetch(res, "model.safetensors")


def test_disk_budget_evicts_lru(repos: Path, hub_server, hf_cache: Path) -> None:
    for i in range(3):
        make_repo(repos, f"big/m{i}", _tensors(20 + i, n=1024))  # ~32 KiB each
    srv = hub_server(repos)
    client = _client(srv.url, hf_cache)
    paths = {}
    for i in range(3):
        res, path = _cached(client, f"big/m{i}")
        paths[i] = (res, path)
        past = time.time() - 1000 + i * 100
        os.utime(path.resolve(), (past, past))  # m0 least recently used
    size = paths[0][1].stat().st_size
    freed = enforce_disk_budget(hf_cache, int(size * 2.5), protect={paths[0][0].revision})
    assert freed >= size
    assert paths[0][1].exists()  # protected despite being the oldest
    assert not paths[1][1].exists()  # the oldest unprotected one went
    assert paths[2][1].exists()
    assert enforce_disk_budget(hf_cache, 10**9) == 0
    budgeted = _client(srv.url, hf_cache, budget=int(size * 1.5))
    res, path = _cached(budgeted, "big/m1")
    assert path.exists()  # the revision just fetched is never evicted by its own fetch


def test_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, hub_endpoint="http://127.0.0.1:1", hub_token="t0k",
                        disk_budget_bytes=123, cache_dir=tmp_path / "hf-cache")
    client = HubClient.from_settings(settings)
    assert client.endpoint == "http://127.0.0.1:1"
    assert client.cache_dir == tmp_path / "hf-cache"
    assert client.disk_budget_bytes == 123
    assert client.auth_headers() == {"Authorization": "Bearer t0k"}
    with pytest.raises(HubError):
        HubClient(endpoint="http://127.0.0.1:1", token=None, cache_dir=tmp_path,
                  disk_budget_bytes=None, max_retries=0).resolve("org/x")
