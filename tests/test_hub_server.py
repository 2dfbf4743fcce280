"""The local Hub server against the real huggingface_hub client (127.0.0.1 only)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
from huggingface_hub import errors as hf_errors

from auditor_testkit.hub.server import FaultConfig
from tests.fixtures_hub import git_commit, make_repo


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.0.weight": torch.randn(16, 8, generator=gen),
            "layer.1.weight": torch.randn(8, 8, generator=gen).to(torch.float16)}


@pytest.fixture
def populated(hub_root: Path) -> Path:
    make_repo(hub_root, "org/base", _tensors(0), {"license": "apache-2.0"},
              config={"model_type": "llama"},
              meta={"createdAt": "2024-01-01T00:00:00Z"})
    for i in range(5):
        make_repo(hub_root, f"user{i}/ft-{i}", _tensors(i + 1),
                  {"base_model": "org/base", "tags": ["chat"]},
                  meta={"createdAt": f"2024-02-0{i + 1}T00:00:00Z"})
    make_repo(hub_root, "org/merged", _tensors(9),
              {"base_model": ["org/base", "user0/ft-0"]},
              files={"mergekit_config.yml": "merge_method: linear\n"},
              meta={"createdAt": "2024-03-01T00:00:00Z"})
    make_repo(hub_root, "org/gated", _tensors(10), {"base_model": "org/base"},
              meta={"gated": "manual", "createdAt": "2023-01-01T00:00:00Z"})
    make_repo(hub_root, "org/secret", _tensors(11), {"base_model": "org/base"},
              meta={"private": True})
    return hub_root


def test_list_models_filter_sort_pagination(populated: Path, hub_server) -> None:
    srv = hub_server(populated, page_size=2)
    api = HfApi(endpoint=srv.url, token=False)
    models = list(api.list_models(filter="base_model:org/base", sort="created_at", limit=5,
                                  full=True))
    ids = [m.id for m in models]
    # newest first, paginated across 3 pages, private repo hidden, limit honoured
    assert ids == ["org/merged", "user4/ft-4", "user3/ft-3", "user2/ft-2", "user1/ft-1"]
    assert models[0].sha and len(models[0].sha) == 40
    merge_only = [m.id for m in api.list_models(filter="base_model:merge:org/base")]
    assert merge_only == ["org/merged"]
    both = [m.id for m in api.list_models(filter=["base_model:finetune:org/base", "chat"])]
    assert sorted(both) == [f"user{i}/ft-{i}" for i in range(5)]  # all filters must match
    assert [m.id for m in api.list_models(author="org", search="bas")] == ["org/base"]


def test_link_header_and_agent_harnesses(populated: Path, hub_server) -> None:
    srv = hub_server(populated, page_size=3)
    first = httpx.get(f"{srv.url}/api/models", params={"filter": "base_model:org/base"})
    assert len(first.json()) == 3
    nxt = first.links["next"]["url"]
    second = httpx.get(nxt)
    assert {m["id"] for m in second.json()}.isdisjoint({m["id"] for m in first.json()})
    assert httpx.get(f"{srv.url}/api/agent-harnesses").status_code == 404


def test_model_info_with_revision_and_files_metadata(populated: Path, hub_server) -> None:
    srv = hub_server(populated)
    api = HfApi(endpoint=srv.url, token=False)
    info = api.model_info("org/merged", files_metadata=True)
    assert info.card_data.base_model == ["org/base", "user0/ft-0"]
    assert "base_model:merge:org/base" in info.tags and "mergekit" in info.tags
    assert info.safetensors.parameters == {"F32": 128, "F16": 64}
    assert info.safetensors.total == 192
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == (populated / "org/merged/model.safetensors").stat().st_size
    assert ".hubmeta.json" not in sizes
    lfs = next(s.lfs for s in info.siblings if s.rfilename == "model.safetensors")
    assert lfs is not None and len(lfs.sha256) == 64
    again = api.model_info("org/merged", revision=info.sha)
    assert again.sha == info.sha
    assert info.created_at.year == 2024 and info.created_at.month == 3


def test_download_and_safetensors_metadata(populated: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(populated)
    api = HfApi(endpoint=srv.url, token=False)
    sha = api.model_info("user1/ft-1").sha
    path = hf_hub_download("user1/ft-1", "model.safetensors", revision=sha, endpoint=srv.url,
                           cache_dir=hf_cache, token=False)
    original = (populated / "user1/ft-1/model.safetensors").read_bytes()
    assert Path(path).read_bytes() == original
    assert sha in path
    meta = api.get_safetensors_metadata("user1/ft-1", revision=sha)
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["layer.0.weight"].shape == [16, 8]
    assert tensors["layer.1.weight"].dtype == "F16"


def test_hffilesystem_ranged_reads(populated: Path, hub_server) -> None:
    srv = hub_server(populated)
    fs = HfFileSystem(endpoint=srv.url, token=False)
    original = (populated / "user2/ft-2/model.safetensors").read_bytes()
    with fs.open("user2/ft-2/model.safetensors", "rb", block_size=16) as fh:
        fh.seek(100)
        assert fh.read(37) == original[100:137]
        fh.seek(9)
        assert fh.read(5) == original[9:14]


def test_range_edge_cases(populated: Path, hub_server) -> None:
    srv = hub_server(populated)
    url = f"{srv.url}/org/base/resolve/main/model.safetensors"
    original = (populated / "org/base/model.safetensors").read_bytes()
    size = len(original)
    head = httpx.head(url)
    assert head.headers["x-repo-commit"] and head.headers["etag"].startswith('"')
    assert int(head.headers["content-length"]) == size
    assert head.headers["accept-ranges"] == "bytes"
    assert "x-xet-hash" not in head.headers
    r = httpx.get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == original[-10:]
    assert r.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
    r = httpx.get(url, headers={"Range": f"bytes={size - 3}-{size + 50}"})
    assert r.status_code == 206 and r.content == original[-3:]
    r = httpx.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416
    assert httpx.get(url).content == original


def test_error_codes_map_to_hf_exceptions(populated: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(populated)
    api = HfApi(endpoint=srv.url, token=False)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("org/secret")  # private looks missing without a token
    with pytest.raises(hf_errors.RevisionNotFoundError):
        api.model_info("org/base", revision="f" * 40)
    with pytest.raises(hf_errors.RemoteEntryNotFoundError):
        hf_hub_download("org/base", "missing.bin", endpoint=srv.url, cache_dir=hf_cache,
                        token=False)
    r = httpx.get(f"{srv.url}/api/models/org/nope")
    assert r.headers["x-error-code"] == "RepoNotFound" and "error" in r.json()


def test_gated_and_private_with_tokens(populated: Path, hub_server, hf_cache: Path) -> None:
    srv = hub_server(populated, tokens=["good-token"])
    anon = HfApi(endpoint=srv.url, token=False)
    assert anon.model_info("org/gated").gated == "manual"  # metadata is public
    with pytest.raises(hf_errors.GatedRepoError):
        hf_hub_download("org/gated", "model.safetensors", endpoint=srv.url,
                        cache_dir=hf_cache, token=False)
    with pytest.raises(hf_errors.GatedRepoError):
        hf_hub_download("org/gated", "model.safetensors", endpoint=srv.url,
                        cache_dir=hf_cache, token="wrong-token")
    path = hf_hub_download("org/gated", "model.safetensors", endpoint=srv.url,
                           cache_dir=hf_cache, token="good-token")
    assert Path(path).read_bytes() == (populated / "org/gated/model.safetensors").read_bytes()
    authed = HfApi(endpoint=srv.url, token="good-token")
    assert authed.model_info("org/secret").private is True
    assert "org/secret" in [m.id for m in authed.list_models(filter="base_model:org/base")]


def test_path_escape_refused(populated: Path, hub_server, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (populated / "org/base/link.txt").symlink_to(tmp_path / "outside.txt")
    srv = hub_server(populated)
    for path in ("../gated/README.md", "%2e%2e/gated/README.md", "link.txt", ".hubmeta.json",
                 "/etc/passwd"):
        r = httpx.get(f"{srv.url}/org/base/resolve/main/{path}")
        assert r.status_code == 404, path
        assert b"secret" not in r.content
    names = [s.rfilename for s in HfApi(endpoint=srv.url, token=False).model_info(
        "org/base").siblings]
    assert "link.txt" not in names
    assert httpx.get(f"{srv.url}/api/models/..%2F../base").status_code == 404


def test_git_repo_served_at_commit(hub_root: Path, hub_server, hf_cache: Path) -> None:
    repo = make_repo(hub_root, "org/gitrepo", _tensors(3), {"base_model": "org/base"})
    first = git_commit(repo, "v1")
    (repo / "README.md").write_text("---\nbase_model: org/other\n---\n")
    (repo / "extra.txt").write_text("v2 only")
    second = git_commit(repo, "v2")
    (repo / "uncommitted.txt").write_text("not served")
    srv = hub_server(hub_root)
    api = HfApi(endpoint=srv.url, token=False)
    head = api.model_info("org/gitrepo")
    assert head.sha == second
    assert head.card_data.base_model == "org/other"
    old = api.model_info("org/gitrepo", revision=first)
    assert old.sha == first and old.card_data.base_model == "org/base"
    assert "extra.txt" not in [s.rfilename for s in old.siblings]
    assert "uncommitted.txt" not in [s.rfilename for s in head.siblings]
    path = hf_hub_download("org/gitrepo", "README.md", revision=first, endpoint=srv.url,
                           cache_dir=hf_cache, token=False)
    assert "org/base" in Path(path).read_text()
    r = httpx.get(f"{srv.url}/org/gitrepo/resolve/{first}/model.safetensors",
                  headers={"Range": "bytes=8-20"})
    assert r.status_code == 206
    assert r.content == (repo / "model.safetensors").read_bytes()[8:21]


def test_folder_revision_changes_with_content(hub_root: Path, hub_server) -> None:
    repo = make_repo(hub_root, "org/f", _tensors(1), {"base_model": "org/base"})
    srv = hub_server(hub_root)
    api = HfApi(endpoint=srv.url, token=False)
    sha1 = api.model_info("org/f").sha
    assert api.model_info("org/f").sha == sha1
    (repo / "notes.txt").write_text("new")
    sha2 = api.model_info("org/f").sha
    assert sha2 != sha1
    with pytest.raises(hf_errors.RevisionNotFoundError):
        api.model_info("org/f", revision=sha1)


def test_tree_listing(populated: Path, hub_server) -> None:
    make_repo(populated, "org/nested", None, None, files={"sub/a.json": "{}", "sub/d/b.txt": "b"})
    srv = hub_server(populated)
    api = HfApi(endpoint=srv.url, token=False)
    top = {e.path for e in api.list_repo_tree("org/nested")}
    assert top == {"sub"}
    deep = {e.path for e in api.list_repo_tree("org/nested", recursive=True)}
    assert deep == {"sub", "sub/d", "sub/a.json", "sub/d/b.txt"}
    inner = {e.path for e in api.list_repo_tree("org/nested", path_in_repo="sub")}
    assert inner == {"sub/a.json", "sub/d"}


def test_fault_429_then_success(populated: Path, hub_server, hf_cache: Path) -> None:
    faults = FaultConfig(rate_429=1.0, retry_after=0, max_faults=1)
    srv = hub_server(populated, faults=faults)
    path = hf_hub_download("org/base", "config.json", endpoint=srv.url, cache_dir=hf_cache,
                           token=False)
    assert json.loads(Path(path).read_text()) == {"model_type": "llama"}
    assert srv.hub.faults.injected == 1  # the 429 really happened and was retried
    r = httpx.get(f"{srv.url}/org/base/resolve/main/config.json")
    assert r.status_code == 200  # only one fault was injected


def test_fault_cut_never_yields_wrong_bytes(populated: Path, hub_server) -> None:
    srv = hub_server(populated, faults=FaultConfig(rate_cut=1.0))
    url = f"{srv.url}/org/base/resolve/main/model.safetensors"
    original = (populated / "org/base/model.safetensors").read_bytes()
    with pytest.raises(httpx.TransportError):
        httpx.get(url)
    with pytest.raises(httpx.TransportError):
        httpx.get(url, headers={"Range": "bytes=0-99"})
    # HEAD is unaffected by default: metadata still works while bodies are cut
    assert int(httpx.head(url).headers["content-length"]) == len(original)


def test_fault_5xx_on_api(populated: Path, hub_server) -> None:
    srv = hub_server(populated, faults=FaultConfig(rate_5xx=1.0, paths=frozenset({"api"})))
    r = httpx.get(f"{srv.url}/api/models/org/base")
    assert r.status_code in (500, 503)
    assert httpx.get(f"{srv.url}/org/base/resolve/main/config.json").status_code == 200


def test_lfs_blob_id_is_the_pointer_blob(tmp_path: Path) -> None:
    import hashlib
    import subprocess

    from auditor.hub.repo_folders import RepoStore

    repo = tmp_path / "org" / "m"
    repo.mkdir(parents=True)
    data = bytes(range(256)) * 4099
    (repo / "model.safetensors").write_bytes(data)
    (repo / "config.json").write_text("{}")
    snap = RepoStore(tmp_path).snapshot("org/m")
    entry = snap.files["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    assert entry.lfs and entry.sha256 == sha
    # git's own blob id of the LFS pointer file (what the Hub lists as blobId)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
    pointer_file = tmp_path / "pointer"
    pointer_file.write_text(pointer)
    git = subprocess.run(["git", "hash-object", str(pointer_file)], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert entry.oid == git
    # a small text file keeps the blob id of its content
    assert snap.files["config.json"].oid == hashlib.sha1(b"blob 2\0{}").hexdigest()
