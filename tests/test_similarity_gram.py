"""The masked Gram matrices (nonzero / sign-agreeing coordinates of the subject) are made
only when asked for; made late, they are the products over the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor.analysis.attribution import attribute
from auditor.analysis.similarity import build_gram
from tests.lineage_synth import SHAPES, fp, task_vector


def _manual(stack, mask_agree: bool) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.zeros_like(stack.gram)
    for t, key in enumerate(stack.keys):
        w = stack.prints[0].tensors[key].weight
        a = np.array([p.tensors[key].sample for p in stack.prints], dtype=np.float64)
        keep = a[0] != 0
        a = a[:, keep]
        if mask_agree:
            a = np.where(np.sign(a) == np.sign(a[0]), a, 0.0)
        out[stack.key_group[t]] += w * (a @ a.T)
    return out


def test_masked_grams_of_a_sparse_subject() -> None:
    taus = [task_vector(i) for i in range(3)]
    sub = {}
    for n in SHAPES:
        t = 0.6 * taus[0][n] + 0.5 * taus[1][n]
        sub[n] = torch.where(torch.rand(t.shape, generator=torch.Generator().manual_seed(5))
                             < 0.5, t, torch.zeros_like(t))
    stack = build_gram([("s", fp(sub)), *((f"c{i}", fp(t)) for i, t in enumerate(taus))])
    assert "_masked" not in stack.__dict__  # not made by the stack itself
    np.testing.assert_allclose(stack.gram_nz, _manual(stack, False), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(stack.gram_agree, _manual(stack, True), rtol=1e-12,
                               atol=1e-300)
    assert not np.allclose(stack.gram_nz, stack.gram)
    fit = attribute(stack, [1, 2], variant="nonzero").fit
    assert fit.coefficients == pytest.approx((0.6, 0.5), abs=0.05)


def test_dense_subject_nonzero_gram_is_the_gram() -> None:
    taus = [task_vector(i) for i in range(3)]
    stack = build_gram([(f"c{i}", fp(t)) for i, t in enumerate(taus)])
    attribute(stack, [1, 2])  # the plain fit does not make them
    assert "_masked" not in stack.__dict__
    np.testing.assert_array_equal(stack.gram_nz, stack.gram)

