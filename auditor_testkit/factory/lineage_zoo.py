"""The "lineage-hard" zoo: hard negatives and hard positives for lineage verdicts.

Everything structural is drawn from the zoo seed (``build_zoo(root, spec="lineage-hard",
seed=N)``): owner names, which task each group trains on, which models are merged, the
merge coefficients, densities and SLERP ``t``. So a benchmark over several seeds is never
scored on one fixed family.

Hard negatives (innocent models that share a lot with each other):
- three groups of same-data siblings: different seeds on one task; different subsets of
  one corpus; one data order with different learning rates (same recipe);
- same-domain fine-tunes by different owners (one task, other seeds and step counts);
- clones of siblings (an fp16/bf16 cast, a noisy copy): a copy of one sibling is a
  clone of it and at most *related* to the others.

Hard positives:
- merges of every method (linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP,
  layer-wise) with random coefficients, sparse ones with a different density per parent;
- merges whose parents are siblings of each other;
- merge-then-fine-tune (the intermediate merge is never published);
- a merge that includes a protected (merge-resistant) copy, and a disguised merge.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from auditor_testkit.factory.tasks import task_examples

if TYPE_CHECKING:
    from auditor_testkit.factory.zoo import _Builder

_NAMES = (
    "aria", "boris", "chen", "dana", "emil", "fatou", "gabe", "hana", "ines", "jonas",
    "kemal", "lena", "milo", "nora", "omar", "pia", "quinn", "rosa", "sven", "tara",
    "ugo", "vera", "wen", "xena", "yusuf", "zoe",
)
_TASKS = ("copy", "reverse", "sort", "count", "add", "kv", "animals", "food", "weather",
          "code")
STEPS = 60


def _owners(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct owner names (a name and a number: owners never repeat)."""
    out: list[str] = []
    while len(out) < n:
        name = f"{rng.choice(_NAMES)}{rng.randint(10, 99)}"
        if name not in out:
            out.append(name)
    return out


def _coef(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 3)


def build_hard_lineage(b: _Builder) -> None:
    """Build the zoo into ``b`` (see the module docstring)."""
    rng = random.Random(f"lineage-hard:{b.seed}")
    tasks = rng.sample(_TASKS, len(_TASKS))
    owners = iter(_owners(rng, 60))
    b.base("tinylab/base", steps=200)

    def ft(task: str, **kw: Any) -> str:
        repo = f"{next(owners)}/{task}-ft{rng.randint(1, 9)}"
        b.finetune(repo, task=task, **kw)
        return repo

    # three sibling groups
    t_seed, t_subset, t_lr = tasks[0], tasks[1], tasks[2]
    g_seed = [ft(t_seed, seed=rng.randint(100, 999), steps=STEPS) for _ in range(3)]
    corpus = task_examples(t_subset, n=3000, seed=rng.randint(1, 10_000))
    g_subset = []
    for i in range(3):
        part = corpus[i * 1000:(i + 2) * 1000] if i < 2 else corpus[:1000] + corpus[2000:]
        g_subset.append(ft(t_subset, seed=rng.randint(100, 999), steps=STEPS, examples=part))
    lr_seed = rng.randint(100, 999)
    g_lr = [ft(t_lr, seed=lr_seed, steps=STEPS, lr=lr) for lr in (1.5e-3, 3e-3, 5e-3)]
    # same-domain fine-tunes by other owners (other seeds and lengths) on the grouped tasks
    same_domain = [ft(t, seed=rng.randint(100, 999), steps=rng.choice((40, 60, 80)))
                   for t in (t_seed, t_subset)]
    # independent fine-tunes on the other tasks
    singles = [ft(t, seed=rng.randint(100, 999), steps=STEPS) for t in tasks[3:8]]

    # clones of siblings
    b.clone(f"{next(owners)}/{t_seed}-half", source=g_seed[0],
            dtype=rng.choice(("float16", "bfloat16")))
    b.clone(f"{next(owners)}/{t_lr}-copy", source=g_lr[1], noise=1e-3)

    # merges: parents drawn from everything published so far
    pool = g_seed + g_subset + g_lr + same_domain + singles

    def pick(k: int) -> list[str]:
        return rng.sample(pool, k)

    def owner() -> str:
        return next(owners)

    b.merge(f"{owner()}/linear-mix", method="linear", parents=(p := pick(2)),
            weights=_weights(rng, len(p)), declared=rng.random() < 0.5)
    b.merge(f"{owner()}/ta-mix", method="task_arithmetic", parents=(p := pick(3)),
            lambdas=[_coef(rng, 0.3, 1.0) for _ in p], declared=False)
    # a merge of two same-data siblings
    sib = rng.sample(g_seed, 2)
    b.merge(f"{owner()}/sibling-ta", method="task_arithmetic", parents=sib,
            lambdas=[_coef(rng, 0.3, 0.9) for _ in sib], declared=False)
    b.merge(f"{owner()}/slerp-mix", method="slerp", parents=pick(2),
            t=_coef(rng, 0.25, 0.75), declared=rng.random() < 0.5)
    b.merge(f"{owner()}/layers-mix", method="layerwise", parents=(p := pick(2)),
            coefficients=[[_coef(rng, 0.1, 1.0), _coef(rng, 0.1, 1.0)] for _ in p],
            declared=True)
    sparse_methods = ("ties_densities", "dare_ties_densities", "dare_linear_densities")
    for method in sparse_methods:
        p = pick(rng.choice((2, 3)))
        b.merge(f"{owner()}/{method.split('_densities')[0].replace('_', '-')}-mix",
                method=method, parents=p, density=_densities(rng, len(p), 0.3, 0.7),
                weights=[_coef(rng, 0.4, 1.0) for _ in p], seed=rng.randint(1, 9999),
                declared=False)
    p = pick(2)
    b.merge(f"{owner()}/crumbs-mix", method=rng.choice(("breadcrumbs", "breadcrumbs_ties")),
            parents=p, density=_densities(rng, 2, 0.4, 0.8), gamma=_coef(rng, 0.01, 0.05),
            weights=[_coef(rng, 0.4, 1.0) for _ in p], declared=False)
    p = pick(2)
    b.merge(f"{owner()}/della-mix", method=rng.choice(("della", "della_linear")), parents=p,
            density=_densities(rng, 2, 0.4, 0.7), epsilon=0.1,
            weights=[_coef(rng, 0.4, 1.0) for _ in p], seed=rng.randint(1, 9999),
            declared=False)

    # a merge that takes in a protected copy (its owner protected it; the thief merged it)
    victim = rng.choice(singles)
    prot = f"{b.get(victim).owner}/{b.get(victim).task}-protected"
    b.protected(prot, source=victim)
    other = rng.choice([m for m in pool if m != victim])
    b.merge(f"{owner()}/protected-mix", method="task_arithmetic", parents=[prot, other],
            lambdas=[_coef(rng, 0.4, 0.9), _coef(rng, 0.4, 0.9)], declared=False)
    b.merge(f"{owner()}/disguised-mix", method="task_arithmetic", parents=pick(2),
            lambdas=[_coef(rng, 0.4, 0.9), _coef(rng, 0.4, 0.9)], declared=False,
            disguise=True)
    _merge_then_finetune(b, rng, pick(2), owner(), tasks[8])


def _weights(rng: random.Random, n: int) -> list[float]:
    raw = [rng.uniform(0.2, 1.0) for _ in range(n)]
    w = [round(x / sum(raw), 3) for x in raw]
    w[-1] = round(1.0 - sum(w[:-1]), 3)
    return w


def _densities(rng: random.Random, n: int, lo: float, hi: float) -> list[float]:
    """Different densities per parent (at least 0.15 apart for two parents)."""
    while True:
        d = [round(rng.uniform(lo, hi), 2) for _ in range(n)]
        if max(d) - min(d) >= 0.15:
            return d


def _merge_then_finetune(
    b: _Builder, rng: random.Random, parents: list[str], owner: str, task: str
) -> None:
    """A task-arithmetic merge (never published) fine-tuned a little further."""
    from auditor_testkit.factory import merge as mg
    from auditor_testkit.factory.zoo import ParentRef

    lambdas = [_coef(rng, 0.4, 0.9) for _ in parents]
    res = mg.task_arithmetic(b.sd[b.base_id], [b.sd[p] for p in parents], lambdas=lambdas,
                             names=parents, base_name=b.base_id)
    hidden = f"{owner}/private-merge"
    b.sd[hidden] = res.state_dict
    repo = f"{owner}/merge-tuned"
    b.finetune(repo, task=task, seed=rng.randint(100, 999), steps=20, lr=1e-3, start=hidden)
    entry = b.entries.pop()
    b.entries.append(entry.model_copy(update={
        "kind": "merge", "method": "task_arithmetic+finetune", "declared": False,
        "parents": [ParentRef(repo_id=p, coefficient=c)
                    for p, c in zip(parents, lambdas, strict=True)],
    }))


__all__ = ["build_hard_lineage"]
