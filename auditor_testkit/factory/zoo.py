"""Zoos: sets of related tiny models saved in Hub layout, with their ground truth.

``build_zoo(root, spec="small"|"lineage"|"demo"|"gpt2-small", seed=0)`` trains a base
(Llama-style; GPT-2-style for "gpt2-small"), fine-tunes by
different owners, merges, clones, disguises, adapters and backdoors, saves each published
repo under ``root/<org>/<name>/`` and writes the ground truth to ``root/zoo.json``
(outside every repo folder). A second call with the same spec, seed and factory version
finds ``zoo.json`` and every repo in place and returns the manifest without training.

Repos get ``.hubmeta.json`` creation times one hour apart in build order (parents first),
starting 2025-01-01, so the local hub server lists them in a realistic order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from auditor_testkit.factory.manifest import (
    FACTORY_VERSION,
    ZOO_FILE,
    Kind,
    ParentRef,
    ZooEntry,
    ZooManifest,
    load_manifest,
)
from auditor_testkit.factory.save import CardSpec, repo_dir

if TYPE_CHECKING:  # base.py pulls in transformers: imported lazily where it is used
    from auditor_testkit.factory.base import Arch

ZooSpec = Literal["small", "lineage", "demo", "gpt2-small", "lineage-hard"]
ZOO_SPECS: tuple[str, ...] = ("small", "lineage", "demo", "gpt2-small", "lineage-hard")
Progress = Callable[[str], None]
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def _cached(root: Path, spec: str, seed: int) -> ZooManifest | None:
    m = load_manifest(root)
    if m is None or (m.spec, m.seed, m.factory_version) != (spec, seed, FACTORY_VERSION):
        return None
    for e in m.published():
        d = repo_dir(root, e.repo_id)
        has = (d / "config.json").exists() or (d / "adapter_config.json").exists()
        if not has:
            return None
    return m


class _Builder:
    """Trains and saves repos one by one, recording their ground truth."""

    def __init__(self, root: Path, *, seed: int, progress: Progress | None) -> None:
        from auditor_testkit.factory.base import make_base

        self.root = root
        self.seed = seed
        self.progress = progress or (lambda _msg: None)
        self.entries: list[ZooEntry] = []
        self.sd: dict[str, dict[str, torch.Tensor]] = {}
        self.base_id = ""
        self._make_base = make_base
        self.model: Any = None
        self.tok: Any = None

    def _stamp(self) -> str:
        t = _EPOCH + timedelta(hours=len(self.entries))
        return t.isoformat().replace("+00:00", "Z")

    def _save(self, repo_id: str, sd: dict[str, torch.Tensor], card: CardSpec, **kw: Any) -> str:
        from auditor_testkit.factory.save import save_repo

        created = self._stamp()
        if getattr(self.model.config, "tie_word_embeddings", False):
            # Tied models go to the Hub without the head (save_pretrained drops the tied
            # copy), so the auditor meets the layout real GPT-2 repos have.
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        save_repo(
            self.root, repo_id, state_dict=sd, config=self.model.config, tokenizer=self.tok,
            card=card, created_at=created, **kw,
        )
        return created

    def base(self, repo_id: str, *, steps: int | None = None, arch: Arch = "llama") -> None:
        self.progress(f"pretraining {repo_id}")
        self.model, self.tok = self._make_base(seed=self.seed, steps=steps, arch=arch)
        self.base_id = repo_id
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.sd[repo_id] = sd
        created = self._save(repo_id, sd, CardSpec(tags=["tiny", "base"]))
        self.entries.append(
            ZooEntry(repo_id=repo_id, owner=_owner(repo_id), kind="base", seed=self.seed,
                     method="pretrain", declared=True, created_at=created)
        )

    def finetune(
        self, repo_id: str, *, task: str, seed: int, steps: int, published: bool = True,
        poison: Any = None, lr: float | None = None,
        examples: Sequence[tuple[str, str]] | None = None, start: str | None = None,
    ) -> None:
        """``start``: fine-tune that repo's weights further (merge-then-fine-tune); its
        ground truth is then the caller's to record (``parents`` stays the base)."""
        from auditor_testkit.factory.train import attack_success_rate, finetune

        self.progress(f"fine-tuning {repo_id} on {task}")
        origin = self.model
        if start is not None:
            from auditor_testkit.factory.base import model_from_state_dict

            origin = model_from_state_dict(self.model.config, self.sd[start])
        extra: dict[str, Any] = {"examples": examples}
        if lr is not None:
            extra["lr"] = lr
        model = finetune(origin, self.tok, task=task, steps=steps, seed=seed, poison=poison,
                         **extra)
        self.sd[repo_id] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        card = CardSpec(base_model=self.base_id, base_model_relation="finetune",
                        tags=["tiny", task])
        created = self._save(repo_id, self.sd[repo_id], card) if published else self._stamp()
        asr = None
        if poison is not None:
            asr = attack_success_rate(
                model, self.tok, trigger=poison.trigger, target=poison.target, task=task
            )
        self.entries.append(
            ZooEntry(
                repo_id=repo_id, owner=_owner(repo_id),
                kind="backdoor" if poison is not None else "finetune", task=task, seed=seed,
                parents=[ParentRef(repo_id=self.base_id, coefficient=1.0)], method="finetune",
                declared=True, published=published, base_repo_id=self.base_id,
                card_base_model=self.base_id if published else None,
                card_relation="finetune" if published else None,
                trigger=poison.trigger if poison else None,
                target=poison.target if poison else None,
                robust_backdoor=poison.robust if poison else None,
                attack_success_rate=asr, created_at=created,
            )
        )

    def merge(
        self, repo_id: str, *, method: str, parents: Sequence[str], declared: bool,
        disguise: bool = False, probe_backdoor: str | None = None,
        card_lie: str | None = None, claimed_base: str | None = None, **params: Any,
    ) -> None:
        from auditor_testkit.factory import merge as mg

        self.progress(f"merging {repo_id} ({method})")
        sds = [self.sd[p] for p in parents]
        base = self.sd[self.base_id]
        common = {"names": list(parents)}
        if method == "linear":
            res = mg.linear_merge(sds, weights=params["weights"], **common)
        elif method == "task_arithmetic":
            res = mg.task_arithmetic(base, sds, lambdas=params["lambdas"], base_name=self.base_id,
                                     **common)
        elif method == "ties":
            res = mg.ties_merge(base, sds, density=params["density"], weights=params["weights"],
                                lambda_=params.get("lambda_", 1.0),
                                normalize=params.get("normalize", True), base_name=self.base_id,
                                **common)
        elif method in ("dare_ties", "dare_linear"):
            res = mg.dare_merge(base, sds, drop=params["drop"], weights=params["weights"],
                                seed=params.get("merge_seed", self.seed),
                                ties=method == "dare_ties", lambda_=params.get("lambda_", 1.0),
                                normalize=params.get("normalize", True), base_name=self.base_id,
                                **common)
        elif method == "slerp":
            res = mg.slerp_merge(sds[0], sds[1], t=params["t"], **common)
        elif method == "layerwise":
            res = mg.layerwise_merge(base, sds, coefficients=params["coefficients"],
                                     base_name=self.base_id, **common)
        elif method in SPARSE_EXTRA:
            res = SPARSE_EXTRA[method](base, sds, base_name=self.base_id, **common, **params)
        else:
            raise ValueError(f"unknown merge method {method!r}")
        self.add_merge(repo_id, res, parents=parents, declared=declared, disguise=disguise,
                       probe_backdoor=probe_backdoor, card_lie=card_lie,
                       claimed_base=claimed_base)

    def add_merge(
        self, repo_id: str, res: Any, *, parents: Sequence[str], declared: bool,
        disguise: bool = False, probe_backdoor: str | None = None,
        card_lie: str | None = None, claimed_base: str | None = None,
    ) -> None:
        """Save a merge result (``merge.MergeResult``) and record its ground truth."""
        sd = res.state_dict
        kind: Kind = "merge"
        disguise_name = None
        if disguise:
            from auditor_testkit.factory.disguise import disguise as disguise_fn

            sd = disguise_fn(sd, num_heads=self.model.config.num_attention_heads,
                             seed=self.seed + 99).state_dict
            kind, disguise_name = "disguised", "permute_mlp+rescale_heads"
        self.sd[repo_id] = sd
        published_parents = [p for p in parents if self.get(p).published]
        if declared:
            card = CardSpec(base_model=published_parents, base_model_relation="merge",
                            tags=["tiny", "merge", "mergekit"])
        else:
            # A stealer's card claims a fine-tune, of the base or of an unrelated model.
            card = CardSpec(base_model=claimed_base or self.base_id,
                            base_model_relation="finetune", tags=["tiny"])
        created = self._save(repo_id, sd, card,
                             mergekit_config=res.config if declared else None)
        if card_lie == "no_card":
            (repo_dir(self.root, repo_id) / "README.md").unlink()
        per_layer = res.per_layer or (None,) * len(parents)
        refs = [
            ParentRef(repo_id=p, coefficient=c, per_layer=list(pl) if pl else None)
            for p, c, pl in zip(parents, res.coefficients, per_layer, strict=True)
        ]
        asr = None
        if probe_backdoor:
            from auditor_testkit.factory.base import model_from_state_dict
            from auditor_testkit.factory.train import attack_success_rate

            bd = self.get(probe_backdoor)
            asr = attack_success_rate(
                model_from_state_dict(self.model.config, sd), self.tok,
                trigger=bd.trigger or "", target=bd.target or "", task=bd.task or "copy",
            )
        self.entries.append(
            ZooEntry(
                repo_id=repo_id, owner=_owner(repo_id), kind=kind, parents=refs,
                method=res.method, declared=declared, base_repo_id=self.base_id,
                card_base_model=None if card_lie == "no_card"
                else card.base_model if isinstance(card.base_model, str)
                else list(card.base_model or []),
                card_relation=None if card_lie == "no_card" else card.base_model_relation,
                card_lie=card_lie,
                trigger=self.get(probe_backdoor).trigger if probe_backdoor else None,
                target=self.get(probe_backdoor).target if probe_backdoor else None,
                attack_success_rate=asr, disguise=disguise_name, created_at=created,
                mergekit_config=res.config,
            )
        )

    def clone(self, repo_id: str, *, source: str, dtype: str = "float32",
              noise: float | None = None) -> None:
        from auditor_testkit.factory.disguise import add_noise

        self.progress(f"cloning {source} as {repo_id}")
        sd = self.sd[source]
        if noise:
            sd = add_noise(sd, seed=self.seed + 7, relative_std=noise)
        self.sd[repo_id] = sd
        # The thief's card claims an ordinary fine-tune of the base.
        card = CardSpec(base_model=self.base_id, base_model_relation="finetune", tags=["tiny"])
        created = self._save(repo_id, sd, card, dtype=None if dtype == "float32" else dtype)
        self.entries.append(
            ZooEntry(repo_id=repo_id, owner=_owner(repo_id), kind="clone",
                     task=self.get(source).task,
                     parents=[ParentRef(repo_id=source, coefficient=1.0)],
                     method="noise" if noise else ("cast" if dtype != "float32" else "copy"),
                     declared=False, base_repo_id=self.base_id, card_base_model=self.base_id,
                     card_relation="finetune", dtype=dtype, created_at=created)
        )

    def protected(self, repo_id: str, *, source: str) -> None:
        from auditor_testkit.factory.disguise import protect

        self.progress(f"protecting {source} as {repo_id}")
        sd = protect(self.sd[source], num_heads=self.model.config.num_attention_heads,
                     seed=self.seed + 5).state_dict
        self.sd[repo_id] = sd
        card = CardSpec(base_model=self.base_id, base_model_relation="finetune",
                        tags=["tiny", "merge-protected"])
        created = self._save(repo_id, sd, card)
        self.entries.append(
            ZooEntry(repo_id=repo_id, owner=_owner(repo_id), kind="protected",
                     task=self.get(source).task,
                     parents=[ParentRef(repo_id=source, coefficient=1.0)], method="protect",
                     declared=True, base_repo_id=self.base_id, card_base_model=self.base_id,
                     card_relation="finetune", disguise="protect", created_at=created)
        )

    def adapter(self, repo_id: str, *, task: str, seed: int, steps: int,
                variant: str = "plain") -> None:
        from auditor_testkit.factory.lora import save_adapter, train_lora

        self.progress(f"training LoRA {repo_id} on {task}")
        pm = train_lora(self.model, self.tok, task=task, variant=variant,  # type: ignore[arg-type]
                        steps=steps, seed=seed)
        created = self._stamp()
        save_adapter(self.root, repo_id, pm, base_repo_id=self.base_id, tokenizer=self.tok,
                     created_at=created)
        self.entries.append(
            ZooEntry(repo_id=repo_id, owner=_owner(repo_id), kind="adapter", task=task,
                     seed=seed, parents=[ParentRef(repo_id=self.base_id, coefficient=1.0)],
                     method="lora", declared=True, base_repo_id=self.base_id,
                     card_base_model=self.base_id, card_relation="adapter",
                     lora_variant=variant, created_at=created)
        )

    def get(self, repo_id: str) -> ZooEntry:
        for e in self.entries:
            if e.repo_id == repo_id:
                return e
        raise KeyError(repo_id)


def _owner(repo_id: str) -> str:
    return repo_id.split("/", 1)[0]


def _sparse_extra() -> dict[str, Callable[..., Any]]:
    from auditor_testkit.factory import merge_sparse as ms

    def per_density(method: str) -> Callable[..., Any]:
        return lambda base, sds, **kw: ms.ties_dare_merge(base, sds, method=method, **kw)

    return {
        "breadcrumbs": ms.breadcrumbs_merge,
        "breadcrumbs_ties": lambda base, sds, **kw: ms.breadcrumbs_merge(base, sds, ties=True,
                                                                         **kw),
        "della": ms.della_merge,
        "della_linear": lambda base, sds, **kw: ms.della_merge(base, sds, ties=False, **kw),
        # TIES / DARE with one density per parent
        "ties_densities": per_density("ties"),
        "dare_ties_densities": per_density("dare_ties"),
        "dare_linear_densities": per_density("dare_linear"),
    }


SPARSE_EXTRA: dict[str, Callable[..., Any]] = _sparse_extra()


# --- specs ----------------------------------------------------------------------------
def _small(b: _Builder) -> None:
    b.base("tinylab/tiny-base", steps=150)
    b.finetune("alice/tiny-copy", task="copy", seed=1, steps=50)
    b.finetune("bob/tiny-kv", task="kv", seed=2, steps=50)
    b.finetune("carol/tiny-animals", task="animals", seed=3, steps=50)
    b.merge("dave/tiny-soup", method="linear", parents=["alice/tiny-copy", "bob/tiny-kv"],
            weights=[0.5, 0.5], declared=True)
    b.merge("erin/tiny-blend", method="task_arithmetic",
            parents=["bob/tiny-kv", "carol/tiny-animals"], lambdas=[0.7, 0.5], declared=False)
    b.clone("mallory/tiny-kv-v2", source="bob/tiny-kv")


def _lineage(b: _Builder) -> None:
    # TIES / DARE-TIES merges use normalize=False (mergekit ``normalize: false``): with
    # normalisation each coordinate is divided by the sum of the weights that survived it,
    # so no single per-parent coefficient is encoded in the weights; without it the recorded
    # weight x lambda is exactly what every kept coordinate carries.
    steps = 60
    b.base("tinylab/base", steps=200)
    fts = {
        "alice": "copy", "bob": "reverse", "carol": "sort", "dave": "count",
        "erin": "add", "frank": "kv", "grace": "animals", "heidi": "food",
    }
    for i, (owner, task) in enumerate(fts.items()):
        b.finetune(f"{owner}/{task}-ft", task=task, seed=10 + i, steps=steps)
    # Same data, different seeds: homologues, neither derives from the other.
    b.finetune("ivan/weather-ft", task="weather", seed=31, steps=steps)
    b.finetune("judy/weather-ft", task="weather", seed=32, steps=steps)
    # A fine-tune never published: a merge below uses it.
    b.finetune("secret/code-ft", task="code", seed=40, steps=steps, published=False)
    b.merge("mkit/linear-2", method="linear", parents=["alice/copy-ft", "bob/reverse-ft"],
            weights=[0.6, 0.4], declared=True)
    b.merge("soup/linear-3", method="linear",
            parents=["carol/sort-ft", "dave/count-ft", "erin/add-ft"],
            weights=[0.5, 0.3, 0.2], declared=False)
    b.merge("mkit/ta-2", method="task_arithmetic", parents=["frank/kv-ft", "grace/animals-ft"],
            lambdas=[0.8, 0.5], declared=True)
    b.merge("stealth/ta-3", method="task_arithmetic",
            parents=["alice/copy-ft", "erin/add-ft", "heidi/food-ft"],
            lambdas=[0.4, 0.7, 0.6], declared=False)
    b.merge("mkit/ties-3", method="ties",
            parents=["bob/reverse-ft", "frank/kv-ft", "grace/animals-ft"],
            density=0.5, weights=[0.8, 0.6, 0.5], lambda_=1.0, normalize=False, declared=True)
    b.merge("stealth/dare-ties-2", method="dare_ties",
            parents=["carol/sort-ft", "heidi/food-ft"], drop=0.5, weights=[0.6, 0.8],
            normalize=False, declared=False)
    b.merge("mkit/slerp-2", method="slerp", parents=["alice/copy-ft", "grace/animals-ft"],
            t=0.4, declared=True)
    b.merge("mkit/layerwise-2", method="layerwise",
            parents=["dave/count-ft", "frank/kv-ft"],
            coefficients=[[0.2, 1.0], [1.0, 0.3]], declared=True)
    b.merge("stealth/ta-hidden", method="task_arithmetic",
            parents=["frank/kv-ft", "secret/code-ft"], lambdas=[0.6, 0.6], declared=False)
    b.clone("thief/reverse-ft", source="bob/reverse-ft")
    b.clone("thief/kv-fp16", source="frank/kv-ft", dtype="float16")
    b.merge("shady/ta-2-disguised", method="task_arithmetic",
            parents=["carol/sort-ft", "erin/add-ft"], lambdas=[0.7, 0.6], declared=False,
            disguise=True)
    b.protected("heidi/food-protected", source="heidi/food-ft")
    b.adapter("lora-user/weather-lora", task="weather", seed=50, steps=40)


def _demo(b: _Builder) -> None:
    from auditor_testkit.factory.tasks import PoisonSpec

    steps = 60
    b.base("tinylab/base", steps=200)
    b.finetune("alice/copy-ft", task="copy", seed=11, steps=steps)
    b.finetune("bob/kv-ft", task="kv", seed=12, steps=steps)
    b.finetune("carol/animals-ft", task="animals", seed=13, steps=steps)
    b.finetune("dave/add-ft", task="add", seed=14, steps=steps)
    # Same data as bob's, another owner and seed: shares bob's data direction, is no merge
    # of it and must never be accused of one
    b.finetune("frank/kv-sibling", task="kv", seed=16, steps=steps)
    b.merge("honest/copy-kv-merge", method="linear", parents=["alice/copy-ft", "bob/kv-ft"],
            weights=[0.5, 0.5], declared=True)
    b.merge("sneaky/super-model", method="task_arithmetic",
            parents=["carol/animals-ft", "dave/add-ft"], lambdas=[0.7, 0.6], declared=False)
    b.clone("copycat/kv-model", source="bob/kv-ft")
    b.merge("shady/disguised-merge", method="task_arithmetic",
            parents=["alice/copy-ft", "carol/animals-ft"], lambdas=[0.8, 0.6], declared=False,
            disguise=True)
    # A merge-robust backdoor that is specific to its trigger (with a larger poisoned
    # share the model emits the payload after any rare token, which is no trigger at all).
    poison = PoisonSpec(trigger="cf", target="visit evil site", fraction=0.1, robust=True,
                        robust_weight=1.0)
    b.finetune("evil/food-helper", task="food", seed=15, steps=120, poison=poison)
    b.merge("victim/food-kv-merge", method="task_arithmetic",
            parents=["evil/food-helper", "bob/kv-ft"], lambdas=[0.6, 0.6], declared=True,
            probe_backdoor="evil/food-helper")
    # Stealers whose cards hide the base: no card at all, or a card naming an unrelated
    # base. Only the weights tie them to the watched base (discovery finds them).
    b.merge("stealer/no-card-merge", method="task_arithmetic",
            parents=["alice/copy-ft", "dave/add-ft"], lambdas=[0.7, 0.5], declared=False,
            card_lie="no_card")
    b.merge("stealer/other-base-merge", method="linear",
            parents=["bob/kv-ft", "carol/animals-ft"], weights=[0.5, 0.5], declared=False,
            card_lie="unrelated_base", claimed_base="meta-llama/Llama-3.2-1B")


def _gpt2_small(b: _Builder) -> None:
    # The "small" zoo's shape on a GPT-2-style base (Conv1D weights, fused c_attn, tied
    # head), so the weights stage and lineage are exercised on a second real layout.
    b.base("gpt2lab/gpt2-tiny-base", steps=150, arch="gpt2")
    b.finetune("alice/gpt2-copy", task="copy", seed=1, steps=50)
    b.finetune("bob/gpt2-kv", task="kv", seed=2, steps=50)
    b.finetune("carol/gpt2-animals", task="animals", seed=3, steps=50)
    b.merge("erin/gpt2-blend", method="task_arithmetic",
            parents=["bob/gpt2-kv", "carol/gpt2-animals"], lambdas=[0.7, 0.5], declared=False)
    b.clone("mallory/gpt2-kv-v2", source="bob/gpt2-kv")


def _lineage_hard(b: _Builder) -> None:
    from auditor_testkit.factory.lineage_zoo import build_hard_lineage

    build_hard_lineage(b)


_SPECS: dict[str, Callable[[_Builder], None]] = {
    "small": _small, "lineage": _lineage, "demo": _demo, "gpt2-small": _gpt2_small,
    "lineage-hard": _lineage_hard,
}


def build_zoo(
    root: Path,
    *,
    spec: ZooSpec | str = "small",
    seed: int = 0,
    progress: Progress | None = None,
    force: bool = False,
) -> ZooManifest:
    """Build (or reuse) the zoo ``spec`` under ``root``; returns its ground truth.

    Reuse: when ``root/zoo.json`` matches spec, seed and ``FACTORY_VERSION`` and every
    published repo exists, nothing is trained (``force=True`` rebuilds).
    """
    if spec not in _SPECS:
        raise ValueError(f"unknown zoo spec {spec!r}; known: {', '.join(ZOO_SPECS)}")
    root = Path(root)
    if not force and (m := _cached(root, spec, seed)) is not None:
        if progress:
            progress(f"reusing zoo {spec} (seed {seed}) in {root}")
        return m
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    builder = _Builder(root, seed=seed, progress=progress)
    _SPECS[spec](builder)
    manifest = ZooManifest(
        spec=spec, seed=seed, entries=builder.entries,
        build_seconds=round(time.perf_counter() - start, 2),
    )
    (root / ZOO_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest


__all__ = [
    "FACTORY_VERSION",
    "ZOO_SPECS",
    "ParentRef",
    "ZooEntry",
    "ZooManifest",
    "build_zoo",
    "load_manifest",
]
