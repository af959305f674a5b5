"""Image lists (folders, list files) and a fault-tolerant image dataset.

An `ImageList` is the ordered list of images a cache is made of: built from a folder (recursive; ImageFolder-style
class sub-folders give labels) or from a list file (.txt: one path per line; .csv: a ``path`` column and optionally
``label``). Its order is deterministic (sorted paths), so a rerun resumes on the same list, and its `digest` is what a
cache records to refuse a different list.

`ImageDataset` never raises on a bad file: unreadable, truncated or empty images come back as failures with the
error text, to be reported and skipped by the caller.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageList:
    """Ordered image paths with integer labels (-1 when unknown) and the class names labels index into."""

    paths: List[str]
    labels: List[int]
    classes: List[str]
    source: str = ""
    extra: Dict[str, List[str]] = field(default_factory=dict)  # more images.csv columns (e.g. place, group)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, start: int, stop: int) -> "ImageList":
        return ImageList(self.paths[start:stop], self.labels[start:stop], self.classes, self.source,
                         {k: v[start:stop] for k, v in self.extra.items()})

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for p, y in zip(self.paths, self.labels):
            h.update(f"{p}\t{y}\n".encode())
        for k in sorted(self.extra):
            h.update(("\t".join([k] + [str(v) for v in self.extra[k]]) + "\n").encode())
        return h.hexdigest()

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else ""

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike]) -> "ImageList":
        """All images under `folder` (recursive, sorted). Files inside first-level sub-folders are labelled by the
        sub-folder (ImageFolder layout, classes sorted by name); files directly in `folder` get label -1."""
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1 for p in files]
        return cls([str(p.resolve()) for p in files], labels, classes, source=str(root.resolve()))

    @classmethod
    def from_file(cls, list_file: Union[str, os.PathLike]) -> "ImageList":
        """Images named in a list file; relative paths are taken relative to the list file's folder.

        ``.csv``: a header with a ``path`` column and optionally ``label`` (an integer or a class name).
        Anything else: one path per line; blank lines and lines starting with ``#`` are skipped.
        """
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"image list file not found: {list_file}")
        base = list_file.resolve().parent
        rows: List[Tuple[str, str]] = []
        if list_file.suffix.lower() == ".csv":
            with open(list_file, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise ValueError(f"{list_file}: a CSV image list needs a 'path' column (has {reader.fieldnames})")
                for r in reader:
                    rows.append((r["path"], (r.get("label") or "").strip()))
        else:
            with open(list_file) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        rows.append((line, ""))
        if not rows:
            raise ValueError(f"{list_file}: the image list is empty")
        paths = [str((base / p).resolve()) if not os.path.isabs(p) else p for p, _ in rows]
        raw = [y for _, y in rows]
        if all(y == "" or _is_int(y) for y in raw):
            labels, classes = [int(y) if y else -1 for y in raw], []
        else:
            classes = sorted({y for y in raw if y})
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[y] if y else -1 for y in raw]
        return cls(paths, labels, classes, source=str(list_file.resolve()))

    @classmethod
    def from_waterbirds(cls, root: Union[str, os.PathLike], split: Optional[str] = None) -> "ImageList":
        """The Waterbirds layout: ROOT/metadata.csv with img_filename, y (0 landbird, 1 waterbird), split (0 train,
        1 val, 2 test) and place (0 land, 1 water). Adds the columns place, group ("landbird_on_water", ...) and
        split. Missing or unreadable files are left in the list, to be reported and skipped by the cache."""
        root = Path(root)
        meta = root / "metadata.csv"
        with open(meta, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"img_filename", "y", "split", "place"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{meta}: not a Waterbirds metadata file (missing columns {sorted(missing)})")
        if split is not None:
            if split not in WATERBIRDS_SPLITS:
                raise ValueError(f"split must be one of {list(WATERBIRDS_SPLITS)}; got {split!r}")
            rows = [r for r in rows if int(r["split"]) == WATERBIRDS_SPLITS[split]]
        if not rows:
            raise ValueError(f"{meta}: no rows for split {split!r}")
        names = {v: k for k, v in WATERBIRDS_SPLITS.items()}
        y = [int(r["y"]) for r in rows]
        place = [int(r["place"]) for r in rows]
        extra = {"place": [WATERBIRDS_PLACES[p] for p in place],
                 "group": [f"{WATERBIRDS_CLASSES[a]}_on_{WATERBIRDS_PLACES[p]}" for a, p in zip(y, place)],
                 "split": [names[int(r["split"])] for r in rows]}
        classes = list(WATERBIRDS_CLASSES)
        if "class_name" in rows[0]:  # a Waterbirds-layout set with other class names (e.g. the shapes testbed)
            names = {int(r["y"]): r["class_name"] for r in rows}
            classes = [names.get(i, WATERBIRDS_CLASSES[i]) for i in range(2)]
            extra["group"] = [f"{classes[a]}_on_{WATERBIRDS_PLACES[p]}" for a, p in zip(y, place)]
        return cls([str((root / r["img_filename"]).resolve()) for r in rows], y, classes,
                   source=f"{meta.resolve()}:{split or 'all'}", extra=extra)

    @classmethod
    def from_path(cls, images: Union[str, os.PathLike], split: Optional[str] = None) -> "ImageList":
        """A folder (a Waterbirds-layout folder when it holds such a metadata.csv), or a list file."""
        p = Path(images)
        if p.is_dir() and _is_waterbirds(p):
            return cls.from_waterbirds(p, split)
        if split is not None:
            raise ValueError("--split applies to Waterbirds-layout folders (metadata.csv with img_filename, y, "
                             "split, place)")
        if p.is_dir():
            return cls.from_folder(p)
        if p.is_file():
            return cls.from_file(p)
        raise FileNotFoundError(f"IMAGES must be a folder or a list file; not found: {images}")


WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")


def _is_waterbirds(folder: Path) -> bool:
    meta = folder / "metadata.csv"
    if not meta.is_file():
        return False
    with open(meta, newline="") as f:
        header = next(csv.reader(f), [])
    return {"img_filename", "y", "split", "place"} <= set(header)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def load_rgb(path: str) -> Image.Image:
    """Open an image fully (so truncation errors surface here) and convert it to RGB (grayscale, RGBA, palette)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """Items are (index, tensor or None, error or None); bad files never raise."""

    def __init__(self, images: ImageList, preprocess: Callable, indices: Optional[Sequence[int]] = None):
        self.images = images
        self.preprocess = preprocess
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.images.paths[idx]
        try:
            if os.path.getsize(path) == 0:
                raise OSError("empty file (0 bytes)")
            tensor = self.preprocess(load_rgb(path))
            return idx, tensor, None
        except Exception as exc:  # any decoding/preprocessing failure is reported, not raised
            return idx, None, f"{type(exc).__name__}: {exc}"


def collate_with_failures(items):
    """Stack the good items; return (indices [k], images [k, 3, H, W] or None, failures [(index, error)])."""
    good = [(i, t) for i, t, e in items if e is None]
    failures = [(i, e) for i, t, e in items if e is not None]
    if not good:
        return [], None, failures
    return [i for i, _ in good], torch.stack([t for _, t in good]), failures
