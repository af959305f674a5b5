"""Jobs on images: heatmaps, the comparison of explainers, and the segmentation and perturbation evaluations.

Like `textspan.jobs`, each is a library function with its command's guarantees: a locked `RunFolder`, run.json,
and for the evaluations a resumable progress file (saved after every batch; a rerun with the same settings
continues where it stopped and equals an uninterrupted run; other settings are refused unless ``overwrite``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ._repr import concise
from . import engine
from .errors import BadInputError, job
from .jobs import Loaded, Notify, _nothing, resolve_model, zero_shot_classifier
from .store import RunFolder

log = logging.getLogger(__name__)


def _images(loaded: Loaded, paths: Sequence):
    """(PIL images as read, preprocessed batch on the model's device); an unreadable file stops with its name."""
    import torch

    from .datasets import read_image

    pil = [read_image(p) for p in paths]
    x = torch.stack([loaded.preprocess(im) for im in pil]).to(engine.model_device(loaded.model))
    return pil, x


def _texts(loaded: Loaded, texts: Sequence[str]):
    import torch

    from .text import encode_texts

    if not texts:
        raise BadInputError("no prompts given")
    return torch.from_numpy(encode_texts(loaded.model, loaded.tokenizer, list(texts)))


@concise
@dataclass
class HeatmapResult:
    """maps [b, k, grid_h, grid_w] of the prompts (or None), per_head {head: [b, k, gh, gw]} (with head_grid),
    per labelled head {head: [b, top, gh, gw]} for its top TextSpan texts (with labels)."""

    maps: Optional[np.ndarray]
    per_head: Dict[str, np.ndarray]
    labelled: Dict[str, np.ndarray]
    frames: Sequence = ()
    names: Sequence[str] = ()
    prompts: Sequence[str] = ()
    relative: bool = True

    def figure(self, title: str = ""):
        """The grid of the prompts' maps (images x prompts, the original image first) as a matplotlib figure."""
        from .visualize import overlay_grid

        return overlay_grid(self.frames, self.maps, self.names, list(self.prompts), title=title or (
            ("relative" if self.relative else "absolute") + " decomposition maps"), relative=self.relative)


@job
def draw_heatmaps(images: Sequence, output=None, prompts: Sequence[str] = (), model="shapes", pretrained=None, *,
                  device=None, heads=None, layers=None, absolute: bool = False, labels=None, top: int = 3,
                  panel_scale: bool = False, head_grid: bool = False, overwrite: bool = False,
                  quiet: bool = True) -> HeatmapResult:
    """Per-prompt spatial maps from the decomposition for image files.

    With ``output``: an overlay PNG per image and prompt (NAME_JJ.png), the raw maps (maps.npy) and grid.png; with
    ``head_grid`` (needs `heads`) one grid per prompt of images x heads (head_grid_JJ.png); with ``labels`` (a
    label-heads folder or `HeadLabels`) a figure and an array per labelled head for its `top` texts. Relative maps
    (the default) need two prompts at least; ``absolute=True`` gives each prompt's own map. With both `labels` and
    `heads`, only those heads' labels are drawn. ``quiet=False``: progress bars.
    """
    from tqdm.auto import tqdm
    from .heatmaps import check_relative, heatmaps
    from .jobs import HeadLabels
    from .names import head_name, parse_heads

    if not prompts and labels is None:
        raise BadInputError("give prompts (--prompts) and/or labels (--labels)")
    if head_grid and not heads:
        raise BadInputError("head_grid (--head-grid) needs heads (--heads)")
    if prompts:
        check_relative(not absolute, len(prompts))
    label_set = None
    if labels is not None:
        label_set = labels if isinstance(labels, HeadLabels) else HeadLabels.load(labels)
    loaded = resolve_model(model, pretrained, device)
    tower = engine.read_tower(loaded.model)
    pairs = parse_heads(heads, tower.n_layers, tower.n_heads) if heads else []
    if layers is not None:
        from .names import parse_layers

        parse_layers(layers, tower.n_layers)  # checked before anything is written
    pil, x = _images(loaded, images)
    names = [Path(p).stem for p in images]
    shown = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]  # the maps live on the preprocessed frame
    result = HeatmapResult(None, {}, {}, shown, names, list(prompts), not absolute)
    settings = dict(fingerprint=loaded.fingerprint, images=[str(Path(p).resolve()) for p in images],
                    prompts=list(prompts), heads=[head_name(*p) for p in pairs], layers=layers, absolute=absolute,
                    labels=None if labels is None else str(getattr(label_set, "cache", "")) + f":{label_set.bank_digest}",
                    top=top, panel_scale=panel_scale, head_grid=head_grid)
    run = RunFolder(output, "heatmap", settings, overwrite=overwrite) if output is not None else None
    out = Path(output) if output is not None else None
    from .visualize import SCALE_NOTES, overlay_figure, overlay_grid, row_scales

    kind = "absolute" if absolute else "relative"
    with run if run is not None else _nothing():
        if prompts:
            T = _texts(loaded, prompts)
            maps = heatmaps(loaded.model, x, T, heads=heads, layers=layers, relative=not absolute).cpu().numpy()
            result.maps = maps
            if out is not None:
                np.save(out / "maps.npy", maps)
                where = f" (heads {heads})" if heads else f" (layers {layers})" if layers is not None else ""
                scales = row_scales(maps, not absolute, "panel" if panel_scale else "row")
                note = SCALE_NOTES["panel"] if panel_scale else "colour scale shared by this image's prompts"
                for i, name in enumerate(names):
                    for j, prompt in enumerate(prompts):
                        overlay_figure(shown[i], maps[i, j], f"{name}: {prompt!r}{where}, {kind}",
                                       out / f"{name}_{j:02d}.png", relative=not absolute, scale=scales[i][j],
                                       scale_note=note)
                overlay_grid(shown, maps, names, list(prompts), out / "grid.png",
                             title=f"{kind} decomposition maps{where}", relative=not absolute,
                             scale="panel" if panel_scale else "row")
            if head_grid:
                per = np.stack([heatmaps(loaded.model, x, T, heads=[p], relative=not absolute).cpu().numpy()
                                for p in pairs], axis=2)  # [b, k, heads, g, g]
                result.per_head = {head_name(*p): per[:, :, k] for k, p in enumerate(pairs)}
                if out is not None:
                    for j, prompt in enumerate(prompts):
                        overlay_grid(shown, per[:, j], names, [head_name(*p) for p in pairs],
                                     out / f"head_grid_{j:02d}.png", title=f"{prompt!r}: each head alone, {kind}",
                                     relative=not absolute, scale="panel" if panel_scale else "row")
        if label_set is not None:
            records = label_set.records()
            if pairs:  # --heads restricts the labelled heads drawn
                wanted = [head_name(*p) for p in pairs]
                missing = [h for h in wanted if h not in {r["head"] for r in records}]
                if missing:
                    raise BadInputError(f"heads {', '.join(missing)} have no labels in {labels} (labelled: "
                                        f"{', '.join(r['head'] for r in records[:8])}"
                                        f"{', ...' if len(records) > 8 else ''})")
                records = [r for r in records if r["head"] in wanted]
            for rec in tqdm(records, disable=quiet, desc="labelled heads", unit="head"):
                texts = [t["text"] for t in rec["texts"][:top]]
                m = heatmaps(loaded.model, x, _texts(loaded, texts), heads=rec["head"],
                             relative=not absolute and len(texts) > 1).cpu().numpy()
                result.labelled[rec["head"]] = m
                if out is not None:
                    np.save(out / f"{rec['head']}.npy", m)
                    overlay_grid(shown, m, names, texts, out / f"{rec['head']}.png",
                                 title=f"{rec['head']}: its top texts", relative=not absolute and len(texts) > 1,
                                 scale="panel" if panel_scale else "row")
        if run is not None:
            run.write_run_json(dict(images=[str(p) for p in images], model=loaded.name, pretrained=loaded.pretrained,
                                    prompts=list(prompts), heads=heads, layers=layers, absolute=absolute,
                                    labels=None if labels is None or isinstance(labels, HeadLabels) else str(labels)),
                               model_fingerprint=loaded.fingerprint)
    return result


@concise
@dataclass
class Comparison:
    """Raw maps per method ([b, P, grid_h, grid_w]) and seconds per method."""

    maps: Dict[str, np.ndarray]
    seconds: Dict[str, float]
    frames: Sequence = ()
    names: Sequence[str] = ()
    prompts: Sequence[str] = ()

    def figure(self):
        """Every method's maps side by side (upsampled, min-max normalised) as a matplotlib figure."""
        import torch

        from .methods import upsample_maps
        from .visualize import compare_grid

        size = (self.frames[0].size[1], self.frames[0].size[0])
        shown = {m: upsample_maps(torch.from_numpy(v), size).numpy() for m, v in self.maps.items()}
        return compare_grid(None, self.frames, self.names, list(self.prompts), list(self.maps), shown, self.seconds,
                            signed=_signed_maps(self.maps, list(self.maps), len(self.prompts), size))


@job
def compare_methods(images: Sequence, prompts: Sequence[str], output=None, model="shapes", pretrained=None, *,
                    methods: Optional[Sequence[str]] = None, device=None, overwrite: bool = False,
                    quiet: bool = True) -> Comparison:
    """Every explainer on the same images and prompts: compare.png (rows: image x prompt, columns: methods; each
    map upsampled and min-max normalised, one shared colour bar), maps_<method>.npy (raw [b, P, grid_h, grid_w])
    and times.json (seconds per method), given ``output``. ``quiet=False``: a progress bar over the methods."""
    from tqdm.auto import tqdm

    from .methods import explain, list_methods, upsample_maps

    names = list(methods) if methods else None
    unknown = [m for m in names or () if m not in list_methods()]
    if unknown:
        raise BadInputError(f"unknown methods {unknown}; known: {', '.join(list_methods())}")
    loaded = resolve_model(model, pretrained, device)
    if names is None:  # every method defined on this tower (as the methods registered themselves)
        names = list_methods(engine.read_tower(loaded.model))
    pil, x = _images(loaded, images)
    T = _texts(loaded, prompts)
    frames = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]
    res = Comparison({}, {}, frames, [Path(p).stem for p in images], list(prompts))
    shown = {}
    settings = dict(fingerprint=loaded.fingerprint, images=[str(Path(p).resolve()) for p in images],
                    prompts=list(prompts), methods=names)
    run = RunFolder(output, "compare", settings, overwrite=overwrite) if output is not None else None
    with run if run is not None else _nothing():
        bar = tqdm(names, disable=quiet, desc="explainers", unit="method")
        for m in bar:
            bar.set_postfix_str(m)
            start = time.perf_counter()
            raw = explain(loaded.model, x, T, method=m,
                          **({"relative": len(prompts) > 1} if m == "decomposition" else {}))
            res.seconds[m] = time.perf_counter() - start
            res.maps[m] = raw.cpu().numpy()
            shown[m] = upsample_maps(raw.cpu(), tuple(x.shape[-2:])).numpy()  # [b, P, H, W] in [0, 1]
        if run is not None:
            out = Path(output)
            from .visualize import compare_grid

            for m in names:
                np.save(out / f"maps_{m}.npy", res.maps[m])
            compare_grid(out / "compare.png", frames, [Path(p).stem for p in images], list(prompts), names, shown,
                         res.seconds, signed=_signed_maps(res.maps, names, len(prompts), tuple(x.shape[-2:])))
            (out / "times.json").write_text(json.dumps({"seconds": res.seconds, "images": len(images),
                                                        "prompts": len(prompts), "device": str(x.device)}, indent=1))
            run.write_run_json(dict(images=[str(p) for p in images], methods=names, prompts=list(prompts),
                                    model=loaded.name, pretrained=loaded.pretrained),
                               model_fingerprint=loaded.fingerprint)
    return res


def sample_across_classes(items, limit: int, seed: int = 0):
    """A seeded sample of `limit` images of an `ImageList`, spread over its classes (as evenly as their sizes
    allow: round-robin over the classes, each class's images in a seeded order), kept in list order."""
    rng = np.random.default_rng(seed)
    by_class: Dict[int, List[int]] = {}
    for i, y in enumerate(items.labels):
        by_class.setdefault(int(y), []).append(i)
    queues = [list(rng.permutation(idx)) for _, idx in sorted(by_class.items())]
    chosen: List[int] = []
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(int(q.pop(0)))
    chosen.sort()
    from .datasets import ImageList

    return ImageList([items.paths[i] for i in chosen], [items.labels[i] for i in chosen], items.classes, items.source,
                     {k: [v[i] for i in chosen] for k, v in items.extra.items()}, list(items.notes))


def _signed_maps(maps: dict, names, n_prompts: int, size) -> dict:
    """{method: [b, P, H, W] upsampled raw maps} of the methods whose maps are signed (the decomposition relative
    to the mean over prompts, with two prompts or more): drawn without min-max stretching."""
    from .visualize import upsample

    if "decomposition" in names and n_prompts > 1:
        return {"decomposition": upsample(maps["decomposition"], size).numpy()}
    return {}


def _eval_settings(loaded: Loaded, method, options, W, classnames, **data) -> dict:
    """What must agree for an evaluation to resume: model, method and options, classifier, and the `data` keys.
    A method not defined on the model's tower is refused here, before any work."""
    from .errors import UnsupportedModelError
    from .methods import get_method, list_methods, method_towers, tower_kind

    get_method(method)
    tower = engine.read_tower(loaded.model)
    if method not in list_methods(tower, with_required=True):
        why = f"{tower_kind(tower)!r} pooling"
        if tower_kind(tower) in method_towers(method):
            why = "a LayerNorm between its heads' outputs and the residual stream (EVA)"
        raise UnsupportedModelError(f"method {method!r} is not defined on this model's tower ({why}); these are: "
                                    f"{', '.join(list_methods(tower))}")
    from .methods import method_requires

    missing = [o for o in method_requires(method) if o not in options]
    if missing:
        raise BadInputError(f"method {method!r} needs the option {missing[0]} (--option {missing[0]}=...)")
    if method == "neurons":  # the folders must come from this model
        from .methods.neurons import load_neuron_folders

        for layer, _, fp in load_neuron_folders(options["neurons"]):
            if fp != loaded.fingerprint:
                raise UnsupportedModelError(f"the neurons folder of block {layer} was made with other weights "
                                            f"(fingerprint {fp}; this model {loaded.fingerprint})")
    return {"model": loaded.name, "pretrained": loaded.pretrained, "fingerprint": loaded.fingerprint,
            "method": method, "options": options,
            "classifier": hashlib.sha256(np.ascontiguousarray(W).tobytes()).hexdigest(), "classes": list(classnames),
            **data}


@job
def evaluate_segmentation(data, output=None, model="shapes", pretrained=None, *, classes=None, templates=None,
                          classifier=None, target: str = "predicted", samples: int = 8,
                          method: str = "decomposition", options: Optional[dict] = None, batch_size: int = 16,
                          threshold="mean", clip: bool = True, device=None, overwrite: bool = False,
                          quiet: bool = True, notify: Notify = log.info) -> dict:
    """Zero-shot segmentation with an explainer's maps (DESIGN.md section 6).

    The protocol's defaults (clip at 0, threshold at the map's mean) can be changed for other published protocols:
    ``threshold=0.5`` (a fixed value of the min-max normalised map) and ``clip=False`` (the second-order lens'
    segmentation from neurons uses both).

    `data` is gtsegs_ijcv.mat (ImageNet-segmentation) or a folder with images/ and masks/ (same relative paths).
    The map of the chosen class (the predicted one, or with ``target="true"`` the class sub-folder's; decomposition:
    minus the mean over classes) is clipped at 0, min-max normalised and thresholded at its mean. Returns and writes
    segmentation.json (pixel_accuracy, miou, map, pointing, ...), per_image.csv and sample overlays. Per-image rows
    are saved after every batch (segment_progress.json): rerunning resumes; a folder with other settings is refused.

    Several objects in one image (folder data): masks/REL/CLASS.png, one mask per object named by its class (REL:
    the image's path without extension). Each object is scored on its own (whatever `target` says): the map of its
    class against its mask, the other objects counting as background, and the pointing game (the map's maximum on
    that object). segmentation.json then adds `by_objects` ({"1": scores of single-mask images, "2": of the
    two-object images' objects, ...}); per_image.csv has a row per object (item IMAGE:CLASS).
    """
    from . import segmentation as seg
    from .evals.segmentation import SegmentationEvaluation
    from .evaluation import run_evaluation

    if target not in ("predicted", "true"):
        raise BadInputError(f"target must be 'predicted' or 'true'; got {target!r}")
    options = dict(options or {})
    loaded = resolve_model(model, pretrained, device)
    W, classnames = zero_shot_classifier(loaded, classes, templates, classifier,
                                         default_classes=seg.folder_classes(data) if Path(data).is_dir() else ())
    source = seg.SegmentationSource(data)
    if target == "true" and source.is_mat:
        raise BadInputError("target='true' (--target true) needs class sub-folders (folder data); the .mat file has "
                            "no labels")
    from .evals._maps import check_threshold

    threshold = check_threshold(threshold)
    protocol = {} if threshold == "mean" and clip else dict(threshold=threshold, clip=bool(clip))
    settings = _eval_settings(loaded, method, options, W, classnames, data=source.identity, target=target,
                              **protocol)
    ev = SegmentationEvaluation(loaded, W, classnames, method=method, options=options, target=target,
                                samples=samples, out=Path(output) if output is not None else None,
                                threshold=threshold, clip=clip)
    return run_evaluation(ev, source, output, settings, batch_size=batch_size, overwrite=overwrite, quiet=quiet,
                          notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(data=str(data), model=loaded.name, pretrained=loaded.pretrained,
                                         target=target, method=method, options=options, **protocol))


@job
def evaluate_perturbation(images, output=None, model="shapes", pretrained=None, *, classes=None, templates=None,
                          classifier=None, method: str = "decomposition", options: Optional[dict] = None,
                          limit: Optional[int] = None, seed: int = 0, batch_size: int = 32, device=None,
                          overwrite: bool = False, quiet: bool = True, notify: Notify = log.info) -> dict:
    """Positive and negative perturbation (Chefer et al. 2021): remove the most (positive) or least (negative)
    relevant patches for the predicted class, 10% .. 90% in steps of 10%, and measure zero-shot accuracy at each step
    (against the class sub-folder when the images have one, else against the unperturbed prediction). A removed
    patch is set to 0 in the normalised image (the preprocessing mean colour), the same for every method.

    Returns and writes perturbation.json (positive_auc, negative_auc, steps), perturbation.csv and
    perturbation.png. The counts so far are saved after every batch (perturbation_progress.json): rerunning resumes.
    `limit`: a seeded sample (`seed`) of that many images spread over the classes (`sample_across_classes`), not the
    first files in sorted order.
    """
    from .datasets import ImageList, ImageListSource
    from .evals.perturbation import PerturbationEvaluation
    from .evaluation import run_evaluation

    options = dict(options or {})
    loaded = resolve_model(model, pretrained, device)
    items = images if isinstance(images, ImageList) else ImageList.from_path(images)
    W, classnames = zero_shot_classifier(loaded, classes, templates, classifier, default_classes=items.classes)
    if limit and limit < len(items):
        items = sample_across_classes(items, limit, seed)
    # the label of an image: its class folder's name among the classes; without folders, the clean prediction
    has_labels = all(lab >= 0 for lab in items.labels) and bool(items.classes)
    labels = None
    if has_labels:
        missing = sorted(set(items.classes) - set(classnames))
        if missing:
            raise BadInputError(f"class folders not in the classifier's classes: {missing[:5]}")
        labels = [classnames.index(items.classes[y]) for y in items.labels]
    settings = _eval_settings(loaded, method, options, W, classnames, images_digest=items.digest,
                              n_images=len(items), target="class folder" if has_labels else "unperturbed prediction")
    ev = PerturbationEvaluation(loaded, W, classnames, method=method, options=options, labels=labels)
    return run_evaluation(ev, ImageListSource(items, loaded.preprocess), output, settings, batch_size=batch_size,
                          overwrite=overwrite, quiet=quiet, notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(images=str(images), model=loaded.name, pretrained=loaded.pretrained,
                                         method=method, options=options, limit=limit))


__all__ = ["Comparison", "HeatmapResult", "compare_methods", "draw_heatmaps", "evaluate_perturbation",
           "evaluate_segmentation"]
