"""Security properties of a whole audit: tokens are never logged or stored; hostile cards
stay inert in every output."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from typer.testing import CliRunner

from auditor.cli import app
from auditor.exitcodes import ExitCode
from tests.fixtures_hub import make_repo

TOKEN = "hf_SECRETtoken0123456789abcdef"
PAYLOAD = "<script>alert('card')</script>"


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8, generator=gen)
            for i in range(2)}


def test_token_never_logged_or_stored_and_card_inert(
        tmp_path: Path, hub_server, caplog) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "hub"
    base = _tensors(0)
    make_repo(root, "org/base", base, {"license": "mit"})
    tuned = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    # A gated repo (needs the token to download) whose card is attacker-written.
    make_repo(root, "evil/gated-ft", tuned,
              {"base_model": "org/base", "tags": [PAYLOAD], "license": PAYLOAD},
              meta={"gated": "auto"})
    server = hub_server(root, tokens={TOKEN})
    data = tmp_path / "data"
    env = {"AUDITOR_HUB_ENDPOINT": server.url, "AUDITOR_HUB_TOKEN": TOKEN,
           "AUDITOR_DATA_DIR": str(data), "AUDITOR_CACHE_DIR": str(tmp_path / "cache")}
    caplog.set_level(logging.DEBUG)
    outputs = {}
    for fmt in ("json", "html", "sarif"):
        result = CliRunner().invoke(
            app, ["audit", "evil/gated-ft", "--store", "--format", fmt, "-q"], env=env)
        # compared against no candidate (nothing else in this hub): "incomplete", exit 2,
        # but an audit was made and rendered
        assert result.exit_code in (ExitCode.CLEAN, ExitCode.FINDINGS, ExitCode.ERROR)
        assert "error:" not in result.output, result.output
        outputs[fmt] = result.stdout
    # Without the token the gated download is refused with a clear error (exit 2).
    env_no_token = {k: v for k, v in env.items() if k != "AUDITOR_HUB_TOKEN"}
    env_no_token["AUDITOR_CACHE_DIR"] = str(tmp_path / "cache2")
    denied = CliRunner().invoke(app, ["audit", "evil/gated-ft", "-q"], env=env_no_token)
    assert denied.exit_code == ExitCode.ERROR and "gated" in denied.output.lower()

    stored = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    assert TOKEN.encode() not in stored
    assert TOKEN not in caplog.text
    for fmt, text in outputs.items():
        assert TOKEN not in text, fmt
    for text in outputs.values():
        assert PAYLOAD not in text  # card values never reach an output as raw markup
