"""Jobs for the comparison papers' benchmarks: deletion/insertion, ImageNet-S, OpenImages-V7 points, and
`run_benchmark`, which runs every method on a dataset with every evaluation it supports and writes a leaderboard.

Each evaluation job has the guarantees of the others (`textspan.evaluation`): a locked, resumable run folder whose
settings must agree, run.json, torchrun shards. Dataset kinds `run_benchmark` recognises and what they support:

    imagenet-s      ImageNet-S folder (validation/, validation-segmentation/)   imagenet_s, deletion_insertion
    openimages      oidv7-*-annotations-point-labels.csv + images            points
    segmentation    gtsegs_ijcv.mat, or images/ + masks/                       segmentation
    classes         an image folder with class sub-folders                     perturbation, deletion_insertion
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import BadInputError, job
from .evals._maps import check_threshold
from .jobs import Notify, resolve_model, zero_shot_classifier

log = logging.getLogger(__name__)

SUPPORTS = {"imagenet-s": ("imagenet_s", "deletion_insertion"), "openimages": ("points",),
            "segmentation": ("segmentation",), "classes": ("perturbation", "deletion_insertion")}

# leaderboard columns: (evaluation, result key, column name, higher is better)
COLUMNS = [("segmentation", "pixel_accuracy", "seg pixel acc", True), ("segmentation", "miou", "seg mIoU", True),
           ("segmentation", "map", "seg mAP", True), ("segmentation", "pointing", "pointing", True),
           ("imagenet_s", "miou", "ImageNet-S mIoU", True), ("points", "p_miou", "p-mIoU", True),
           ("perturbation", "positive_auc", "pos. pert. AUC", False),
           ("perturbation", "negative_auc", "neg. pert. AUC", True),
           ("deletion_insertion", "deletion_auc", "deletion AUC", False),
           ("deletion_insertion", "insertion_auc", "insertion AUC", True)]


def _class_labels(items, classnames: Sequence[str]) -> Optional[List[int]]:
    """Per image of `items`, the classifier column of its class folder (named as the column, or by its WordNet id
    when the column holds CLIP's name of it); None without class folders."""
    from .imagenet import class_names

    if not items.classes or any(y < 0 for y in items.labels):
        return None
    folder_names = class_names(items.classes)
    cols = []
    for c, alias in zip(items.classes, folder_names):
        if c in classnames:
            cols.append(classnames.index(c))
        elif alias in classnames:
            cols.append(classnames.index(alias))
        else:
            raise BadInputError(f"class folder {c!r} is not among the classifier's classes ({', '.join(classnames[:5])}"
                                f"{', ...' if len(classnames) > 5 else ''})")
    return [cols[y] for y in items.labels]


@job
def evaluate_deletion_insertion(images, output=None, model="shapes", pretrained=None, *, classes=None,
                                templates=None, classifier=None, method: str = "decomposition",
                                options: Optional[dict] = None, target: str = "true", steps: int = 100,
                                every: int = 10, max_side: int = 640, start: str = "black", seed: int = 0,
                                limit: Optional[int] = None, batch_size: int = 8, device=None,
                                overwrite: bool = False, quiet: bool = True, notify: Notify = log.info) -> dict:
    """Grad-ECLIP's deletion and insertion curves (`textspan.evals.deletion`) over an image folder with class
    sub-folders (folders named by WordNet id are prompted with CLIP's ImageNet names). Writes
    deletion_insertion.json/.csv/.png; returns the results (deletion_auc, insertion_auc, the curves)."""
    from .datasets import ImageList, ImageListSource
    from .evals.deletion import DeletionInsertionEvaluation
    from .evaluation import run_evaluation
    from .image_jobs import _eval_settings, sample_across_classes
    from .imagenet import class_names

    options = dict(options or {})
    loaded = resolve_model(model, pretrained, device)
    items = images if isinstance(images, ImageList) else ImageList.from_path(images)
    W, classnames = zero_shot_classifier(loaded, classes, templates, classifier,
                                         default_classes=class_names(items.classes))
    if limit and limit < len(items):
        items = sample_across_classes(items, limit, seed)
    labels = _class_labels(items, classnames)
    protocol = dict(target=target, steps=steps, every=every, max_side=max_side, start=start, seed=seed)
    ev = DeletionInsertionEvaluation(loaded, W, classnames, method=method, options=options, labels=labels,
                                     **protocol)
    settings = _eval_settings(loaded, method, options, W, classnames, images_digest=items.digest,
                              n_images=len(items), **protocol)
    return run_evaluation(ev, ImageListSource(items), output, settings, batch_size=batch_size, overwrite=overwrite,
                          quiet=quiet, notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(images=str(images), model=loaded.name, pretrained=loaded.pretrained,
                                         method=method, options=options, limit=limit, **protocol))


@job
def evaluate_imagenet_s(data, output=None, model="shapes", pretrained=None, *, categories=None, templates=None,
                        classifier=None, method: str = "decomposition", options: Optional[dict] = None, target: str = "true",
                        threshold=0.5, limit: Optional[int] = None, batch_size: int = 16, device=None,
                        overwrite: bool = False, quiet: bool = True, notify: Notify = log.info) -> dict:
    """ImageNet-S zero-shot segmentation mIoU (`textspan.evals.imagenet_s`) on an ImageNet-S folder; the classes are
    the subset's categories, prompted with CLIP's ImageNet names (or `classifier`: [d', n] columns in category
    order, an array or .npy). Writes imagenet_s.json."""
    from .evals.imagenet_s import ImageNetSEvaluation
    from .evaluation import run_evaluation
    from .image_jobs import _eval_settings
    from .imagenet import ImageNetS

    if target not in ("true", "predicted"):
        raise BadInputError(f"target must be 'true' or 'predicted'; got {target!r}")
    options = dict(options or {})
    threshold = check_threshold(threshold)
    loaded = resolve_model(model, pretrained, device)
    ds = ImageNetS(data, categories)
    src = _Limited(ds, limit)
    W, classnames = zero_shot_classifier(loaded, ds.names, templates, classifier)
    if W.shape[1] != len(ds.names):
        raise BadInputError(f"classifier has {W.shape[1]} columns; {ds.root} has {len(ds.names)} categories")
    ev = ImageNetSEvaluation(loaded, W, classnames, method=method, options=options, target=target,
                             threshold=threshold)
    settings = _eval_settings(loaded, method, options, W, classnames, data=ds.identity, n_images=len(src),
                              target=target, threshold=threshold)
    return run_evaluation(ev, src, output, settings, batch_size=batch_size, overwrite=overwrite, quiet=quiet,
                          notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(data=str(data), model=loaded.name, pretrained=loaded.pretrained,
                                         method=method, options=options, target=target, threshold=threshold,
                                         limit=limit))


@job
def evaluate_points(data, output=None, model="shapes", pretrained=None, *, templates=None, classifier=None,
                    method: str = "decomposition", options: Optional[dict] = None, threshold=0.5,
                    limit: Optional[int] = None, batch_size: int = 16, device=None, overwrite: bool = False,
                    quiet: bool = True, notify: Notify = log.info) -> dict:
    """p-mIoU on OpenImages-V7 point labels (`textspan.evals.points`); the classes are the names of the MIDs with a
    'yes' point (or `classifier`: columns in the order of `OpenImagesPoints(data).classes`). Writes points.json; the
    reader's notes (points left out) are in the results."""
    from .evals.points import PointsEvaluation
    from .evaluation import run_evaluation
    from .image_jobs import _eval_settings
    from .openimages import OpenImagesPoints

    options = dict(options or {})
    threshold = check_threshold(threshold)
    loaded = resolve_model(model, pretrained, device)
    ds = OpenImagesPoints(data)
    src = _Limited(ds, limit)
    W, classnames = zero_shot_classifier(loaded, ds.classes, templates, classifier)
    if W.shape[1] != len(ds.classes):
        raise BadInputError(f"classifier has {W.shape[1]} columns; {ds.points_file} names {len(ds.classes)} classes")
    ev = PointsEvaluation(loaded, W, classnames, method=method, options=options, threshold=threshold,
                          notes=ds.notes)
    settings = _eval_settings(loaded, method, options, W, classnames, data=ds.identity, n_images=len(src),
                              threshold=threshold)
    return run_evaluation(ev, src, output, settings, batch_size=batch_size, overwrite=overwrite, quiet=quiet,
                          notify=notify, fingerprint=loaded.fingerprint,
                          arguments=dict(data=str(data), model=loaded.name, pretrained=loaded.pretrained,
                                         method=method, options=options, threshold=threshold, limit=limit))


class _Limited:
    """The first `limit` entries of a source (all when None)."""

    def __init__(self, source, limit: Optional[int]):
        self.source, self.n = source, len(source) if not limit else min(int(limit), len(source))
        self.identity = source.identity

    def __len__(self) -> int:
        return self.n

    def entries(self, start: int, stop: int):
        return self.source.entries(start, min(stop, self.n))


# --------------------------------------------------------------------------------------------------------------------
# the benchmark


def dataset_kind(data) -> str:
    """imagenet-s, openimages, segmentation or classes (see the module doc); BadInputError for anything else."""
    from .imagenet import is_imagenet_s
    from .openimages import find_points_file

    p = Path(data)
    if not p.exists():
        raise BadInputError(f"{data}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".mat":
            return "segmentation"
        raise BadInputError(f"{data}: a file, but not an ImageNet-segmentation .mat file")
    if is_imagenet_s(p):
        return "imagenet-s"
    try:
        find_points_file(p)
        return "openimages"
    except BadInputError:
        pass
    if (p / "images").is_dir() and (p / "masks").is_dir():
        return "segmentation"
    if any(q.is_dir() and not q.name.startswith(".") for q in p.iterdir()):
        return "classes"
    raise BadInputError(f"{data}: not a dataset textspan benchmarks (ImageNet-S, OpenImages-V7 points, "
                        f"gtsegs_ijcv.mat, images/ + masks/, or class sub-folders)")


def _run_one(evaluation: str, data, kind: str, out: Path, loaded, method: str, *, classes, templates, limit,
             batch_size, overwrite, quiet, notify, seed) -> dict:
    from .image_jobs import evaluate_perturbation, evaluate_segmentation

    common = dict(method=method, batch_size=batch_size, overwrite=overwrite, quiet=quiet, notify=notify)
    if evaluation == "segmentation":
        return evaluate_segmentation(data, out, loaded, classes=classes, templates=templates, samples=0, **common)
    if evaluation == "perturbation":
        return evaluate_perturbation(data, out, loaded, classes=classes, templates=templates, limit=limit, seed=seed,
                                     **common)
    if evaluation == "deletion_insertion":
        src = data
        if kind == "imagenet-s":
            from .imagenet import find_subset

            src = find_subset(data) / "validation"
        return evaluate_deletion_insertion(src, out, loaded, classes=classes, templates=templates, limit=limit,
                                           seed=seed, **common)
    if evaluation == "imagenet_s":
        return evaluate_imagenet_s(data, out, loaded, templates=templates, limit=limit, **common)
    if evaluation == "points":
        return evaluate_points(data, out, loaded, templates=templates, limit=limit, **common)
    raise BadInputError(f"unknown evaluation {evaluation!r}")


@job
def run_benchmark(data, output, model="shapes", pretrained=None, *, methods="all", evaluations=None,
                  classes=None, templates=None, limit: Optional[int] = None, seed: int = 0, batch_size: int = 8,
                  device=None, overwrite: bool = False, quiet: bool = True, notify: Notify = log.info) -> dict:
    """Every method (``"all"``: every method defined on the model's tower, as the methods registered themselves) with
    every evaluation the dataset supports (or `evaluations`), one resumable run folder per method and evaluation
    (OUTPUT/METHOD/EVALUATION/), then the leaderboard: leaderboard.csv / .md (methods x metrics, seconds per image)
    and leaderboard.png. A rerun resumes: finished runs are read back, unfinished ones continue.

    Returns {"kind", "evaluations", "methods", "rows": [{method, metric columns..., seconds per image}]}.
    """
    from .methods import list_methods

    kind = dataset_kind(data)
    supported = SUPPORTS[kind]
    evals = list(supported) if not evaluations else [e.strip() for e in (
        evaluations.split(",") if isinstance(evaluations, str) else evaluations)]
    bad = [e for e in evals if e not in supported]
    if bad:
        raise BadInputError(f"{data} ({kind}) supports {', '.join(supported)}; not {', '.join(bad)}")
    loaded = resolve_model(model, pretrained, device)
    from . import engine

    defined = list_methods(engine.read_tower(loaded.model))
    if methods in (None, "all") or methods == ["all"]:
        names = defined
    else:
        names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
        unknown = [m for m in names if m not in defined]
        if unknown:
            raise BadInputError(f"methods {unknown} are not defined on this model's tower; these are: "
                                f"{', '.join(defined)}")
    out = Path(output)
    settings = dict(data=str(Path(data).resolve()), kind=kind, model=loaded.name, pretrained=loaded.pretrained,
                    fingerprint=loaded.fingerprint, limit=limit, seed=seed)
    rows: List[Dict] = []
    results: Dict[str, Dict[str, dict]] = {}
    with _benchmark_folder(out, settings, overwrite) as run:
        for m in names:
            row: Dict = {"method": m}
            for e in evals:
                t0 = time.perf_counter()
                r = _run_one(e, data, kind, out / m / e, loaded, m, classes=classes, templates=templates, limit=limit,
                             batch_size=batch_size, overwrite=overwrite, quiet=quiet, notify=notify, seed=seed)
                results.setdefault(m, {})[e] = r
                n = r.get("n_images") or 1
                secs = _seconds(out / m / e, time.perf_counter() - t0)
                for ev, key, col, _ in COLUMNS:
                    if ev == e and r.get(key) is not None:
                        row[col] = round(float(r[key]), 2)
                row[f"{e} s/img"] = round(secs / n, 4)
            rows.append(row)
            if run is not None:
                run.save_progress(dict(settings, done=[r["method"] for r in rows]))
        board = rows
        if run is not None:  # one process (or rank 0 under torchrun) writes the leaderboard
            board = write_leaderboard(out, rows, evals, title=f"{Path(data).name} ({kind}), {loaded.name}")
            run.write_run_json(dict(data=str(data), methods=names, evaluations=evals, model=loaded.name,
                                    pretrained=loaded.pretrained, limit=limit, seed=seed, batch_size=batch_size),
                               model_fingerprint=loaded.fingerprint)
    return {"kind": kind, "evaluations": evals, "methods": names, "rows": board, "results": results}


class _benchmark_folder:
    """The benchmark's own run folder: held by the one process, or by rank 0 under torchrun (the other ranks get
    None; a refusal on rank 0 stops every rank with its reason, none waits for the others)."""

    def __init__(self, out: Path, settings: dict, overwrite: bool):
        from .store import RunFolder

        self.run = RunFolder(out, "benchmark", settings, overwrite=overwrite, progress_name="benchmark.json")
        self.held = False

    def __enter__(self):
        from .cache import _world

        world, rank = _world()
        if world == 1:
            self.held = True
            return self.run.__enter__()
        import torch.distributed as dist

        error = [None]
        if rank == 0:
            try:
                self.run.__enter__()
                self.held = True
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                error = [str(exc)]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise BadInputError(error[0])
        return self.run if rank == 0 else None

    def __exit__(self, *exc):
        if self.held:
            self.run.__exit__(*exc)


def _seconds(folder: Path, fallback: float) -> float:
    """Seconds the run spent scoring, over all its sessions (its progress file; rank files summed under torchrun)."""
    total, found = 0.0, False
    for p in folder.glob("*progress.json*"):
        if p.suffix == ".tmp":
            continue
        try:
            total += float(json.loads(p.read_text()).get("seconds", 0.0))
            found = True
        except (OSError, ValueError):
            continue
    return total if found else fallback


def write_leaderboard(out: Path, rows: List[Dict], evaluations: Sequence[str], title: str = "") -> List[Dict]:
    """leaderboard.csv, leaderboard.md (the best value of each metric in bold) and leaderboard.png."""
    cols = [c for ev, _, c, _ in COLUMNS if ev in evaluations and any(c in r for r in rows)]
    times = [f"{e} s/img" for e in evaluations]
    fields = ["method"] + cols + times
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    better = {c: hi for _, _, c, hi in COLUMNS}
    best = {}
    for c in cols:
        vals = [r[c] for r in rows if c in r]
        if vals:
            best[c] = max(vals) if better[c] else min(vals)
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        cells = [r["method"]]
        for c in cols + times:
            v = r.get(c)
            s = "" if v is None else f"{v:.2f}" if c in cols else f"{v:.3f}"
            cells.append(f"**{s}**" if c in best and v == best[c] else s)
        lines.append("| " + " | ".join(cells) + " |")
    arrows = ", ".join(f"{c} {'higher' if better[c] else 'lower'} is better" for c in cols)
    (out / "leaderboard.md").write_text((f"{title}\n\n" if title else "") + "\n".join(lines) + f"\n\n({arrows}; "
                                        "s/img: seconds spent scoring per image, model loading left out)\n")
    _leaderboard_figure(out / "leaderboard.png", rows, cols, better, title)
    return rows


def _leaderboard_figure(path: Path, rows, cols, better, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cols:
        return
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols) + 1, 0.28 * len(rows) + 1.4), squeeze=False)
    names = [r["method"] for r in rows]
    for ax, c in zip(axes[0], cols):
        vals = [r.get(c, np.nan) for r in rows]
        ax.barh(range(len(rows)), vals, color=["#3b6ea8" if better[c] else "#b5523b"] * len(rows))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names if ax is axes[0][0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{c}\n({'higher' if better[c] else 'lower'} is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["dataset_kind", "evaluate_deletion_insertion", "evaluate_imagenet_s", "evaluate_points", "run_benchmark",
           "write_leaderboard"]
