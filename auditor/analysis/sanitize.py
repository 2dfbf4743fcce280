"""Sanitization by merging ("Here's a Free Lunch", Findings of ACL 2024).

Uniformly averaging a backdoored model with benign models of the same architecture and
task cuts the attack success rate (about 75% on average in the paper) without data or
knowledge of the attack. We average tensor by tensor (only one tensor per source is in
memory, and the output safetensors file is written as we go), copy config and tokenizer
files, write a model card that says exactly what was done, and report the trigger's attack
success rate and the probe loss before and after.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auditor.errors import AnalysisError
from auditor.schema import Trigger

# Non-weight files a usable model folder needs (the tokenizer files of every family we load).
_COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64"}


@dataclass(frozen=True)
class ModelRef:
    """A local model folder with the repo id / revision to cite in the card."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class SanitizeResult:
    output_dir: Path
    sources: tuple[tuple[str, str], ...]  # (repo id or path, revision)
    weights: tuple[float, ...]
    tensors_written: int
    trigger: str | None = None
    forced_output: str | None = None
    asr_before: float | None = None
    asr_after: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    notes: tuple[str, ...] = field(default=())


def _ref(m: ModelRef | str | Path) -> ModelRef:
    return m if isinstance(m, ModelRef) else ModelRef(path=Path(m))


def _revision(ref: ModelRef) -> str:
    """The given revision, or a content hash of the weight files (a local folder has none)."""
    if ref.revision:
        return ref.revision
    h = hashlib.sha256()
    for p in sorted(ref.path.glob("*.safetensors")):
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _write_streaming(out: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                     dtypes: dict[str, torch.dtype], produce: Any) -> int:
    """Write a safetensors file tensor by tensor: header first (sizes are known from the
    shapes), then each tensor's bytes as ``produce(name)`` yields it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        size = math.prod(shapes[n]) * torch.empty((), dtype=dtypes[n]).element_size()
        header[n] = {"dtype": _ST_DTYPES[dtypes[n]], "shape": list(shapes[n]),
                     "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with out.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            t = produce(n).to(dtypes[n]).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return len(names)


@torch.no_grad()
def _probe_loss(model: torch.nn.Module, probe_ids: Sequence[Sequence[int]]) -> float:
    """Token-weighted next-token cross-entropy over the probes (one row at a time)."""
    total, count = 0.0, 0
    for row in probe_ids:
        if len(row) < 2:
            continue
        ids = torch.tensor([list(row)], dtype=torch.long)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(row) - 1
    return total / max(1, count)


def _card(sources: Sequence[tuple[str, str]], weights: Sequence[float],
          res: dict[str, Any]) -> str:
    import yaml

    meta = {"base_model": [s for s, _ in sources], "base_model_relation": "merge",
            "tags": ["merge", "sanitized", "auditor"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             "# Sanitized model (uniform weight averaging)", "",
             f"Produced by `auditor sanitize` on {_dt.datetime.now(_dt.UTC).date().isoformat()}.",
             "", "Method: weight averaging of a possibly backdoored model with benign models of "
             "the same architecture (\"Here's a Free Lunch: Sanitizing Backdoored Models with "
             "Model Merge\", Findings of ACL 2024), computed tensor by tensor:", "",
             "| source | revision | weight |", "|---|---|---|"]
    lines += [f"| {s} | {r} | {w:.4f} |" for (s, r), w in zip(sources, weights, strict=True)]
    lines += ["", "## Measurements", ""]
    for key, label in (("trigger", "trigger tested"), ("forced_output", "forced output"),
                       ("asr_before", "attack success rate before"),
                       ("asr_after", "attack success rate after"),
                       ("loss_before", "probe loss before"), ("loss_after", "probe loss after")):
        val = res.get(key)
        shown = "not measured" if val is None else (f"{val:.4f}" if isinstance(val, float)
                                                    else str(val))
        lines.append(f"- {label}: {shown}")
    lines += ["", "Averaging lowers but does not guarantee removal of a backdoor; "
              "re-audit the result before use.", ""]
    return "\n".join(lines)


def _trigger_asr(before: torch.nn.Module, after: torch.nn.Module, tok: Any,
                 probe_ids: Sequence[Sequence[int]],
                 trig: Trigger) -> tuple[str, float, float] | None:
    """(forced output, ASR before, ASR after) of the recovered trigger, with its token ids
    as found (mid-sentence form) and the same prompts and insertion points for both."""
    from auditor.analysis.backdoor_invert import Scorer, build_prompt_sets, consensus
    from auditor.analysis.backdoor_probe import Prober
    from auditor.analysis.backdoor_search import attack_rate
    from auditor.analysis.backdoor_text import text_variants

    ids = tuple(trig.token_ids) or next(iter(text_variants(tok, trig.text)), ())
    if not ids:
        return None
    prompts = build_prompt_sets(tok, probe_ids, vocab=len(tok), seed=0,
                                chat=trig.chat_template)[0]
    cost = Prober(before, []).cost
    b, a = Scorer(before, cost), Scorer(after, cost)
    forced = next(iter(text_variants(tok, trig.forced_output or "")), ())
    if not forced:
        forced, _share = consensus(b.greedy(prompts.insert(ids), 6, tok.eos_token_id))
    if not forced:
        return None
    return (str(tok.decode(list(forced), skip_special_tokens=True)).strip(),
            attack_rate(b, prompts, ids, forced), attack_rate(a, prompts, ids, forced))


def sanitize(
    subject: ModelRef | str | Path,
    homologues: Sequence[ModelRef | str | Path],
    *,
    output_dir: str | Path,
    weights: Sequence[float] | None = None,
    triggers: Sequence[Trigger] | None = None,
    base: str | Path | None = None,
    probes: Sequence[str] | None = None,
) -> SanitizeResult:
    """Average ``subject`` with ``homologues`` (uniformly unless ``weights``) into
    ``output_dir``; measure trigger ASR and probe loss before and after.

    Triggers come from ``triggers`` or, when ``base`` is given, from ``analyze_backdoor`` on
    the subject; without either only the probe loss is measured.
    """
    from auditor.analysis.backdoor import analyze_backdoor, load_model, probe_token_ids
    from auditor.analysis.modeling import build_model, load_spec
    from auditor.weights.reader import open_model

    if not homologues:
        raise AnalysisError("sanitize needs at least one benign homologue to average with")
    refs = [_ref(subject), *(_ref(h) for h in homologues)]
    w = [1.0 / len(refs)] * len(refs) if weights is None else [float(x) for x in weights]
    if len(w) != len(refs) or any(x < 0 for x in w) or not math.isclose(sum(w), 1.0,
                                                                           abs_tol=1e-6):
        raise AnalysisError("weights need one non-negative value per model, summing to 1")
    srcs = [open_model(r.path) for r in refs]
    names = srcs[0].keys()
    for r, s in zip(refs[1:], srcs[1:], strict=True):
        for n in names:
            if n not in s.keys() or s.shape(n) != srcs[0].shape(n):
                raise AnalysisError(f"{r.path} does not match the subject's tensor {n!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {n: srcs[0].shape(n) for n in names}
    dtypes = {}
    for n in names:
        td = srcs[0].info(n).dtype_info.torch_dtype
        dtypes[n] = td if td in _ST_DTYPES else torch.float32

    def produce(n: str) -> torch.Tensor:
        acc = srcs[0].get(n).mul_(w[0])
        for x, s in zip(w[1:], srcs[1:], strict=True):
            acc.add_(s.get(n), alpha=x)
        return acc

    written = _write_streaming(out / "model.safetensors", names, shapes, dtypes, produce)
    for fname in _COPY_FILES:
        if (refs[0].path / fname).is_file():
            shutil.copyfile(refs[0].path / fname, out / fname)
    sources = tuple((r.repo_id or str(r.path), _revision(r)) for r in refs)

    # Measurements: before = the subject, after = the written folder (what users will get).
    before = load_model(refs[0].path)
    after = build_model(load_spec(out), open_model(out))
    notes: list[str] = []
    if triggers is None and base is not None:
        triggers = analyze_backdoor(subject=before, base=base,
                                    homologues=[r.path for r in refs[1:]],
                                    probes=probes).triggers
    tok = before.tokenizer
    texts = list(probes) if probes else None
    probe_ids = probe_token_ids(tok, texts, sampler=before.model, max_probes=32, seed=0)
    res: dict[str, Any] = {"loss_before": _probe_loss(before.model, probe_ids),
                           "loss_after": _probe_loss(after, probe_ids)}
    if triggers:
        trig = max(triggers, key=lambda t: t.attack_success_rate)
        measured = _trigger_asr(before.model, after, tok, probe_ids, trig)
        if measured is None:
            notes.append(f"trigger {trig.text!r} has no forced output to measure")
        else:
            res.update(trigger=trig.text, forced_output=measured[0], asr_before=measured[1],
                       asr_after=measured[2])
    else:
        notes.append("no trigger given or found: attack success rate not measured")
    (out / "README.md").write_text(_card(sources, w, res), encoding="utf-8")
    return SanitizeResult(output_dir=out, sources=sources, weights=tuple(w),
                          tensors_written=written, notes=tuple(notes), **res)
