"""A local hub for discovery tests: derivatives of a watched base with honest, missing and
lying cards, unrelated models of the same architecture, and other architectures.

No training: weights are seeded random tensors; a fine-tune adds a seeded delta, a merge
mixes fine-tunes linearly. Sizes are small but big enough that 1% of a file holds its
header and a probe (hidden 64, vocabulary 2048).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auditor_testkit.factory.random_llama import random_llama
from tests.fixtures_hub import make_repo

WATCHED = "acme/base"
UNRELATED_BASE = "other/base"


def llama_config(*, hidden: int = 64, inter: int = 128, layers: int = 2, vocab: int = 2048
                 ) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": hidden // 4, "vocab_size": vocab,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "hidden_act": "silu",
    }


def llama_tensors(seed: int, *, hidden: int = 64, inter: int = 128, layers: int = 2,
                  vocab: int = 2048) -> dict[str, torch.Tensor]:
    return random_llama(seed, hidden=hidden, inter=inter, layers=layers, vocab=vocab, std=0.05)


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale if v.dim() > 1 else v.clone()
            for k, v in base.items()}


def mix(parts: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    return {k: sum(c * sd[k] for c, sd in parts) for k in parts[0][1]}  # type: ignore[misc]


@dataclass
class DiscoveryZoo:
    root: Path
    derivatives: dict[str, str] = field(default_factory=dict)  # repo -> how its card lies
    unrelated: list[str] = field(default_factory=list)
    lying: dict[str, str] = field(default_factory=dict)  # repo -> expected lie kind


def iso(hours: int) -> str:
    return f"2025-02-{1 + hours // 24:02d}T{hours % 24:02d}:00:00Z"


def build(root: Path, *, seed: int = 0, scale: float = 0.01) -> DiscoveryZoo:
    """Write the zoo under ``root``; ``seed`` moves every weight and delta."""
    zoo = DiscoveryZoo(root=root)
    cfg = llama_config()
    hour = 0

    def put(repo: str, sd: dict[str, torch.Tensor], card: dict[str, Any] | None, *,
            config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
        nonlocal hour
        hour += 1
        if card is not None:
            card = {"library_name": "transformers", **card}
        make_repo(root, repo, sd, card, config=config or cfg,
                  meta={"createdAt": iso(hour)}, **(extra or {}))

    base = llama_tensors(seed)
    put(WATCHED, base, {"license": "apache-2.0"})
    other = llama_tensors(seed + 500)
    put(UNRELATED_BASE, other, {"license": "mit"})
    zoo.unrelated.append(UNRELATED_BASE)

    ft = {f"ft{i}": finetune(base, seed + i, scale) for i in range(4)}
    # Declared fine-tunes and a declared merge: the card is honest.
    put("alice/ft-declared", ft["ft0"], {"base_model": WATCHED, "base_model_relation":
                                         "finetune"})
    zoo.derivatives["alice/ft-declared"] = "declared"
    put("bob/ft-declared", ft["ft1"], {"base_model": WATCHED, "base_model_relation": "finetune"})
    zoo.derivatives["bob/ft-declared"] = "declared"
    put("mkit/merge-declared", mix([(0.5, ft["ft0"]), (0.5, ft["ft1"])]),
        {"base_model": ["alice/ft-declared", "bob/ft-declared"], "base_model_relation": "merge",
         "tags": ["merge", "mergekit"]})
    zoo.derivatives["mkit/merge-declared"] = "declared"
    # Undeclared: no card at all (a fine-tune and a merge).
    put("ghost/ft-nocard", ft["ft2"], None)
    zoo.derivatives["ghost/ft-nocard"] = "no card"
    zoo.lying["ghost/ft-nocard"] = "no_card"
    put("ghost/merge-nocard", mix([(0.6, ft["ft0"]), (0.4, ft["ft2"])]), None)
    zoo.derivatives["ghost/merge-nocard"] = "no card"
    zoo.lying["ghost/merge-nocard"] = "no_card"
    # Lying cards: another base, "finetune" for a merge of another base.
    put("liar/ft-otherbase", ft["ft3"], {"base_model": UNRELATED_BASE,
                                         "base_model_relation": "finetune"})
    zoo.derivatives["liar/ft-otherbase"] = "names another base"
    zoo.lying["liar/ft-otherbase"] = "other_base"
    put("liar/merge-as-ft", mix([(0.5, ft["ft1"]), (0.5, ft["ft3"])]),
        {"base_model": UNRELATED_BASE, "base_model_relation": "finetune"})
    zoo.derivatives["liar/merge-as-ft"] = "names another base, says finetune"
    zoo.lying["liar/merge-as-ft"] = "other_base"
    put("liar/merge-says-ft", mix([(0.7, ft["ft0"]), (0.3, ft["ft3"])]),
        {"base_model": WATCHED, "base_model_relation": "finetune"})
    zoo.derivatives["liar/merge-says-ft"] = "declared base, says finetune for a merge"
    zoo.lying["liar/merge-says-ft"] = "finetune_for_merge"
    put("liar/wrong-parents", mix([(0.5, ft["ft0"]), (0.5, ft["ft2"])]),
        {"base_model": ["alice/ft-declared", "bob/ft-declared"],
         "base_model_relation": "merge", "tags": ["merge"]})
    zoo.derivatives["liar/wrong-parents"] = "declared merge, names a parent it does not use"
    zoo.lying["liar/wrong-parents"] = "wrong_parents"
    # Disguised layouts: renamed prefix, resized vocabulary, half precision.
    renamed = {("transformer." + k[len("model."):]) if k.startswith("model.") else k: v
               for k, v in finetune(base, seed + 7, scale).items()}
    put("ghost/renamed", renamed, None)
    zoo.derivatives["ghost/renamed"] = "no card, renamed prefix"
    resized = finetune(base, seed + 8, scale)
    g = torch.Generator().manual_seed(seed + 9)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        resized[k] = torch.cat([resized[k], torch.randn(64, resized[k].shape[1], generator=g)
                                * 0.05])
    put("ghost/resized", resized, None, config={**cfg, "vocab_size": 2048 + 64})
    zoo.derivatives["ghost/resized"] = "no card, resized vocabulary"
    put("ghost/half", {k: v.to(torch.float16) for k, v in ft["ft2"].items()}, None)
    zoo.derivatives["ghost/half"] = "no card, float16 copy"
    # Same architecture, unrelated base: never a derivative (one declares its own base).
    put("other/ft", finetune(other, seed + 20, scale), {"base_model": UNRELATED_BASE,
                                                       "base_model_relation": "finetune"})
    zoo.unrelated.append("other/ft")
    put("stranger/scratch", llama_tensors(seed + 700), None)
    zoo.unrelated.append("stranger/scratch")
    # Other architectures: wider llama, a GPT-2.
    wide = llama_config(hidden=128)
    put("wide/model", llama_tensors(seed + 800, hidden=128), {"license": "mit"}, config=wide)
    zoo.unrelated.append("wide/model")
    g2 = torch.Generator().manual_seed(seed + 900)
    gpt2 = {"transformer.wte.weight": torch.randn(2048, 64, generator=g2),
            "transformer.h.0.attn.c_attn.weight": torch.randn(64, 192, generator=g2)}
    put("gpt/model", gpt2, {"license": "mit"}, config={"model_type": "gpt2", "n_embd": 64})
    zoo.unrelated.append("gpt/model")
    return zoo
