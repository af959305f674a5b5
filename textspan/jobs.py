"""Jobs: whole analyses, each a library function with the guarantees of its command.

Every job takes its inputs (a cache folder or `HeadCache`, a model or a model name, ...), returns a result object,
and, given an ``output`` folder, writes the same files as the command line into a `textspan.store.RunFolder`: one
writer at a time (a second process is refused), ``run.json`` beside the outputs, and a folder of another command
refused unless ``overwrite``. The command line only parses options, calls one of these and prints.

    >>> import textspan
    >>> labels = textspan.label_cache("cache", bank="shapes", n_texts=5, layers="-2:", output="labels")  # doctest: +SKIP
    >>> abl = textspan.ablate_cache("cache", output="abl")                                               # doctest: +SKIP
    >>> abl.results["baseline"], abl.single_heads.shape                                                  # doctest: +SKIP

Shared conventions: ``model=None`` on a cache job means "the model recorded in the cache's manifest" (loaded, and
refused when its weights differ from the cache's); mean-ablation takes its means from a seeded half of the cache and
evaluates the other half unless ``reference`` (another cache) or ``same_set=True`` (the published protocol) is given
(DESIGN.md section 5).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._repr import concise
from . import ablation, engine
from .cache import HeadCache
from .errors import BadInputError, FolderMismatchError, InputNotFoundError, ModelMismatchError, TextspanError, job
from .names import head_name, parse_head_name, parse_heads, parse_layers
from .store import RunFolder

log = logging.getLogger(__name__)

Notify = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------------------
# shared helpers: models, caches, text banks, classifiers, reference protocols


def default_device() -> str:
    """The device every command uses by default: cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@concise
@dataclass
class Loaded:
    """A model with what goes with it: (model, preprocess, tokenizer), its name and pretrained tag/file."""

    model: object
    preprocess: Optional[Callable]
    tokenizer: Optional[Callable]
    name: Optional[str] = None
    pretrained: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        from .models import fingerprint

        if getattr(self, "_fp", None) is None:
            self._fp = fingerprint(self.model)
        return self._fp


def resolve_model(model, pretrained=None, device=None, *, preprocess=None, tokenizer=None) -> Loaded:
    """A `Loaded` from a model name (loaded with `load_model`), a `Loaded`, or a model object (with its preprocess and
    tokenizer when the job needs them)."""
    from .models import load_model

    if isinstance(model, Loaded):
        return model
    if isinstance(model, (str, Path)):
        m, pre, tok = load_model(str(model), pretrained, device=device or default_device())
        return Loaded(m, preprocess or pre, tokenizer or tok, str(model), None if pretrained is None else str(pretrained))
    if model is None:
        raise BadInputError("no model given")
    return Loaded(model, preprocess, tokenizer)


def open_cache(cache) -> HeadCache:
    """A `HeadCache` from a folder (or the cache itself)."""
    if isinstance(cache, HeadCache):
        return cache
    folder = Path(cache)
    if not folder.is_dir():
        raise InputNotFoundError(f"cache folder not found: {cache}")
    try:
        return HeadCache(folder)
    except TextspanError:
        raise
    except FileNotFoundError as exc:
        raise InputNotFoundError(str(exc)) from exc
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc


def model_for_cache(cache: HeadCache, model=None, pretrained=None, device=None, *, tokenizer=None) -> Loaded:
    """The model a cache was made with (by default the one its manifest names); refuses one with other weights."""
    if model is None:
        pre = pretrained or cache.manifest.get("pretrained")
        loaded = resolve_model(cache.manifest["model"], pre, device)
        loaded.name, loaded.pretrained = cache.manifest["model"], pre
    else:
        loaded = resolve_model(model, pretrained, device, tokenizer=tokenizer)
    cache.check_model(loaded.model)
    return loaded


def is_builtin(model_name) -> bool:
    from .models import BUILTIN_MODELS

    return model_name in BUILTIN_MODELS


def default_templates(model_name) -> Path:
    """The prompt templates: the general ones, or the shapes-world ones for the built-in models."""
    from .text import bank_path

    return bank_path("shapes_templates" if is_builtin(model_name) else "templates")


def bank_and_embeddings(bank, text_embeddings, loaded: Optional[Loaded], fingerprint: str):
    """(embeddings [M, d'], TextBank) from precomputed embeddings (checked against the model and bank) or a bank
    encoded with the model (cached on disk by model and bank)."""
    from .text import TextBank, bank_embeddings, load_embeddings

    if text_embeddings is not None:
        tb = TextBank.load(bank) if bank else None
        return load_embeddings(text_embeddings, fingerprint=fingerprint, bank=tb)
    if bank is None:
        raise BadInputError("give a text bank (bank=...) or precomputed text_embeddings=...")
    tb = TextBank.load(bank)
    try:
        return bank_embeddings(loaded.model, loaded.tokenizer, tb, fingerprint=fingerprint), tb
    except ValueError as exc:
        msg = str(exc)
        if "shapes-world vocabulary" in msg:  # a general bank with a built-in model: name every unknown word
            unknown = getattr(loaded.tokenizer, "unknown_words", lambda texts: {})(tb.texts)
            words = list(unknown)
            listed = ", ".join(words[:40]) + (f", ... ({len(words)} in all)" if len(words) > 40 else "")
            first = f" (the first, {words[0]!r}, in {unknown[words[0]]!r})" if words else ""
            raise BadInputError(f"text bank {bank!r} has {len(words)} words the built-in model cannot read: "
                                f"{listed}{first}; use --bank shapes (the shapes-world bank)") from exc
        raise


def load_classifier(path, d_embed: int, classes: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """(W [d', C] float32, class names) from a .npy classifier file (class names given, or 0..C-1)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"classifier file not found: {path}")
    try:
        W = np.load(path)
    except (ValueError, OSError, EOFError) as exc:
        raise BadInputError(f"{path}: not a .npy classifier array ({exc})") from exc
    names = list(classes) if classes else [str(i) for i in range(W.shape[1] if W.ndim == 2 else 0)]
    if W.ndim != 2 or W.shape[0] != d_embed or len(names) != W.shape[1]:
        raise BadInputError(f"{path}: expected a [{d_embed}, {len(names) or 'classes'}] classifier, got {W.shape}")
    return W.astype(np.float32), names


def zero_shot_classifier(loaded: Loaded, classes, templates=None, classifier=None, d_embed: Optional[int] = None,
                         default_classes: Sequence[str] = (), cache: Optional[HeadCache] = None
                         ) -> Tuple[np.ndarray, List[str]]:
    """(W [d', C], class names): a given array or .npy file, or built from class names (a list or a file, one per
    line) and prompt templates (a list or a file; default: the model's default templates).

    Given the `cache` the classifier will score, the classes are checked against it (`check_classes`): a list that
    would shift the labels is refused instead of giving a wrong accuracy."""
    from .zeroshot import build_classifier, read_lines, read_templates

    source = f"--classes {classes}" if isinstance(classes, (str, Path)) else "classes"
    names = (read_lines(classes, "classes") if isinstance(classes, (str, Path)) else list(classes)) if classes \
        else list(default_classes)
    if classifier is not None:
        if isinstance(classifier, (str, Path)):
            W, names = load_classifier(classifier, d_embed or _embed_width(loaded), names or None)
            source = f"--classifier {classifier}" if not classes else source
        else:
            W = np.asarray(classifier, dtype=np.float32)
            names = names or [str(i) for i in range(W.shape[1])]
            source = "classifier" if not classes else source
        if cache is not None:
            check_classes(names, cache, source, named=bool(classes))
            if W.shape[1] < 2:
                raise BadInputError(f"{source}: one class; zero-shot accuracy needs two classes at least")
        return W, names
    if not names:
        raise BadInputError("no class names: give classes (--classes) or a classifier (--classifier)")
    if cache is not None and classes:
        check_classes(names, cache, source)
    if cache is not None and len(names) < 2:
        raise BadInputError(f"{len(names)} class ({', '.join(names)}): zero-shot accuracy needs two classes at least "
                            f"(give --classes, or cache images from two class folders or more)")
    if templates is None:
        tmpl = read_templates(default_templates(loaded.name))
    elif isinstance(templates, (str, Path)):
        tmpl = read_templates(templates)
    else:
        tmpl = list(templates)
    return build_classifier(loaded.model, loaded.tokenizer, names, tmpl), names


def check_classes(names: Sequence[str], cache: HeadCache, source: str = "classes", named: bool = True) -> None:
    """Refuse class names that do not fit the cache's labels: another count than the cache's classes (or fewer
    than its largest label + 1 when it records no names), or, when the cache has names, a name that is another
    class of the cache at another index (the order would shift the labels). Names the cache does not know at all
    (e.g. readable names for WordNet-id folders) are accepted in the cache's order. `named`: False for a
    classifier's columns (no names to compare)."""
    known = list(cache.manifest.get("classes") or [])
    labels = np.asarray(cache.labels)
    top = int(labels.max()) if labels.size else -1
    if known:
        if len(names) != len(known):
            raise BadInputError(f"{source}: {len(names)} classes, but the cache {cache.folder} has {len(known)} "
                                f"({_preview(known)}); give one name per class, in the cache's order")
        if named:
            index = {c: i for i, c in enumerate(known)}
            moved = [(i, n) for i, n in enumerate(names) if n in index and index[n] != i]
            if moved:
                i, n = moved[0]
                raise BadInputError(f"{source}: name {i + 1} is {n!r}, which is class {index[n]} of the cache "
                                    f"{cache.folder}, not class {i} ({known[i]!r}); give the names in the cache's "
                                    f"order: {_preview(known)}")
    elif len(names) <= top:
        raise BadInputError(f"{source}: {len(names)} classes, but the cache {cache.folder} has labels up to {top}")


def _preview(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _embed_width(loaded: Loaded) -> int:
    return engine.read_tower(loaded.model).d_embed


@dataclass
class Reference:
    """Where mean-ablated terms take their means: the arrays, and which rows are evaluated / averaged."""

    cache: HeadCache
    eval_rows: Optional[np.ndarray]
    ref_rows: Optional[np.ndarray]
    protocol: str


def reference_protocol(cache: HeadCache, reference=None, same_set: bool = False, seed: int = 0) -> Reference:
    """Another cache (`reference`), the evaluation set itself (`same_set`, the published protocol), or by default a
    seeded half of the cache for the means with the other half evaluated."""
    if reference is not None and same_set:
        raise BadInputError("reference (--reference) and same_set (--same-set) exclude each other")
    if reference is not None:
        ref = open_cache(reference)
        if ref.manifest["fingerprint"] != cache.manifest["fingerprint"]:
            raise ModelMismatchError(f"the reference cache {ref.folder} was made with another model")
        return Reference(ref, None, None, f"means from {ref.folder}")
    if same_set:
        return Reference(cache, None, None, "means from the evaluation set itself (published protocol)")
    ref_rows, eval_rows = ablation.split_rows(len(cache), 0.5, seed)
    return Reference(cache, eval_rows, ref_rows,
                     f"means from a seeded half of the cache (seed {seed}), evaluated on the other")


def _rows(a: np.ndarray, rows: Optional[np.ndarray]) -> np.ndarray:
    return a if rows is None else a[rows]


def _write_csv(path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _cache_run(output, command: str, overwrite: bool, cache: HeadCache, settings: Optional[dict] = None,
               W: Optional[np.ndarray] = None) -> RunFolder:
    """The run folder of a job on `cache`: refuses the cache folder itself, another command's folder, and a finished
    run made with other `settings` (which always include the cache's identity and, given `W`, the classifier's
    content) unless ``overwrite``."""
    if Path(output).resolve() == cache.folder.resolve():
        raise FolderMismatchError(f"{output} is the cache folder itself; write the {command} results elsewhere")
    settings = dict(settings or {}, cache_fingerprint=cache.manifest["fingerprint"],
                    cache_images=cache.manifest.get("images_digest"), cache_rows=len(cache))
    if W is not None:
        settings["classifier"] = _array_digest(W)
    return RunFolder(output, command, settings, overwrite=overwrite)


def _array_digest(a) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# cache, decompose, encode texts


@job
def cache_images(images, output, model="shapes", pretrained=None, *, device=None, split=None, batch_size: int = 32,
                 dtype: str = "float32", num_workers: int = 0, overwrite: bool = False, quiet: bool = True):
    """Decompose every image of a folder or list file and stream the head terms into a cache folder (see
    `textspan.cache.build_cache`, which this wraps; under torchrun, call `textspan.cache.init_distributed` first).

    Returns a `textspan.cache.CacheResult` (rows, failures, resumed_from)."""
    from .cache import build_cache
    from .datasets import ImageList
    from .models import describe_pretrained

    image_list = images if isinstance(images, ImageList) else ImageList.from_path(images, split=split)
    loaded = resolve_model(model, pretrained, device)
    name = loaded.name or getattr(model, "name", None) or "custom"
    return build_cache(loaded.model, loaded.preprocess, image_list, output, model_name=name,
                       pretrained=describe_pretrained(pretrained), batch_size=batch_size, dtype=dtype,
                       num_workers=num_workers, overwrite=overwrite, quiet=quiet,
                       arguments=dict(images=str(images) if not isinstance(images, ImageList) else image_list.source,
                                      model=name, pretrained=pretrained, device=str(device), batch_size=batch_size,
                                      dtype=dtype, num_workers=num_workers, split=split))


@concise
@dataclass
class DecomposeSummary:
    """Per image: name, identity error, embedding norm, top layers and heads (see `decompose_images`)."""

    images: List[dict]
    output: Optional[Path] = None


@job
def decompose_images(paths: Sequence, output=None, model="shapes", pretrained=None, *, device=None, top: int = 5,
                     preprocess=None, overwrite: bool = False, notify: Notify = log.info) -> DecomposeSummary:
    """Spatially decompose each image file.

    With ``output``: per image NAME_heads.npy [layer, token, head, d_embed] and NAME_mlps.npy [layer + 1, d_embed],
    and summary.json with the identity error (max |sum of terms - e/||e|||, with e from the library's own
    ``encode_image``), each layer's contribution to the embedding (dot product with e/||e||; all contributions sum to
    1) and the top layers and heads. An unreadable image is reported and skipped.
    """
    import torch

    from .datasets import read_image
    from .decomposition import decompose

    loaded = resolve_model(model, pretrained, device, preprocess=preprocess)
    settings = dict(fingerprint=loaded.fingerprint, images=[str(Path(p).resolve()) for p in paths], top=top)
    run = RunFolder(output, "decompose", settings, overwrite=overwrite) if output is not None else None
    out = Path(output) if output is not None else None
    summary, used = [], set()
    dev = engine.model_device(loaded.model)
    with run if run is not None else _nothing():
        for i, path in enumerate(paths):
            stem = Path(path).stem
            name = stem if stem not in used else f"{stem}_{i}"
            used.add(name)
            try:
                x = loaded.preprocess(read_image(path)).unsqueeze(0).to(dev)
            except BadInputError as exc:
                notify(f"skipping {path}: {exc}")
                summary.append({"path": str(path), "error": str(exc)})
                continue
            with torch.no_grad():
                d = decompose(loaded.model, x, spatial=True)
                e = engine.library_image_embedding(loaded.model, x)
            e_hat = e / e.norm(dim=-1, keepdim=True)
            if out is not None:
                np.save(out / f"{name}_heads.npy", d.heads[0].float().cpu().numpy())
                np.save(out / f"{name}_mlps.npy", d.mlps[0].float().cpu().numpy())
            attn = (d.layer_attention()[0] @ e_hat[0]).cpu()  # [layer]
            mlp = (d.mlps[0] @ e_hat[0]).cpu()  # [layer + 1]
            layers = [{"layer": l, "attention": float(attn[l]), "mlp": float(mlp[l + 1]),
                       "total": float(attn[l] + mlp[l + 1])} for l in range(d.n_layers)]
            heads = d.head_terms()[0] @ e_hat[0]  # [layer, head]
            flat = heads.flatten().abs().argsort(descending=True)[:top]
            summary.append({
                "path": str(path), "name": name,
                "identity_error": float((d.total()[0] - e_hat[0]).abs().max()),
                "embedding_norm": float(d.norm[0]),
                "embedding_term": float(mlp[0]),
                "top_layers": sorted(layers, key=lambda r: -abs(r["total"]))[:top],
                "top_heads": [{"head": head_name(int(k) // d.n_heads, int(k) % d.n_heads),
                               "contribution": float(heads.flatten()[k])} for k in flat],
                "layers": layers,
            })
        if run is not None:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            run.write_run_json(dict(images=[str(p) for p in paths], model=loaded.name, pretrained=loaded.pretrained,
                                    device=str(dev), top=top), model_fingerprint=loaded.fingerprint)
    return DecomposeSummary(summary, out)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@job
def encode_bank(bank, output, model="shapes", pretrained=None, *, device=None, batch_size: int = 256,
                tokenizer=None) -> Tuple[np.ndarray, Path]:
    """Encode a text bank (a file, or a built-in bank name) with the model's text tower into FILE.npy, with a
    FILE.json sidecar (model fingerprint, bank digest, texts) and FILE.run.json. Returns (embeddings, path)."""
    from .store import write_run_json
    from .text import TextBank, encode_texts, save_embeddings

    tb = TextBank.load(bank)
    loaded = resolve_model(model, pretrained, device, tokenizer=tokenizer)
    emb = encode_texts(loaded.model, loaded.tokenizer, tb.texts, batch_size=batch_size)
    path = save_embeddings(output, emb, tb, loaded.fingerprint, loaded.name or "")
    write_run_json(path.parent, "encode-texts", dict(bank=str(bank), model=loaded.name, pretrained=loaded.pretrained,
                                                    batch_size=batch_size), model_fingerprint=loaded.fingerprint,
                   name=path.stem + ".run.json")
    return emb, path


# --------------------------------------------------------------------------------------------------------------------
# TextSpan labels


@concise
@dataclass
class HeadLabels:
    """TextSpan labels of a cache's heads: {(layer, head): TextSpanResult} with where they came from.

    `save(folder)` writes heads.csv (one row per head and text: head, layer, head_index, rank, text,
    variance_explained, cumulative), heads.json, heads.md and directions.npz (per head its picked TextSpan directions
    "L3H1" [m, d'] and its mean term "L3H1_mean" [d']); `HeadLabels.load(folder)` reads them back.
    """

    results: Dict[Tuple[int, int], object]
    bank: str = ""
    rank: int = 80
    n_texts: int = 20
    model: str = ""
    n_images: int = 0
    cache: str = ""
    fingerprint: str = ""
    bank_digest: str = ""

    def __getitem__(self, head) -> object:
        key = parse_head_name(head) if isinstance(head, str) else tuple(head)
        return self.results[key]

    def heads(self) -> List[str]:
        return [head_name(l, h) for l, h in sorted(self.results)]

    def records(self) -> List[dict]:
        out = []
        for (l, h), r in sorted(self.results.items()):
            out.append({"head": head_name(l, h), "layer": l, "head_index": h,
                        "total_variance": float(r.total_variance),
                        "texts": [{"rank": k, "text": t, "variance_explained": float(v), "cumulative": float(c)}
                                  for k, (t, v, c) in enumerate(zip(r.texts, r.variance_explained, r.cumulative))]})
        return out

    def save(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        records = self.records()
        _write_csv(folder / "heads.csv", ["head", "layer", "head_index", "rank", "text", "variance_explained",
                                          "cumulative"],
                   [[rec["head"], rec["layer"], rec["head_index"], t["rank"], t["text"],
                     f"{t['variance_explained']:.6f}", f"{t['cumulative']:.6f}"]
                    for rec in records for t in rec["texts"]])
        (folder / "heads.json").write_text(json.dumps({"cache": self.cache, "bank": self.bank, "rank": self.rank,
                                                       "n_texts": self.n_texts, "model": self.model,
                                                       "n_images": self.n_images, "fingerprint": self.fingerprint,
                                                       "bank_digest": self.bank_digest, "heads": records}, indent=1))
        arrays = {}
        for (l, h), r in self.results.items():
            if np.asarray(r.directions).size:
                arrays[head_name(l, h)] = np.asarray(r.directions, dtype=np.float32)
                arrays[head_name(l, h) + "_mean"] = np.asarray(r.mean, dtype=np.float32)
        if arrays:
            np.savez(folder / "directions.npz", **arrays)
        lines = [f"# TextSpan labels: {self.model} ({self.n_images} images), bank {self.bank}", "",
                 "Texts in the order TextSpan picked them: each explains the most of the variance the texts before it "
                 "left (greedy), so the percentages (of the head's variance) need not decrease.", ""]
        for rec in records:
            top = rec["texts"]
            share = 100 * top[-1]["cumulative"] if top else 0.0
            lines.append(f"## {rec['head']} ({share:.1f}% of its variance with {len(top)} texts)")
            lines += [f"{t['rank'] + 1}. {t['text']} ({100 * t['variance_explained']:.1f}%)" for t in top]
            lines.append("")
        (folder / "heads.md").write_text("\n".join(lines))
        return folder

    @classmethod
    def load(cls, folder) -> "HeadLabels":
        from .span import TextSpanResult

        path = Path(folder) / "heads.json"
        if not path.is_file():
            raise InputNotFoundError(f"{path} not found (the output of `textspan label-heads`)")
        vectors = Path(folder) / "directions.npz"
        arrays = dict(np.load(vectors)) if vectors.is_file() else {}
        try:
            spec = json.loads(path.read_text())
            results = {}
            for rec in spec["heads"]:
                texts = rec["texts"]
                var = np.array([t["variance_explained"] for t in texts], dtype=np.float64)
                results[parse_head_name(rec["head"])] = TextSpanResult(
                    texts=[t["text"] for t in texts], indices=[], variance_explained=var,
                    cumulative=np.array([t["cumulative"] for t in texts], dtype=np.float64),
                    directions=arrays.get(rec["head"], np.zeros((0, 0))),
                    mean=arrays.get(rec["head"] + "_mean", np.zeros(0)),
                    total_variance=float(rec.get("total_variance", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{path}: not a textspan label file ({type(exc).__name__}: {exc})") from exc
        labels = cls(results, spec.get("bank", ""), spec.get("rank", 0), spec.get("n_texts", 0),
                     spec.get("model", ""), spec.get("n_images", 0), spec.get("cache", ""),
                     spec.get("fingerprint", ""), spec.get("bank_digest", ""))
        labels.folder = Path(folder)
        return labels


@job
def label_cache(cache, output=None, *, bank=None, text_embeddings=None, n_texts: int = 20, layers="-4:",
                rank: int = 80, pool_heads: bool = False, model=None, pretrained=None, device=None, tokenizer=None,
                overwrite: bool = False, quiet: bool = True) -> HeadLabels:
    """TextSpan labels for every head of the chosen layers of a cache (DESIGN.md section 4).

    Args:
        cache: a cache folder or `HeadCache`.
        output: where heads.csv / heads.json / heads.md and run.json go (None: nothing written).
        bank: a text bank file or built-in name; text_embeddings: precomputed embeddings from `encode_bank`
            (checked against the cache's model and the bank).
        n_texts, layers, rank: texts per head, layers ("-4:", "0,3", "all"), the rank of the head's subspace.
        pool_heads: label the pooling heads of an attention-pooled (SigLIP) cache instead of the trunk's (`layers`
            is then ignored); they are keyed as layer L, one past the trunk's last layer (``L{L}H{g}``).
        model: the model for the text tower (default: the cache's own, from its manifest).

    Returns:
        `HeadLabels` ({(layer, head): TextSpanResult}).
    """
    from .span import label_heads

    c = open_cache(cache)
    fp = c.manifest["fingerprint"]
    loaded = None
    if text_embeddings is None:
        loaded = model_for_cache(c, model, pretrained, device, tokenizer=tokenizer)
    emb, tb = bank_and_embeddings(bank, text_embeddings, loaded, fp)
    L = c.manifest["n_layers"]
    if pool_heads:
        if c.pool_heads is None:
            raise BadInputError(f"{c.folder}: pool_heads=True (--pool-heads) needs a cache of an attention-pooled "
                                f"tower (SigLIP); this cache's model pools at its CLS token")
        chosen, source = [0], c.pool_heads[:, None]  # [n, 1, G, d']
    else:
        chosen, source = parse_layers(layers, L), c.heads
    if n_texts > len(tb):
        raise BadInputError(f"n_texts={n_texts} (--n-texts) is more than the {len(tb)} texts of the bank")
    settings = dict(bank_digest=tb.digest, n_texts=n_texts, layers=chosen, rank=rank, pool_heads=pool_heads)
    run = _cache_run(output, "label-heads", overwrite, c, settings) if output is not None else None
    with run if run is not None else _nothing():
        results = label_heads(source, emb, tb.texts, chosen, n_texts=n_texts, rank=rank, progress=not quiet)
        if pool_heads:
            results = {(L, g): r for (_, g), r in results.items()}
        labels = HeadLabels(results, tb.source, rank, n_texts, c.manifest["model"], len(c), str(c.folder), fp,
                            tb.digest)
        if run is not None:
            labels.save(output)
            run.write_run_json(dict(cache=str(c.folder), bank=None if bank is None else str(bank),
                                    text_embeddings=None if text_embeddings is None else str(text_embeddings),
                                    n_texts=n_texts, layers=layers, rank=rank, pool_heads=pool_heads),
                                model_fingerprint=fp)
    return labels


@concise
@dataclass
class CompletenessResult:
    """Accuracies (%): baseline, analysed heads intact with the rest mean-ablated, and per number of texts."""

    baseline: float
    ablated_rest: float
    by_n_texts: Dict[int, float]
    layers: List[int]
    protocol: str
    labels: HeadLabels


@job
def measure_completeness(cache, output=None, *, bank=None, text_embeddings=None, classes=None, templates=None,
                         classifier=None, n_texts: Sequence[int] = (5, 10, 20, 40, 60), layers="-4:", rank: int = 80,
                         reference=None, same_set: bool = False, seed: int = 0, model=None, pretrained=None,
                         device=None, overwrite: bool = False, quiet: bool = True) -> CompletenessResult:
    """Zero-shot accuracy with the analysed heads replaced by their TextSpan reconstructions (every other term
    mean-ablated), per number of texts, against the baseline. Means from `reference`, the evaluation set itself
    (`same_set`) or, by default, a seeded half of the cache (the other half evaluated). Writes completeness.csv,
    completeness.json and completeness.png with ``output``."""
    from . import span

    c = open_cache(cache)
    fp = c.manifest["fingerprint"]
    loaded = model_for_cache(c, model, pretrained, device)
    if bank is None and text_embeddings is None:
        bank = "shapes" if is_builtin(loaded.name) else "general"
    emb, tb = bank_and_embeddings(bank, text_embeddings, loaded, fp)
    W, _ = zero_shot_classifier(loaded, classes, templates, classifier, c.manifest["d_embed"],
                                default_classes=c.manifest.get("classes") or [], cache=c)
    ms = sorted({int(m) for m in n_texts})
    chosen = parse_layers(layers, c.manifest["n_layers"])
    if max(ms) > len(tb):
        raise BadInputError(f"{max(ms)} texts per head asked, but the bank has {len(tb)}")
    ref = reference_protocol(c, reference, same_set, seed)
    settings = dict(bank_digest=tb.digest, n_texts=ms, layers=chosen, rank=rank, protocol=ref.protocol)
    run = _cache_run(output, "completeness", overwrite, c, settings, W) if output is not None else None
    with run if run is not None else _nothing():
        results = span.label_heads(c.heads, emb, tb.texts, chosen, n_texts=max(ms), rank=rank, progress=not quiet)
        acc = span.completeness(c.heads, c.mlps, c.embeddings, W, c.labels, results, ms, ref_heads=ref.cache.heads,
                                ref_mlps=ref.cache.mlps, rows=ref.eval_rows, ref_rows=ref.ref_rows)
        labels = HeadLabels(results, tb.source, rank, max(ms), c.manifest["model"], len(c), str(c.folder))
        res = CompletenessResult(acc["baseline"], acc["ablated_rest"], acc["by_n_texts"], chosen, ref.protocol,
                                 labels)
        if run is not None:
            out = Path(output)
            _write_csv(out / "completeness.csv", ["n_texts", "accuracy"],
                       [[m, f"{acc['by_n_texts'][m]:.3f}"] for m in ms])
            (out / "completeness.json").write_text(json.dumps(
                {"baseline": acc["baseline"], "ablated_rest": acc["ablated_rest"],
                 "by_n_texts": {str(k): v for k, v in acc["by_n_texts"].items()}, "layers": chosen,
                 "bank": tb.source, "protocol": ref.protocol}, indent=1))
            from .visualize import completeness_plot

            completeness_plot(ms, acc, out / "completeness.png")
            run.write_run_json(dict(cache=str(c.folder), bank=None if bank is None else str(bank),
                                    n_texts=ms, layers=layers, rank=rank,
                                    reference=None if reference is None else str(reference), same_set=same_set,
                                    seed=seed), model_fingerprint=fp)
    return res


@concise
@dataclass
class Retrieval:
    """Images ranked by one head's contribution along a text: rows (cache rows), paths, scores."""

    head: str
    text: str
    rows: List[int]
    paths: List[str]
    scores: List[float]


@job
def retrieve_images(cache, head, text: str, output=None, *, top: int = 16, bottom: bool = False, model=None,
                    pretrained=None, device=None, overwrite: bool = False, notify: Notify = log.warning) -> Retrieval:
    """Rank a cache's images by the dot product of one head's term with a text's embedding (``bottom``: least
    similar first). Writes retrieval.csv and a contact sheet retrieval.png with ``output``."""
    from .datasets import read_image
    from .text import encode_texts

    c = open_cache(cache)
    (layer, h), = parse_heads(head, c.manifest["n_layers"], c.manifest["n_heads"])[:1]
    loaded = model_for_cache(c, model, pretrained, device)
    t = encode_texts(loaded.model, loaded.tokenizer, [text])[0]
    scores = np.asarray(c.heads[:, layer, h], dtype=np.float64) @ t
    order = np.argsort(scores if bottom else -scores, kind="stable")[:top]
    images = c.images
    res = Retrieval(head_name(layer, h), text, [int(i) for i in order], [images["path"][i] for i in order],
                    [float(scores[i]) for i in order])
    if output is not None:
        with _cache_run(output, "retrieve", overwrite, c, dict(head=res.head, text=text, top=top,
                                                               bottom=bottom)) as run:
            out = Path(output)
            _write_csv(out / "retrieval.csv", ["rank", "row", "path", "score"],
                       [[k, i, p, f"{s:.6f}"] for k, (i, p, s) in enumerate(zip(res.rows, res.paths, res.scores))])
            from .visualize import contact_sheet

            thumbs = []
            for p, s in zip(res.paths, res.scores):
                try:
                    thumbs.append((read_image(p), f"{s:+.3f}"))
                except BadInputError as exc:  # a file moved since caching: keep the CSV, skip its thumbnail
                    notify(f"cannot show {p}: {exc}")
            contact_sheet(thumbs, out / "retrieval.png", title=f"{res.head}: {text}")
            run.write_run_json(dict(cache=str(c.folder), head=head, text=text, top=top, bottom=bottom),
                               model_fingerprint=c.manifest["fingerprint"])
    return res


# --------------------------------------------------------------------------------------------------------------------
# ablation and debiasing


@concise
@dataclass
class AblationResult:
    """Mean-ablation accuracies (%): `results` holds baseline, mlps, cls_to_cls, mlps_and_cls_to_cls,
    cls_to_cls_per_layer, accumulated, single_heads [L][H], protocol, n_evaluated and (with heads) head_set;
    `single_heads` is the [L, H] array."""

    results: dict
    single_heads: np.ndarray

    @property
    def single_heads_margin(self) -> np.ndarray:
        """[L, H]: the mean correct-class margin (its logit minus the largest other) with each head mean-ablated."""
        return np.asarray(self.results["single_heads_margin"])

    def figure(self):
        """The head-importance figure: accuracy change and margin change per head when mean-ablated (one sign
        convention: red, negative, the head matters)."""
        from .visualize import head_importance_figure

        return head_importance_figure(self.single_heads - self.results["baseline"],
                                      self.single_heads_margin - self.results["baseline_margin"])


@job
def ablate_cache(cache, output=None, *, classes=None, templates=None, classifier=None, reference=None,
                 same_set: bool = False, heads=None, draws: int = 5, seed: int = 0, model=None, pretrained=None,
                 device=None, overwrite: bool = False, quiet: bool = True) -> AblationResult:
    """Mean-ablation experiments on a cache (DESIGN.md section 5): all MLP-type terms, the CLS->CLS terms (all
    layers and per layer), both, the accumulated layer ablation, every single head and, with `heads`, that head set
    against `draws` random sets of the same size. Writes ablations.json, single_heads.csv, accumulated.csv,
    accumulated.png and head_importance.png with ``output``."""
    c = open_cache(cache)
    loaded = None if classifier is not None else model_for_cache(c, model, pretrained, device)
    W, _ = zero_shot_classifier(loaded, classes, templates, classifier, c.manifest["d_embed"],
                                default_classes=c.manifest.get("classes") or [], cache=c)
    ref = reference_protocol(c, reference, same_set, seed)
    chosen = parse_heads(heads, c.manifest["n_layers"], c.manifest["n_heads"]) if heads else None
    settings = dict(protocol=ref.protocol, heads=[head_name(*p) for p in chosen] if chosen else None, draws=draws,
                    seed=seed)
    run = _cache_run(output, "ablate", overwrite, c, settings, W) if output is not None else None
    with run if run is not None else _nothing():
        labels = _rows(c.labels, ref.eval_rows)
        t = ablation.term_logits(c.heads, c.cls_to_cls, c.mlps, W, rows=ref.eval_rows, ref_heads=ref.cache.heads,
                                 ref_cls=ref.cache.cls_to_cls, ref_mlps=ref.cache.mlps, ref_rows=ref.ref_rows,
                                 same_set=True)
        res = ablation.standard_ablations(t, labels)
        single, margin = ablation.single_head_importance(t, labels, margins=True, progress=not quiet)
        res["single_heads"] = single.tolist()
        res["baseline_margin"] = ablation.mean_margin(t.base, labels)
        res["single_heads_margin"] = margin.tolist()
        res["protocol"] = ref.protocol
        res["n_evaluated"] = int(len(labels))
        if chosen:
            res["head_set"] = dict(heads=heads if isinstance(heads, str) else ",".join(head_name(*p) for p in chosen),
                                   **ablation.head_set_comparison(t, labels, chosen, draws, seed))
        if run is not None:
            out = Path(output)
            (out / "ablations.json").write_text(json.dumps(res, indent=1))
            _write_csv(out / "single_heads.csv", ["head", "layer", "head_index", "accuracy", "drop", "margin",
                                                  "margin_change"],
                       [[head_name(l, h), l, h, f"{single[l, h]:.3f}", f"{res['baseline'] - single[l, h]:.3f}",
                         f"{margin[l, h]:.6f}", f"{margin[l, h] - res['baseline_margin']:+.6f}"]
                        for l in range(single.shape[0]) for h in range(single.shape[1])])
            _write_csv(out / "accumulated.csv", ["layers_ablated_up_to", "accuracy"],
                       [[k - 1, f"{a:.3f}"] for k, a in enumerate(res["accumulated"])])
            from .visualize import head_importance_figure, line_plot

            line_plot(list(range(-1, len(res["accumulated"]) - 1)), res["accumulated"], out / "accumulated.png",
                      xlabel="attention of layers 0..l mean-ablated (l = -1: none)",
                      ylabel="zero-shot accuracy (%)", hline=res["baseline"], hline_label="baseline (nothing ablated)",
                      label="layers 0..l ablated", title="accumulated layer ablation")
            head_importance_figure(single - res["baseline"], margin - res["baseline_margin"],
                                   out / "head_importance.png")
            run.write_run_json(dict(cache=str(c.folder), reference=None if reference is None else str(reference),
                                    same_set=same_set, heads=heads if isinstance(heads, (str, type(None))) else
                                    [head_name(*p) for p in chosen], draws=draws, seed=seed),
                               model_fingerprint=c.manifest["fingerprint"])
    return AblationResult(res, single)


@concise
@dataclass
class DebiasResult:
    """`report` (per-group, average and worst-group accuracy before and after, random and generic baselines,
    the heads and why) and the saved `classifier` (`DebiasedClassifier`)."""

    report: dict
    classifier: object


@job
def debias_cache(cache, output=None, *, reference=None, same_set: bool = False, classes=None, templates=None,
                 classifier=None, label_column: str = "label", group_column: str = "group",
                 spurious_column: str = "place", select: str = "auto", heads=None,
                 concept: Union[str, Sequence[str]] = "water, land, an object on water, an object on land",
                 n_heads: Optional[int] = None, threshold: Optional[float] = None, keep_last: int = 4,
                 with_generic: bool = False, draws: int = 5, seed: int = 0, model=None, pretrained=None,
                 device=None, overwrite: bool = False) -> DebiasResult:
    """Remove a spurious feature by mean-ablating the heads that encode it (DESIGN.md section 5).

    Heads are chosen explicitly (`select="explicit"`, `heads="L3H1,..."`), by concept texts (`"concept"`: the
    fraction of each head's variance in their span) or automatically (`"auto"`: the correlation ratio of the head's
    outputs with the `spurious_column` of the reference rows); 4 heads unless `n_heads` / `threshold`. Reports
    per-group, average and worst-group accuracy before and after, against `draws` random head sets of the same size,
    with and without the generic ablation (heads of all but the last `keep_last` layers and the MLP-type terms), and
    builds a `DebiasedClassifier` (saved as debiased_classifier.json/.npz, with report.json and groups.csv, given
    ``output``). Means are streamed from the reference rows, never loaded whole."""
    from . import debias as db
    from .text import encode_texts

    if select not in ("explicit", "concept", "auto"):
        raise BadInputError(f"select must be explicit, concept or auto; got {select!r}")
    c = open_cache(cache)
    loaded = None
    if classifier is None or select == "concept":
        loaded = model_for_cache(c, model, pretrained, device)
    W, classnames = zero_shot_classifier(loaded, classes, templates, classifier, c.manifest["d_embed"],
                                         default_classes=c.manifest.get("classes") or [], cache=c)
    ref = reference_protocol(c, reference, same_set, seed)
    table = c.images
    for col in (label_column, group_column):
        if col not in table.columns:
            raise BadInputError(f"{c.folder}/images.csv has no column {col!r} (columns: {list(table.columns)})")
    try:
        labels = table[label_column].to_numpy().astype(int)
    except ValueError as exc:
        raise BadInputError(f"{c.folder}/images.csv: column {label_column!r} holds non-integer labels") from exc
    groups = table[group_column].astype(str).to_numpy()
    labels, groups = _rows(labels, ref.eval_rows), _rows(groups, ref.eval_rows)
    L, H = c.manifest["n_layers"], c.manifest["n_heads"]
    scores = None
    count = n_heads if n_heads or threshold is not None else 4
    if select == "explicit":
        if not heads:
            raise BadInputError("select='explicit' (--select explicit) needs heads (--heads)")
        chosen = parse_heads(heads, L, H)
        why = "given explicitly"
    elif select == "auto":
        ref_table = ref.cache.images
        if spurious_column not in ref_table.columns:
            raise BadInputError(f"the reference images.csv has no column {spurious_column!r}")
        attr = _rows(ref_table[spurious_column].astype(str).to_numpy(), ref.ref_rows)
        scores = db.head_scores_auto(ref.cache.heads, attr, rows=ref.ref_rows)
        chosen = db.top_heads(scores, count, threshold)
        why = f"largest correlation ratio of the head's outputs with {spurious_column!r} on the reference set"
    else:
        texts = [t.strip() for t in concept.split(",") if t.strip()] if isinstance(concept, str) else list(concept)
        emb = encode_texts(loaded.model, loaded.tokenizer, texts)
        scores = db.head_scores_concept(ref.cache.heads, emb, rows=ref.ref_rows)
        chosen = db.top_heads(scores, count, threshold)
        why = f"largest fraction of variance in the span of the concept texts {texts}"
    if not chosen:
        raise BadInputError("no head was selected (lower the threshold?)")
    settings = dict(protocol=ref.protocol, heads=[head_name(l, h) for l, h in chosen], selection=select,
                    label_column=label_column, group_column=group_column, keep_last=keep_last,
                    with_generic=with_generic, draws=draws, seed=seed)
    run = _cache_run(output, "debias", overwrite, c, settings, W) if output is not None else None
    with run if run is not None else _nothing():
        t = ablation.term_logits(c.heads, c.cls_to_cls, c.mlps, W, rows=ref.eval_rows, ref_heads=ref.cache.heads,
                                 ref_cls=ref.cache.cls_to_cls, ref_mlps=ref.cache.mlps, ref_rows=ref.ref_rows,
                                 same_set=True)
        generic = dict(layers=list(range(max(0, L - keep_last))), mlps=True)

        def metrics(logits):
            return db.group_metrics(logits.argmax(axis=1), labels, groups)

        report = {"protocol": ref.protocol, "heads": [head_name(l, h) for l, h in chosen], "selection": select,
                  "why": why, "baseline": metrics(t.base), "heads_ablated": metrics(ablation.ablate_heads(t, chosen)),
                  "generic_ablated": metrics(ablation.ablate_heads(t, [], **generic)),
                  "heads_and_generic_ablated": metrics(ablation.ablate_heads(t, chosen, **generic)),
                  "generic": {"layers": generic["layers"], "mlps": True}}
        for name, kw in (("random_heads", {}), ("random_heads_and_generic", generic)):
            runs = [metrics(ablation.ablate_heads(t, s, **kw)) for s in
                    ablation.random_head_sets(L, H, len(chosen), draws, seed)]
            report[name] = {"worst_group": [r["worst_group"] for r in runs], "average": [r["average"] for r in runs],
                            "best_worst_group": max(r["worst_group"] for r in runs),
                            "mean_worst_group": float(np.mean([r["worst_group"] for r in runs])),
                            "mean_average": float(np.mean([r["average"] for r in runs]))}
        if scores is not None:
            report["scores"] = {head_name(l, h): float(scores[l, h]) for l in range(L) for h in range(H)}
        clf = db.DebiasedClassifier.from_reference(
            ref.cache.heads, ref.cache.mlps, W, classnames, chosen, c.manifest["fingerprint"],
            layers=generic["layers"] if with_generic else (), mlps=with_generic, model=c.manifest["model"],
            pretrained=c.manifest.get("pretrained"), info={"selection": select, "why": why, "protocol": ref.protocol},
            rows=ref.ref_rows)
        if run is not None:
            out = Path(output)
            clf.save(out)
            (out / "report.json").write_text(json.dumps(report, indent=1))
            table_rows = []
            for setting in ("baseline", "heads_ablated", "generic_ablated", "heads_and_generic_ablated"):
                table_rows += [[setting, g, f"{a:.3f}"] for g, a in report[setting]["per_group"].items()]
                table_rows.append([setting, "average", f"{report[setting]['average']:.3f}"])
                table_rows.append([setting, "worst_group", f"{report[setting]['worst_group']:.3f}"])
            _write_csv(out / "groups.csv", ["setting", "group", "accuracy"], table_rows)
            run.write_run_json(dict(cache=str(c.folder), reference=None if reference is None else str(reference),
                                    same_set=same_set, select=select, heads=heads if heads is None or
                                    isinstance(heads, str) else [head_name(*p) for p in chosen],
                                    concept=concept, n_heads=n_heads, threshold=threshold, keep_last=keep_last,
                                    with_generic=with_generic, draws=draws, seed=seed),
                               model_fingerprint=c.manifest["fingerprint"])
    return DebiasResult(report, clf)


# --------------------------------------------------------------------------------------------------------------------
# the shapes world


@job
def write_shapes_world(output, n: int = 1000, *, seed: int = 0, objects: int = 1, spurious: Optional[str] = None,
                       layout: str = "folders", overwrite: bool = False) -> Path:
    """Write generated shapes-world images (ImageFolder layout by shape), their masks and metadata.csv.

    OUTPUT/images/SHAPE/NNNNNN.png, OUTPUT/masks/SHAPE/NNNNNN.png (255 = object; with two objects, their union),
    OUTPUT/metadata.csv (path, caption and every attribute). With ``objects=2``, also one mask per object class,
    OUTPUT/masks/SHAPE/NNNNNN/CLASS.png (the layout `evaluate_segmentation` scores per object; two objects of one
    shape share their class's mask). `spurious`: "train"/"val"/"test" for the Waterbirds-like world. A folder that
    holds another world (other n, seed, objects or spurious setting) is refused unless ``overwrite``, which first
    removes its images and masks.

    ``layout="imagenet-s"``: OUTPUT/validation/SHAPE/NNNNNN.JPEG and OUTPUT/validation-segmentation/SHAPE/NNNNNN.png
    (class id R + 256 * G: the shape's position in sorted order + 1, 0 background) with ImageNetS_categories.txt;
    ``layout="openimages"``: OUTPUT/validation/NNNNNN.jpg with oidv7-val-annotations-point-labels.csv (per shape in
    the image, 3 "yes" points sampled inside its mask and 3 "no" points outside it, seeded) and
    oidv7-class-descriptions.csv."""
    from . import world

    if layout not in ("folders", "imagenet-s", "openimages"):
        raise BadInputError(f"layout must be folders, imagenet-s or openimages; got {layout!r}")
    settings = dict(n=n, seed=seed, objects=int(objects), spurious=spurious)
    if layout != "folders":
        settings["layout"] = layout
    out = Path(output)
    if layout != "folders":
        return _write_world_layout(out, settings, overwrite)
    with RunFolder(out, "shapes-world", settings, overwrite=overwrite, progress_name="world.json") as run:
        _refuse_other_world(out, run, settings, overwrite, ("images", "masks"))
        spec = None
        world_seed = seed
        if spurious:
            if spurious not in world.SPLIT_SEEDS:
                raise BadInputError(f"spurious must be one of {list(world.SPLIT_SEEDS)}; got {spurious!r}")
            spec = world.Spurious(balanced=(spurious == "test"))
            world_seed = world.SPLIT_SEEDS[spurious] + seed
        rows = []
        for i in range(n):
            s = world.sample(world_seed, i, n_objects=int(objects), spurious=spec)
            rel = Path(s.labels["shape"]) / f"{i:06d}.png"
            for sub, arr in (("images", s.image), ("masks", s.mask.astype("uint8") * 255)):
                (out / sub / rel.parent).mkdir(parents=True, exist_ok=True)
                _save_png(arr, out / sub / rel)
            if int(objects) > 1:
                per_object = out / "masks" / rel.with_suffix("")
                per_object.mkdir(parents=True, exist_ok=True)
                for shape in sorted({o["shape"] for o in s.objects}):
                    union = np.any([m for m, o in zip(s.masks, s.objects) if o["shape"] == shape], axis=0)
                    _save_png(union.astype("uint8") * 255, per_object / f"{shape}.png")
            rows.append({"path": str(Path("images") / rel), "mask": str(Path("masks") / rel), "index": i,
                         "caption": s.caption, **s.labels})
        with open(out / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        run.save_progress(dict(settings, complete=True))
        run.write_run_json(dict(settings, world_seed=world_seed))
    return out


def _write_world_layout(out: Path, settings: dict, overwrite: bool) -> Path:
    """The shapes world in the ImageNet-S or OpenImages-V7 point-label layout (see `write_shapes_world`)."""
    import shutil

    from . import world
    from .imagenet import write_imagenet_s
    from .openimages import write_openimages

    layout, n, seed, objects = settings["layout"], settings["n"], settings["seed"], settings["objects"]
    spec = world.Spurious(balanced=(settings["spurious"] == "test")) if settings["spurious"] else None
    world_seed = world.SPLIT_SEEDS[settings["spurious"]] + seed if settings["spurious"] else seed
    shapes = sorted(world.SHAPES)
    with RunFolder(out, "shapes-world", settings, overwrite=overwrite, progress_name="world.json") as run:
        for sub in ("validation", "validation-segmentation"):
            if overwrite and (out / sub).exists():
                shutil.rmtree(out / sub)
        samples = [world.sample(world_seed, i, n_objects=objects, spurious=spec) for i in range(n)]
        if layout == "imagenet-s":
            images: Dict[str, list] = {}
            masks: Dict[str, list] = {}
            names: Dict[str, list] = {}
            for i, s in enumerate(samples):
                ids = np.zeros(s.image.shape[:2], np.int64)
                for m, o in zip(s.masks, s.objects):
                    ids[m] = shapes.index(o["shape"]) + 1  # a later object covers an earlier one
                first = s.labels["shape"]
                images.setdefault(first, []).append(s.image)
                masks.setdefault(first, []).append(ids)
                names.setdefault(first, []).append(f"{i:06d}")
            write_imagenet_s(out.parent, out.name, shapes, images, masks, names)
        else:
            rng = np.random.default_rng(seed + 7919)
            mids = {sh: f"/m/shape_{sh}" for sh in shapes}
            rows = []
            for i, s in enumerate(samples):
                h, w = s.image.shape[:2]
                for sh in sorted({o["shape"] for o in s.objects}):
                    inside = np.any([m for m, o in zip(s.masks, s.objects) if o["shape"] == sh], axis=0)
                    for want, yn in ((inside, "yes"), (~inside, "no")):
                        ys, xs = np.nonzero(want)
                        for k in rng.choice(len(ys), size=min(3, len(ys)), replace=False) if len(ys) else []:
                            rows.append((f"{i:06d}", (xs[k] + 0.5) / w, (ys[k] + 0.5) / h, mids[sh], yn))
            write_openimages(out, "val", {f"{i:06d}": s.image for i, s in enumerate(samples)}, rows,
                             {m: sh for sh, m in mids.items()})
        run.save_progress(dict(settings, complete=True))
        run.write_run_json(dict(settings, world_seed=world_seed))
    return out


@job
def write_shapes_waterbirds(output, n_train: int = 2000, n_val: int = 1000, n_test: int = 2000, *,
                            correlation: float = 0.95, overwrite: bool = False) -> Path:
    """A Waterbirds-layout dataset from the spurious shapes world: OUTPUT/metadata.csv (img_filename, y, split,
    place, class_name) and OUTPUT/images/. Labels: circle (0) / square (1); place: land (0) / water (1); squares go
    with water in train/val with probability `correlation`; the test split has the four groups in equal numbers.
    A folder holding another such set is refused unless ``overwrite``."""
    from . import world

    settings = dict(n_train=n_train, n_val=n_val, n_test=n_test, correlation=correlation)
    out = Path(output)
    with RunFolder(out, "shapes-waterbirds", settings, overwrite=overwrite, progress_name="world.json") as run:
        _refuse_other_world(out, run, settings, overwrite, ("images",))
        (out / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for split, n, code in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
            spec = world.Spurious(correlation=correlation, balanced=(split == "test"))
            for i in range(n):
                s = world.sample(world.SPLIT_SEEDS[split], i, spurious=spec)
                name = f"images/{split}_{i:06d}.png"
                _save_png(s.image, out / name)
                rows.append({"img_filename": name, "y": s.labels["label"], "split": code,
                             "place": int(s.labels["background"] == "water"),
                             "class_name": world.SPURIOUS_CLASSES[int(s.labels["label"])]})
        with open(out / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        run.save_progress(dict(settings, complete=True))
        run.write_run_json(settings)
    return out


def _save_png(arr, path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _refuse_other_world(out: Path, run: RunFolder, settings: dict, overwrite: bool, subfolders) -> None:
    """A world folder is written whole: refuse one that holds another world (or unknown files), unless overwrite."""
    import shutil

    from .store import differences, read_json

    old = read_json(run.progress_file)
    present = [s for s in subfolders if (out / s).exists()] + (["metadata.csv"] if (out / "metadata.csv").exists()
                                                                else [])
    if not present:
        return
    if not overwrite:
        if old is None:
            raise FolderMismatchError(f"{out} already holds {', '.join(present)} that this command did not write; "
                                      f"use another output folder, or --overwrite to replace them")
        problems = differences(old, settings)
        if problems:
            raise FolderMismatchError(f"{out} holds another world ({'; '.join(problems)}); use another output "
                                      f"folder, or --overwrite to replace it")
    for s in subfolders:
        shutil.rmtree(out / s, ignore_errors=True)
    (out / "metadata.csv").unlink(missing_ok=True)


@job
def evaluate_shapes(output=None, model: str = "shapes", pretrained=None, *, n: int = 2000, seed: int = 12345,
                    overwrite: bool = False) -> dict:
    """Zero-shot accuracy of a built-in model per attribute on `n` fresh single-object images (accuracy.json);
    for shapes-spurious also the per-group, average and worst-group accuracy of the circle/square classifier on a
    balanced split and a linear probe's accuracy (key "spurious")."""
    from . import training

    if not is_builtin(model):
        raise BadInputError(f"evaluate_shapes takes a built-in model (shapes, shapes-spurious); got {model!r}")
    loaded = resolve_model(model, pretrained, "cpu")
    acc = training.zero_shot_accuracy(loaded.model, loaded.tokenizer, n=n, seed=seed)
    if model == "shapes-spurious":
        acc["spurious"] = training.spurious_report(loaded.model, loaded.tokenizer, n=n, seed=seed)
    if output is not None:
        with RunFolder(output, "eval-shapes", overwrite=overwrite) as run:
            (Path(output) / "accuracy.json").write_text(json.dumps(acc, indent=1))
            run.write_run_json(dict(model=model, pretrained=pretrained, n=n, seed=seed),
                               model_fingerprint=loaded.fingerprint)
    return acc


__all__ = ["AblationResult", "CompletenessResult", "DebiasResult", "DecomposeSummary", "HeadLabels", "Loaded",
           "Retrieval", "ablate_cache", "cache_images", "debias_cache", "decompose_images", "encode_bank",
           "evaluate_shapes", "label_cache", "measure_completeness", "retrieve_images", "write_shapes_waterbirds",
           "write_shapes_world"]
