"""Discovery and screening: bytes read per candidate, and screening vs full-read verdicts.

Part 1 (product path: ``crawl_base`` of the daemon against ``serve-hub``): a hub of
models with real vocabulary size (32,000) and bf16 weights, drawn at random per run
(seeds, fine-tune strengths, merge coefficients): derivatives of the watched base with
honest, missing and lying cards, same-architecture models of an unrelated base, another
width. Prints the bytes discovery read per candidate: at most 1% of an unrelated one's
weight bytes, at most 5% of a screened derivative's.

Part 2: the factory's lineage zoo (built or reused under --zoo). Every published subject
is screened against the homologues published before it, once from sampled rows (at most
5% of its bytes) and once from a full read of the same tensors; prints both verdicts
(clone / merge(parents) / finetune), the bytes share, and whether the sampled verdict was
borderline (then the full read decides, as in the product).

    python benchmarks/bench_discovery.py [--zoo /tmp/lineage-zoo] [--ignore-range]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from auditor_testkit.factory.random_llama import random_llama


# --- part 1 ------------------------------------------------------------------------------
def _llama(seed: int, *, hidden: int, inter: int, layers: int, vocab: int
           ) -> dict[str, torch.Tensor]:
    return random_llama(seed, hidden=hidden, inter=inter, layers=layers, vocab=vocab, std=0.02)


def _delta(sd: dict[str, torch.Tensor], seed: int, rel: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.02 * rel if v.dim() > 1 else v
            for k, v in sd.items()}


def _write(root: Path, repo: str, sd: dict[str, torch.Tensor], card: dict[str, Any] | None,
           config: dict[str, Any], hour: int) -> None:
    import json

    import yaml
    from safetensors.torch import save_file

    d = root / repo
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    if card is not None:
        card = {"library_name": "transformers", **card}
        (d / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n# Model\n")
    (d / ".hubmeta.json").write_text(json.dumps(
        {"createdAt": f"2025-05-{1 + hour // 24:02d}T{hour % 24:02d}:00:00Z"}))


def part1(tmp: Path, *, ignore_range: bool) -> bool:
    from auditor.daemon.crawler import crawl_base
    from auditor.hub.client import HubClient
    from auditor.store.db import make_engine, session_factory, upgrade_database
    from auditor_testkit.hub.server import HubServer

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    shape = {"hidden": 256, "inter": 688, "layers": 4, "vocab": 32000}
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "vocab_size": 32000, "num_attention_heads": 4}
    root = tmp / "hub"
    base_id = f"org{rng.randrange(1000)}/base-{rng.randrange(1000)}"
    other_id = f"other{rng.randrange(1000)}/base"
    base = _llama(seed, **shape)
    other = _llama(seed + 1, **shape)
    fts = [_delta(base, seed + 10 + i, rng.uniform(0.05, 0.3)) for i in range(3)]
    c = rng.uniform(0.3, 0.7)
    merge = {k: c * fts[0][k] + (1 - c) * fts[1][k] for k in base}
    models: list[tuple[str, dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any],
                       bool]] = [
        (base_id, base, {"license": "mit"}, cfg, False),
        (other_id, other, {"license": "mit"}, cfg, False),
        ("alice/ft", fts[0], {"base_model": base_id}, cfg, True),
        ("bob/ft", fts[1], {"base_model": base_id}, cfg, True),
        ("ghost/ft-nocard", fts[2], None, cfg, True),
        ("ghost/merge-nocard", merge, None, cfg, True),
        ("liar/merge-otherbase", merge | {}, {"base_model": other_id,
                                              "base_model_relation": "finetune"}, cfg, True),
        ("other/ft", _delta(other, seed + 20, 0.2), {"base_model": other_id}, cfg, False),
        ("stranger/scratch", _llama(seed + 30, **shape), None, cfg, False),
        ("wide/model", _llama(seed + 40, **{**shape, "hidden": 320}),
         {"license": "mit"}, {**cfg, "hidden_size": 320}, False),
    ]
    truth = {m[0]: m[4] for m in models}
    t0 = time.perf_counter()
    for hour, (repo, sd, card, config, _d) in enumerate(models):
        _write(root, repo, sd, card, config, hour)
    print(f"part 1: wrote {len(models)} repos (vocab 32000, bf16, seed {seed}) in "
          f"{time.perf_counter() - t0:.1f}s; server ignores Range: {ignore_range}")
    url = f"sqlite:///{tmp / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    ok = True
    with HubServer(root, ignore_range=ignore_range) as srv:
        client = HubClient(endpoint=srv.url, token=None, cache_dir=tmp / "cache",
                           disk_budget_bytes=None)
        t0 = time.perf_counter()
        with session_factory(engine)() as session:
            result = crawl_base(session, client, base_id, config_hash="bench")
        seconds = time.perf_counter() - t0
    engine.dispose()
    queued = set(result.new_repos)
    print(f"{'candidate':24s} {'truth':10s} {'stage':9s} {'verdict':8s} {'bytes':>10s} "
          f"{'on wire':>10s} {'of':>11s} {'share':>7s}")
    for e in result.examinations:
        derivative = truth.get(e.repo_id, False)
        limit = 0.05 if e.related else 0.01
        wire = max(e.bytes_transferred, e.bytes_read)
        share = wire / e.total_bytes if e.total_bytes else 0.0
        within = share <= limit
        ok &= within and bool(e.related) == derivative
        print(f"{e.repo_id:24s} {'derivative' if derivative else 'unrelated':10s} "
              f"{e.stage:9s} {e.related!s:8s} {e.bytes_read:10d} {wire:10d} "
              f"{e.total_bytes:11d} {share:7.2%} "
              f"{'ok' if within else 'OVER ' + format(limit, '.0%')}")
    missed = {r for r, d in truth.items() if d} - queued
    wrong = {r for r, d in truth.items() if not d} & queued
    ok &= not missed and not wrong
    print(f"crawl {seconds:.1f}s; derivatives queued {len(queued)}/"
          f"{sum(truth.values())}; missed {sorted(missed)}; unrelated queued {sorted(wrong)}")
    return ok


# --- part 2 ------------------------------------------------------------------------------
def part2(zoo_root: Path) -> bool:
    from auditor.analysis.screening import screen
    from auditor.daemon.discovery import load_base_profile
    from auditor.hub.client import HubClient
    from auditor.weights.sampling import compare_shapes, plan_samples, read_full, read_samples
    from auditor_testkit.factory.zoo import build_zoo
    from auditor_testkit.hub.server import HubServer

    manifest = build_zoo(zoo_root, spec="lineage", progress=print)
    seed = random.randrange(1 << 30)
    subjects = [e for e in manifest.entries
                if e.published and e.kind not in ("base", "adapter")]
    print(f"part 2: lineage zoo ({len(subjects)} subjects), sampling seed {seed}")
    ok = True
    agree = borderline = 0
    with HubServer(zoo_root) as srv:
        client = HubClient(endpoint=srv.url, token=None, cache_dir=zoo_root / ".cache",
                           disk_budget_bytes=None)
        profile = load_base_profile(client, manifest.base.repo_id, seed=seed)
        opened: dict[str, Any] = {}

        def open_repo(repo: str) -> Any:
            if repo not in opened:
                from auditor.daemon.discovery import _sources_for
                from auditor.weights.sampling import read_layout

                resolved = client.resolve(repo)
                layout, sources = read_layout(_sources_for(client, resolved,
                                                           max_stream_bytes=None),
                                              resolved.files)
                opened[repo] = (layout, sources,
                                compare_shapes(profile.layout.tensors, layout.tensors))
            return opened[repo]

        print(f"{'subject':24s} {'truth':28s} {'sampled':34s} {'full read':34s} "
              f"{'share':>6s} stab")
        for i, e in enumerate(subjects):
            layout, sources, match = open_repo(e.repo_id)
            before = sum(s.bytes_read for s in sources.values())
            homs = [h.repo_id for h in subjects[:i]]
            chunks = plan_samples(match, profile.layout.tensors, layout.tensors, seed=seed,
                                  budget_bytes=int(layout.total_bytes * 0.05) - before,
                                  max_tensors=16, max_chunks=256)
            sub = read_samples(chunks, layout, sources, names=match.pairs)
            share = sum(s.bytes_read for s in sources.values()) / layout.total_bytes
            base = read_samples(chunks, profile.layout, profile.sources)
            hs = {h: read_samples(chunks, open_repo(h)[0], open_repo(h)[1],
                                  names=open_repo(h)[2].pairs) for h in homs}
            sampled = screen(sub, base, hs, seed=seed)
            tensors = sorted({c.tensor for c in chunks})
            rows = min(layout.tensors[match.pairs[t]].shape[0] for t in tensors)

            def rows_of(full: dict[str, torch.Tensor], tensors: list[str] = tensors,
                        rows: int = rows) -> list[torch.Tensor]:
                return [r for t in tensors for r in full[t][:rows]]

            full_sub = rows_of(read_full(layout, sources, tensors, names=match.pairs))
            full_base = rows_of(read_full(profile.layout, profile.sources, tensors))
            full_h = {h: rows_of(read_full(open_repo(h)[0], open_repo(h)[1], tensors,
                                           names=open_repo(h)[2].pairs)) for h in homs}
            full = screen(full_sub, full_base, full_h, seed=seed)
            final = full.verdict if sampled.borderline else sampled.verdict
            borderline += sampled.borderline
            same = final == full.verdict
            agree += same
            ok &= same and share <= 0.05
            truth = f"{e.kind}({', '.join(p.repo_id for p in e.parents)})"
            print(f"{e.repo_id:24s} {truth[:28]:28s} {sampled.verdict.describe()[:34]:34s} "
                  f"{full.verdict.describe()[:34]:34s} {share:6.2%} "
                  f"{sampled.stability:.2f}{' borderline->full' if sampled.borderline else ''}")
        profile.close()
    print(f"verdict agreement screening vs full read: {agree}/{len(subjects)} "
          f"({borderline} borderline, decided by the full read)")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("/tmp/lineage-zoo"))
    ap.add_argument("--ignore-range", action="store_true",
                    help="part 1 against a server that ignores Range (answers 200)")
    ap.add_argument("--skip-zoo", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ok1 = part1(Path(tmp), ignore_range=args.ignore_range)
    ok2 = True if args.skip_zoo else part2(args.zoo)
    print(f"RESULT part1 {'PASS' if ok1 else 'FAIL'}; part2 "
          f"{'skipped' if args.skip_zoo else 'PASS' if ok2 else 'FAIL'}")


if __name__ == "__main__":
    main()
