"""Cost of hostile inputs that used to amplify: prints seconds and peak RSS growth.

- a safetensors header of N zero-size tensors (default 1.5 M, ~89 MB; was 70 s / 1.67 GB):
  refused by the tensor-count limit before the JSON is parsed;
- the same header with the limit lifted (what the limit saves);
- a model card whose base_model lists 10,000 entries (was 7 s: quadratic de-duplication).

    .venv/bin/python benchmarks/bench_hostile.py [--tensors 1500000] [--bases 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def header_file(folder: Path, count: int) -> Path:
    rng = random.Random()
    prefix = "".join(rng.choice("abcdefgh") for _ in range(1))
    header = {f"{prefix}.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
              for i in range(count)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def timed_header(path: Path, *, max_tensors: int | None) -> tuple[str, float, float]:
    from auditor.errors import MalformedSafetensors
    from auditor.weights.safetensors_io import LocalFile, parse_header

    before = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        with LocalFile(path) as src:
            head = parse_header(src, max_tensors=max_tensors)
        outcome = f"parsed {len(head.tensors)} tensors"
    except MalformedSafetensors as exc:
        outcome = f"refused: {str(exc).split(': ', 1)[-1][:70]}"
    return outcome, time.perf_counter() - t0, peak_rss_mb() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensors", type=int, default=1_500_000)
    parser.add_argument("--bases", type=int, default=10_000)
    parser.add_argument("--lifted", action="store_true",
                        help="also parse with the limit lifted (slow, gigabytes)")
    args = parser.parse_args()
    import auditor.weights.safetensors_io  # noqa: F401  (imports out of the timings)
    from auditor.hub.card import parse_card

    with tempfile.TemporaryDirectory() as tmp:
        path = header_file(Path(tmp), args.tensors)
        size_mb = path.stat().st_size / 1e6
        outcome, secs, rss = timed_header(path, max_tensors=None)
        print(f"header {args.tensors} zero-size tensors ({size_mb:.1f} MB), default limit: "
              f"{outcome}; {secs:.2f} s, peak RSS +{rss:.0f} MB")
        if args.lifted:
            outcome, secs, rss = timed_header(path, max_tensors=args.tensors + 1)
            print(f"same header, limit lifted: {outcome}; {secs:.2f} s, peak RSS +{rss:.0f} MB")
    rng = random.Random()
    ids = [f"o{rng.randrange(10**6)}/m{rng.randrange(10**6)}" for _ in range(args.bases)]
    card = "---\nbase_model:\n" + "".join(f"  - {i}\n" for i in ids) + "---\n"
    t0 = time.perf_counter()
    info = parse_card(card)
    print(f"card with {args.bases} base_model entries: kept {len(info.base_models)}; "
          f"{time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
