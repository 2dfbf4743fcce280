"""Streaming task-vector benchmark: is peak memory bounded by the largest tensor?

Writes (in a temp dir) a base and a fine-tune of >= 500 MB each, streaming each tensor straight
to disk so the generator itself never holds a model, then prints:
- plain sequential read time of both files (page cache warm, as the Hub cache would be);
- MB/s of per-tensor task-vector norms through ``open_model`` + ``model_deltas``;
- peak RSS of that computation measured in a fresh subprocess, next to the bound
  2 x largest tensor (fp32) + interpreter/torch baseline.

Usage: .venv/bin/python benchmarks/bench_weights.py [--mb 520] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch


def hwm_kb():
    # VmHWM is this process's own peak RSS; ru_maxrss would carry the parent's across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


from auditor.weights.reader import open_model
from auditor.weights.task_vectors import model_deltas
torch.set_num_threads(1)
baseline = hwm_kb()
t0 = time.perf_counter()
n_bytes = 0
total = 0.0
mode = sys.argv[3]
model, base = open_model(sys.argv[1], read_mode=mode), open_model(sys.argv[2], read_mode=mode)
with model, base:
    deltas, report = model_deltas(model, base)
    for name in deltas.keys():
        d = deltas.delta(name)
        total += float(torch.linalg.vector_norm(d)) ** 2
        n_bytes += model.info(name).nbytes + base.info(name).nbytes
        del d
elapsed = time.perf_counter() - t0
peak = hwm_kb()
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak, "seconds": elapsed,
                  "bytes": n_bytes, "norm": total ** 0.5, "n": len(deltas.keys())}))
"""


def plan(target_mb: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A llama-like layout: one big fp32 embedding, fp16 matrices, small fp32 norms."""
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("model.embed_tokens.weight", (16000, 2048), torch.float32),  # 131 MB, the largest
    ]
    size = 16000 * 2048 * 4
    layer = 0
    while size < target_mb * 1_000_000:
        for proj, shape in (
            ("self_attn.q_proj", (2048, 2048)),
            ("self_attn.o_proj", (2048, 2048)),
            ("mlp.up_proj", (5504, 2048)),
            ("mlp.down_proj", (2048, 5504)),
        ):
            specs.append((f"model.layers.{layer}.{proj}.weight", shape, torch.float16))
            size += math.prod(shape) * 2
        specs.append((f"model.layers.{layer}.input_layernorm.weight", (2048,), torch.float32))
        size += 2048 * 4
        layer += 1
    return specs


_DT = {torch.float32: "F32", torch.float16: "F16"}


def write_streaming(path: Path, specs, *, seed: int, noise: float) -> int:
    """Write a safetensors file tensor by tensor (the header first, computed from the plan)."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DT[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # keep the data area 8-byte aligned like safetensors does
    with path.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for i, (_name, shape, dtype) in enumerate(specs):
            g = torch.Generator().manual_seed(i)
            t = torch.randn(shape, generator=g) * 0.02
            if noise:
                g2 = torch.Generator().manual_seed(seed * 100_000 + i)
                t += torch.randn(shape, generator=g2) * noise
            fh.write(t.to(dtype).numpy().tobytes())
            del t
    return path.stat().st_size


def plain_read(paths: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for p in paths:
        with p.open("rb") as fh:
            while chunk := fh.read(16 << 20):
                n += len(chunk)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=520)
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_weights_"))
    (tmp / "base").mkdir(parents=True, exist_ok=True)
    (tmp / "ft").mkdir(parents=True, exist_ok=True)
    specs = plan(args.mb)
    largest = max(math.prod(s) for _, s, _ in specs)
    t0 = time.perf_counter()
    fb, ff = tmp / "base" / "model.safetensors", tmp / "ft" / "model.safetensors"
    if args.keep is not None and fb.exists() and ff.exists():
        size_b, size_f = fb.stat().st_size, ff.stat().st_size  # reuse a kept pair
    else:
        size_b = write_streaming(fb, specs, seed=0, noise=0.0)
        size_f = write_streaming(ff, specs, seed=1, noise=1e-3)
    print(
        f"generated base {size_b / 1e6:.0f} MB + fine-tune {size_f / 1e6:.0f} MB "
        f"({len(specs)} tensors, largest {largest * 4 / 1e6:.0f} MB as fp32) "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    secs, n = plain_read([tmp / "base" / "model.safetensors", tmp / "ft" / "model.safetensors"])
    print(f"plain read: {n / 1e6:.0f} MB in {secs:.2f} s = {n / 1e6 / secs:.0f} MB/s")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bound = 2 * largest * 4 / 2**20
    files_mib = (size_b + size_f) / 2**20
    for mode in ("pread", "mmap"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp / "ft"), str(tmp / "base"), mode],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mb = r["bytes"] / 1e6
        peak, base_rss = r["peak_kb"] / 1024, r["baseline_kb"] / 1024
        print(
            f"[read_mode={mode}] task-vector norms: {r['n']} tensors, {mb:.0f} MB in "
            f"{r['seconds']:.2f} s = {mb / r['seconds']:.0f} MB/s (||delta|| = {r['norm']:.4f})"
        )
        print(
            f"[read_mode={mode}] peak RSS {peak:.0f} MiB = baseline {base_rss:.0f} MiB "
            f"(interpreter + torch) + growth {peak - base_rss:.0f} MiB; bound: 2 x largest "
            f"fp32 = {bound:.0f} MiB (+ baseline = {bound + base_rss:.0f} MiB); "
            f"model files {files_mib:.0f} MiB"
        )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(generator process peak RSS: {own:.0f} MiB)")
    if args.keep is None:
        for p in (tmp / "base" / "model.safetensors", tmp / "ft" / "model.safetensors"):
            p.unlink()
        for d in (tmp / "base", tmp / "ft", tmp):
            d.rmdir()


if __name__ == "__main__":
    main()
