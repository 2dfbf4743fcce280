"""Helpers for the crawler / daemon tests: tiny Llama-shaped repos and a fake audit.

(Named test_* so it belongs to the daemon's test files; it holds no tests.)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor import ANALYSIS_VERSION
from auditor.schema import AuditReport, BackdoorInfo, MergeInfo, ProtectionInfo, SubjectRef
from tests.fixtures_hub import git_commit, make_repo

HIDDEN, INTER, LAYERS, VOCAB = 32, 64, 2, 64
BASE = "tinylab/base"

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": HIDDEN // 4, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.05,
           "model.norm.weight": torch.ones(HIDDEN),
           "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.05}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            w = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.05
            out[p + f"self_attn.{proj}_proj.weight"] = w
        out[p + "mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g) * 0.05
        out[p + "mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g) * 0.05
        out[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g) * 0.05
        out[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        out[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    return out


def finetuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01
              ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale for k, v in base.items()}


def iso_hours(hours: int) -> str:
    return f"2025-01-{1 + hours // 24:02d}T{hours % 24:02d}:00:00Z"


def make_model(root: Path, repo_id: str, *, seed: int, hours: int, base: str | None = BASE,
               meta: dict[str, Any] | None = None, git: bool = False) -> Path:
    """A fine-tune of ``base`` (or the base itself when ``base`` is None)."""
    tensors = base_tensors() if base is None else finetuned(base_tensors(), seed)
    card: dict[str, Any] = {"license": "apache-2.0", "library_name": "transformers"}
    if base is not None:
        card["base_model"] = base
        card["base_model_relation"] = "finetune"
    return make_repo(root, repo_id, tensors, card, config=LLAMA_CONFIG,
                     meta={"createdAt": iso_hours(hours), "gated": False, "private": False,
                           **(meta or {})}, git=git)


DERIVATIVES = ("alice/ft-a", "bob/ft-b", "carol/ft-c", "dave/ft-d")


def make_zoo(root: Path, *, derivatives: tuple[str, ...] = DERIVATIVES) -> list[str]:
    make_model(root, BASE, seed=0, hours=0, base=None)
    for i, repo in enumerate(derivatives, start=1):
        make_model(root, repo, seed=i, hours=i)
    # Not a derivative of the watched base: never listed.
    make_repo(root, "other/unrelated", base_tensors(99), {"license": "mit"},
              config=LLAMA_CONFIG, meta={"createdAt": iso_hours(50)})
    return list(derivatives)


def new_commit(repo: Path, *, seed: int) -> str:
    """Change the weights of a git repo and commit; returns the new sha."""
    from safetensors.torch import save_file

    save_file(finetuned(base_tensors(), seed), str(repo / "model.safetensors"))
    return git_commit(repo, f"update {seed}")


# --- a fake orchestrator -----------------------------------------------------------
def tiny_fingerprint(seed: int) -> Any:
    from auditor.analysis.fingerprint import Fingerprint, TensorPrint

    sample = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    tp = TensorPrint(name="w", shape=(8,), numel=8, sq_norm=float((sample**2).sum()),
                     zero_fraction=0.0, group="layer.0", sample=sample)
    return Fingerprint(tensors={"w": tp}, sample_size=8)


@dataclass
class FakeAudit:
    """Stands in for ``audit_revision``: resolves and downloads every file through the
    real client (so Hub faults hit it), optionally sleeps, records each call."""

    delay: float = 0.0
    fail_with: dict[str, Exception] = field(default_factory=dict)
    backdoor_for: set[str] = field(default_factory=set)
    calls: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, subject: str, *, revision: str | None = None, base: str | None = None,
                 homologues: Any = None, settings: Any = None, client: Any = None,
                 **_: Any) -> Any:
        with self.lock:
            self.calls.append({"subject": subject, "revision": revision, "base": base,
                               "homologues": dict(homologues or {})})
        if subject in self.fail_with:
            raise self.fail_with[subject]
        resolved = client.resolve(subject, revision=revision)
        for name in resolved.files:
            client.fetch(resolved, name)
        if self.delay:
            time.sleep(self.delay)
        ref = SubjectRef(repo_id=subject, revision=resolved.revision, base_repo_id=base)
        report = AuditReport(
            tool_version="test", analysis_version=ANALYSIS_VERSION, subject=ref, lineage=[],
            merge=MergeInfo(is_merge=False),
            backdoor=BackdoorInfo(suspected=subject in self.backdoor_for),
            protection=ProtectionInfo(), findings=[])
        return SimpleNamespace(report=report, fingerprint=tiny_fingerprint(len(self.calls)),
                               resolved=resolved, exit_code=0)


# --- reading the store -------------------------------------------------------------
def audit_rows(session: Session) -> list[dict[str, Any]]:
    from auditor.store.models import Audit, Repo, Revision

    rows = session.execute(
        select(Repo.repo_id, Revision.sha, Audit.status, Audit.attempts, Audit.error,
               Audit.finished_at, Audit.id)
        .join(Revision, Audit.revision_id == Revision.id)
        .join(Repo, Revision.repo_pk == Repo.id)
        .order_by(Audit.id)
    ).all()
    session.rollback()
    return [dict(r._mapping) for r in rows]


def dump(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str, indent=1)
