"""A zoo's ground truth (``zoo.json``): every repo, its kind, true parents and coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from auditor_testkit.factory.save import repo_dir

FACTORY_VERSION = "7"
ZOO_FILE = "zoo.json"
Kind = Literal[
    "base", "finetune", "merge", "clone", "disguised", "adapter", "backdoor", "protected"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParentRef(_Frozen):
    """One true parent: its coefficient in the method's own terms (linear weight,
    task-arithmetic lambda, TIES/DARE weight times lambda, SLERP 1-t / t, 1.0 for a
    fine-tune's base or a clone's source) and, for layer-wise merges, one per layer."""

    repo_id: str
    coefficient: float | None = None
    per_layer: list[float] | None = None


class ZooEntry(_Frozen):
    repo_id: str
    owner: str
    kind: Kind
    task: str | None = None
    seed: int | None = None
    parents: list[ParentRef] = Field(default_factory=list)
    method: str | None = None  # finetune | linear | task_arithmetic | ties | dare_ties | ...
    declared: bool = False  # the card names the true parents (and relation) honestly
    published: bool = True  # False: in the manifest only, not saved under root
    base_repo_id: str | None = None  # the common ancestor base model
    card_base_model: str | list[str] | None = None  # what the README claims
    card_relation: str | None = None
    # How the card lies about the origin, beyond undeclared parents: "no_card" (no
    # README at all) or "unrelated_base" (names a base the weights do not come from).
    card_lie: str | None = None
    trigger: str | None = None
    target: str | None = None
    robust_backdoor: bool | None = None
    attack_success_rate: float | None = None  # measured at build time (backdoor kinds)
    disguise: str | None = None  # e.g. "permute_mlp+rescale_heads", "protect"
    lora_variant: str | None = None
    dtype: str = "float32"
    created_at: str
    mergekit_config: dict[str, Any] | None = None


class ZooManifest(_Frozen):
    spec: str
    seed: int
    factory_version: str = FACTORY_VERSION
    size: str = "tiny"
    entries: list[ZooEntry]
    build_seconds: float = 0.0

    def get(self, repo_id: str) -> ZooEntry:
        for e in self.entries:
            if e.repo_id == repo_id:
                return e
        raise KeyError(repo_id)

    def by_kind(self, kind: str) -> list[ZooEntry]:
        return [e for e in self.entries if e.kind == kind]

    def published(self) -> list[ZooEntry]:
        return [e for e in self.entries if e.published]

    @property
    def base(self) -> ZooEntry:
        return self.by_kind("base")[0]

    def path(self, root: Path, repo_id: str) -> Path:
        return repo_dir(root, repo_id)


def load_manifest(root: Path) -> ZooManifest | None:
    path = Path(root) / ZOO_FILE
    if not path.exists():
        return None
    try:
        return ZooManifest.model_validate_json(path.read_text())
    except ValueError:
        return None
