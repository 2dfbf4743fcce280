"""``check_json_file``: a content that passed the bounded parser is not parsed again in the
process (a worker's family shares one tokenizer.json); a changed or failing file is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from auditor import bounded
from auditor.errors import AuditorError


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = bounded.load_json_file

    def spy(path: Path | str, **kw: object) -> object:
        seen.append(str(path))
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bounded, "load_json_file", spy)
    return seen


def test_a_checked_file_is_not_parsed_again(tmp_path: Path, parses: list[str]) -> None:
    f = tmp_path / "tokenizer.json"
    f.write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(100)}}}))
    bounded.check_json_file(f)
    bounded.check_json_file(f)
    assert len(parses) == 1
    f.write_text(json.dumps({"model": {"vocab": {}}}))  # new content: parsed again
    os.utime(f, ns=(1, 1))
    bounded.check_json_file(f)
    assert len(parses) == 2


def test_the_same_blob_in_two_snapshots_is_one_content(tmp_path: Path,
                                                        parses: list[str]) -> None:
    blobs = tmp_path / "models--a--b" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "0f3a").write_text("{}")
    links = []
    for snap in ("s1", "s2"):
        d = tmp_path / "models--a--b" / "snapshots" / snap
        d.mkdir(parents=True)
        (d / "tokenizer.json").symlink_to(blobs / "0f3a")
        links.append(d / "tokenizer.json")
    for link in links:
        bounded.check_json_file(link)
    assert len(parses) == 1


def test_a_bad_file_fails_every_time(tmp_path: Path, parses: list[str]) -> None:
    f = tmp_path / "config.json"
    f.write_text("[" * 100 + "]" * 100)  # deeper than the nesting limit
    for _ in range(2):
        with pytest.raises(AuditorError):
            bounded.check_json_file(f)
    assert len(parses) == 2
