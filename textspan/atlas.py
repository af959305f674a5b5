"""The head atlas: a self-contained static web site of a cache's heads (opens from file://; no server, no network).

    textspan.build_atlas("cache", "labels", "site", ablations="abl")      # then open site/index.html

- ``index.html``: the layer x head grid coloured by a chosen measure (variance explained by the head's TextSpan
  texts; the single-head ablation effect with ``ablations``; for the built-in model the ground-truth attribute that
  explains the head; the mean norm of the head's terms), each cell linking to its head; each layer's mean
  contribution to the embedding; a search box that filters the heads whose labels contain a word (in the page).
- ``heads/L{l}H{h}.html``: the head's texts with variance bars and the cumulative curve; for each text the top
  images by the head's projection on that text's TextSpan direction (thumbnails); the head's maps of its top texts
  on sample images (when the cache's model can be loaded); its ablation effect.
- ``thumbs/`` one small JPEG per image shown (each written once, however many heads show it), ``assets/`` the CSS
  and script shipped in the package, ``data.js`` the measures and labels the page script reads, ``run.json``.

Memory stays bounded for large caches: the head terms are read in row blocks and the top images kept per block.
"""
from __future__ import annotations

import html
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ._repr import concise
from .errors import BadInputError, ModelMismatchError, job
from .jobs import HeadLabels, Notify, is_builtin, open_cache
from .names import head_name
from .store import RunFolder

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "atlas_assets"
_BLOCK = 512  # rows of the head terms read at a time


@concise
@dataclass
class AtlasResult:
    """Where the site is and what it holds."""

    output: Path
    n_heads: int
    n_thumbnails: int
    n_maps: int
    seconds: float
    bytes: int
    measures: List[str]


@job
def build_atlas(cache, labels, output, *, ablations=None, n_images: int = 6, map_images: int = 4, model=None,
                pretrained=None, device=None, maps: bool = True, neurons=None, top_neurons: int = 30,
                overwrite: bool = False, notify: Notify = log.info, quiet: bool = True) -> AtlasResult:
    """Write the head atlas of a cache and its TextSpan labels into `output` (see the module doc).

    Args:
        cache: a cache folder or `HeadCache`.
        labels: a label-heads folder (or `HeadLabels` with directions) of this cache.
        ablations: an `ablate` output folder of this cache (its single-head effects colour the grid and the pages).
        n_images: top images shown per text.
        map_images: sample images on which each head's maps are drawn (the cache's first rows); 0 or ``maps=False``
            for none. Maps need the cache's model (loaded from its manifest unless `model` is given).
        neurons: `textspan neurons` folders of this model (one or a list): a page per layer,
            ``neurons/L{l}.html``, with its `top_neurons` neurons by mean centred effect norm (their share on their
            principal direction, texts, top images and the map of the effect along that direction on the top image),
            linked from the index.

    Returns:
        `AtlasResult` (pages, thumbnails, maps, seconds, bytes on disk).
    """
    t0 = time.time()
    c = open_cache(cache)
    lab = labels if isinstance(labels, HeadLabels) else HeadLabels.load(labels)
    if lab.fingerprint and lab.fingerprint != c.manifest["fingerprint"]:
        raise ModelMismatchError(f"the labels were made on a cache of another model (fingerprint {lab.fingerprint}; "
                                 f"the cache's is {c.manifest['fingerprint']})")
    heads = sorted(lab.results)
    if not heads:
        raise BadInputError("the labels hold no head")
    L, H = c.manifest["n_layers"], c.manifest["n_heads"]
    if any(l >= L or h >= H for l, h in heads):
        raise BadInputError(f"the labels name heads outside the cache's {L} layers x {H} heads")
    directions = _directions(c, lab, heads, notify)
    abl = _read_ablations(ablations, L, H) if ablations is not None else None
    out = Path(output)
    settings = dict(cache_fingerprint=c.manifest["fingerprint"], cache_images=c.manifest.get("images_digest"),
                    cache_rows=len(c), labels_bank=lab.bank_digest, labels_heads=[head_name(*k) for k in heads],
                    labels_n_texts=lab.n_texts, labels_rank=lab.rank, ablations=None if ablations is None else str(Path(ablations).resolve()),
                    n_images=n_images, map_images=map_images if maps else 0)
    neuron_dirs = [] if neurons is None else [Path(p) for p in ([neurons] if isinstance(neurons, (str, Path))
                                                                 else neurons)]
    neuron_layers = [_neuron_folder(p, c.manifest["fingerprint"]) for p in neuron_dirs]
    if neuron_dirs:
        settings["neurons"] = [str(p.resolve()) for p in neuron_dirs]
        settings["top_neurons"] = top_neurons
    with RunFolder(out, "atlas", settings, overwrite=overwrite) as run:
        for sub in ("heads", "thumbs", "assets"):
            (out / sub).mkdir(exist_ok=True)
        for f in ASSETS.iterdir():
            if f.suffix in (".css", ".js"):
                shutil.copyfile(f, out / "assets" / f.name)
        top, norms, layer_contrib = _scan(c, heads, directions, n_images)
        images = c.images
        rows = sorted({int(r) for per in top.values() for rs, _ in per for r in rs})
        n_thumbs = _thumbnails(images, rows, out / "thumbs", notify)
        map_files = _maps(c, lab, heads, out / "heads", map_images, model, pretrained, device, notify, quiet) \
            if maps and map_images > 0 else {}
        measures = _measures(c, lab, heads, norms, abl, notify)
        _write_data_js(out / "data.js", L, H, heads, lab, measures)
        _write_index(out / "index.html", c, lab, heads, measures, layer_contrib, L, H, neuron_layers)
        for folder, layer in zip(neuron_dirs, neuron_layers):
            _write_neuron_page(out, folder, layer, top_neurons, model, pretrained, device, notify)
        for key in tqdm(heads, disable=quiet, desc="head pages", unit="head"):
            _write_head_page(out / "heads" / f"{head_name(*key)}.html", key, c, lab, top[key], images, abl,
                             map_files.get(key), measures)
        run.write_run_json(dict(cache=str(c.folder), labels=str(getattr(labels, "folder", labels)),
                                ablations=None if ablations is None else str(ablations), n_images=n_images,
                                map_images=map_images if map_files else 0),
                           model_fingerprint=c.manifest["fingerprint"],
                           extra={"model": c.manifest["model"], "bank": lab.bank, "bank_digest": lab.bank_digest})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return AtlasResult(out, len(heads), n_thumbs, len(map_files), time.time() - t0, size, list(measures))


# --------------------------------------------------------------------------------------------------------------------
# the numbers


def _directions(c, lab: HeadLabels, heads, notify) -> Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]]:
    """Per head: (unit TextSpan directions [m, d'], the head's mean term [d']) from the labels, or recomputed with
    TextSpan on the cache when the label folder predates stored directions."""
    missing = [k for k in heads if np.asarray(lab.results[k].directions).size == 0]
    if missing:
        from .jobs import label_cache

        notify(f"the labels hold no TextSpan directions for {len(missing)} heads: recomputing them from bank "
               f"{lab.bank!r}")
        redo = label_cache(c, bank=lab.bank, n_texts=lab.n_texts, layers=sorted({l for l, _ in missing}),
                           rank=lab.rank)
        for k in missing:
            if redo.results[k].texts != lab.results[k].texts:
                raise BadInputError(f"recomputed labels of {head_name(*k)} differ from the label folder's; re-run "
                                    f"label-heads")
            lab.results[k] = redo.results[k]
    out = {}
    for k in heads:
        r = lab.results[k]
        d = np.asarray(r.directions, dtype=np.float64)
        if d.ndim != 2 or d.shape[1] != c.manifest["d_embed"]:
            raise BadInputError(f"{head_name(*k)}: label directions of shape {d.shape} for a cache of width "
                                f"{c.manifest['d_embed']}")
        out[k] = (d / np.linalg.norm(d, axis=1, keepdims=True), np.asarray(r.mean, dtype=np.float64))
    return out


def _scan(c, heads, directions, k: int):
    """One pass over the head terms in row blocks: per (head, text) the k images with the largest projection on the
    text's direction (of the centred terms), per head the mean norm of its terms, per layer the mean contribution
    (dot product with the embedding) of its attention and of its MLP."""
    arr, emb, mlps = c.heads, c.embeddings, c.mlps
    n, L = arr.shape[0], arr.shape[1]
    index = {key: i for i, key in enumerate(heads)}
    lh = np.array(heads)
    T = max(len(directions[key][0]) for key in heads)
    U = np.zeros((len(heads), T, arr.shape[-1]), np.float32)  # [heads, texts, d']
    offset = np.zeros((len(heads), T), np.float64)
    for key, i in index.items():
        u, mean = directions[key]
        U[i, :len(u)] = u
        offset[i, :len(u)] = u @ mean
    best_s = np.full((len(heads), T, 0), -np.inf)
    best_r = np.zeros((len(heads), T, 0), np.int64)
    norms = np.zeros(len(heads))
    contrib = np.zeros((2, L + 1))  # attention per layer (index l), MLP-type terms (index l, l = 0 the embedding)
    for a in range(0, n, _BLOCK):
        b = min(a + _BLOCK, n)
        block = np.asarray(arr[a:b], dtype=np.float32)  # [B, L, H, d'] one sequential read
        e = np.asarray(emb[a:b], dtype=np.float32)
        contrib[0, :L] += np.einsum("bld,bd->l", block.sum(axis=2), e, dtype=np.float64)
        contrib[1] += np.einsum("bld,bd->l", np.asarray(mlps[a:b], dtype=np.float32), e, dtype=np.float64)
        sel = block[:, lh[:, 0], lh[:, 1]]  # [B, heads, d']
        norms += np.linalg.norm(sel, axis=2).sum(axis=0)
        scores = np.einsum("bhd,htd->htb", sel, U, dtype=np.float64) - offset[:, :, None]  # [heads, T, B]
        rows = np.broadcast_to(np.arange(a, b), scores.shape)
        cand_s = np.concatenate([best_s, scores], axis=2)
        cand_r = np.concatenate([best_r, rows], axis=2)
        keep = min(k, cand_s.shape[2])
        part = np.argpartition(-cand_s, keep - 1, axis=2)[:, :, :keep]
        best_s = np.take_along_axis(cand_s, part, axis=2)
        best_r = np.take_along_axis(cand_r, part, axis=2)
    order = np.argsort(-best_s, axis=2, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=2)
    best_r = np.take_along_axis(best_r, order, axis=2)
    top = {key: [(best_r[i, t].tolist(), best_s[i, t].tolist()) for t in range(len(directions[key][0]))]
           for key, i in index.items()}
    return top, {key: norms[i] / n for key, i in index.items()}, contrib / n


def _read_ablations(folder, L: int, H: int) -> dict:
    path = Path(folder) / "ablations.json"
    if not path.is_file():
        raise BadInputError(f"{path} not found (the output of `textspan ablate`)")
    res = json.loads(path.read_text())
    single = np.asarray(res.get("single_heads"), dtype=np.float64)
    if single.shape != (L, H):
        raise BadInputError(f"{path}: single-head accuracies of shape {single.shape}, the cache has {L} x {H} heads")
    out = {"effect": single - res["baseline"], "baseline": res["baseline"], "protocol": res.get("protocol", "")}
    if "single_heads_margin" in res:  # ablate outputs before the margin was measured have accuracy only
        out["margin_effect"] = np.asarray(res["single_heads_margin"], dtype=np.float64) - res["baseline_margin"]
        out["baseline_margin"] = res["baseline_margin"]
    return out


def _measures(c, lab: HeadLabels, heads, norms, abl, notify) -> Dict[str, dict]:
    """name -> {label, values {L3H1: v}, min, max, diverging, scale, digits, notes}."""
    def seq(label, values, digits=2, notes=None):
        vals = [v for v in values.values() if v is not None]
        return {"label": label, "values": values, "min": float(min(vals)), "max": float(max(vals)),
                "diverging": False, "digits": digits, "notes": notes or {}}

    out = {"variance": seq("fraction of the head's variance explained by its texts",
                           {head_name(*k): float(lab.results[k].cumulative[-1]) if len(lab.results[k].cumulative)
                            else 0.0 for k in heads})}
    if abl is not None:
        eff = abl["effect"]
        scale = float(np.abs(eff).max()) or 1.0
        if "margin_effect" in abl:  # first: it does not saturate, so it is the one that shows something
            meff = abl["margin_effect"]
            mscale = float(np.abs(meff).max()) or 1.0
            out["margin"] = {"label": "correct-class margin change when mean-ablated (cosine; red, negative: the "
                                      "head matters)",
                             "values": {head_name(l, h): float(meff[l, h]) for l in range(meff.shape[0])
                                        for h in range(meff.shape[1])},
                             "min": -mscale, "max": mscale, "diverging": True, "scale": mscale, "digits": 4,
                             "notes": {}}
        out["ablation"] = {"label": "accuracy change when mean-ablated (pts; red, negative: the head matters)",
                           "values": {head_name(l, h): float(eff[l, h]) for l in range(eff.shape[0])
                                      for h in range(eff.shape[1])},
                           "min": -scale, "max": scale, "diverging": True, "scale": scale, "digits": 2, "notes": {}}
    truth = _ground_truth(c, heads, notify)
    if truth is not None:
        out["attribute"] = seq("correlation ratio of the head's outputs with its best attribute (shapes world)",
                               {k: v for k, (v, _) in truth.items()}, notes={k: a for k, (_, a) in truth.items()})
    out["norm"] = seq("mean norm of the head's terms", {head_name(*k): float(v) for k, v in norms.items()}, digits=3)
    return out


def _ground_truth(c, heads, notify) -> Optional[Dict[str, Tuple[float, str]]]:
    """For a built-in model's cache of shapes-world images: per head the attribute with the largest correlation
    ratio of the head's outputs (between-class over total variance), from the world's metadata.csv."""
    if not is_builtin(c.manifest["model"]):
        return None
    import pandas as pd

    from . import world
    from .metrics import correlation_ratio

    source = Path(str(c.manifest.get("images_source", "")))
    meta = next((p / "metadata.csv" for p in (source, source.parent) if (p / "metadata.csv").is_file()), None)
    if meta is None:
        return None
    table = pd.read_csv(meta, keep_default_na=False)
    if "path" not in table.columns:
        return None
    by_path = {str((meta.parent / p).resolve()): i for i, p in enumerate(table["path"])}
    rows = [by_path.get(str(Path(p).resolve())) for p in c.images["path"]]
    if any(r is None for r in rows):
        notify(f"{meta}: not every cached image is listed; no ground-truth measure")
        return None
    attrs = [a for a in world.ATTRIBUTES if a in table.columns]
    keep = np.arange(min(len(rows), 2000))
    values = {a: table[a].astype(str).to_numpy()[np.asarray(rows)[keep]] for a in attrs}
    arr = c.heads
    out = {}
    for l, h in heads:
        X = np.asarray(arr[keep, l, h], dtype=np.float64)
        ratios = {a: correlation_ratio(X, v) for a, v in values.items()}
        best = max(ratios, key=ratios.get)
        out[head_name(l, h)] = (float(ratios[best]), best)
    return out


# --------------------------------------------------------------------------------------------------------------------
# images


def _thumbnails(images, rows, folder: Path, notify, size: int = 64) -> int:
    """One JPEG per image row (written once: existing files are kept)."""
    from .datasets import read_image

    made = 0
    for r in rows:
        path = folder / f"{r:06d}.jpg"
        if path.is_file():
            continue
        try:
            im = read_image(images["path"][r])
        except BadInputError as exc:  # moved since caching: a grey square names the gap
            notify(f"thumbnail of row {r}: {exc}")
            from PIL import Image

            im = Image.new("RGB", (size, size), (200, 200, 200))
        im.thumbnail((size, size))
        im.save(path, quality=80)
        made += 1
    return len(rows)


def _maps(c, lab, heads, folder: Path, k: int, model, pretrained, device, notify,
          quiet: bool = True) -> Dict[Tuple[int, int], str]:
    """Per head a JPEG of its top-3 texts' maps (relative to their mean) on the cache's first `k` images, from one
    spatial decomposition; nothing when the model cannot be loaded (said)."""
    import torch

    from . import engine
    from .datasets import read_image
    from .decomposition import decompose
    from .jobs import model_for_cache
    from .text import encode_texts
    from .visualize import map_grid_image

    try:
        loaded = model_for_cache(c, model, pretrained, device)
    except Exception as exc:  # offline weights, another model: the atlas is still useful without maps
        notify(f"no head maps: the cache's model cannot be used ({type(exc).__name__}: {exc})")
        return {}
    if loaded.preprocess is None:
        notify("no head maps: no preprocess given with the model")
        return {}
    paths = list(c.images["path"][:k])
    pil = [read_image(p) for p in paths]
    x = torch.stack([loaded.preprocess(im) for im in pil]).to(engine.model_device(loaded.model))
    with torch.no_grad():
        d = decompose(loaded.model, x, spatial=True)  # heads [k, L, N, H, d']
    grid = engine.read_tower(loaded.model).grid_size
    texts = [(key, lab.results[key].texts[:3]) for key in heads]
    flat = sorted({t for _, ts in texts for t in ts})
    emb = encode_texts(loaded.model, loaded.tokenizer, flat)
    row = {t: i for i, t in enumerate(flat)}
    shown = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]
    out = {}
    for (l, h), ts in tqdm(texts, disable=quiet, desc="head maps", unit="head"):
        T = torch.from_numpy(emb[[row[t] for t in ts]]).to(d.heads.dtype)
        m = (d.heads[:, l, 1:, h, :] @ T.t()).transpose(1, 2).reshape(len(pil), len(ts), *grid)  # [k, t, gh, gw]
        if len(ts) > 1:
            m = m - m.mean(dim=1, keepdim=True)
        name = f"{head_name(l, h)}_maps.jpg"
        map_grid_image(shown, m.float().cpu().numpy(), relative=len(ts) > 1, cell=160,
                       col_labels=list(ts)).save(folder / name, quality=88)
        out[(l, h)] = name
    return out


# --------------------------------------------------------------------------------------------------------------------
# pages


def _page(title: str, body: str, root: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="stylesheet" href="{root}assets/atlas.css">\n</head>\n<body>\n{body}\n</body>\n</html>\n')


def _write_data_js(path: Path, L, H, heads, lab, measures) -> None:
    data = {"layers": L, "n_heads": H, "heads": [head_name(*k) for k in heads],
            "labels": {head_name(*k): list(lab.results[k].texts) for k in heads},
            "shares": {head_name(*k): [round(float(v), 6) for v in lab.results[k].variance_explained] for k in heads},
            "measures": measures}
    path.write_text("window.ATLAS = " + json.dumps(data, separators=(",", ":")) + ";\n")


def _svg_bars(values: Sequence[float], labels: Sequence[str], width=520, height=140) -> str:
    """A small signed bar chart (inline SVG): the axis spans [min(0, values), max(0, values)], zero line drawn."""
    hi = max(0.0, max(values, default=0.0))
    lo = min(0.0, min(values, default=0.0))
    span = max(hi - lo, 1e-12)
    top, bottom = 16.0, float(height)          # plotting band (pixels), value labels above the band
    scale = (bottom - top) / span
    zero = top + hi * scale
    n = len(values)
    bw = (width - 40) / max(n, 1)
    parts = [f'<svg width="{width}" height="{height + 18}" role="img" aria-label="bar chart">',
             f'<line x1="30" y1="{zero:.1f}" x2="{width}" y2="{zero:.1f}" stroke="#999"/>',
             f'<text x="0" y="{zero + 4:.1f}">0</text>']
    for i, (v, lab) in enumerate(zip(values, labels)):
        h = abs(v) * scale
        y = zero - h if v >= 0 else zero
        colour = "#4c78a8" if v >= 0 else "#e45756"
        x = 32 + i * bw
        ty = y - 3 if v >= 0 else y + h + 11
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw * 0.8:.1f}" height="{h:.1f}" fill="{colour}">'
                     f'<title>{html.escape(lab)}: {v:+.4f}</title></rect>')
        parts.append(f'<text x="{x:.1f}" y="{ty:.1f}" font-size="10">{v:+.3f}</text>')
        parts.append(f'<text x="{x:.1f}" y="{height + 14}">{html.escape(lab)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _neuron_folder(folder: Path, fingerprint: str) -> int:
    """The layer of a finished `textspan neurons` folder of the cache's model (refused otherwise)."""
    from .store import read_finished_run

    return int(read_finished_run(folder, "neurons", fingerprint)["arguments"]["layer"])


def _write_neuron_page(out: Path, folder: Path, layer: int, top: int, model, pretrained, device, notify) -> None:
    """neurons/L{l}.html: the layer's `top` neurons by mean centred effect norm."""
    import csv as _csv

    (out / "neurons").mkdir(exist_ok=True)
    from .neuron_jobs import strongest_neurons

    order, typical = strongest_neurons(folder, top)
    explained = np.load(folder / "explained.npy")
    texts = json.loads((folder / "decomposition.json").read_text()) if (folder / "decomposition.json").is_file() \
        else {}
    tops: Dict[int, List[Tuple[int, str]]] = {}
    with open(folder / "top_images.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in _csv.DictReader(f):
            tops.setdefault(int(row["neuron"]), []).append((int(row["index"]), row["path"]))
    maps = _neuron_maps(out / "neurons", folder, layer, order, tops, model, pretrained, device, notify)
    from .datasets import read_image

    rows = []
    for n in order:
        n = int(n)
        thumbs = []
        for idx, path in tops.get(n, [])[:6]:
            name = f"n{layer}_{idx:06d}.jpg"
            if not (out / "thumbs" / name).is_file():
                try:
                    im = read_image(path)
                    im.thumbnail((64, 64))
                    im.save(out / "thumbs" / name, quality=80)
                except BadInputError as exc:
                    notify(f"neuron thumbnail {path}: {exc}")
                    continue
            thumbs.append(f'<img src="../thumbs/{name}" alt="{html.escape(Path(path).name)}" '
                          f'title="{html.escape(path)}">')
        said = "; ".join(f"{html.escape(t)} ({c:+.2f})" for t, c in texts.get(str(n), [])[:5]) or "(no text bank)"
        m = f'<img class="map" src="{maps[n]}" alt="map of neuron {n}">' if n in maps else ""
        rows.append(f"<tr><td>{n}</td><td>{typical[n]:.4g}</td><td>{explained[n]:.0%}</td><td>{said}</td>"
                    f"<td>{''.join(thumbs)}</td><td>{m}</td></tr>")
    body = f"""<nav><a href="../index.html">&larr; all heads</a></nav>
<h1>Neurons of block {layer}'s MLP</h1>
<p class="meta">The {len(order)} neurons with the largest mean second-order effect (centred, over the images of
{html.escape(str(folder))}); the share of their top effects on their principal direction; that direction decomposed
into texts (orthogonal matching pursuit, coefficients in brackets); their top images; and on the top image, where
the effect along the direction comes from (per source token, red towards the direction).</p>
<table class="neurons"><tr><th>neuron</th><th>mean |effect|</th><th>on its direction</th><th>texts</th>
<th>top images</th><th>map</th></tr>
{chr(10).join(rows)}
</table>"""
    (out / "neurons" / f"L{layer}.html").write_text(_page(f"neurons of block {layer}", body, "../"))


def _neuron_maps(folder_out: Path, folder: Path, layer: int, order, tops, model, pretrained, device,
                 notify) -> Dict[int, str]:
    """Per neuron a JPEG of its effect along its own principal direction, per source token, on its top image."""
    import torch

    from . import engine
    from .datasets import read_image
    from .jobs import resolve_model
    from .neurons import neuron_maps
    from .store import read_json
    from .visualize import map_grid_image

    rec = read_json(folder / "run.json")
    try:
        loaded = resolve_model(model if model is not None else rec["arguments"]["model"],
                               pretrained if model is not None else rec["arguments"].get("pretrained"), device)
    except Exception as exc:  # the pages are still useful without maps
        notify(f"no neuron maps: the model cannot be loaded ({type(exc).__name__}: {exc})")
        return {}
    pca = torch.from_numpy(np.load(folder / "pca.npy"))
    tower = engine.read_tower(loaded.model)
    out = {}
    for n in order:
        n = int(n)
        if not tops.get(n):
            continue
        im = read_image(tops[n][0][1])
        x = loaded.preprocess(im)[None].to(engine.model_device(loaded.model))
        m = neuron_maps(loaded.model, x, layer, pca[n][None], neurons=[n])[0, 0, 0, tower.n_prefix:]
        grid = tower.grid_of(x)
        name = f"L{layer}_n{n}.jpg"
        map_grid_image([im.resize((x.shape[-1], x.shape[-2]))], m.reshape(1, 1, *grid).float().cpu().numpy(),
                       relative=True, cell=120, col_labels=[f"neuron {n}"]).save(folder_out / name, quality=88)
        out[n] = name
    return out


def _write_index(path: Path, c, lab, heads, measures, contrib, L, H, neuron_layers=()) -> None:
    labelled = {head_name(*k) for k in heads}
    head_row = "".join(f"<th>H{h}</th>" for h in range(H))
    body_rows = []
    for l in range(L):
        cells = []
        for h in range(H):
            name = head_name(l, h)
            if name in labelled:
                texts = lab.results[(l, h)].texts
                top = texts[0] if len(texts) else ""
                cells.append(f'<td data-head="{name}" data-top="{html.escape(top)}"><a href="heads/{name}.html">'
                             f'<span class="idx">{h}</span><span class="top">{html.escape(top)}</span></a></td>')
            else:
                cells.append(f'<td data-head="{name}" title="{name}: not labelled">{h}</td>')
        body_rows.append(f"<tr><th>L{l}</th>{''.join(cells)}</tr>")
    options = "".join(f'<option value="{k}">{html.escape(v["label"])}</option>' for k, v in measures.items())
    values, names = [float(contrib[1, 0])], ["embed"]  # in the order the residual stream adds them
    for l in range(L):
        values += [float(contrib[0, l]), float(contrib[1, l + 1])]
        names += [f"L{l} attn", f"L{l} mlp"]
    bars = _svg_bars(values, names, width=max(520, 40 * (2 * L + 1) + 40))
    m = c.manifest
    body = f"""<h1>Head atlas: {html.escape(str(m['model']))}</h1>
<p class="meta">{len(c)} images &middot; {L} layers x {H} heads &middot; {len(heads)} heads labelled with
{lab.n_texts} texts each (bank {html.escape(Path(lab.bank).name if lab.bank else '?')}, rank {lab.rank}) &middot;
model fingerprint {html.escape(m['fingerprint'])}</p>
<h2>Heads</h2>
<div class="controls">
<label>colour by <select id="measure">{options}</select></label>
<label>which heads do <input id="search" type="search" placeholder="a word, e.g. water" autocomplete="off"></label>
<span id="count" class="meta"></span>
</div>
<div id="legend" class="legend"><span class="lo"></span><span class="bar"></span><span class="hi"></span>
<span class="what"></span></div>
<table class="grid"><tr><th></th>{head_row}</tr>
{chr(10).join(body_rows)}
</table>
<ol id="results"></ol>
<h2>Each layer's contribution to the embedding</h2>
<p class="meta">Mean over the images of the dot product of the layer's attention terms (all heads, all tokens) and of
its MLP term with the normalised embedding; all bars together sum to 1 per image (the decomposition's identity).</p>
{bars}
{_neuron_links(neuron_layers)}
<script src="data.js"></script>
<script src="assets/atlas.js"></script>"""
    path.write_text(_page(f"textspan atlas: {m['model']}", body, ""))


def _neuron_links(layers) -> str:
    if not layers:
        return ""
    links = " &middot; ".join(f'<a href="neurons/L{l}.html">block {l}</a>' for l in sorted(layers))
    return f"<h2>Neurons</h2>\n<p>Second-order effects of MLP neurons: {links}</p>"


MIN_SHARE_FOR_IMAGES = 0.01  # a text explaining less of its head's variance gets no thumbnails (they would not show it)


def _write_head_page(path: Path, key, c, lab, top, images, abl, maps_file, measures) -> None:
    name = head_name(*key)
    r = lab.results[key]
    rows = []
    for i, (t, v, cum) in enumerate(zip(r.texts, r.variance_explained, r.cumulative)):
        rs, ss = top[i] if i < len(top) else ([], [])
        if float(v) < MIN_SHARE_FOR_IMAGES:
            thumbs = (f'<span class="meta weak">explains {100 * float(v):.1f}% of the head\'s variance (under '
                      f'{100 * MIN_SHARE_FOR_IMAGES:.0f}%): too little for the top images along it to show it</span>')
        else:
            thumbs = "".join(f'<figure><img src="../thumbs/{int(row):06d}.jpg" alt="image row {int(row)}" '
                             f'title="{html.escape(str(images["path"][int(row)]))}"><figcaption>{s:+.3f}'
                             f'</figcaption></figure>' for row, s in zip(rs, ss))
        rows.append(f'<tr><td class="num">{i + 1}</td><td>{html.escape(t)}</td>'
                    f'<td class="num"><span class="bar" style="width:{max(1, 200 * float(v)):.0f}px"></span> '
                    f'{100 * float(v):.1f}%</td><td class="num">{100 * float(cum):.1f}%</td>'
                    f'<td><div class="thumbs">{thumbs}</div></td></tr>')
    cum = [0.0] + [float(x) for x in r.cumulative]
    w, h = 300, 120
    pts = " ".join(f"{20 + i * (w - 30) / max(1, len(cum) - 1):.1f},{h - 10 - x * (h - 20):.1f}"
                   for i, x in enumerate(cum))
    curve = (f'<svg width="{w}" height="{h}" role="img" aria-label="cumulative variance explained">'
             f'<line x1="20" y1="{h - 10}" x2="{w}" y2="{h - 10}" stroke="#999"/>'
             f'<line x1="20" y1="10" x2="20" y2="{h - 10}" stroke="#999"/>'
             f'<polyline fill="none" stroke="#4c78a8" stroke-width="2" points="{pts}"/>'
             f'<text x="24" y="12">100%</text><text x="{w - 60}" y="{h - 14}">{len(cum) - 1} texts</text></svg>')
    effect = ""
    if abl is not None:
        e = float(abl["effect"][key])
        cls = "effect-neg" if e < 0 else "effect-pos"
        margin = ""
        if "margin_effect" in abl:
            me = float(abl["margin_effect"][key])
            margin = (f' and the correct class\'s mean margin (its logit minus the largest other) by <b class='
                      f'"{"effect-neg" if me < 0 else "effect-pos"}">{me:+.4f}</b> (baseline '
                      f'{abl["baseline_margin"]:.4f})')
        effect = (f'<h2>Ablation</h2><p>Mean-ablating {name} changes zero-shot accuracy by <b class="{cls}">'
                  f'{e:+.2f} points</b> (baseline {abl["baseline"]:.2f}%){margin}; red, negative: the head matters '
                  f'({html.escape(abl["protocol"])}).</p>')
    truth = ""
    if "attribute" in measures and name in measures["attribute"]["values"]:
        truth = (f'<p class="meta">Ground truth: the attribute that explains this head best is '
                 f'<b>{html.escape(measures["attribute"]["notes"][name])}</b> (correlation ratio '
                 f'{measures["attribute"]["values"][name]:.2f}).</p>')
    maps = ""
    if maps_file:
        maps = (f'<h2>Maps of its top texts</h2><p class="meta">Columns: the image, then each of the top '
                f'{min(3, len(r.texts))} texts ({html.escape(", ".join(r.texts[:3]))}); this head\'s direct '
                f'contribution per patch dotted with the text, relative to the mean over these texts (red: towards '
                f'the text, blue: away; transparent: near zero; one colour scale per row, its range on the right).</p>'
                f'<img class="maps" src="{html.escape(maps_file)}" alt="maps of {name} on sample images">')
    body = f"""<nav><a href="../index.html">&larr; all heads</a></nav>
<h1>{name}</h1>
<p class="meta">{html.escape(str(c.manifest['model']))}, layer {key[0]}, head {key[1]}; {len(r.texts)} TextSpan texts
explain {100 * float(r.cumulative[-1]) if len(r.cumulative) else 0:.1f}% of the head's variance.</p>
{truth}
<h2>Texts</h2>
<p class="meta">In the order TextSpan picked them: each text is the one that explains the most of the variance the
texts before it left (greedy), so the shares need not decrease down the table.</p>
{curve}
<table class="texts"><tr><td></td><td>text</td><td>variance explained</td><td>cumulative</td>
<td>top images by the head's projection on the text's direction</td></tr>
{chr(10).join(rows)}
</table>
{maps}
{effect}"""
    path.write_text(_page(f"{name}: textspan atlas", body, "../"))


__all__ = ["AtlasResult", "build_atlas"]
