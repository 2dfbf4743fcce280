"""A real-shape model family, written tensor by tensor: never built in CI (benchmarks only).

``LLAMA_1B`` is shaped like Llama-3.2-1B (hidden 2048, 16 layers, 32 query heads and 8 kv
heads, intermediate 8192, vocab 128256, tied embeddings, bf16), written as sharded
safetensors with an index. Weights are random (seeded), so the family builds in minutes:

* the base: N(0, 0.02) matrices, norms near 1;
* fine-tunes: base + a task vector that is low-rank plus noise (``TaskVector``);
* merges (``Recipe``): linear, task arithmetic, TIES, DARE of fine-tunes;
* a disguised copy of any recipe: MLP neurons permuted and rescaled, and per kv group a
  scalar on Q/K and on V/O (function-preserving);
* a PEFT LoRA adapter on q/v.

Every tensor is a pure function of (seeds, name, rows), so a merge regenerates its parents'
task vectors instead of reading them back, and no model is ever held whole in memory: the
peak is one layer tensor (or one block of embedding rows) per term.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor_testkit.factory.save import CardSpec, write_hubmeta, write_model_card

_ROW_BLOCK = 8192
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class RealShape:
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 8192
    vocab: int = 128256
    tied: bool = True
    max_shard_bytes: int = 1 << 30

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "torch_dtype": "bfloat16",
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, hd = self.hidden, self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.heads * hd, h),
                p + "self_attn.k_proj.weight": (self.kv_heads * hd, h),
                p + "self_attn.v_proj.weight": (self.kv_heads * hd, h),
                p + "self_attn.o_proj.weight": (h, self.heads * hd),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            }
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())


LLAMA_1B = RealShape()
# Same structure, test-sized: what the tests build (seconds, kilobytes).
TINY = RealShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                 max_shard_bytes=40_000)


def _gen(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _block_randn(key: tuple[object, ...], shape: tuple[int, ...], r0: int,
                 r1: int) -> torch.Tensor:
    """Rows r0:r1 of a seeded normal tensor generated in fixed row blocks, so any slice
    of it is the same whichever way the writer cuts the rows."""
    parts = []
    for b0 in range(r0 - r0 % _ROW_BLOCK, r1, _ROW_BLOCK):
        b1 = min(shape[0], b0 + _ROW_BLOCK)
        blk = torch.randn((b1 - b0, *shape[1:]), generator=_gen(*key, b0))
        parts.append(blk[max(r0, b0) - b0:min(r1, b1) - b0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def base_rows(seed: int, name: str, shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the base's tensor ``name``."""
    if len(shape) == 1:
        g = _gen("base", seed, name)
        return 1.0 + 0.02 * torch.randn(shape, generator=g)[r0:r1]
    return 0.02 * _block_randn(("base", seed, name), shape, r0, r1)


@dataclass(frozen=True)
class TaskVector:
    """A fine-tune's update: rank-``rank`` product plus noise, ``scale`` x the base's std."""

    seed: int
    rank: int = 8
    scale: float = 0.1
    noise_share: float = 0.3

    def _factors(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen("tv", self.seed, name)
        u = torch.randn(shape[0], self.rank, generator=g)
        v = torch.randn(self.rank, shape[1], generator=g)
        return u, v

    def rows(self, name: str, shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
        std = 0.02 * self.scale
        if len(shape) == 1:
            return std * torch.randn(shape, generator=_gen("tv1", self.seed, name))[r0:r1]
        u, v = self._factors(name, shape)
        low = (u[r0:r1] @ v) / math.sqrt(self.rank)
        noise = _block_randn(("tvn", self.seed, name), shape, r0, r1)
        a, b = math.sqrt(1 - self.noise_share), math.sqrt(self.noise_share)
        return std * (a * low + b * noise)

    def at(self, name: str, shape: tuple[int, ...], flat: np.ndarray) -> torch.Tensor:
        """Values at flat coordinates only (synthetic fingerprints: no full tensor)."""
        std = 0.02 * self.scale
        if len(shape) == 1:
            return std * torch.randn(shape, generator=_gen("tv1", self.seed, name))[flat]
        u, v = self._factors(name, shape)
        idx = torch.from_numpy(flat)
        i, j = idx // shape[1], idx % shape[1]
        low = (u[i] * v[:, j].T).sum(1) / math.sqrt(self.rank)
        noise = torch.randn(len(flat), generator=_gen("tvs", self.seed, name))
        a, b = math.sqrt(1 - self.noise_share), math.sqrt(self.noise_share)
        return std * (a * low + b * noise)


@dataclass(frozen=True)
class Disguise:
    """Function-preserving: MLP permutation + up/down scales, per kv-group Q/K, V/O scalars."""

    seed: int
    scale_range: tuple[float, float] = (0.5, 2.0)

    def _logu(self, g: torch.Generator, n: int) -> torch.Tensor:
        lo, hi = (math.log(x) for x in self.scale_range)
        return torch.exp(lo + torch.rand(n, generator=g) * (hi - lo))

    def apply(self, name: str, t: torch.Tensor, shape: RealShape) -> torch.Tensor:
        m = _LAYER.match(name)
        if m is None:
            return t
        layer = int(m.group(1))
        g = _gen("disg", self.seed, layer)
        perm = torch.randperm(shape.intermediate, generator=g)
        c = self._logu(g, shape.intermediate)
        a = self._logu(g, shape.kv_heads)
        b = self._logu(g, shape.kv_heads)
        hd, group = shape.head_dim, shape.heads // shape.kv_heads
        per_q = a.repeat_interleave(group * hd)
        if name.endswith("mlp.gate_proj.weight"):
            return t[perm]
        if name.endswith("mlp.up_proj.weight"):
            return t[perm] * c[:, None]
        if name.endswith("mlp.down_proj.weight"):
            return t[:, perm] / c[None, :]
        if name.endswith("q_proj.weight"):
            return t * per_q[:, None]
        if name.endswith("k_proj.weight"):
            return t / a.repeat_interleave(hd)[:, None]
        if name.endswith("v_proj.weight"):
            return t * b.repeat_interleave(hd)[:, None]
        if name.endswith("o_proj.weight"):
            return t / b.repeat_interleave(group * hd)[None, :]
        return t


@dataclass(frozen=True)
class Recipe:
    """theta = base + sum_i coef_i * f_i(tau_i), with ``method`` deciding f (per row block).

    ``linear`` with weights w summing to 1 is task arithmetic with the same coefficients.
    ``ties``: per block keep each tau's top ``density`` magnitudes, elect a sign, average
    the agreeing entries (times ``coefs[0]``). ``dare``: drop with probability ``drop``,
    rescale by 1 / (1 - drop).
    """

    base_seed: int
    taus: tuple[TaskVector, ...] = ()
    coefs: tuple[float, ...] = ()
    method: str = "ta"
    density: float = 0.3
    drop: float = 0.5
    mix_seed: int = 0
    disguise: Disguise | None = None
    # The base already written (a TensorSource): its rows are read back instead of drawn
    # again, which halves the cost of building a family (bf16-rounded base, as on the Hub).
    base_source: Any = field(default=None, compare=False)

    def rows(self, name: str, shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
        if self.base_source is not None:
            out = (self.base_source.get_rows(name, r0, r1) if len(shape) == 2
                   else self.base_source.get(name)[r0:r1])
        else:
            out = base_rows(self.base_seed, name, shape, r0, r1)
        taus = [t.rows(name, shape, r0, r1) for t in self.taus]
        if not taus:
            return out
        if self.method in ("ta", "linear"):
            for c, t in zip(self.coefs, taus, strict=True):
                out.add_(t, alpha=c)
        elif self.method == "dare":
            for k, (c, t) in enumerate(zip(self.coefs, taus, strict=True)):
                z = _block_randn(("dare", self.mix_seed, k, name), shape, r0, r1)
                keep = torch.special.ndtr(z) >= self.drop  # uniform, block-stable
                out.add_(t * keep / (1 - self.drop), alpha=c)
        elif self.method == "ties":
            trimmed = []
            for t in taus:
                k = max(1, int(self.density * t.numel()))
                thr = t.abs().flatten().kthvalue(t.numel() - k + 1).values
                trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
            stack = torch.stack(trimmed)
            sign = torch.sign(stack.sum(0))
            agree = (torch.sign(stack) == sign) & (stack != 0)
            num = (stack * agree).sum(0)
            merged = num / agree.sum(0).clamp_min(1)
            out.add_(merged, alpha=self.coefs[0])
        else:
            raise ValueError(f"unknown merge method {self.method!r}")
        return out


# ---------------------------------------------------------------- writing
_BF16 = "BF16"


def _chunks(recipe: Recipe, name: str, shape: tuple[int, ...],
            rs: RealShape) -> Iterator[torch.Tensor]:
    if recipe.disguise is not None and _LAYER.match(name) and len(shape) == 2:
        yield recipe.disguise.apply(name, recipe.rows(name, shape, 0, shape[0]), rs)
        return
    if len(shape) == 1:
        yield recipe.rows(name, shape, 0, shape[0])
        return
    for r0 in range(0, shape[0], _ROW_BLOCK):
        yield recipe.rows(name, shape, r0, min(shape[0], r0 + _ROW_BLOCK))


def write_sharded(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    produce: Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]],
    *,
    max_shard_bytes: int,
) -> list[str]:
    """Sharded bf16 safetensors + index, streamed: headers first, then each tensor's
    bytes as its row blocks are produced (no tensor is held whole unless it must be)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = 2 * math.prod(shapes[n])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files: list[str] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in shard:
            nbytes = 2 * math.prod(shapes[n])
            header[n] = {"dtype": _BF16, "shape": list(shapes[n]),
                         "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (directory / fname).open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for n in shard:
                for chunk in produce(n, shapes[n]):
                    fh.write(chunk.to(torch.bfloat16).contiguous().view(torch.uint8)
                             .numpy().tobytes())
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(2 * math.prod(s) for s in shapes.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        files.append("model.safetensors.index.json")
    return files


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer with exactly ``vocab`` entries: specials, the probe texts'
    words (so built-in probes tokenize), then filler tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from auditor.analysis.probes import read_probe_texts

    words: list[str] = ["<pad>", "<bos>", "<eos>", "<unk>"]
    seen = set(words)
    for text in read_probe_texts():
        for w in text.split():
            if w not in seen and len(words) < vocab:
                seen.add(w)
                words.append(w)
    words += [f"tok{i}" for i in range(vocab - len(words))]
    table = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))  # noqa: S106
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "model_max_length": 2048}))


@dataclass
class BuiltModel:
    repo_id: str
    path: Path
    recipe: Recipe | None = None
    truth: dict[str, Any] = field(default_factory=dict)


def write_model(root: Path, repo_id: str, recipe: Recipe, rs: RealShape, *,
                card: CardSpec, created_at: str | None = None) -> BuiltModel:
    org, _, name = repo_id.partition("/")
    directory = root / org / name
    write_sharded(directory, rs.shapes(), lambda n, s: _chunks(recipe, n, s, rs),
                  max_shard_bytes=rs.max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(rs.config(), indent=1))
    write_tokenizer(directory, rs.vocab)
    write_model_card(directory, card, repo_id=repo_id)
    write_hubmeta(directory, created_at=created_at)
    return BuiltModel(repo_id=repo_id, path=directory, recipe=recipe)


def write_lora(root: Path, repo_id: str, *, base_repo: str, rs: RealShape, seed: int,
               rank: int = 16, created_at: str | None = None) -> BuiltModel:
    """A PEFT LoRA adapter on q_proj and v_proj (B random too: a trained-looking delta)."""
    from safetensors.torch import save_file

    org, _, name = repo_id.partition("/")
    directory = root / org / name
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, shape in rs.shapes().items():
        if not n.endswith(("q_proj.weight", "v_proj.weight")):
            continue
        mod = n.removesuffix(".weight")
        g = _gen("lora", seed, n)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = (
            torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])).to(torch.bfloat16)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = (
            0.002 * torch.randn(shape[0], rank, generator=g)).to(torch.bfloat16)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base_repo,
        "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}))
    write_model_card(directory, CardSpec(base_model=base_repo, base_model_relation="adapter"),
                     repo_id=repo_id)
    write_hubmeta(directory, created_at=created_at)
    return BuiltModel(repo_id=repo_id, path=directory)


def synthetic_fingerprint(tau: TaskVector, rs: RealShape, *, sample_size: int | None = None
                          ) -> Any:
    """The fingerprint of base + ``tau`` without building it: samples at the fingerprint's
    coordinates, squared norms estimated from the samples (for stored homologues in
    benchmarks, where writing 50 models of 2.5 GB is not an option)."""
    from auditor.analysis.fingerprint import (
        DEFAULT_SAMPLE_SIZE,
        Fingerprint,
        TensorPrint,
        layer_group,
        sample_indices,
    )

    k = sample_size or DEFAULT_SAMPLE_SIZE
    prints = {}
    for name, shape in rs.shapes().items():
        idx = sample_indices(name, shape, k)
        vals = tau.at(name, shape, idx)
        numel = math.prod(shape)
        sq = float(vals.double().pow(2).sum()) * numel / len(idx)
        prints[name] = TensorPrint(name=name, shape=tuple(shape), numel=numel, sq_norm=sq,
                                   zero_fraction=0.0, group=layer_group(name),
                                   sample=vals.numpy().astype(np.float32))
    return Fingerprint(tensors=prints, sample_size=k)


def family_recipes(*, base_seed: int, tau_seeds: Sequence[int]) -> list[TaskVector]:
    return [TaskVector(seed=s) for s in tau_seeds]
