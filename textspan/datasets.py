"""Image lists (folders, list files) and a fault-tolerant image dataset.

An `ImageList` is the ordered list of images a cache is made of: built from a folder (recursive; ImageFolder-style
class sub-folders give labels) or from a list file (.txt: one path per line; .csv: a ``path`` column and optionally
``label``). Its order is deterministic (sorted paths), so a rerun resumes on the same list, and its `digest` is what a
cache records to refuse a different list.

`ImageDataset` never raises on a bad file: unreadable, truncated or empty images come back as failures with the
error text, to be reported and skipped by the caller.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from . import textio
from .errors import BadInputError, InputNotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageList:
    """Ordered image paths with integer labels (-1 when unknown) and the class names labels index into."""

    paths: List[str]
    labels: List[int]
    classes: List[str]
    source: str = ""
    extra: Dict[str, List[str]] = field(default_factory=dict)  # more images.csv columns (e.g. place, group)
    notes: List[Dict[str, str]] = field(default_factory=list)  # {"path", "note"}: what reading the list noticed

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, start: int, stop: int) -> "ImageList":
        return ImageList(self.paths[start:stop], self.labels[start:stop], self.classes, self.source,
                         {k: v[start:stop] for k, v in self.extra.items()}, list(self.notes))

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for p, y in zip(self.paths, self.labels):  # a Linux file name may hold any bytes: keep them
            h.update(f"{p}\t{y}\n".encode("utf-8", "surrogateescape"))
        for k in sorted(self.extra):
            h.update(("\t".join([k] + [str(v) for v in self.extra[k]]) + "\n").encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else ""

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike]) -> "ImageList":
        """All images under `folder` (recursive, sorted). Files inside first-level sub-folders are labelled by the
        sub-folder (ImageFolder layout, classes sorted by name); files directly in `folder` get label -1.

        Every first-level sub-folder is a class, also one with no images or one that cannot be read: it keeps its
        index (so later classes do not shift), and is reported (a warning, and `notes`, which the cache writes into
        its manifest). Hidden folders (a name starting with '.') are skipped and noted."""
        root = Path(folder)
        if not root.is_dir():
            raise InputNotFoundError(f"image folder not found: {folder}")
        notes: List[Dict[str, str]] = []

        def note(path, text):
            log.warning("%s: %s", path, text)
            notes.append({"path": str(path), "note": text})

        try:
            entries = sorted(os.listdir(root))
        except OSError as exc:
            raise BadInputError(f"image folder {folder} cannot be read ({exc.strerror or exc})") from exc
        hidden = [e for e in entries if e.startswith(".") and (root / e).is_dir()]
        for e in hidden:
            note(root / e, "hidden folder skipped")
        classes = [e for e in entries if not e.startswith(".") and (root / e).is_dir()]
        # a symlink that leads nowhere (or to itself) is kept, so that reading it reports it as a failure
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and (p.is_symlink() or p.is_file())
                       and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))
        unreadable = []
        for dirpath, _, _ in os.walk(root, onerror=lambda exc: unreadable.append(exc)):
            pass
        for exc in unreadable:
            note(exc.filename, f"folder cannot be read ({exc.strerror or exc}); its images are missing")
        if not files:
            raise BadInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}"
                                + (f" ({len(unreadable)} folders could not be read)" if unreadable else ""))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1 for p in files]
        present = set(labels)
        for c, i in index.items():
            if i not in present:
                note(root / c, f"class folder {c!r} (class {i}) has no images: the class is kept, so the "
                               f"classes after it keep their indices")
        return cls([_absolute(p) for p in files], labels, classes, source=str(root.resolve()), notes=notes)

    @classmethod
    def from_file(cls, list_file: Union[str, os.PathLike]) -> "ImageList":
        """Images named in a list file; relative paths are taken relative to the list file's folder.

        ``.csv``: a header with a ``path`` column and optionally ``label`` (an integer or a class name).
        Anything else: one path per line; blank lines and lines starting with ``#`` are skipped.
        Read with `textspan.textio` (UTF-8 with or without BOM, CRLF, a Windows-1252 fallback with a warning).
        """
        list_file = Path(list_file)
        if not list_file.is_file():
            raise InputNotFoundError(f"image list file not found: {list_file}")
        base = list_file.resolve().parent
        rows: List[Tuple[int, str, str]] = []  # (line, path, label)
        notes: List[str] = []
        if list_file.suffix.lower() == ".csv":
            header, records = textio.read_csv(list_file, "image list", notes)
            if "path" not in header:
                raise BadInputError(f"{list_file}: a CSV image list needs a 'path' column (has {header})")
            for line, r in records:
                if not r["path"].strip():
                    raise BadInputError(f"{list_file}, line {line}: empty path")
                rows.append((line, r["path"], (r.get("label") or "").strip()))
        else:
            for line, text in textio.read_lines(list_file, "image list", notes):
                if not text.startswith("#"):
                    rows.append((line, text, ""))
        if not rows:
            raise BadInputError(f"{list_file}: the image list is empty")
        paths = [str((base / p).resolve()) if not os.path.isabs(p) else p for _, p, _ in rows]
        raw = [y for _, _, y in rows]
        lines = [k for k, _, _ in rows]
        ints = [k for k, y in enumerate(raw) if y and _is_int(y)]
        names = [k for k, y in enumerate(raw) if y and not _is_int(y)]
        if ints and names:
            raise BadInputError(f"{list_file}: the label column mixes integers (line {lines[ints[0]]}: "
                                f"{raw[ints[0]]!r}) and class names (line {lines[names[0]]}: {raw[names[0]]!r}); "
                                f"use one or the other")
        if not names:
            labels, classes = [int(y) if y else -1 for y in raw], []
            negative = [k for k, y in enumerate(labels) if y < -1]
            if negative:
                raise BadInputError(f"{list_file}, line {lines[negative[0]]}: label {raw[negative[0]]!r} is negative")
        else:
            classes = sorted({y for y in raw if y})
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[y] if y else -1 for y in raw]
        return cls(paths, labels, classes, source=str(list_file.resolve()),
                   notes=[{"path": str(list_file), "note": n} for n in notes])

    @classmethod
    def from_waterbirds(cls, root: Union[str, os.PathLike], split: Optional[str] = None) -> "ImageList":
        """The Waterbirds layout: ROOT/metadata.csv with img_filename, y (0 landbird, 1 waterbird), split (0 train,
        1 val, 2 test) and place (0 land, 1 water). Adds the columns place, group ("landbird_on_water", ...) and
        split. Missing or unreadable files are left in the list, to be reported and skipped by the cache."""
        root = Path(root)
        meta = root / "metadata.csv"
        notes: List[str] = []
        header, rows = textio.read_csv(meta, "Waterbirds metadata", notes)
        _check_waterbirds_header(meta, header)
        for line, r in rows:
            for col, allowed in (("y", (0, 1)), ("place", (0, 1)), ("split", (0, 1, 2))):
                value = (r.get(col) or "").strip()
                if not _is_int(value) or int(value) not in allowed:
                    raise BadInputError(f"{meta}, line {line}: column {col!r} is {value!r}; expected one of "
                                        f"{list(allowed)}")
            if not (r.get("img_filename") or "").strip():
                raise BadInputError(f"{meta}, line {line}: empty img_filename")
        if split is not None:
            code = _split_code(split)
            rows = [(line, r) for line, r in rows if int(r["split"]) == code]
        if not rows:
            raise BadInputError(f"{meta}: no rows for split {split!r}")
        rows = [r for _, r in rows]
        names = {v: k for k, v in WATERBIRDS_SPLITS.items()}
        y = [int(r["y"]) for r in rows]
        place = [int(r["place"]) for r in rows]
        extra = {"place": [WATERBIRDS_PLACES[p] for p in place],
                 "group": [f"{WATERBIRDS_CLASSES[a]}_on_{WATERBIRDS_PLACES[p]}" for a, p in zip(y, place)],
                 "split": [names[int(r["split"])] for r in rows]}
        classes = list(WATERBIRDS_CLASSES)
        if "class_name" in rows[0]:  # a Waterbirds-layout set with other class names (e.g. the shapes testbed)
            names = {int(r["y"]): r["class_name"].strip() for r in rows}
            classes = [names.get(i, WATERBIRDS_CLASSES[i]) for i in range(2)]
            extra["group"] = [f"{classes[a]}_on_{WATERBIRDS_PLACES[p]}" for a, p in zip(y, place)]
        return cls([str((root / r["img_filename"]).resolve()) for r in rows], y, classes,
                   source=f"{meta.resolve()}:{split or 'all'}", extra=extra,
                   notes=[{"path": str(meta), "note": n} for n in notes])

    @classmethod
    def from_path(cls, images: Union[str, os.PathLike], split: Optional[str] = None) -> "ImageList":
        """A folder (a Waterbirds-layout folder when it holds a metadata.csv: a folder with a metadata.csv that is
        not one is refused, never read as a plain folder), or a list file."""
        p = Path(images)
        if p.is_dir() and (p / "metadata.csv").exists():
            return cls.from_waterbirds(p, split)
        if split is not None:
            raise BadInputError("--split applies to Waterbirds-layout folders (metadata.csv with img_filename, y, "
                             "split, place)")
        if p.is_dir():
            return cls.from_folder(p)
        if p.is_file():
            return cls.from_file(p)
        raise InputNotFoundError(f"IMAGES must be a folder or a list file; not found: {images}")


WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")


def _split_code(split) -> int:
    """A Waterbirds split from its name (train/val/test) or the file's own value (0/1/2)."""
    text = str(split).strip().lower()
    if text in WATERBIRDS_SPLITS:
        return WATERBIRDS_SPLITS[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise BadInputError(f"split must be one of train, val, test (or the file's values 0, 1, 2); got {split!r}")


WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")


def _check_waterbirds_header(meta: Path, header: Sequence[str]) -> None:
    """A folder's metadata.csv must be Waterbirds metadata: refuse one that is not, naming the missing columns."""
    missing = [c for c in WATERBIRDS_COLUMNS if c not in header]
    if not missing:
        return
    hint = ""
    if {"path", "caption"} <= set(header):
        hint = f" This is a shapes-world folder: cache its images/ sub-folder ({meta.parent / 'images'})."
    raise BadInputError(
        f"{meta}: a folder with a metadata.csv is read as the Waterbirds layout, and this file lacks the columns "
        f"{', '.join(missing)} (it has: {', '.join(header) or 'no header'}).{hint} To read the folder's images "
        f"without it, pass a list file (one path per line, or a CSV with 'path' and 'label' columns).")


def _absolute(p: Path) -> str:
    """The resolved path, or the absolute (unresolved) one for a symlink loop."""
    try:
        return str(p.resolve(strict=False))
    except (OSError, RuntimeError):
        return str(p.absolute())


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as image viewers show them on a page


def read_image(path, *, notes: Optional[List[str]] = None, background=BACKGROUND) -> Image.Image:
    """An image file as a viewer shows it, as 8-bit RGB.

    - EXIF orientation is applied (a phone photo taken upright is upright);
    - integer images deeper than 8 bits are scaled from their declared full range to 8 bits (16-bit: 65535 -> 255;
      32-bit: 2^31 - 1, or 2^32 - 1 when unsigned, -> 255), never by their own maximum; float images by their range:
      [0, 1] x 255, [0, 255] as levels, [0, 65535] x 255/65535, anything larger refused; `notes` says which rule
      was applied (the cache writes it into its manifest);
    - CMYK is converted through its embedded ICC profile when it has one (else Pillow's plain conversion);
    - transparency (RGBA, LA, palette with a transparent colour) is composited on `background` (white);
    - a multi-frame file (GIF, TIFF, ...) gives its first frame, and says so in `notes`.

    Raises `BadInputError` naming the file when it cannot be read (missing, empty, truncated, not an image, a
    symlink loop, a decompression bomb).
    """
    try:
        if os.path.getsize(path) == 0:
            raise OSError("empty file (0 bytes)")
        with Image.open(path) as img:
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1 and notes is not None:
                notes.append(f"{n_frames} frames: the first is used")
            img.load()
            return _as_rgb(img, background, notes)
    except BadInputError:
        raise
    except Exception as exc:  # decoding errors come in many types
        raise BadInputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc


def _as_rgb(img: Image.Image, background, notes: Optional[List[str]] = None) -> Image.Image:
    import numpy as np
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        top, what = _integer_range(img)
        if arr.min() < 0 and notes is not None:
            notes.append(f"{what}: negative values shown as black")
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
        if notes is not None:
            notes.append(f"{what}: scaled to 8 bits (x 255/{int(top)})")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise BadInputError("a float image with NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        if hi <= 1.0:
            scale, rule = 255.0, "values in [0, 1]: x 255"
        elif hi <= 255.0:
            scale, rule = 1.0, "values in [0, 255]: taken as 8-bit levels"
        elif hi <= 65535.0:
            scale, rule = 255.0 / 65535.0, "values in [0, 65535]: taken as 16-bit levels (x 255/65535)"
        else:
            raise BadInputError(f"a float image with values up to {hi:g}: no known range (textspan reads float "
                                f"images in [0, 1], [0, 255] or [0, 65535]); convert it to 8 or 16 bits")
        if notes is not None:
            notes.append(f"float image, {rule}" + ("; negative values shown as black" if arr.min() < 0 else ""))
        img = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L")
    elif mode == "CMYK" and img.info.get("icc_profile"):
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: the plain conversion below
            img = img.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def _integer_range(img: Image.Image) -> Tuple[float, str]:
    """(full-scale value, description) of an integer image, from its declared bit depth: 16-bit modes (I;16*) and
    files that declare 16 bits per sample: 65535; 32-bit (Pillow's "I"): 2^32 - 1 for unsigned samples, 2^31 - 1
    for signed ones (TIFF SampleFormat), else 2^31 - 1. Never the image's own maximum (a dark image stays dark)."""
    if img.mode.startswith("I;16"):
        return 65535.0, "16-bit image"
    bits, fmt = None, None
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        b = tags.get(258)
        bits = int(b[0] if isinstance(b, (tuple, list)) else b) if b else None
        f = tags.get(339)
        fmt = int(f[0] if isinstance(f, (tuple, list)) else f) if f else None
    if bits is not None and bits <= 16:
        return float(2 ** bits - 1), f"{bits}-bit image"
    if fmt == 1:
        return float(2 ** 32 - 1), "32-bit unsigned image"
    return float(2 ** 31 - 1), "32-bit integer image"


def load_rgb(path: str) -> Image.Image:
    """`read_image` (kept under its earlier name)."""
    return read_image(path)


class ImageDataset(torch.utils.data.Dataset):
    """Items are (index, tensor or None, error or None, note or None); bad files never raise."""

    def __init__(self, images: ImageList, preprocess: Callable, indices: Optional[Sequence[int]] = None):
        self.images = images
        self.preprocess = preprocess
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.images.paths[idx]
        notes: List[str] = []
        try:
            tensor = self.preprocess(read_image(path, notes=notes))
            return idx, tensor, None, "; ".join(notes) or None
        except BadInputError as exc:
            return idx, None, _reason(exc, path), None
        except Exception as exc:  # preprocessing failures are reported, not raised
            return idx, None, f"{type(exc).__name__}: {exc}", None


def _reason(exc: Exception, path: str) -> str:
    """The error text without the leading file name (the caller records the path beside it)."""
    text = str(exc)
    prefix = f"{path}: cannot read the image ("
    return text[len(prefix):-1] if text.startswith(prefix) and text.endswith(")") else text


def collate_with_failures(items):
    """Stack the good items; return (indices [k], images [k, 3, H, W] or None, failures [(index, error)], notes
    [(index, note)])."""
    good = [(i, t) for i, t, e, _ in items if e is None]
    failures = [(i, e) for i, t, e, _ in items if e is not None]
    notes = [(i, n) for i, t, e, n in items if n]
    if not good:
        return [], None, failures, notes
    return [i for i, _ in good], torch.stack([t for _, t in good]), failures, notes


class ImageListSource:
    """The images of an `ImageList` as entries for `textspan.evaluation.run_evaluation`: value = (index in the list,
    PIL image, preprocessed tensor or None without `preprocess`). Unreadable files (and preprocessing failures) are
    entries with their reason, as `ImageDataset` reports them."""

    def __init__(self, items: ImageList, preprocess: Optional[Callable] = None):
        self.items = items
        self.preprocess = preprocess
        self.identity = items.digest

    def __len__(self) -> int:
        return len(self.items)

    def entries(self, start: int, stop: int):
        from .evaluation import Entry

        for idx in range(start, stop):
            path = self.items.paths[idx]
            try:
                img = read_image(path)
                tensor = self.preprocess(img) if self.preprocess is not None else None
                yield Entry(idx, path, (idx, img, tensor))
            except BadInputError as exc:
                yield Entry(idx, path, None, _reason(exc, path))
            except Exception as exc:  # preprocessing failures are reported, not raised
                yield Entry(idx, path, None, f"{type(exc).__name__}: {exc}")
