"""The neuron analyses of the second-order lens (second_order_lens: compute_second_order_neuron_prs.py,
compute_pcas.py, compute_sparse_decomposition.py, compute_ablations.py) as resumable jobs.

`analyse_neurons` streams an image set twice through `textspan.neurons.neuron_effects` (one MLP layer):

1. the mean second-order effect of every neuron over the images ([W, d']);
2. each neuron's effect minus that mean (the published centring), its norm per image ([n, W], `norms.npy`), and a
   running top-k per neuron of the centred effects by norm (k = `top_k`, published 100).

The full [n, W, d'] effects are never stored (ViT-B/16: 3072 x 512 per image): what is kept is the mean, the
per-image norms and the top-k effects per neuron (the published PCA reads only those). Then, per neuron, the first
principal direction of its top-k centred effects (SVD without re-centring, the sign chosen so that more than half
of them project positively, else flipped, as published) and the share of their energy it explains; given a text
bank, a **sparse decomposition** of every direction into `components` texts by orthogonal matching pursuit
(scikit-learn's `SparseCoder`, as published: the texts' embeddings centred over the bank, each embedding dimension
divided by its norm over the bank; the published factor 100 on that dictionary only scales the coefficients and is
left out), with its reconstruction quality (the cosine between the direction and its reconstruction).

Everything is saved after every batch (one atomic file per pass): a kill loses at most the batch in flight and a
rerun resumes; a folder made with other settings is refused unless ``overwrite``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ._repr import concise
from .errors import BadInputError, job
from .jobs import Notify, resolve_model
from .store import RunFolder

log = logging.getLogger(__name__)


@concise
@dataclass
class NeuronResult:
    """The outputs of `analyse_neurons` (also in its folder): pca [W, d'], explained [W], mean [W, d'], threshold
    [W] (the k-th largest centred norm), norms [n, W], top [W, k] image indices (-1: fewer than k images),
    texts {neuron: [(text, coefficient)]} and reconstruction [W] when a bank was given."""

    layer: int
    pca: np.ndarray
    explained: np.ndarray
    mean: np.ndarray
    threshold: np.ndarray
    norms: np.ndarray
    top: np.ndarray
    paths: List[str]
    texts: Dict[int, list] = field(default_factory=dict)
    reconstruction: Optional[np.ndarray] = None

    @property
    def median_explained(self) -> float:
        """The median over the neurons of the share of their top effects' energy on their principal direction."""
        return float(np.median(self.explained))


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_npz(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInputError(f"{path}: unreadable saved state ({exc}); rerun with --overwrite to start afresh") from exc


def principal_directions(effects: np.ndarray, valid: Optional[np.ndarray] = None):
    """Per neuron, the first right singular vector of its top-k centred effects [W, k, d'] (rows with valid False
    left out), signed so that more than half of the effects project positively, else flipped (compute_pcas.py), and
    the share of the effects' energy it explains: (directions [W, d'], explained [W])."""
    W, k, d = effects.shape
    dirs = np.zeros((W, d), np.float64)
    explained = np.zeros(W, np.float64)
    for n in range(W):
        rows = effects[n] if valid is None else effects[n][valid[n]]
        if len(rows) == 0 or not np.any(rows):
            continue
        _, s, vh = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
        v = vh[0]
        positive = int(np.sum(rows @ v > 0))
        dirs[n] = v if positive > len(rows) // 2 else -v
        explained[n] = float(s[0] ** 2 / np.sum(s ** 2))
    return dirs, explained


def text_dictionary(embeddings: np.ndarray) -> np.ndarray:
    """The published dictionary for the sparse decomposition: text embeddings [M, d'] centred over the texts, each
    dimension divided by its norm over the texts (compute_sparse_decomposition.py, without its factor 100)."""
    t = np.asarray(embeddings, dtype=np.float64)
    t = t - t.mean(axis=0)
    norm = np.linalg.norm(t, axis=0, keepdims=True)
    return t / np.where(norm > 0, norm, 1.0)


def sparse_decomposition(directions: np.ndarray, dictionary: np.ndarray, components: int):
    """Orthogonal matching pursuit of every direction [W, d'] over the dictionary [M, d'] with `components` atoms
    (scikit-learn's `SparseCoder(transform_algorithm="omp")`, as published): (coefficients [W, M], reconstruction
    cosine [W])."""
    from sklearn.decomposition import SparseCoder

    if components < 1:
        raise BadInputError(f"components must be at least 1; got {components}")
    if components > dictionary.shape[0]:
        raise BadInputError(f"the text bank has {dictionary.shape[0]} texts: too few for {components} components "
                            f"(--components)")
    coder = SparseCoder(dictionary=dictionary, transform_algorithm="omp", transform_n_nonzero_coefs=components,
                        transform_alpha=1e-4)
    coef = coder.transform(directions)
    recon = coef @ dictionary
    num = np.sum(recon * directions, axis=1)
    den = np.linalg.norm(recon, axis=1) * np.linalg.norm(directions, axis=1)
    return coef, np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@job
def analyse_neurons(images, output, model="shapes", pretrained=None, *, layer: int = -2, bank=None,
                    components: int = 32, top_k: int = 100, batch_size: int = 16, device=None,
                    overwrite: bool = False, quiet: bool = True, notify: Notify = log.info) -> NeuronResult:
    """Second-order effects of the neurons of one MLP layer over an image set, their principal directions, top
    images and (with `bank`) sparse decompositions into texts; see the module doc.

    Writes into `output`: mean.npy [W, d'], norms.npy [n, W], pca.npy [W, d'], explained.npy [W], threshold.npy [W],
    top_index.npy [W, k], neurons.csv (a row per neuron), top_images.csv, images.csv, and with a bank
    decomposition.json ({neuron: [[text, coefficient], ...]}); run.json.
    """
    import torch

    from . import engine
    from .datasets import ImageDataset, ImageList, collate_with_failures
    from .neurons import check_neuron_layer, neuron_directions, neuron_effects

    if top_k < 1:
        raise BadInputError(f"top_k must be at least 1; got {top_k}")
    loaded = resolve_model(model, pretrained, device)
    tower = engine.read_tower(loaded.model)
    idx = check_neuron_layer(tower, layer)
    items = images if isinstance(images, ImageList) else ImageList.from_path(images)
    n = len(items)
    emb = tb = None
    if bank is not None:
        from .jobs import bank_and_embeddings

        emb, tb = bank_and_embeddings(bank, None, loaded, loaded.fingerprint)
        if components > len(tb):
            raise BadInputError(f"the text bank has {len(tb)} texts: too few for {components} components "
                                f"(--components)")
    settings = dict(fingerprint=loaded.fingerprint, layer=idx, images=items.digest, n_images=n, top_k=top_k,
                    bank=None if tb is None else tb.digest, components=components if tb is not None else None)
    out = Path(output)
    dev = engine.model_device(loaded.model)
    W, d_embed = tower.d_mlp, tower.d_embed
    with RunFolder(out, "neurons", settings, overwrite=overwrite, progress_name="neurons_progress.json") as run:
        progress = run.load_progress({"phase": 1})
        run.save_progress(progress)
        if overwrite:
            for name in ("pass1.npz", "pass2.npz"):
                (out / name).unlink(missing_ok=True)
        dirs = neuron_directions(loaded.model, idx)

        def batches(start: int, desc: str):
            loader = torch.utils.data.DataLoader(ImageDataset(items, loaded.preprocess, indices=range(start, n)),
                                                 batch_size=batch_size, collate_fn=collate_with_failures)
            from tqdm.auto import tqdm

            for ids, x, bad, _ in tqdm(loader, disable=quiet, desc=desc, unit="batch"):
                nxt = max(list(ids) + [i for i, _ in bad]) + 1
                eff = None
                if x is not None:
                    eff = neuron_effects(loaded.model, x.to(dev), idx, directions=dirs)
                    eff = eff.double().cpu().numpy()  # [b, W, d']
                yield list(ids), bad, nxt, eff

        # pass 1: the mean effect of every neuron
        s1 = _load_npz(out / "pass1.npz") or {"sum": np.zeros((W, d_embed)), "count": np.array(0),
                                              "next": np.array(0), "failures": np.array("[]")}
        if int(s1["next"]) < n and progress["phase"] == 1:
            if int(s1["next"]):
                notify(f"resuming pass 1 (means) at image {int(s1['next'])} of {n}")
            failures = json.loads(str(s1["failures"]))
            for ids, bad, nxt, eff in batches(int(s1["next"]), "neurons: means"):
                failures += [{"item": items.paths[i], "error": e} for i, e in bad]
                if eff is not None:
                    s1["sum"] = s1["sum"] + eff.sum(axis=0)
                    s1["count"] = np.array(int(s1["count"]) + eff.shape[0])
                s1["next"] = np.array(nxt)
                s1["failures"] = np.array(json.dumps(failures))
                _save_npz(out / "pass1.npz", **s1)
        if int(s1["count"]) == 0:
            raise BadInputError(f"no readable images in {getattr(items, 'source', images)}")
        mean = s1["sum"] / int(s1["count"])
        progress["phase"] = 2
        run.save_progress(progress)

        # pass 2: centred norms per image, and the top-k centred effects per neuron
        norms_path = out / "norms.npy"
        s2 = _load_npz(out / "pass2.npz")
        if s2 is None:
            s2 = {"effects": np.zeros((W, top_k, d_embed), np.float32), "norm": np.full((W, top_k), -np.inf),
                  "index": np.full((W, top_k), -1, np.int64), "next": np.array(0)}
            np.lib.format.open_memmap(norms_path, mode="w+", dtype=np.float32, shape=(n, W))[:] = np.nan
        norms = np.lib.format.open_memmap(norms_path, mode="r+")
        if int(s2["next"]) < n:
            if int(s2["next"]):
                notify(f"resuming pass 2 (top {top_k} per neuron) at image {int(s2['next'])} of {n}")
            for ids, bad, nxt, eff in batches(int(s2["next"]), "neurons: top effects"):
                if eff is not None:
                    c = eff - mean[None]  # [b, W, d']
                    cn = np.linalg.norm(c, axis=-1)  # [b, W]
                    norms[ids] = cn.astype(np.float32)
                    norms.flush()
                    allnorm = np.concatenate([s2["norm"], cn.T], axis=1)  # [W, k + b]
                    alleff = np.concatenate([s2["effects"], c.transpose(1, 0, 2).astype(np.float32)], axis=1)
                    allidx = np.concatenate([s2["index"], np.broadcast_to(np.asarray(ids)[None], (W, len(ids)))],
                                            axis=1)
                    keep = np.argsort(-allnorm, axis=1, kind="stable")[:, :top_k]
                    s2["norm"] = np.take_along_axis(allnorm, keep, axis=1)
                    s2["index"] = np.take_along_axis(allidx, keep, axis=1)
                    s2["effects"] = np.take_along_axis(alleff, keep[..., None], axis=1)
                s2["next"] = np.array(nxt)
                _save_npz(out / "pass2.npz", **s2)
        valid = s2["index"] >= 0
        pca, explained = principal_directions(s2["effects"], valid)
        threshold = np.where(valid.all(axis=1), s2["norm"][:, -1], np.nan)
        failures = json.loads(str(s1["failures"]))

        texts: Dict[int, list] = {}
        recon = None
        if tb is not None:
            coef, recon = sparse_decomposition(pca, text_dictionary(emb), components)
            for k in range(W):
                order = np.argsort(-np.abs(coef[k]), kind="stable")[:components]
                texts[k] = [(tb.texts[j], float(coef[k, j])) for j in order if coef[k, j] != 0]

        np.save(out / "mean.npy", mean.astype(np.float32))
        np.save(out / "pca.npy", pca.astype(np.float32))
        np.save(out / "explained.npy", explained.astype(np.float32))
        np.save(out / "threshold.npy", threshold.astype(np.float32))
        np.save(out / "top_index.npy", s2["index"])
        _write_tables(out, items, s2, mean, explained, texts, recon, failures)
        run.write_run_json(dict(images=str(getattr(items, "source", images)), model=loaded.name,
                                pretrained=loaded.pretrained, layer=idx, bank=None if bank is None else str(bank),
                                components=components, top_k=top_k, batch_size=batch_size),
                           model_fingerprint=loaded.fingerprint,
                           extra={"n_images": int(s1["count"]), "failures": failures,
                                  "stored": "mean [W, d'], centred norms [n, W] and the top-k centred effects per "
                                            "neuron (pass2.npz); not the full [n, W, d'] effects"})
    return NeuronResult(layer=idx, pca=pca, explained=explained, mean=mean, threshold=threshold,
                        norms=np.asarray(np.load(norms_path, mmap_mode="r")), top=s2["index"], paths=list(items.paths),
                        texts=texts, reconstruction=recon)


def strongest_neurons(folder, top: int):
    """(the `top` neurons of an `analyse_neurons` folder by mean centred effect norm over its images, strongest first
    (ties in neuron order), the mean norm of every neuron [W])."""
    typical = np.nanmean(np.asarray(np.load(Path(folder) / "norms.npy", mmap_mode="r")), axis=0)
    return [int(n) for n in np.argsort(-typical, kind="stable")[:top]], typical


def _write_tables(out: Path, items, s2, mean, explained, texts, recon, failures) -> None:
    W = mean.shape[0]
    with open(out / "images.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label"])
        for i, (p, y) in enumerate(zip(items.paths, items.labels)):
            w.writerow([i, p, items.class_name(y) if y >= 0 else ""])
    with open(out / "neurons.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["neuron", "mean_effect_norm", "top_effect_norm", "pca_explained", "reconstruction",
                    "top_texts"])
        for k in range(W):
            top = "; ".join(f"{t} ({c:+.3f})" for t, c in texts.get(k, [])[:5])
            w.writerow([k, f"{np.linalg.norm(mean[k]):.6g}", f"{s2['norm'][k, 0]:.6g}", f"{explained[k]:.4f}",
                        "" if recon is None else f"{recon[k]:.4f}", top])
    with open(out / "top_images.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["neuron", "rank", "index", "path", "centred_norm"])
        for k in range(W):
            for r in range(min(10, s2["index"].shape[1])):
                i = int(s2["index"][k, r])
                if i >= 0:
                    w.writerow([k, r, i, items.paths[i], f"{s2['norm'][k, r]:.6g}"])
    if texts:
        (out / "decomposition.json").write_text(json.dumps({str(k): v for k, v in texts.items()}, indent=0))


__all__ = ["NeuronResult", "analyse_neurons", "principal_directions", "sparse_decomposition", "strongest_neurons",
           "text_dictionary"]


def _folder_model(folder: Path, model, pretrained, device):
    """(the model of a finished `textspan neurons` folder: the one given, else the one it records, refused when its
    weights differ; the folder's run.json record)."""
    from .store import read_finished_run

    rec = read_finished_run(folder, "neurons")
    args = rec["arguments"]
    loaded = resolve_model(model if model is not None else args["model"],
                           pretrained if model is not None else args.get("pretrained"), device)
    read_finished_run(folder, "neurons", loaded.fingerprint)
    return loaded, rec


@job
def ablate_neurons(neurons, images=None, output=None, model=None, pretrained=None, *, classes=None, templates=None,
                   classifier=None, batch_size: int = 16, device=None, overwrite: bool = False, quiet: bool = True,
                   notify: Notify = log.info) -> dict:
    """Zero-shot accuracy on `images` (class sub-folders; None: the images the neurons folder was made from, on
    their classes) with the second-order effects of the neurons analysed in the `analyse_neurons` folder `neurons`
    mean-ablated (`textspan.evals.neuron_ablation`); model=None: the one recorded in that folder (refused when its
    weights differ). Writes neuron_ablation.json. (compute_ablations.py takes its means from a training set and
    measures on a validation set: pass other images for that.)"""
    from .benchmark import _class_labels
    from .datasets import ImageList, ImageListSource
    from .evals.neuron_ablation import NeuronAblationEvaluation
    from .evaluation import run_evaluation
    from .jobs import zero_shot_classifier

    folder = Path(neurons)
    loaded, rec = _folder_model(folder, model, pretrained, device)
    args = rec["arguments"]
    if images is None:
        images = args["images"]
    items = images if isinstance(images, ImageList) else ImageList.from_path(images)
    W, classnames = zero_shot_classifier(loaded, classes, templates, classifier, default_classes=items.classes)
    labels = _class_labels(items, classnames)
    if labels is None:
        raise BadInputError(f"{images}: neuron ablation measures accuracy, so the images need class sub-folders")
    arrays = {k: np.load(folder / f"{k}.npy") for k in ("mean", "threshold", "pca")}
    layer = int(args["layer"])
    ev = NeuronAblationEvaluation(loaded, W, labels, layer, arrays["mean"], arrays["threshold"], arrays["pca"])
    import hashlib

    settings = dict(fingerprint=loaded.fingerprint, neurons=str(folder.resolve()), layer=layer,
                    neurons_digest=hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest(),
                    images=items.digest, classifier=hashlib.sha256(np.ascontiguousarray(W).tobytes()).hexdigest())
    return run_evaluation(ev, ImageListSource(items, loaded.preprocess), output, settings, batch_size=batch_size,
                          overwrite=overwrite, quiet=quiet, notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(neurons=str(neurons), images=str(images), model=loaded.name, layer=layer))


__all__ += ["ablate_neurons"]


@concise
@dataclass
class NeuronMaps:
    """maps [b, n_neurons, k, grid_h, grid_w]: each neuron's second-order effect per source patch along each direction
    (a prompt's text embedding, or the neuron's own principal direction), for the images; `neurons` the ids, `columns`
    the directions' names."""

    layer: int
    neurons: List[int]
    columns: List[str]
    maps: np.ndarray


@job
def draw_neuron_maps(images, neurons, output=None, neuron_ids=None, prompts=(), model=None, pretrained=None, *,
                     top: int = 4, device=None, overwrite: bool = False, quiet: bool = True) -> NeuronMaps:
    """Heatmaps of neurons' second-order effects (`textspan.neurons.neuron_maps`) on image files, for the neurons of a
    `textspan neurons` folder: `neuron_ids` (default: the `top` neurons by mean centred effect), along each prompt
    (or, without prompts, along each neuron's own principal direction). Writes maps.npy and one figure per neuron
    (images x directions, signed: red towards the direction; the panels of a row share a scale) given `output`."""
    import torch

    from . import engine
    from .datasets import read_image
    from .neurons import neuron_maps
    from .text import encode_texts

    folder = Path(neurons)
    loaded, rec = _folder_model(folder, model, pretrained, device)
    layer = int(rec["arguments"]["layer"])
    pca = np.load(folder / "pca.npy")
    W = pca.shape[0]
    if neuron_ids is None:
        ids, _ = strongest_neurons(folder, top)
    else:
        ids = [int(n) for n in (str(neuron_ids).split(",") if isinstance(neuron_ids, str) else neuron_ids)]
        bad = [n for n in ids if not 0 <= n < W]
        if bad:
            raise BadInputError(f"neurons {bad} are out of range: block {layer}'s MLP has {W} (0 .. {W - 1})")
    if not images:
        raise BadInputError("no images given")
    tower = engine.read_tower(loaded.model)
    pil = [read_image(p) for p in images]
    x = torch.stack([loaded.preprocess(im) for im in pil]).to(engine.model_device(loaded.model))
    grid = tower.grid_of(x)
    if prompts:
        T = torch.from_numpy(encode_texts(loaded.model, loaded.tokenizer, list(prompts)))
        m = neuron_maps(loaded.model, x, layer, T, neurons=ids)  # [b, n, k, N]
        columns = list(prompts)
    else:  # each neuron along its own direction
        m = torch.stack([neuron_maps(loaded.model, x, layer, torch.from_numpy(pca[n])[None], neurons=[n])[:, 0]
                         for n in ids], dim=1)  # [b, n, 1, N]
        columns = ["its direction"]
    maps = m[..., tower.n_prefix:].reshape(*m.shape[:3], *grid).float().cpu().numpy()
    result = NeuronMaps(layer, ids, columns, maps)
    if output is not None:
        from .visualize import overlay_grid

        settings = dict(fingerprint=loaded.fingerprint, neurons=str(folder.resolve()), ids=ids,
                        prompts=list(prompts), images=[str(Path(p).resolve()) for p in images])
        with RunFolder(output, "neuron-heatmap", settings, overwrite=overwrite) as run:
            out = Path(output)
            np.save(out / "maps.npy", maps)
            shown = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]
            names = [Path(p).stem for p in images]
            for k, n in enumerate(ids):
                fig = overlay_grid(shown, maps[:, k], names, columns, out / f"neuron_{n}.png",
                                   title=f"block {layer}, neuron {n}: second-order effect per source patch",
                                   relative=True, bar_label="effect along the\ndirection (signed)")
                import matplotlib.pyplot as plt

                plt.close(fig)
            run.write_run_json(dict(images=[str(p) for p in images], neurons=str(neurons), ids=ids,
                                    prompts=list(prompts)), model_fingerprint=loaded.fingerprint)
    return result


__all__ += ["NeuronMaps", "draw_neuron_maps"]
