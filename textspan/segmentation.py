"""Zero-shot segmentation data: the ImageNet-segmentation .mat file, image/mask folders, and mask alignment.

Masks are resized and cropped exactly as the model's preprocessing resizes and crops the image (nearest-neighbour
for the mask), so a non-square image's mask stays aligned with its crop; the published code squashes the mask to a
square instead, misaligning it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .errors import BadInputError


NON_GEOMETRIC = ("ToTensor", "MaybeToTensor", "Normalize", "MaybeConvertMode", "ConvertImageDtype")


def mask_transform(preprocess):
    """A callable mapping a PIL mask through the geometric steps (Resize, CenterCrop) of `preprocess`, with
    nearest-neighbour resizing. Raises ValueError for preprocessing it cannot mirror."""
    from torchvision import transforms as T

    if hasattr(preprocess, "mask_transform"):  # a transformers image processor (textspan.hf.HFImageTransform)
        return preprocess.mask_transform()
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        # textspan's built-in preprocess: a plain resize of the whole image to the model's size
        from . import builtin

        if preprocess is builtin.preprocess:
            return lambda m: m.resize((builtin.world.SIZE, builtin.world.SIZE), Image.NEAREST)
        raise BadInputError("cannot align masks with this preprocess (no torchvision transforms list)")
    geo = []
    for t in steps:
        if isinstance(t, T.Resize):
            geo.append(T.Resize(t.size, interpolation=T.InterpolationMode.NEAREST, max_size=t.max_size))
        elif isinstance(t, T.CenterCrop):
            geo.append(T.CenterCrop(t.size))
        elif type(t).__name__ in NON_GEOMETRIC or type(t).__name__ == "function":
            continue  # colour conversion, tensor conversion, normalisation
        else:
            raise BadInputError(f"cannot align masks with the preprocessing step {type(t).__name__}")
    return T.Compose(geo)


def mask_array(mask_img: Image.Image) -> np.ndarray:
    """Foreground = any non-zero value."""
    return np.asarray(mask_img.convert("L")) > 0


def mat_entries(path) -> int:
    """The number of entries of a gtsegs_ijcv.mat file; ValueError naming the file when it is not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["value/img"].shape[0])
    except (OSError, KeyError) as exc:
        raise BadInputError(f"{path}: not an ImageNet-segmentation .mat file (HDF5 with value/img and value/gt): "
                         f"{exc}") from exc


def iter_mat(path, start: int = 0, stop: Optional[int] = None
             ) -> Iterator[Tuple[int, Optional[Image.Image], Optional[np.ndarray], Optional[str]]]:
    """(index, RGB image, mask, error) for each entry of gtsegs_ijcv.mat (HDF5: object references under value/img
    and value/gt), entries [start, stop). A broken entry yields its error instead of stopping the iteration."""
    import h5py

    with h5py.File(path, "r") as f:
        refs_img, refs_gt = f["value/img"], f["value/gt"]
        for i in range(start, refs_img.shape[0] if stop is None else min(stop, refs_img.shape[0])):
            try:
                img = np.array(f[refs_img[i, 0]]).transpose(2, 1, 0)  # stored as [3, W, H]
                gt_ref = f[refs_gt[i, 0]]
                gt = np.array(f[gt_ref[0, 0]] if gt_ref.dtype == h5py.ref_dtype else gt_ref).transpose(1, 0)
                yield i, Image.fromarray(img.astype(np.uint8), "RGB"), gt > 0, None
            except Exception as exc:  # report and go on
                yield i, None, None, f"{type(exc).__name__}: {exc}"


def folder_images(folder) -> List[Path]:
    """The images of a segmentation folder (FOLDER/images/**), sorted: the order `iter_folder` yields them in."""
    from .datasets import IMAGE_EXTENSIONS

    root = Path(folder)
    images = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise BadInputError(f"{folder}: expected images under {root / 'images'} and masks under {root / 'masks'}")
    return images


def folder_classes(folder) -> List[str]:
    """The class sub-folders of FOLDER/images (sorted), the default class names of a segmentation folder; [] when its
    images lie directly in FOLDER/images."""
    root = Path(folder) / "images"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def object_masks(folder: Path) -> Dict[str, np.ndarray]:
    """{class name: mask} from a folder of one mask per object (CLASS.png; the file's stem names the class the prompt
    names). BadInputError naming the folder when it holds no .png mask."""
    found = {}
    for q in sorted(folder.glob("*.png")):
        with Image.open(q) as m:
            found[q.stem] = mask_array(m)
    if not found:
        raise BadInputError(f"{folder}: a per-object mask folder with no CLASS.png mask in it")
    return found


def iter_folder(folder, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, Optional[Image.Image],
                                                         Optional[Union[np.ndarray, Dict[str, np.ndarray]]],
                                                         Optional[str]]]:
    """(name, RGB image, mask, error) for FOLDER/images/** with masks at the same relative path (any extension
    for the image, .png for the mask) under FOLDER/masks/, from the `start`-th image on. Images with several
    objects: a folder FOLDER/masks/REL (REL without its extension) holding one CLASS.png per object; then `mask` is
    {class: mask} (the folder is read when both it and a single mask exist). `stop`: the image to stop before."""
    from .datasets import load_rgb

    root = Path(folder)
    for p in folder_images(folder)[start:stop]:
        rel = p.relative_to(root / "images")
        try:
            per_object = (root / "masks" / rel).with_suffix("")
            if per_object.is_dir():
                mask = object_masks(per_object)
            else:
                with Image.open((root / "masks" / rel).with_suffix(".png")) as m:
                    mask = mask_array(m)
            yield str(rel), load_rgb(str(p)), mask, None
        except Exception as exc:
            yield str(rel), None, None, f"{type(exc).__name__}: {exc}"


def write_mat(path, images: List[np.ndarray], masks: List[np.ndarray]) -> None:
    """Write images [H, W, 3] uint8 and masks [H, W] in the gtsegs_ijcv.mat HDF5 layout (for tests and small
    custom sets)."""
    import h5py

    with h5py.File(path, "w") as f:
        grp = f.create_group("refs")
        img_refs = f.create_dataset("value/img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = f.create_dataset("value/gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (img, gt) in enumerate(zip(images, masks)):
            d_img = grp.create_dataset(f"img{i}", data=np.asarray(img).transpose(2, 1, 0))
            d_gt = grp.create_dataset(f"gt{i}", data=np.asarray(gt, dtype=np.uint8).transpose(1, 0))
            inner = grp.create_dataset(f"gtref{i}", (1, 1), dtype=h5py.ref_dtype)
            inner[0, 0] = d_gt.ref
            img_refs[i, 0] = d_img.ref
            gt_refs[i, 0] = inner.ref


class SegmentationSource:
    """The entries of a segmentation dataset (gtsegs_ijcv.mat or an images/ + masks/ folder) for
    `textspan.evaluation.run_evaluation`: value = (RGB image, mask or {class: mask})."""

    def __init__(self, data):
        import hashlib

        self.data = data
        self.is_mat = Path(data).is_file()
        if self.is_mat:
            self.n = mat_entries(data)
            self.identity = f"{Path(data).resolve()} ({Path(data).stat().st_size} bytes, {self.n} entries)"
        else:
            listed = folder_images(data)
            self.n = len(listed)
            self.identity = hashlib.sha256("\n".join(str(q.relative_to(Path(data))) for q in listed).encode()
                                           ).hexdigest()

    def __len__(self) -> int:
        return self.n

    def entries(self, start: int, stop: int):
        from .evaluation import Entry

        it = iter_mat(self.data, start, stop) if self.is_mat else iter_folder(self.data, start, stop)
        for k, (name, im, mask, err) in enumerate(it):
            yield Entry(start + k, str(name), None if err else (im, mask), err)
