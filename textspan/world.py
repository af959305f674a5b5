"""The shapes world: procedurally generated images whose ground truth is known.

Every sample is a deterministic function of (seed, index): a 64 x 64 RGB image of one (or two) objects, a caption
naming a random subset of its attributes, the attribute labels, and each object's pixel mask. Attributes:

    shape       circle, square, triangle, star, cross
    colour      red, orange, yellow, purple, white, pink      (chosen to stand out from both backgrounds)
    size        small (radius 7-10 px), large (13-16 px)
    horizontal  left, right        (object centre in that half, a few px off the middle line)
    vertical    top, bottom
    background  water (blue with sine waves), land (green or brown blocky noise)

plus Gaussian pixel noise. Captions follow "a {size} {colour} {shape} in the {vertical} {horizontal} on {background}"
with a few framings ("a photo of ...", "an image of ..."); the shape is named 95% of the time (else the noun is
"object"), every other attribute 70%, independently.

The `spurious` mode is a Waterbirds-like world: a binary label (shape "circle" = 0 or "square" = 1) agrees with the
background (circle on land, square on water) with probability `correlation` in the train/val splits, and the test
split has the four (label, background) groups in equal numbers. In that mode captions name the background rarely
(20%), so that the shape words have to carry it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BadInputError

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 35, 35),
    "orange": (245, 145, 25),
    "yellow": (240, 225, 45),
    "purple": (150, 55, 205),
    "white": (245, 245, 245),
    "pink": (255, 125, 195),
}
SIZES = {"small": (7, 10), "large": (13, 16)}
HORIZONTAL = ("left", "right")
VERTICAL = ("top", "bottom")
BACKGROUNDS = ("water", "land")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "horizontal": HORIZONTAL,
              "vertical": VERTICAL, "background": BACKGROUNDS}
SPURIOUS_CLASSES = ("circle", "square")  # label 0, 1; label 1 goes with water
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_029}

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


@dataclass
class Sample:
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    labels: Dict[str, str]  # attribute -> value (of the first object); spurious: also "label", "group"
    masks: List[np.ndarray] = field(default_factory=list)  # one [H, W] bool mask per object
    objects: List[Dict[str, str]] = field(default_factory=list)  # per-object attributes

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool: the union of the object masks."""
        return np.any(np.stack(self.masks), axis=0)


@dataclass(frozen=True)
class Spurious:
    """A Waterbirds-like split: the binary label agrees with the background with probability `correlation`
    (train/val); with `balanced`, the four (label, background) groups are equally likely (test)."""

    correlation: float = 0.95
    balanced: bool = False
    background_named: float = 0.2


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5EED])


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """[SIZE, SIZE] bool mask of a shape of radius r centred at (cx, cy)."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.86 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # pointing up: apex (0, -r), base at y = 0.75 r
        base, half = 0.75 * r, 0.95 * r
        inside_base = dy <= base
        # the two slanted edges: |dx| <= half * (dy + r) / (base + r)
        return inside_base & (np.abs(dx) <= half * (dy + r) / (base + r)) & (dy >= -r)
    if shape == "star":  # five points, one pointing up; inner radius 0.45 r
        rho = np.sqrt(dx * dx + dy * dy)
        theta = np.arctan2(dx, -dy) % (2 * np.pi / 5)  # angle from "up", folded to one point's sector
        phi = np.minimum(theta, 2 * np.pi / 5 - theta)  # [0, pi/5]: 0 at a point, pi/5 at an inner corner
        inner = 0.45 * r
        p1 = np.array([r, 0.0])
        p2 = np.array([inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)])
        x, y = rho * np.cos(phi), rho * np.sin(phi)
        cross = (p2[0] - p1[0]) * (y - p1[1]) - (p2[1] - p1[1]) * (x - p1[0])
        return cross >= 0
    if shape == "cross":
        w = 0.36 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    raise BadInputError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "water":
        base = np.array([35, 85, 175], np.float32) + rng.uniform(-12, 12, 3)
        fx, fy = rng.uniform(0.15, 0.35), rng.uniform(0.02, 0.1)
        waves = np.sin(fx * _YY + fy * _XX + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(
            0.5 * fx * _YY - fy * _XX + rng.uniform(0, 2 * np.pi))
        img = base + waves[..., None] * np.array([12, 18, 28], np.float32)
    else:
        green = rng.random() < 0.5
        base = np.array([70, 125, 45] if green else [125, 85, 45], np.float32) + rng.uniform(-10, 10, 3)
        block = int(rng.integers(4, 9))
        n = -(-SIZE // block)
        blocks = rng.normal(0, 1, (n, n, 1)).astype(np.float32)
        tiles = np.repeat(np.repeat(blocks, block, 0), block, 1)[:SIZE, :SIZE]
        img = base + tiles * np.array([18, 16, 10], np.float32)
    return img


def _place(rng: np.random.Generator, r: float, h: str, v: str) -> Tuple[float, float]:
    margin = 3.0  # keep the centre this far off the middle lines
    half = SIZE / 2
    lo, hi = r, half - margin  # centre range within one half, object inside the image
    cx = rng.uniform(lo, hi)
    cy = rng.uniform(lo, hi)
    if h == "right":
        cx = SIZE - cx
    if v == "bottom":
        cy = SIZE - cy
    return float(cx), float(cy)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: Dict[str, str], rng: np.random.Generator, p_attr: float, p_shape: float) -> Tuple[str, str]:
    """'a small red circle' (some attributes dropped) and the position phrase ('in the top left', ...)."""
    words = []
    if rng.random() < p_attr:
        words.append(obj["size"])
    if rng.random() < p_attr:
        words.append(obj["colour"])
    words.append(obj["shape"] if rng.random() < p_shape else "object")
    phrase = f"{_article(words[0])} {' '.join(words)}"
    pos = [w for w, keep in ((obj["vertical"], rng.random() < p_attr), (obj["horizontal"], rng.random() < p_attr))
           if keep]
    return phrase, ("in the " + " ".join(pos)) if pos else ""


FRAMES = ("{}", "a photo of {}", "an image of {}", "a picture of {}")


def make_caption(objects: Sequence[Dict[str, str]], background: str, rng: np.random.Generator,
                 p_attr: float = 0.7, p_shape: float = 0.95, p_background: float = 0.7) -> str:
    parts = []
    for obj in objects:
        phrase, pos = _noun_phrase(obj, rng, p_attr, p_shape)
        parts.append(" ".join(w for w in (phrase, pos) if w))
    text = " and ".join(parts)
    if rng.random() < p_background:
        text += f" on {background}"
    frame = FRAMES[int(rng.integers(len(FRAMES)))]
    return frame.format(text)


def sample(seed: int, index: int, *, n_objects: int = 1, spurious: Optional[Spurious] = None) -> Sample:
    """The sample at (seed, index): deterministic, independent of any other call."""
    if n_objects not in (1, 2):
        raise BadInputError("n_objects must be 1 or 2")
    rng = _rng(seed, index)
    extra = {}
    if spurious is not None:
        label = int(rng.integers(2))
        if spurious.balanced:
            water = bool(rng.integers(2))
        else:
            agree = rng.random() < spurious.correlation
            water = (label == 1) == agree
        background = "water" if water else "land"
        extra = {"label": str(label), "group": f"{SPURIOUS_CLASSES[label]}_on_{background}"}
    else:
        background = BACKGROUNDS[int(rng.integers(2))]
    img = _background(background, rng)
    quadrants = [(h, v) for h in HORIZONTAL for v in VERTICAL]
    chosen = rng.permutation(len(quadrants))[:n_objects]
    objects, masks = [], []
    for k, q in enumerate(chosen):
        h, v = quadrants[q]
        shape = SPURIOUS_CLASSES[int(extra["label"])] if (spurious is not None and k == 0) else \
            SHAPES[int(rng.integers(len(SHAPES)))]
        colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = tuple(SIZES)[int(rng.integers(2))]
        r = rng.uniform(*SIZES[size])
        cx, cy = _place(rng, r, h, v)
        m = shape_mask(shape, cx, cy, r)
        rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-10, 10, 3)
        img[m] = rgb
        objects.append({"shape": shape, "colour": colour, "size": size, "horizontal": h, "vertical": v})
        masks.append(m)
    img = img + rng.normal(0, 6, img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    p_bg = spurious.background_named if spurious is not None else 0.7
    caption = make_caption(objects, background, rng, p_background=p_bg)
    labels = dict(objects[0], background=background, **extra)
    return Sample(image=image, caption=caption, labels=labels, masks=masks, objects=objects)


def batch(seed: int, start: int, n: int, **kwargs) -> Tuple[np.ndarray, List[str], List[Dict[str, str]]]:
    """Images [n, H, W, 3] uint8, captions and labels of samples start .. start+n-1."""
    samples = [sample(seed, i, **kwargs) for i in range(start, start + n)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples], [s.labels for s in samples]


def vocabulary() -> List[str]:
    """Every word a caption or a standard prompt can use, in a fixed order."""
    words = ["a", "an", "the", "photo", "image", "picture", "of", "in", "on", "and", "object", "shape", "there", "is"]
    for values in ATTRIBUTES.values():
        words += [w for w in values if w not in words]
    return words
