"""serve-hub, the bounded parser and the rule engine against hostile input."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import HfApi

from auditor.bounded import Limits, loads_json, loads_yaml
from auditor.errors import InputLimitExceeded, MalformedFile, RepoNotFound
from auditor.hub.card import parse_card
from auditor.hub.client import HubClient
from tests import hostile_corpus as hc
from tests.fixtures_hub import card_text


@pytest.fixture
def broken_hub(tmp_path: Path) -> Path:
    """The base, one sane derivative and three repos that used to take the listing down."""
    root = tmp_path / "hub"
    hc.save_tensors(root / hc.BASE_ID / "model.safetensors", hc.base_tensors())
    hc.save_tensors(root / "good/ft" / "model.safetensors", hc.finetune(1))
    (root / "good/ft/README.md").write_text(card_text(hc.BASE_CARD))
    hexcard = root / "bad/hex-card"
    hexcard.mkdir(parents=True)
    (hexcard / "README.md").write_text(
        "---\nbase_model: " + hc.BASE_ID + "\nx: 0x" + "f" * 20000 + "\n---\n")
    deep = root / "bad/deep-header"
    deep.mkdir(parents=True)
    (deep / "README.md").write_text(card_text(hc.BASE_CARD))
    (deep / "model.safetensors").write_bytes(hc.st_bytes(
        b'{"t": {"dtype": "F32", "shape": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"))
    absurd = root / "bad/absurd-shape"
    absurd.mkdir(parents=True)
    (absurd / "README.md").write_text(card_text(hc.BASE_CARD))
    (absurd / "model.safetensors").write_bytes(hc.st_bytes(
        b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b', 0], "data_offsets": [0, 0]}}'))
    (absurd / "config.json").write_text('{"a": ' * 10_000 + "1" + "}" * 10_000)
    return root


def test_listing_survives_broken_repos(broken_hub: Path, hub_server: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    srv = hub_server(broken_hub)
    api = HfApi(endpoint=srv.url, token=False)
    with caplog.at_level(logging.WARNING):
        listed = {m.id for m in api.list_models(filter=f"base_model:{hc.BASE_ID}", full=True)}
        raw = httpx.get(f"{srv.url}/api/models",
                        params={"full": "true", "cardData": "true", "config": "true"})
        every = {m["id"] for m in raw.json()}
    assert raw.status_code == 200
    assert "good/ft" in listed
    assert {"bad/deep-header", "bad/absurd-shape", "good/ft"} <= listed
    assert {hc.BASE_ID, "good/ft", "bad/hex-card"} <= every
    info = api.model_info("bad/absurd-shape", files_metadata=True)
    assert info.sha and len(info.sha) == 40


def test_absurd_range_is_416(broken_hub: Path, hub_server: Any) -> None:
    srv = hub_server(broken_hub)
    url = f"{srv.url}/good/ft/resolve/main/model.safetensors"
    size = int(httpx.head(url).headers["content-length"])
    r = httpx.get(url, headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    r = httpx.get(url, headers={"Range": "bytes=0-" + "9" * 5000})
    assert r.status_code == 206 and len(r.content) == size
    r = httpx.get(url, headers={"Range": "bytes=-" + "9" * 5000})
    assert r.status_code == 206 and len(r.content) == size


def test_paths_info_works(broken_hub: Path, hub_server: Any) -> None:
    srv = hub_server(broken_hub)
    api = HfApi(endpoint=srv.url, token=False)
    infos = api.get_paths_info("good/ft", ["model.safetensors", "README.md", "missing"])
    assert sorted(i.path for i in infos) == ["README.md", "model.safetensors"]


def test_repo_ids_are_never_local_paths(tmp_path: Path, hub_server: Any,
                                        monkeypatch: pytest.MonkeyPatch,
                                        broken_hub: Path) -> None:
    srv = hub_server(broken_hub)
    client = HubClient(endpoint=srv.url, token=None, cache_dir=tmp_path / "c",
                       disk_budget_bytes=None, max_retries=0)
    (tmp_path / "good" / "ft").mkdir(parents=True)  # a decoy next to the working directory
    monkeypatch.chdir(tmp_path)
    assert client.resolve("good/ft").local_dir is None
    assert client.resolve("./good/ft").local_dir == (tmp_path / "good/ft").resolve()
    assert client.resolve("good/ft", local=True).local_dir is not None
    with pytest.raises(RepoNotFound):
        client.resolve("./no/such/folder")


# ---------------------------------------------------------------- bounded parser
LIM = Limits(max_bytes=1_000_000, max_depth=32, max_int_digits=40)


@pytest.mark.parametrize("text, error, word", [
    ("[" * 33 + "]" * 33, InputLimitExceeded, "nested"),
    ('{"a": ' + "1" * 41 + "}", InputLimitExceeded, "integer"),
    ("[NaN]", MalformedFile, "NaN"),
    ("[-Infinity]", MalformedFile, "Infinity"),
    ("[1e999]", MalformedFile, "out of range"),
    ("[[[", MalformedFile, "unbalanced"),
    ("x" * 1_000_001, InputLimitExceeded, "bytes"),
])
def test_bounded_json_refuses(text: str, error: type[Exception], word: str) -> None:
    with pytest.raises(error, match=word):
        loads_json(text, name="f.json", limits=LIM)


def test_bounded_json_keeps_what_real_files_hold() -> None:
    # 32 levels exactly, a 31-digit model_max_length, brackets inside strings.
    assert loads_json("[" * 32 + "]" * 32, name="f", limits=LIM) is not None
    big = loads_json('{"model_max_length": 1000000000000000019884624838656, "t": "[[{{"}',
                     name="tokenizer_config.json", limits=LIM)
    assert big["model_max_length"] == 1000000000000000019884624838656 and big["t"] == "[[{{"


@pytest.mark.parametrize("text, word", [
    ("a: " + "[" * 40 + "]" * 40, "nested"),
    ("a: 0x" + "f" * 50, "integer"),
    ("a: &x [1]\nb: *x", "aliases"),
    ("a: [unclosed", "malformed"),
])
def test_bounded_yaml_refuses(text: str, word: str) -> None:
    with pytest.raises(MalformedFile, match=word):
        loads_yaml(text, name="m.yml", limits=LIM)


def test_base_model_list_deduplicated_in_linear_time() -> None:
    ids = [f"o{i % 97}/m{i % 5000}" for i in range(10_000)]  # 5,000 distinct, each twice
    text = card_text({"base_model": ids})
    t0 = time.perf_counter()
    card = parse_card(text)
    elapsed = time.perf_counter() - t0
    assert len(card.base_models) == 64 and card.base_models[0] == ids[0]
    assert any("keeping the first 64" in w for w in card.warnings)
    assert elapsed < 5  # was quadratic (7 s for 10,000); generous for a loaded machine


def test_header_tensor_count_is_bounded_before_parsing(tmp_path: Path) -> None:
    from auditor.errors import MalformedSafetensors
    from auditor.weights.safetensors_io import validate_file

    path = tmp_path / "m.safetensors"
    path.write_bytes(hc._zero_size_header(3000))
    with pytest.raises(MalformedSafetensors, match="more than 1000 tensors"):
        from auditor.weights.safetensors_io import LocalFile, parse_header

        with LocalFile(path) as src:
            parse_header(src, max_tensors=1000)
    assert len(validate_file(path).tensors) == 3000  # under the default limit


# ---------------------------------------------------------------- rule engine
def test_rule_engine_survives_one_failing_rule_and_int_overflow() -> None:
    from auditor.rules.engine import evaluate
    from auditor.rules.loader import compile_rule, example_measurements, load_rules

    m = example_measurements({
        "declared_mergekit_config": {"weight": 10**40, "nested": [{"x": -(10**30)}]},
        "pickles": [{"path": "x.bin", "dangerous_imports": ["os.system"],
                     "imports": ["os.system"]}],
    })
    broken = compile_rule({
        "id": "TST999", "title": "t", "severity": "low", "description": "d",
        "condition": "m.declared_mergekit_config.weight / 0 > 1", "message": "m",
        "examples": {"fires": [], "does_not_fire": []},
    }, source=Path("t.yaml"))
    errors: list[str] = []
    found = evaluate([*load_rules(), broken], m, errors=errors)
    assert "AUD301" in {f.rule_id for f in found}
    assert errors and "TST999" in errors[0]
    with pytest.raises(Exception):
        evaluate([broken], m)


def test_schema_never_serialises_non_finite_numbers() -> None:
    from auditor.schema import BarrierCurve, ProtectionInfo

    curve = BarrierCurve(other_repo_id="a/b", alphas=[0.0, float("nan")], losses=[1.0],
                         barrier=float("inf"), relative_barrier=float("-inf"))
    data = json.loads(curve.model_dump_json(), parse_constant=lambda c: pytest.fail(c))
    assert data["alphas"] == [0.0, None] and data["barrier"] is None
    prot = ProtectionInfo(scale_curve=[(1.0, float("nan"))])
    assert prot.model_dump(mode="json")["scale_curve"] == [[1.0, None]]


def test_incomplete_audit_page_is_not_clean_and_shows_no_internal_paths() -> None:
    from auditor.reports.formatters import render
    from auditor.schema import (
        AuditReport,
        BackdoorInfo,
        CheckError,
        MergeInfo,
        ProtectionInfo,
        SubjectRef,
    )

    report = AuditReport(
        tool_version="t", analysis_version="1",
        subject=SubjectRef(repo_id="eve/x", revision="a" * 40),
        lineage=[], merge=MergeInfo(is_merge=False), backdoor=BackdoorInfo(suspected=False),
        protection=ProtectionInfo(), findings=[],
        errors=[CheckError(
            detector="weights", kind="MalformedSafetensors",
            message="/srv/auditor/hf-cache/models--eve--x/snapshots/abc/model.safetensors:"
                    " header is not valid JSON")],
    )
    page = render(report, fmt="html")
    assert "Incomplete audit" in page and 'class="verdict v-incomplete"' in page
    assert 'class="verdict v-clean"' not in page and "✔" not in page
    assert "/srv/auditor" not in page and "model.safetensors" in page
