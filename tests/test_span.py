"""TextSpan: the fast (rank-r covariance) algorithm makes exactly the plain algorithm's picks."""
import numpy as np
import pytest
import torch

from textspan.span import text_span, top_right_singular_vectors


def plain_text_span(C, T, n_texts, rank):
    """DESIGN.md section 4, written as plainly as possible (full data, full texts, SVD)."""
    C = np.array(C, dtype=np.float64)
    T = np.array(T, dtype=np.float64)
    _, _, vh = np.linalg.svd(C, full_matrices=False)
    V = vh[:rank]
    T = T @ V.T @ V
    mean = C.mean(0)
    data = C - mean
    total = data.var(0, ddof=1).sum()
    picks, fractions, recon = [], [], np.zeros_like(data)
    for _ in range(n_texts):
        scores = (data @ T.T).std(0, ddof=1)
        j = int(np.argmax(scores))
        tau = T[j].copy()
        nrm = tau @ tau
        comp = np.outer(data @ tau / nrm, tau)
        fractions.append(comp.var(0, ddof=1).sum() / total)
        recon += comp
        data = data - comp
        T = T - np.outer(T @ tau / nrm, tau)
        picks.append(j)
    return picks, np.array(fractions), mean + recon


def _problem(seed, n=120, d=24, M=60, structured=True):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(M, d))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    C = rng.normal(size=(n, d)) * 0.3 + rng.normal(size=d)  # non-zero mean
    if structured:
        for k, j in enumerate((5, 17, 33)):
            C += rng.normal(size=(n, 1)) * (3 - k) * T[j]
    return C, T, [f"text {i}" for i in range(M)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank", [24, 10, 4])
def test_same_picks_as_plain_loop(seed, rank):
    C, T, texts = _problem(seed, structured=seed % 2 == 0)
    n_texts = min(8, rank)
    fast, recon = text_span(C, T, texts, n_texts=n_texts, rank=rank, reconstruct=True)
    picks, fractions, plain_recon = plain_text_span(C, T, n_texts, rank)
    assert fast.indices == picks
    assert fast.texts == [texts[j] for j in picks]
    np.testing.assert_allclose(fast.variance_explained, fractions, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.cumulative, np.cumsum(fractions), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(recon, plain_recon, rtol=1e-9, atol=1e-10)


def test_planted_directions_are_found_in_order():
    C, T, texts = _problem(0)
    res = text_span(C, T, texts, n_texts=3, rank=24)
    assert res.indices == [5, 17, 33]
    assert res.cumulative[-1] > 0.8 and np.all(np.diff(res.cumulative) > 0)


def test_full_rank_full_picks_reconstruct_exactly():
    C, T, texts = _problem(3, d=12, M=40)
    res, recon = text_span(C, T, texts, n_texts=12, rank=12, reconstruct=True)
    np.testing.assert_allclose(recon, C, atol=1e-9)
    assert abs(res.cumulative[-1] - 1) < 1e-9
    # the picked directions are mutually orthogonal
    D = res.directions / np.linalg.norm(res.directions, axis=1, keepdims=True)
    np.testing.assert_allclose(D @ D.T, np.eye(12), atol=1e-9)


def test_ties_take_the_first_text():
    C, T, texts = _problem(1)
    T2 = np.concatenate([T, T[:5]])  # duplicates of texts 0..4 at the end
    res = text_span(C, T2, texts + texts[:5], n_texts=5, rank=24)
    assert all(i < 60 for i in res.indices)


def test_torch_inputs_and_singular_vectors():
    C, T, texts = _problem(2)
    a = text_span(torch.tensor(C, dtype=torch.float32), torch.tensor(T), texts, n_texts=4, rank=24)
    b = text_span(C, T, texts, n_texts=4, rank=24)
    assert a.indices == b.indices
    V = top_right_singular_vectors(C, 5)
    _, _, vh = np.linalg.svd(C, full_matrices=False)
    np.testing.assert_allclose(np.abs(V @ vh[:5].T), np.eye(5), atol=1e-8)


def test_clear_errors():
    C, T, texts = _problem(0)
    with pytest.raises(ValueError, match="another model"):
        text_span(C, T[:, :10], texts, n_texts=2)
    with pytest.raises(ValueError, match="more than"):
        text_span(C, T[:3], texts[:3], n_texts=5)
    with pytest.raises(ValueError, match="texts for"):
        text_span(C, T, texts[:10], n_texts=2)
