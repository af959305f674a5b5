"""ImageNet layouts: WordNet ids to the class names CLIP is prompted with, and ImageNet-S (Gao et al., TPAMI 2022).

ImageNet-S (the LUSSeg/ImageNet-S repository's layout and conventions)::

    ROOT/ImageNetS50/validation/<wnid>/<name>.JPEG
    ROOT/ImageNetS50/validation-segmentation/<wnid>/<name>.png     (also ImageNetS300, ImageNetS919)

A segmentation PNG is RGB; a pixel's class id is ``R + 256 * G``: 0 is "other category" (background), 1000 is
ignored, and id i >= 1 is the i-th WordNet id of the subset's categories in sorted order (the repository's
``ImageNetS_categories_im{50,300,919}.txt`` lists them; a copy beside the data, or ``categories=``, is used when given,
else the sorted ``validation/`` sub-folders, whose count must then be the subset's: 50, 300 or 919). The class names
to prompt with are open_clip's ImageNet class names (CLIP's), found through timm's list of the 1000 WordNet ids in
class-index order.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from .errors import BadInputError

IGNORE = 1000
SUBSETS = {"ImageNetS50": 50, "ImageNetS300": 300, "ImageNetS919": 919}
WNID = re.compile(r"^n\d{8}$")
# ImageNet-S919 merges these classes into another (key into value), as its README lists
MERGED = {"n04356056": "n04355933", "n04493381": "n02808440", "n03642806": "n03832673", "n04008634": "n03773504",
          "n03887697": "n15075141"}


def wnid_names() -> Dict[str, str]:
    """{WordNet id: CLIP's ImageNet class name} for the 1000 ImageNet-1k classes."""
    import open_clip
    import timm.data

    path = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    wnids = path.read_text().split()
    names = list(open_clip.IMAGENET_CLASSNAMES)
    if len(wnids) != len(names):  # pragma: no cover - a changed dependency
        raise RuntimeError(f"{path}: {len(wnids)} WordNet ids for {len(names)} class names")
    return dict(zip(wnids, names))


def is_wnid(name: str) -> bool:
    return bool(WNID.match(name))


def class_names(wnids: Sequence[str]) -> List[str]:
    """CLIP's class names of `wnids` (an id that is no ImageNet-1k class keeps its id, which is then the prompt)."""
    table = wnid_names()
    return [table.get(w, w) for w in wnids]


def decode_ids(rgb: np.ndarray) -> np.ndarray:
    """[h, w] int32 class ids of an ImageNet-S segmentation PNG's [h, w, 3] pixels: R + 256 * G."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise BadInputError(f"an ImageNet-S mask is an RGB PNG; got an array of shape {rgb.shape}")
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def encode_ids(ids: np.ndarray) -> np.ndarray:
    """The inverse of `decode_ids`: [h, w, 3] uint8 (B = 0), as the ImageNet-S README writes predictions."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)


def find_subset(root) -> Path:
    """The folder holding validation/ and validation-segmentation/: `root` itself or its one ImageNetS* child
    (ImageNetS50, ImageNetS300, ImageNetS919, or another subset made the same way)."""
    root = Path(root)
    if (root / "validation").is_dir() and (root / "validation-segmentation").is_dir():
        return root
    found = sorted(p for p in root.glob("ImageNetS*") if (p / "validation").is_dir())
    if len(found) == 1:
        return find_subset(found[0])
    if len(found) > 1:
        raise BadInputError(f"{root} holds several ImageNet-S subsets ({', '.join(p.name for p in found)}); "
                            f"point at one of them")
    raise BadInputError(f"{root}: not an ImageNet-S folder (expected validation/ and validation-segmentation/, "
                        f"or one of {', '.join(SUBSETS)} holding them)")


def is_imagenet_s(root) -> bool:
    try:
        find_subset(root)
        return True
    except BadInputError:
        return False


class ImageNetS:
    """An ImageNet-S validation set: `wnids` (class id i is wnids[i - 1]), `names` (CLIP's class names), and
    entries (image path, mask path) in sorted order. Missing masks, unknown class ids and sizes are reported per
    entry by `read` (as a failure of that image), never for the whole set."""

    def __init__(self, root, categories=None):
        from .datasets import IMAGE_EXTENSIONS

        self.root = find_subset(root)
        images = self.root / "validation"
        folders = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        expected = SUBSETS.get(self.root.name)
        if categories is None:
            pattern = f"ImageNetS_categories_im{expected}.txt" if expected else "ImageNetS_categories*.txt"
            for folder in (self.root, self.root.parent):
                found = sorted(folder.glob(pattern))
                if found:
                    categories = found[0]
                    break
        if categories is not None:
            from .textio import read_lines

            listed = [w for _, w in read_lines(categories)]
            if len(set(listed)) != len(listed):
                raise BadInputError(f"{categories}: a category is listed twice")
            self.wnids = sorted(listed)  # the class id is the position in sorted order (ImageNet-S README)
            self.categories = str(categories)
        else:
            if expected is not None and len(folders) != expected:
                raise BadInputError(
                    f"{images}: {len(folders)} class folders, but {self.root.name} has {expected} classes; the class "
                    f"ids would shift. Put ImageNetS_categories_im{expected}.txt (from the ImageNet-S repository) "
                    f"beside the data or pass categories=")
            self.wnids = folders
            self.categories = "sorted validation/ folders"
        unknown = [f for f in folders if MERGED.get(f, f) not in self.wnids]
        if unknown:
            raise BadInputError(f"{images}: class folders {unknown[:3]} are not among the {len(self.wnids)} "
                                f"categories ({self.categories})")
        self.names = class_names(self.wnids)
        self.items = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.items:
            raise BadInputError(f"{images}: no images")
        self.identity = hashlib.sha256(("\n".join(self.wnids) + "\n" + "\n".join(
            str(p.relative_to(self.root)) for p in self.items)).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def mask_path(self, image: Path) -> Path:
        rel = image.relative_to(self.root / "validation")
        return (self.root / "validation-segmentation" / rel).with_suffix(".png")

    def read(self, image: Path):
        """(RGB image, [h, w] class ids, class id of the image's folder); BadInputError naming the file."""
        from PIL import Image

        from .datasets import read_image

        img = read_image(str(image))
        mpath = self.mask_path(image)
        if not mpath.is_file():
            raise BadInputError(f"{mpath}: no segmentation for {image.name}")
        with Image.open(mpath) as m:
            if m.mode not in ("RGB", "RGBA"):
                raise BadInputError(f"{mpath}: an ImageNet-S mask is an RGB PNG (R + 256 * G); this one is mode "
                                    f"{m.mode}")
            ids = decode_ids(np.asarray(m.convert("RGB")))
        bad = np.unique(ids[(ids > len(self.wnids)) & (ids != IGNORE)])
        if bad.size:
            raise BadInputError(f"{mpath}: class ids {bad[:5].tolist()} are neither 0, 1000 nor one of the "
                                f"{len(self.wnids)} categories")
        if ids.shape != (img.size[1], img.size[0]):
            ids = _rescale_ids(ids, img.size, mpath)
        wnid = image.relative_to(self.root / "validation").parts[0]
        return img, ids, self.wnids.index(MERGED.get(wnid, wnid)) + 1

    def entries(self, start: int, stop: int) -> Iterator:
        from .evaluation import Entry

        for i in range(start, min(stop, len(self.items))):
            p = self.items[i]
            name = str(p.relative_to(self.root / "validation"))
            try:
                yield Entry(i, name, self.read(p))
            except BadInputError as exc:
                yield Entry(i, name, None, str(exc))
            except Exception as exc:  # an unreadable file is that entry's failure
                yield Entry(i, name, None, f"{type(exc).__name__}: {exc}")


def _rescale_ids(ids: np.ndarray, size, path) -> np.ndarray:
    """A mask of another size than its image, with the same shape ratio (within a pixel per side), resized to the
    image (nearest); another shape is refused naming both sizes."""
    from PIL import Image

    h, w = ids.shape
    W, H = size
    if abs(h * W / w - H) > 1.0 + H / max(h, 1):
        raise BadInputError(f"{path}: mask {w}x{h} does not match its image {W}x{H} (another shape)")
    return np.asarray(Image.fromarray(ids.astype(np.int32), "I").resize((W, H), Image.NEAREST)).astype(np.int32)


def write_imagenet_s(root, subset: str, wnids: Sequence[str], images: Dict[str, List], masks: Dict[str, List],
                     names: Dict[str, List[str]]) -> Path:
    """Write an ImageNet-S layout (for tests and `shapes-world --layout imagenet-s`): `images[wnid]` RGB arrays,
    `masks[wnid]` [h, w] class ids, `names[wnid]` file stems; the categories file beside it."""
    from PIL import Image

    base = Path(root) / subset
    for w in wnids:
        for arr, ids, stem in zip(images.get(w, []), masks.get(w, []), names.get(w, [])):
            (base / "validation" / w).mkdir(parents=True, exist_ok=True)
            (base / "validation-segmentation" / w).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(arr, np.uint8)).save(base / "validation" / w / f"{stem}.JPEG", quality=95)
            Image.fromarray(encode_ids(ids)).save(base / "validation-segmentation" / w / f"{stem}.png")
    n = SUBSETS.get(subset)
    (base / f"ImageNetS_categories{f'_im{n}' if n else ''}.txt").write_text("\n".join(wnids) + "\n")
    return base
