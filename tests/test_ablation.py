"""Mean-ablation identities and the fast paths against plain recomputation of the embedding."""
import numpy as np
import pytest
import torch

from helpers import random_images, tiny_clip
import textspan
from textspan import ablation


@pytest.fixture(scope="module")
def terms():
    model = tiny_clip(seed=3, layers=3)
    d = textspan.decompose(model, random_images(40, seed=5), spatial=False)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(24, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    return d.heads.numpy(), d.cls_to_cls.numpy(), d.mlps.numpy(), d.embedding.numpy(), W, labels


def _slow_logits(heads, cls, mlps, W, ref, ablate_heads=(), mlp=False, cls_layers=()):
    """Rebuild every image's embedding from its terms with the chosen ones swapped for reference means."""
    rh, rc, rm = ref
    H = heads.copy()
    M = mlps.copy()
    for l, h in ablate_heads:
        H[:, l, h] = rh[:, l, h].mean(0)
    for l in cls_layers:
        for h in range(H.shape[2]):
            if (l, h) not in ablate_heads:
                H[:, l, h] += rc[:, l, h].mean(0) - cls[:, l, h]
    if mlp:
        M[:] = rm.mean(0)
    return (H.sum(axis=(1, 2)) + M.sum(axis=1)) @ W


def test_baseline_is_the_embedding_classifier(terms):
    heads, cls, mlps, emb, W, labels = terms
    t = ablation.term_logits(heads, cls, mlps, W, same_set=True)
    np.testing.assert_allclose(t.base, emb @ W, atol=1e-5)
    np.testing.assert_allclose(ablation.ablate_heads(t, []), emb @ W, atol=1e-5)


def test_fast_ablations_equal_recomputed_embeddings(terms):
    heads, cls, mlps, emb, W, labels = terms
    ref_rows, eval_rows = ablation.split_rows(40, 0.5, seed=1)
    t = ablation.term_logits(heads, cls, mlps, W, rows=eval_rows, ref_rows=ref_rows)
    ev = (heads[eval_rows], cls[eval_rows], mlps[eval_rows])
    ref = (heads[ref_rows], cls[ref_rows], mlps[ref_rows])
    for kw in [dict(ablate_heads=[(0, 1), (2, 3)]), dict(mlp=True), dict(cls_layers=[0, 2]),
               dict(ablate_heads=[(1, 0)], mlp=True, cls_layers=[1])]:
        fast = ablation.ablate_heads(t, kw.get("ablate_heads", []), mlps=kw.get("mlp", False),
                                     cls_layers=kw.get("cls_layers", ()))
        np.testing.assert_allclose(fast, _slow_logits(*ev, W, ref, **kw), atol=1e-5)
    # whole layers
    fast = ablation.ablate_heads(t, [], layers=[0, 1])
    slow = _slow_logits(*ev, W, ref, ablate_heads=[(l, h) for l in (0, 1) for h in range(4)])
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_same_set_mean_at_batch_size_one_is_a_no_op(terms):
    heads, cls, mlps, emb, W, labels = terms
    rows = np.array([7])
    t = ablation.term_logits(heads, cls, mlps, W, rows=rows, ref_rows=rows)
    every = [(l, h) for l in range(3) for h in range(4)]
    np.testing.assert_allclose(ablation.ablate_heads(t, every, mlps=True, cls_layers=range(3)), t.base, atol=1e-5)
    res = ablation.standard_ablations(t, labels[rows])
    assert res["mlps"] == res["cls_to_cls"] == res["baseline"]
    assert set(res["accumulated"]) == {res["baseline"]}


def test_accumulated_curve_starts_at_baseline_and_ends_at_all_attention_ablated(terms):
    heads, cls, mlps, emb, W, labels = terms
    t = ablation.term_logits(heads, cls, mlps, W, same_set=True)
    res = ablation.standard_ablations(t, labels)
    assert len(res["accumulated"]) == 4 and res["accumulated"][0] == res["baseline"]
    all_heads = [(l, h) for l in range(3) for h in range(4)]
    assert res["accumulated"][-1] == ablation.accuracy_from_logits(ablation.ablate_heads(t, all_heads), labels)


def test_single_head_importance_equals_one_at_a_time(terms):
    heads, cls, mlps, emb, W, labels = terms
    ref_rows, eval_rows = ablation.split_rows(40, 0.5)
    t = ablation.term_logits(heads, cls, mlps, W, rows=eval_rows, ref_rows=ref_rows)
    fast = ablation.single_head_importance(t, labels[eval_rows])
    for l in range(3):
        for h in range(4):
            slow = ablation.accuracy_from_logits(ablation.ablate_heads(t, [(l, h)]), labels[eval_rows])
            assert fast[l, h] == pytest.approx(slow)


def test_random_head_sets_are_seeded_and_distinct():
    a = ablation.random_head_sets(4, 8, 5, 3, seed=2)
    assert a == ablation.random_head_sets(4, 8, 5, 3, seed=2) and len(a) == 3
    assert all(len(set(s)) == 5 for s in a) and a[0] != a[1]
    assert all(l in (2, 3) for s in ablation.random_head_sets(4, 8, 4, 2, layers=[2, 3]) for l, _ in s)


def test_split_rows_partition():
    ref, ev = ablation.split_rows(11, 0.5, seed=3)
    assert sorted(np.concatenate([ref, ev]).tolist()) == list(range(11)) and not set(ref) & set(ev)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_single_head_importance_with_duplicate_classes(terms, chunk):
    """Classifier columns that repeat (duplicate class names) tie exactly: the sweep must follow argmax, which
    picks the first of them, whatever the chunking."""
    heads, cls, mlps, emb, W, labels = terms
    W2 = np.concatenate([W, W[:, [1, 3]]], axis=1)  # classes 5 and 6 repeat classes 1 and 3
    lab = labels.copy()
    lab[::3] = 5  # some images labelled with a later twin: never an argmax
    lab[1::7] = 1
    t = ablation.term_logits(heads, cls, mlps, W2, same_set=True)
    fast = ablation.single_head_importance(t, lab, chunk=chunk)
    for l in range(3):
        for h in range(4):
            slow = ablation.accuracy_from_logits(ablation.ablate_heads(t, [(l, h)]), lab)
            assert fast[l, h] == pytest.approx(slow)
    assert ablation._later_twins(W2).tolist() == [False] * 5 + [True, True]


def test_default_protocol_is_a_disjoint_split(terms):
    """Without a reference, term_logits takes the means from a seeded half and evaluates the other (DESIGN.md 5)."""
    heads, cls, mlps, emb, W, labels = terms
    t = ablation.term_logits(heads, cls, mlps, W)
    ref_rows, eval_rows = ablation.split_rows(len(heads), 0.5, 0)
    want = ablation.term_logits(heads, cls, mlps, W, rows=eval_rows, ref_rows=ref_rows)
    assert t.n == len(eval_rows) and set(ref_rows).isdisjoint(eval_rows)
    np.testing.assert_array_equal(t.base, want.base)
    np.testing.assert_array_equal(t.mean_head, want.mean_head)
    np.testing.assert_allclose(t.base, emb[eval_rows] @ W, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 512])
def test_single_head_margins_equal_one_at_a_time(terms, chunk):
    """The margin sweep (top-2 per row) equals, head by head, the mean over labelled rows of the label's logit minus
    the largest other logit of that head's mean-ablated logits, written from the definition; accuracies unchanged."""
    heads, cls, mlps, emb, W, labels = terms
    lab = labels.copy()
    lab[::5] = -1  # unlabelled rows do not count
    t = ablation.term_logits(heads, cls, mlps, W, same_set=True)
    acc, margin = ablation.single_head_importance(t, lab, chunk=chunk, margins=True)
    np.testing.assert_array_equal(acc, ablation.single_head_importance(t, lab, chunk=chunk))
    keep = lab >= 0
    for l in range(3):
        for h in range(4):
            logits = np.asarray(ablation.ablate_heads(t, [(l, h)]), dtype=np.float64)[keep]
            y = lab[keep]
            mine = logits[np.arange(len(y)), y]
            others = logits.copy()
            others[np.arange(len(y)), y] = -np.inf
            assert margin[l, h] == pytest.approx(float(np.mean(mine - others.max(axis=1))), abs=1e-5)
    base = np.asarray(t.base, dtype=np.float64)[keep]
    y = lab[keep]
    others = base.copy()
    others[np.arange(len(y)), y] = -np.inf
    assert ablation.mean_margin(t.base, lab) == pytest.approx(float(np.mean(base[np.arange(len(y)), y]
                                                                            - others.max(axis=1))), abs=1e-5)
