"""Celery scale-out benchmark: audits per minute with 1 and with 2 worker processes.

    .venv/bin/python benchmarks/bench_workers.py [--audits 20] [--hidden 128] [--layers 4]

The product path end to end: a random zoo (base + fine-tunes; seeds, names, fine-tune
strengths and upload times drawn per run) on the local Hub server, a fresh PostgreSQL
database per round, ``auditor daemon --backend celery --once`` publishing to RabbitMQ and
N real ``auditor worker --concurrency 1 --torch-threads 1`` processes running the real
orchestrator (every gate, behavioural checks included: the repos carry a tokenizer).

The rate is taken from the store: audits done / (last finished_at - first started_at),
so worker start-up and the crawl are left out. Needs PostgreSQL at 127.0.0.1:5432 and
RabbitMQ at 127.0.0.1:5672. Prints the figures, the ratio and the load average (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def build_zoo(root: Path, *, audits: int, bases: int, hidden: int, layers: int,
              rng: random.Random) -> list[str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor_testkit.factory.save import CardSpec, save_repo
    from auditor_testkit.factory.tokenizer import build_tokenizer, vocab_size

    tokenizer = build_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab_size(),
                         max_position_embeddings=128, tie_word_embeddings=False)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    names, weights = [], []
    for _ in range(bases):
        torch.manual_seed(rng.randrange(2**31))
        weights.append(LlamaForCausalLM(config).state_dict())
        names.append(f"lab{rng.randrange(10**6)}/base-{rng.randrange(10**6)}")
        save_repo(root, names[-1], state_dict=weights[-1], config=config,
                  tokenizer=tokenizer, card=CardSpec(), created_at=start)
    # Uploads of the families interleave at random, as on the Hub.
    for i in range(audits):
        b = rng.randrange(bases)
        scale = rng.uniform(0.002, 0.03)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        sd = {k: v + torch.randn(v.shape, generator=g) * scale * (v.std() + 1e-3)
              for k, v in weights[b].items()}
        repo = f"user{rng.randrange(10**6)}/ft-{i}-{rng.randrange(10**4)}"
        save_repo(root, repo, state_dict=sd, config=config, tokenizer=tokenizer,
                  card=CardSpec(base_model=names[b], base_model_relation="finetune"),
                  created_at=start + timedelta(hours=i + 1, minutes=rng.randrange(60)))
    return names


def create_db() -> str:
    from sqlalchemy import create_engine, text

    name = f"bench_workers_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_db(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def one_round(*, workers: int, hub_url: str, bases: list[str], tmp: Path, audits: int
              ) -> tuple[float, float, int]:
    """(audits per minute, audit runs per minute, re-runs) with ``workers`` processes.

    A run is one execution of the orchestrator: parallel workers may audit a model while
    an earlier upload of its family is still running, and the daemon then re-runs the
    later one (``requeue_dependents``); ``attempts`` counts every run."""
    from auditor.daemon.celery_store import workers_seen
    from auditor.store import policy, queries
    from auditor.store.db import make_engine, session_factory, upgrade_database
    from auditor.store.models import Audit

    url = create_db()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AUDITOR_DATABASE_URL": url, "AUDITOR_HUB_ENDPOINT": hub_url,
           "AUDITOR_BROKER_URL": BROKER, "AUDITOR_QUEUE_PREFIX": prefix,
           "AUDITOR_DATA_DIR": str(tmp / f"data-{workers}"), "OMP_NUM_THREADS": "1",
           "AUDITOR_WORKER_HEARTBEAT_SECONDS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("AUDITOR_HUB_TOKEN", None)
    upgrade_database(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with factory() as session:
            for base in bases:
                policy.watch_add(session, repo_id=base)
        for i in range(workers):
            log = (tmp / f"worker-{workers}-{i}.log").open("wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "auditor.cli", "worker", "--queues", "cpu",
                 "--concurrency", "1", "--torch-threads", "1", "--log-level", "warning"],
                env={**env, "AUDITOR_CACHE_DIR": str(tmp / f"cache-{workers}-{i}")},
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while True:
            with factory() as session:
                if len(workers_seen(session)) == workers:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start; see worker-*.log in " + str(tmp))
            time.sleep(0.5)
        subprocess.run([sys.executable, "-m", "auditor.cli", "daemon", "--backend", "celery",
                        "--once", "--log-level", "warning"], env=env, cwd=REPO_ROOT,
                       check=True, timeout=3600)
        with factory() as session:
            done, runs, first, last = session.execute(
                select(func.count(), func.sum(Audit.attempts), func.min(Audit.started_at),
                       func.max(Audit.finished_at))
                .where(Audit.status == "done")).one()
            depth = queries.queue_depth(session)
        if done != audits:
            raise RuntimeError(f"{done} of {audits} audits done: {depth}")
        minutes = (last - first).total_seconds() / 60.0
        return done / minutes, int(runs) / minutes, int(runs) - done
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        engine.dispose()
        drop_db(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audits", type=int, default=20)
    parser.add_argument("--bases", type=int, default=4, help="families the audits spread over")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="default: random per run")
    args = parser.parse_args()
    if args.audits < 20:
        parser.error("at least 20 audits")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    from auditor_testkit.hub.server import HubServer

    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        bases = build_zoo(tmp / "hub", audits=args.audits, bases=args.bases,
                          hidden=args.hidden, layers=args.layers, rng=random.Random(seed))
        print(f"zoo: {args.audits} fine-tunes of {args.bases} random bases (hidden "
              f"{args.hidden}, layers {args.layers}, seed {seed}) built in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        server = HubServer(tmp / "hub").start()
        try:
            rates, runs = {}, {}
            for n in (1, 2):
                load = os.getloadavg()[0]
                rates[n], runs[n], reruns = one_round(
                    workers=n, hub_url=server.url, bases=bases, tmp=tmp, audits=args.audits)
                print(f"{n} worker process(es), 1 torch thread each: {rates[n]:.1f} audits/min "
                      f"({rates[n] * 60:.0f}/hour), {runs[n]:.1f} audit runs/min ({reruns} "
                      f"re-runs of dependents); load average before {load:.2f} on "
                      f"{os.cpu_count()} CPUs", flush=True)
        finally:
            server.stop()
    print(f"ratio 2/1: {rates[2] / rates[1]:.2f} (audits), {runs[2] / runs[1]:.2f} (runs)")


if __name__ == "__main__":
    main()
