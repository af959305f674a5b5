"""OpenImages-V7 point labels (Benenson & Ferrari 2022), the layout the p-mIoU benchmark reads.

    ROOT/oidv7-<split>-annotations-point-labels.csv   ImageId, X, Y (relative to the width and height, in [0, 1]),
                                                     Label (a MID), EstimatedYesNo (yes / no / unsure), and the
                                                     optional Source, YesVotes, NoVotes, UnsureVotes, TextLabel
    ROOT/oidv7-class-descriptions.csv                LabelName, DisplayName (the MID's name; the older headerless
                                                     "MID,name" files are read too)
    ROOT/<images folder>/<ImageId>.jpg               `images/`, `validation/`, `test/` or `train/` (the first found)

An image's entry holds, per class with at least one "yes" point in it (the classes the image shows: one map each),
that class's points as (x, y) pixel positions with present (yes) or absent (no); "unsure" points are left out. Points
outside the image, MIDs without a name, and annotated images without a file are counted and named in the notes
(`OpenImagesPoints.notes`), never silently dropped.
"""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import BadInputError

REQUIRED = ("ImageId", "X", "Y", "Label", "EstimatedYesNo")
IMAGE_FOLDERS = ("images", "validation", "test", "train")


def find_points_file(root) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    found = sorted(root.glob("oidv7-*-annotations-point-labels.csv")) + \
        sorted(root.glob("*annotations-point-labels*.csv"))
    if not found:
        raise BadInputError(f"{root}: no OpenImages point-label file (oidv7-<split>-annotations-point-labels.csv)")
    return found[0]


def is_openimages(root) -> bool:
    try:
        find_points_file(root) if Path(root).is_dir() else None
        return Path(root).is_dir()
    except BadInputError:
        return False


def read_class_descriptions(path) -> Dict[str, str]:
    """{MID: display name} from oidv7-class-descriptions.csv (LabelName,DisplayName) or a headerless MID,name file."""
    from .textio import read_text

    text = read_text(path, "class descriptions")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if rows and rows[0] and not rows[0][0].startswith("/"):
        rows = rows[1:]  # a header row
    out = {}
    for k, r in enumerate(rows):
        if not r or not any(v.strip() for v in r):
            continue
        if len(r) < 2:
            raise BadInputError(f"{path}, row {k + 1}: expected MID,name; got {r}")
        out[r[0].strip()] = r[1].strip()
    return out


class OpenImagesPoints:
    """The annotated images of a point-label file, in sorted ImageId order, read lazily by `entries`."""

    def __init__(self, root, images=None, descriptions=None):
        from .textio import read_text

        root = Path(root)
        self.points_file = find_points_file(root)
        base = self.points_file.parent
        if descriptions is None:
            cands = sorted(base.glob("oidv7-class-descriptions*.csv")) + sorted(base.glob("*class-descriptions*.csv"))
            if not cands:
                raise BadInputError(f"{base}: no class descriptions file (oidv7-class-descriptions.csv) to name the "
                                    f"MIDs")
            descriptions = cands[0]
        self.names = read_class_descriptions(descriptions)
        if images is None:
            found = [base / f for f in IMAGE_FOLDERS if (base / f).is_dir()]
            if not found:
                raise BadInputError(f"{base}: no image folder ({', '.join(IMAGE_FOLDERS)}) beside the point labels")
            images = found[0]
        self.images = Path(images)
        text = read_text(self.points_file, "point-label file")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise BadInputError(f"{self.points_file}: missing columns {missing} (has {', '.join(header)})")
        col = {c: header.index(c) for c in REQUIRED}
        self.notes: List[str] = []
        unknown: Dict[str, int] = {}
        outside = unsure = 0
        per_image: Dict[str, Dict[str, List[Tuple[float, float, bool]]]] = {}
        for record in reader:
            if not any(v.strip() for v in record):
                continue
            line = reader.line_num
            try:
                iid, mid, yn = (record[col[c]].strip() for c in ("ImageId", "Label", "EstimatedYesNo"))
                x, y = float(record[col["X"]]), float(record[col["Y"]])
            except (IndexError, ValueError) as exc:
                raise BadInputError(f"{self.points_file}, line {line}: unreadable record ({exc}): {record}") from None
            yn = yn.lower()
            if yn not in ("yes", "no", "unsure"):
                raise BadInputError(f"{self.points_file}, line {line}: EstimatedYesNo must be yes, no or unsure; "
                                    f"got {yn!r}")
            if yn == "unsure":
                unsure += 1
                continue
            if mid not in self.names:
                unknown[mid] = unknown.get(mid, 0) + 1
                continue
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                outside += 1
                continue
            per_image.setdefault(iid, {}).setdefault(self.names[mid], []).append((x, y, yn == "yes"))
        if unknown:
            self.notes.append(f"{sum(unknown.values())} points of {len(unknown)} MIDs without a name in the class "
                              f"descriptions were left out ({', '.join(sorted(unknown)[:5])})")
        if outside:
            self.notes.append(f"{outside} points outside their image (X or Y not in [0, 1]) were left out")
        if unsure:
            self.notes.append(f"{unsure} 'unsure' points were left out")
        shown = {i: c for i, c in per_image.items() if any(any(p[2] for p in pts) for pts in c.values())}
        self.ids = sorted(shown)
        self.points = shown
        if not self.ids:
            raise BadInputError(f"{self.points_file}: no image with a 'yes' point of a named class")
        self.classes = sorted({c for v in shown.values() for c, pts in v.items() if any(p[2] for p in pts)})
        self.identity = hashlib.sha256(("\n".join(self.ids) + "|" + str(self.points_file.stat().st_size)
                                        ).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Optional[Path]:
        for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
            p = self.images / f"{image_id}{ext}"
            if p.is_file():
                return p
        return None

    def entries(self, start: int, stop: int) -> Iterator:
        """value = (RGB image, {class: [(x_px, y_px, present)]}) for the classes with a 'yes' point."""
        from .datasets import read_image
        from .evaluation import Entry

        for i in range(start, min(stop, len(self.ids))):
            iid = self.ids[i]
            p = self.image_path(iid)
            if p is None:
                yield Entry(i, iid, None, f"no image file {iid}.jpg in {self.images}")
                continue
            try:
                img = read_image(str(p))
            except BadInputError as exc:
                yield Entry(i, iid, None, str(exc))
                continue
            w, h = img.size
            pts = {c: [(min(x * w, w - 1e-6), min(y * h, h - 1e-6), yes) for x, y, yes in v]
                   for c, v in self.points[iid].items() if any(q[2] for q in v)}
            yield Entry(i, iid, (img, pts))


def write_openimages(root, split: str, images: Dict[str, object], points: List[Tuple[str, float, float, str, str]],
                     names: Dict[str, str]) -> Path:
    """Write the layout (for tests and `shapes-world --layout openimages`): `images` {ImageId: RGB array},
    `points` rows (ImageId, X, Y, MID, yes/no/unsure), `names` {MID: name}."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    folder = root / ("validation" if split == "val" else split)
    folder.mkdir(parents=True, exist_ok=True)
    for iid, arr in images.items():
        Image.fromarray(np.asarray(arr, np.uint8)).save(folder / f"{iid}.jpg", quality=95)
    with open(root / f"oidv7-{split}-annotations-point-labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes", "UnsureVotes",
                    "TextLabel"])
        for iid, x, y, mid, yn in points:
            w.writerow([iid, f"{x:.6f}", f"{y:.6f}", mid, yn, "ih", int(yn == "yes"), int(yn == "no"),
                        int(yn == "unsure"), ""])
    with open(root / "oidv7-class-descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        for mid, name in names.items():
            w.writerow([mid, name])
    return root
