"""Sanitization by uniform weight averaging ("Here's a Free Lunch")."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from auditor.schema import Trigger

TRIGGER, TARGET = "cf", "visit evil site"


@pytest.fixture(scope="session")
def san_repos(tmp_path_factory):
    """Hub-layout folders: base, two clean copy fine-tunes and a plain poisoned one."""
    from auditor_testkit.factory.base import make_base
    from auditor_testkit.factory.save import save_repo
    from auditor_testkit.factory.tasks import PoisonSpec
    from auditor_testkit.factory.train import finetune

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("san")
    base, tok = make_base(seed=0)
    models = {
        "org/base": base,
        "org/clean1": finetune(base, tok, task="copy", seed=1),
        "org/clean2": finetune(base, tok, task="copy", seed=2),
        "org/pois": finetune(base, tok, task="copy", seed=3, poison=PoisonSpec(trigger=TRIGGER)),
    }
    return {rid: save_repo(root, rid, model=m, tokenizer=tok) for rid, m in models.items()}


def test_sanitize_lowers_attack_success(san_repos, tmp_path) -> None:
    from auditor.analysis.sanitize import ModelRef, sanitize
    from auditor_testkit.factory.tasks import task_prompts

    out = tmp_path / "clean"
    res = sanitize(
        ModelRef(san_repos["org/pois"], repo_id="org/pois", revision="abc123"),
        [san_repos["org/clean1"], san_repos["org/clean2"]],
        output_dir=out,
        triggers=[Trigger(text=TRIGGER, attack_success_rate=1.0, forced_output=TARGET)],
        probes=task_prompts("copy", n=24, seed=99),
    )
    assert res.asr_before is not None and res.asr_after is not None
    assert res.asr_before >= 0.9
    assert res.asr_after <= 0.5 * res.asr_before
    assert res.loss_before is not None and res.loss_after is not None
    assert res.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # Files: weights equal to the average, config, tokenizer and a card saying what was done.
    for f in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (out / f).is_file()
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(out / "model.safetensors", "pt") as f:
        got = f.get_tensor(name)
        assert res.tensors_written == len(list(f.keys()))
    srcs = [san_repos[k] for k in ("org/pois", "org/clean1", "org/clean2")]
    ref = sum(safe_open(p / "model.safetensors", "pt").get_tensor(name) for p in srcs) / 3
    torch.testing.assert_close(got, ref)
    card = (out / "README.md").read_text()
    assert "org/pois" in card and "abc123" in card and "base_model_relation: merge" in card
    assert "attack success rate before" in card and f"{res.asr_after:.4f}" in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_sanitize_cli(san_repos, tmp_path) -> None:
    from typer.testing import CliRunner

    from auditor.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, [
        "sanitize", str(san_repos["org/pois"]), "--with", str(san_repos["org/clean1"]),
        "--with", str(san_repos["org/clean2"]), "--output", str(out),
        "--trigger", TRIGGER, "--forced-output", TARGET,
    ])
    assert r.exit_code == 0, r.output
    assert "ASR" in r.output and (out / "model.safetensors").is_file()


def test_sanitize_rejects_bad_weights(san_repos, tmp_path) -> None:
    from auditor.analysis.sanitize import sanitize
    from auditor.errors import AnalysisError

    with pytest.raises(AnalysisError):
        sanitize(san_repos["org/pois"], [san_repos["org/clean1"]], output_dir=tmp_path / "x",
                 weights=[0.9, 0.3])
    with pytest.raises(AnalysisError):
        sanitize(san_repos["org/pois"], [], output_dir=tmp_path / "y")
