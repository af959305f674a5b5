"""The neuron jobs: principal directions and the sparse decomposition against their definitions, the whole
`neurons` job on the built-in model (outputs, resume after a kill, refusals) and the neuron ablation."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import encode_with_hooks
import textspan
from textspan.cli import main
from textspan.errors import BadInputError, TextspanError
from textspan.neuron_jobs import (ablate_neurons, analyse_neurons, principal_directions, sparse_decomposition,
                                  text_dictionary)


def test_sparse_decomposition_recovers_an_exact_sparse_combination():
    rng = np.random.default_rng(0)
    D = rng.normal(size=(40, 16))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    target = np.stack([2.0 * D[3] - 1.5 * D[17], 0.7 * D[5] + 0.2 * D[30] - 1.1 * D[39]])
    coef, cos = sparse_decomposition(target, D, 3)
    assert set(np.flatnonzero(coef[0])) <= {3, 17} and coef[0, 3] == pytest.approx(2.0) \
        and coef[0, 17] == pytest.approx(-1.5)
    assert set(np.flatnonzero(coef[1])) == {5, 30, 39} and coef[1, 39] == pytest.approx(-1.1)
    np.testing.assert_allclose(cos, 1.0)
    with pytest.raises(BadInputError, match="40 texts: too few for 41 components"):
        sparse_decomposition(target, D, 41)


def test_text_dictionary_is_the_published_normalisation():
    t = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    d = text_dictionary(t)
    c = t - t.mean(axis=0)
    np.testing.assert_allclose(d, c / np.linalg.norm(c, axis=0))  # each dimension over the texts


def test_principal_directions_sign_and_share():
    rng = np.random.default_rng(1)
    v = rng.normal(size=8)
    v /= np.linalg.norm(v)
    rows = np.outer(rng.uniform(0.5, 2.0, 30) * np.r_[np.ones(20), -np.ones(10)], v) + 0.01 * rng.normal(size=(30, 8))
    dirs, share = principal_directions(rows[None])
    assert dirs[0] @ v > 0.99  # 20 of 30 project positively on +v: the sign is +v
    _, s, _ = np.linalg.svd(rows, full_matrices=False)
    assert share[0] == pytest.approx(s[0] ** 2 / np.sum(s ** 2))
    dirs, _ = principal_directions(-rows[None])
    assert dirs[0] @ v < -0.99


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("nw")
    textspan.write_shapes_world(root / "w", 24, seed=6)
    return root / "w" / "images"


def test_neurons_job_resumes_after_a_kill(world, tmp_path, monkeypatch):
    import textspan.neurons as nmod

    common = dict(layer=-2, bank="shapes", components=3, top_k=5, batch_size=4, device="cpu")
    whole = analyse_neurons(world, tmp_path / "whole", "shapes", **common)
    W = whole.pca.shape[0]
    assert whole.norms.shape == (24, W) and whole.top.shape == (W, 5) and len(whole.texts) == W
    assert np.all(np.isfinite(whole.norms)) and (whole.explained > 0).all()
    # the top images are the largest centred norms of norms.npy, neuron by neuron
    np.testing.assert_array_equal(np.sort(whole.norms, axis=0)[::-1][:5].T,
                                  np.take_along_axis(whole.norms.T, whole.top, axis=1))
    real, calls = nmod.neuron_effects, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 9:  # pass 2's third batch (6 batches per pass)
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(nmod, "neuron_effects", dies)
    with pytest.raises(KeyboardInterrupt):
        analyse_neurons(world, tmp_path / "cut", "shapes", **common)
    monkeypatch.setattr(nmod, "neuron_effects", real)
    seen = []
    again = analyse_neurons(world, tmp_path / "cut", "shapes", notify=seen.append, **common)
    assert seen == ["resuming pass 2 (top 5 per neuron) at image 8 of 24"]
    for name in ("pca", "mean", "explained", "threshold", "top_index"):
        np.testing.assert_array_equal(np.load(tmp_path / "cut" / f"{name}.npy"),
                                      np.load(tmp_path / "whole" / f"{name}.npy"))
    for name in ("neurons.csv", "top_images.csv", "decomposition.json"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    np.testing.assert_array_equal(again.norms, whole.norms)
    with pytest.raises(TextspanError, match=r"other settings \(layer\)"):
        analyse_neurons(world, tmp_path / "cut", "shapes", **dict(common, layer=1))


def test_neurons_job_refusals(world, tmp_path):
    with pytest.raises(BadInputError, match="too few for 999 components"):
        analyse_neurons(world, tmp_path / "a", "shapes", bank="shapes", components=999, device="cpu")
    with pytest.raises(BadInputError, match="the last block"):
        analyse_neurons(world, tmp_path / "b", "shapes", layer=-1, device="cpu")
    r = CliRunner().invoke(main, ["neurons", str(world), "--layer", "9", "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and "out of range" in r.output


def test_neuron_ablation_through_the_cli(world, tmp_path):
    r = CliRunner().invoke(main, ["neurons", str(world), "--layer", "1", "--top-k", "4", "--quiet",
                                  "-o", str(tmp_path / "n")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["neurons-ablate", str(tmp_path / "n"), str(world), "--quiet",
                                  "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "a" / "neuron_ablation.json").read_text())
    acc = res["accuracy"]
    assert res["n_images"] == 24 and set(acc) == {"baseline", "without_all", "without_significant",
                                                   "without_insignificant", "projected_on_pc"}
    assert acc["baseline"] > 50  # the built-in model reads shapes
    direct = ablate_neurons(tmp_path / "n", world, None, device="cpu")
    assert direct["accuracy"] == acc
    own = ablate_neurons(tmp_path / "n", device="cpu")  # the folder's own images and classes
    assert own["accuracy"] == acc and own["n_images"] == 24


def test_neurons_method_is_the_published_segmentation_map(world, tmp_path):
    import torch

    out = tmp_path / "n"
    analyse_neurons(world, out, "shapes", layer=1, top_k=4, device="cpu")
    model, preprocess, _ = textspan.load_model("shapes")
    paths = sorted(world.rglob("*.png"))[:3]
    x = torch.stack([preprocess(textspan.read_image(p)) for p in paths])
    T = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
                                      [:, :textspan.engine.read_tower(model).d_embed], dim=-1)
    got = textspan.explain(model, x, T, method="neurons", neurons=str(out), top_neurons=7)
    # the definition: the post-GELU of block 1 (recorded by a hook on the stock module), averaged over the 7 neurons
    # whose principal direction has the largest |p . t|, at the patch tokens
    seen = []
    encode_with_hooks(model, x, [model.visual.transformer.resblocks[1].mlp.gelu.register_forward_hook(
        lambda m, i, o: seen.append(o))])
    post = seen[0]  # [b, N, W] (batch first)
    pca = torch.from_numpy(np.load(out / "pca.npy"))
    for k in range(2):
        top = torch.topk((pca @ T[k]).abs(), 7).indices
        want = post[:, 1:, top].mean(dim=2).reshape(3, 8, 8)
        torch.testing.assert_close(got[:, k], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BadInputError, match="needs the option neurons"):
        textspan.explain(model, x, T, method="neurons")
    assert "neurons" not in textspan.list_methods() and "neurons" in textspan.list_methods(with_required=True)


def test_neuron_heatmaps(world, tmp_path):
    import torch

    from textspan.neurons import neuron_maps

    out = tmp_path / "n"
    analyse_neurons(world, out, "shapes", layer=2, top_k=4, device="cpu")
    paths = sorted(world.rglob("*.png"))[:2]
    r = CliRunner().invoke(main, ["neuron-heatmap", *map(str, paths), "--neurons", str(out), "--ids", "3,9",
                                  "-p", "a star", "-p", "a red object", "--quiet", "-o", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    maps = np.load(tmp_path / "h" / "maps.npy")
    assert maps.shape == (2, 2, 2, 8, 8)
    assert (tmp_path / "h" / "neuron_3.png").is_file() and (tmp_path / "h" / "neuron_9.png").is_file()
    # the figure's maps are `neuron_maps` at the patches
    model, preprocess, tok = textspan.load_model("shapes")
    x = torch.stack([preprocess(textspan.read_image(p)) for p in paths])
    T = torch.from_numpy(textspan.text.encode_texts(model, tok, ["a star", "a red object"]))
    want = neuron_maps(model, x, 2, T, neurons=[3, 9])[..., 1:].reshape(2, 2, 2, 8, 8)
    np.testing.assert_allclose(maps, want.numpy(), rtol=1e-5, atol=1e-8)
    r = CliRunner().invoke(main, ["neuron-heatmap", str(paths[0]), "--neurons", str(out), "--ids", "9999",
                                  "-o", str(tmp_path / "h2")])
    assert r.exit_code == 1 and "out of range" in r.output


def test_neuron_ablation_equals_its_definition(world, tmp_path):
    import torch

    from textspan.decomposition import forward_image
    from textspan.jobs import resolve_model, zero_shot_classifier

    out = tmp_path / "n"
    analyse_neurons(world, out, "shapes", layer=0, top_k=3, device="cpu")
    res = ablate_neurons(out, world, None, device="cpu", batch_size=5)
    loaded = resolve_model("shapes", None, "cpu")
    items = textspan.datasets.ImageList.from_path(world)
    W, names = zero_shot_classifier(loaded, None, None, default_classes=items.classes)
    x = torch.stack([loaded.preprocess(textspan.read_image(p)) for p in items.paths])
    y = torch.tensor([names.index(items.classes[lab]) for lab in items.labels])
    s = textspan.neuron_effects(loaded.model, x, 0).double()
    e = forward_image(loaded.model, x).double()
    r = e / e.norm(dim=-1, keepdim=True)
    mean = torch.from_numpy(np.load(out / "mean.npy")).double()
    thr = torch.from_numpy(np.load(out / "threshold.npy")).double()
    pca = torch.from_numpy(np.load(out / "pca.npy")).double()
    c = s - mean
    base = r - s.sum(1) + mean.sum(0)
    sig = c.norm(dim=-1) > thr
    reps = {"baseline": r, "without_all": base, "without_significant": base + (c * ~sig[..., None]).sum(1),
            "without_insignificant": base + (c * sig[..., None]).sum(1),
            "projected_on_pc": base + ((c * pca).sum(-1, keepdim=True) * pca).sum(1)}
    Wt = torch.from_numpy(W).double()
    for k, rep in reps.items():  # (mean and threshold stored as float32: predictions are far from ties here)
        assert res["accuracy"][k] == pytest.approx(100.0 * float(((rep @ Wt).argmax(1) == y).float().mean())), k
    assert sig.any() and (~sig).any()  # both sets of neurons are exercised
    # the ablated embeddings themselves (accuracies alone would not tell the variants apart on this model)
    from textspan.evals.neuron_ablation import NeuronAblationEvaluation

    ev = NeuronAblationEvaluation(loaded, W, [0] * len(items), 0, mean.numpy(), thr.numpy(), pca.numpy())
    got = ev.representations(x)
    for k, rep in reps.items():
        torch.testing.assert_close(got[k], rep, rtol=1e-6, atol=1e-8)
    assert (got["without_significant"] - got["without_insignificant"]).abs().max() > 1e-6
