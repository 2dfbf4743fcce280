"""Cost of a loss barrier per candidate, and of a protection check, on factory models.

Prints forward passes, tokens, seconds and peak RSS for: building the probes, one
11-point barrier per candidate (related fine-tune, unrelated model, protected copy), the
function distance, and a full protection assessment with two homologues.

    .venv/bin/python benchmarks/bench_barrier.py [--size tiny|small] [--points 11]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from auditor.analysis.barrier import function_distance, loss_path
    from auditor.analysis.modeling import build_model, spec_from_config
    from auditor.analysis.probes import build_probes
    from auditor.analysis.protection import assess_protection_detailed
    from auditor_testkit.factory.base import make_base
    from auditor_testkit.factory.disguise import protect
    from auditor_testkit.factory.train import finetune

    t0 = time.perf_counter()
    base, tok = make_base(seed=0, size=args.size)
    other, _ = make_base(seed=1, size=args.size)

    def sd(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    subject = sd(finetune(base, tok, task="copy", seed=1))
    candidates = {
        "homologue (copy, seed 2)": sd(finetune(base, tok, task="copy", seed=2)),
        "sibling (sort)": sd(finetune(base, tok, task="sort", seed=3)),
        "unrelated base": sd(other),
        "protected copy": dict(protect(subject, num_heads=base.config.num_attention_heads,
                                       seed=5).state_dict),
    }
    n_params = sum(v.numel() for v in subject.values())
    print(f"factory models ({args.size}, {n_params / 1e6:.2f}M params) trained in "
          f"{time.perf_counter() - t0:.1f}s; peak RSS {peak_rss_mb():.0f} MB")

    spec = spec_from_config(base.config.to_dict())
    probes = build_probes(tokenizer=tok, sampler=base)
    c = probes.cost.snapshot()
    print(f"probes: {len(probes)} rows, {probes.n_tokens} tokens, origins "
          f"{ {o: probes.origins.count(o) for o in set(probes.origins)} }; building cost "
          f"{c.forward_passes} passes, {c.tokens} tokens, {c.seconds:.2f}s")

    work = build_model(spec, subject)
    header = f"{'candidate':28} {'barrier':>8} {'rel':>6} {'passes':>7} {'tokens':>8} {'sec':>6}"
    print(header)
    for name, cand in candidates.items():
        before = probes.cost.snapshot()
        wall = time.perf_counter()
        curve = loss_path(spec, subject, cand, probes=probes, points=args.points, model=work)
        wall = time.perf_counter() - wall
        spent = probes.cost.snapshot().minus(before)
        print(f"{name:28} {curve.barrier:8.3f} {curve.relative_barrier:6.3f} "
              f"{spent.forward_passes:7d} {spent.tokens:8d} {wall:6.2f}")

    before = probes.cost.snapshot()
    wall = time.perf_counter()
    kl = function_distance(spec, subject, candidates["protected copy"], probes=probes,
                           model=work)
    spent = probes.cost.snapshot().minus(before)
    print(f"function distance to protected copy: {kl:.2e} "
          f"({spent.forward_passes} passes, {time.perf_counter() - wall:.2f}s)")

    wall = time.perf_counter()
    a = assess_protection_detailed(
        spec, sd(base), candidates["protected copy"],
        homologues=[candidates["homologue (copy, seed 2)"], candidates["sibling (sort)"]],
        probes=probes, work=work,
    )
    assert a.cost is not None
    print(f"protection (protected copy, 2 homologues): resistant={a.info.merge_resistant} "
          f"ratio={a.info.merged_loss_ratio:.2f} cliff={a.info.scale_cliff}; "
          f"{a.cost.forward_passes} passes, {a.cost.tokens} tokens, "
          f"{time.perf_counter() - wall:.2f}s")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
