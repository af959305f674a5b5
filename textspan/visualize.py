"""All drawing: heatmap overlays, grids, contact sheets, plots. Every plotting function returns its matplotlib
figure (for notebooks) and saves it when given a path.

Overlays keep the image readable: a relative map (what distinguishes a prompt from the others) is drawn with a
perceptual diverging colour map centred on 0 (red: towards the prompt, blue: away), an absolute map with a sequential
one (viridis); the colour's opacity follows the value's magnitude, so that near-zero patches show the image itself.
Per-image overlays are upsampled to at least 224 px; each panel names its prompt or head; grids show the original
image beside the maps; panels on their own scales get their own colour bars."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from PIL import Image, ImageDraw


def contact_sheet(items: List[Tuple[Image.Image, str]], path, title: str = "", thumb: int = 128,
                  columns: int = 8) -> Path:
    """A grid of thumbnails with a caption under each and a title on top, saved as PNG."""
    columns = max(1, min(columns, len(items) or 1))
    rows = -(-len(items) // columns) if items else 1
    pad, text_h, title_h = 4, 14, 20 if title else 0
    sheet = Image.new("RGB", (columns * (thumb + pad) + pad, title_h + rows * (thumb + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), title, fill="black")
    for k, (img, caption) in enumerate(items):
        r, c = divmod(k, columns)
        x, y = pad + c * (thumb + pad), title_h + pad + r * (thumb + text_h + pad)
        im = img.convert("RGB")
        im.thumbnail((thumb, thumb), Image.NEAREST if max(im.size) <= thumb else Image.BICUBIC)
        if max(im.size) < thumb:
            scale = thumb // max(im.size)
            im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
        sheet.paste(im, (x, y))
        draw.text((x, y + thumb + 1), caption, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _plt():
    """pyplot, on the Agg backend unless in a notebook kernel (where figures display inline)."""
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(x, y, path=None, xlabel: str = "", ylabel: str = "", hline=None, label: str = "",
              hline_label: str = "reference", title: str = ""):
    """A line plot with integer x ticks and an optional labelled horizontal reference line; returns the figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, y, "o-", label=label or "accuracy")
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label=hline_label)
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 120)


def _save(fig, path, dpi: int):
    """Save the figure when given a path; always release it from pyplot (a notebook shows the returned figure
    once, and scripts do not accumulate open figures); the figure stays usable (savefig, display)."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return fig


def head_heatmap(values, path=None, title: str = "", diverging: bool = True, label: str = ""):
    """A layer x head grid of values with L{l} / H{h} ticks; signed values (e.g. accuracy changes) on a diverging map
    centred on 0 (the title should say what the sign means); returns the figure."""
    import numpy as np

    plt = _plt()
    values = np.asarray(values, dtype=np.float64)
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.38 * H + 2.5), max(3, 0.32 * L + 1.6)))
    if diverging:
        scale = float(np.abs(values).max()) or 1.0
        im = ax.imshow(values, cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xlabel("head (L{layer}H{head})")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7)
    ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return _save(fig, path, 120)


def upsample(maps, size):
    """[..., g_h, g_w] -> [..., size_h, size_w], bilinear (align_corners=False)."""
    import torch

    t = torch.as_tensor(maps, dtype=torch.float32)
    lead = t.shape[:-2]
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = torch.nn.functional.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear",
                                         align_corners=False)
    return up.reshape(*lead, *size)


MIN_OVERLAY = 224  # per-image overlays are at least this many pixels on their short side
MAX_ALPHA = 0.75


def colourise(values, relative: bool, scale=None):
    """[h, w] values -> ([h, w, 3] colours in [0, 1], [h, w] opacity in [0, MAX_ALPHA]). Relative maps: RdBu
    reversed (red positive), centred on 0, on +-scale (default: the largest magnitude); absolute maps: viridis over
    [min, max] (or [0, scale]). The opacity follows the magnitude (relative) or the value (absolute)."""
    import numpy as np
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    if relative:
        s = float(scale) if scale else (float(np.abs(v).max()) or 1.0)
        t = np.clip(v / s, -1, 1)
        rgb = colormaps["RdBu_r"]((t + 1) / 2)[..., :3]
        alpha = np.abs(t) * MAX_ALPHA
    else:
        lo, hi = (float(v.min()), float(v.max())) if scale is None else _bounds(scale)
        t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
        rgb = colormaps["viridis"](t)[..., :3]
        alpha = (0.15 + 0.85 * t) * MAX_ALPHA
    return rgb, alpha


def _bounds(scale):
    """(lo, hi) of an absolute scale given as a number (0 .. it) or a pair."""
    return (float(scale[0]), float(scale[1])) if isinstance(scale, (tuple, list)) else (0.0, float(scale))


def overlay(image, heat, relative: bool = True, scale=None, min_size: int = MIN_OVERLAY):
    """A PIL image (at least `min_size` px on its short side) with the map upsampled bilinearly and blended over it,
    its opacity following the value (see `colourise`)."""
    import numpy as np
    from PIL import Image as PILImage

    img = image.convert("RGB")
    short = min(img.size)
    if short < min_size:
        img = img.resize((round(img.size[0] * min_size / short), round(img.size[1] * min_size / short)),
                         PILImage.BICUBIC)
    base = np.asarray(img, dtype=np.float32) / 255
    h = upsample(heat, base.shape[:2]).numpy()
    rgb, alpha = colourise(h, relative, scale)
    out = (1 - alpha[..., None]) * base + alpha[..., None] * rgb
    return PILImage.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def overlay_figure(image, heat, title: str, path=None, relative: bool = True):
    """One overlay (>= 224 px) with its title (prompt, head) and a colour bar; returns the figure."""
    import matplotlib as mpl

    plt = _plt()
    shown = overlay(image, heat, relative)
    fig, ax = plt.subplots(figsize=(3.4, 3.4 * shown.size[1] / shown.size[0] + 0.4))
    ax.imshow(shown)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    _colourbar(fig, ax, heat, relative, mpl)
    return _save(fig, path, 110)


def _colourbar(fig, ax, heat, relative, mpl, scale=None):
    import numpy as np

    v = np.asarray(heat, dtype=np.float64)
    if relative:
        s = float(scale) if scale else (float(np.abs(v).max()) or 1.0)
        sm = mpl.cm.ScalarMappable(mpl.colors.Normalize(-s, s), "RdBu_r")
        label = "relative to the mean over prompts"
    else:
        lo, hi = (float(v.min()), float(v.max())) if scale is None else _bounds(scale)
        sm = mpl.cm.ScalarMappable(mpl.colors.Normalize(lo, hi if hi > lo else lo + 1), "viridis")
        label = "map value"
    fig.colorbar(sm, ax=ax, shrink=0.8, label=label)


def map_grid_image(images, maps, relative: bool = True, cell: int = 112, pad: int = 3):
    """A PIL grid (no matplotlib, for many heads): one row per image, the image first, then each map [n, k, gh, gw]
    overlaid (scale shared within a row). Captions live in the page that shows it."""
    import numpy as np
    from PIL import Image as PILImage

    maps = np.asarray(maps, dtype=np.float64)
    n, k = maps.shape[:2]
    sheet = PILImage.new("RGB", ((k + 1) * (cell + pad) + pad, n * (cell + pad) + pad), "white")
    for i in range(n):
        img = images[i].convert("RGB").resize((cell, cell), PILImage.BICUBIC)
        sheet.paste(img, (pad, pad + i * (cell + pad)))
        scale = float(np.abs(maps[i]).max()) if relative else None
        for j in range(k):
            panel = overlay(img, maps[i, j], relative, scale=scale or None, min_size=cell)
            sheet.paste(panel, (pad + (j + 1) * (cell + pad), pad + i * (cell + pad)))
    return sheet


def overlay_grid(images, maps, row_labels, col_labels, path=None, title: str = "", relative: bool = True,
                 shared_scale: bool = True):
    """A grid figure: one row per image, the original image first, then one column per map (maps [n, k, gh, gw],
    each column titled with its prompt or head); one colour bar for the whole grid when the panels share a scale,
    else one per panel. Returns the figure."""
    import matplotlib as mpl
    import numpy as np

    plt = _plt()
    maps = np.asarray(maps, dtype=np.float64)
    n, k = maps.shape[:2]
    shared = None
    if shared_scale:
        shared = (float(np.abs(maps).max()) or 1.0) if relative else (float(maps.min()), float(maps.max()))
    fig, axes = plt.subplots(n, k + 1, figsize=(2.5 * (k + 1) + (0.8 if shared_scale else 0.9 * k), 2.5 * n + 0.6),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].convert("RGB"))
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(overlay(images[i], maps[i, j], relative, scale=shared, min_size=224))
            ax.set_title(col_labels[j], fontsize=8)
            if not shared_scale:
                _colourbar(fig, ax, maps[i, j], relative, mpl)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if shared_scale:
        _colourbar(fig, axes.ravel().tolist(), maps, relative, mpl, scale=shared)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, 110)


def completeness_plot(ms, acc, path=None):
    """Accuracy of the TextSpan reconstructions per number of texts, against the baseline and the heads kept
    intact with the rest mean-ablated."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ms, [acc["by_n_texts"][m] for m in ms], "o-", label="TextSpan reconstruction")
    ax.axhline(acc["baseline"], color="k", ls="--", label="baseline")
    ax.axhline(acc["ablated_rest"], color="gray", ls=":", label="heads intact, rest mean-ablated")
    ax.set_xlabel("texts per head")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_xticks(list(ms))
    ax.set_title("completeness: heads replaced by their TextSpan reconstructions", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 120)


def perturbation_plot(path, fractions, acc, method):
    """Returns the figure (saved when `path` is not None)."""
    """Accuracy against the fraction of patches removed, most relevant first (positive) and least (negative)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    pct = [100 * f for f in fractions]
    ax.plot(pct, acc["positive"], "o-", label="positive (most relevant removed first)")
    ax.plot(pct, acc["negative"], "s-", label="negative (least relevant removed first)")
    ax.set_xlabel("patches removed (%)")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"perturbation: {method}", fontsize=9)
    ax.set_xticks(pct)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, 110)


def compare_grid(path, frames, image_names, prompts, methods, shown, times):
    """Rows: image x prompt; columns: the image, then each method's map (upsampled, min-max), one colour bar.
    Returns the figure (saved when `path` is not None)."""
    import numpy as np

    plt = _plt()
    rows = [(i, j) for i in range(len(frames)) for j in range(len(prompts))]
    fig, axes = plt.subplots(len(rows), len(methods) + 1, figsize=(1.9 * (len(methods) + 1) + 0.9, 1.9 * len(rows)
                                                                    + 0.5), squeeze=False)
    for r, (i, j) in enumerate(rows):
        img = np.asarray(frames[i].convert("RGB"))
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(f"{image_names[i]}\n{prompts[j]!r}", fontsize=7)
        for c, m in enumerate(methods, start=1):
            axes[r, c].imshow(overlay(frames[i], shown[m][i, j], relative=False, scale=1.0))
            if r == 0:
                axes[r, c].set_title(f"{m}\n{times[m]:.2f}s", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    import matplotlib as mpl

    fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0, 1), "viridis"), ax=axes.ravel().tolist(), shrink=0.7,
                 label="relevance (min-max per map; opacity follows it)")
    return _save(fig, path, 110)
