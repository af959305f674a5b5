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


# One sign convention for ablation effects everywhere (these figures and the atlas): the change of a measure when a
# head is mean-ablated, negative (the head matters: removing it hurts) in red, positive in blue, zero white.
EFFECT_CMAP = "RdBu"


def head_importance_figure(accuracy_change, margin_change, path=None):
    """Two layer x head panels: the accuracy change (pts) and the change of the mean correct-class margin (its logit
    minus the largest other) when each head is mean-ablated, on `EFFECT_CMAP` centred on 0 (red: the head matters).
    Accuracy saturates (at 100%, removing one head seldom flips a prediction); the margin does not."""
    import numpy as np

    plt = _plt()
    panels = [(np.asarray(accuracy_change, dtype=np.float64), "accuracy change (pts)"),
              (np.asarray(margin_change, dtype=np.float64), "margin change (cosine)")]
    L, H = panels[0][0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4, 0.38 * H + 2.5), max(3, 0.32 * L + 1.8)), squeeze=False)
    for ax, (values, label) in zip(axes[0], panels):
        _effect_panel(fig, ax, values, label)
    fig.suptitle("mean-ablating one head: change of the zero-shot accuracy and of the correct class's margin\n"
                 "(red, negative: the head matters; blue: removing it helps)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 120)


def _effect_panel(fig, ax, values, label, title=None, diverging: bool = True):
    """One layer x head grid on `ax`: signed values on `EFFECT_CMAP` centred on 0 (or `viridis`), L{l} / H{h}
    ticks, axis labels, a title and a colour bar."""
    import numpy as np

    L, H = values.shape
    if diverging:
        scale = float(np.abs(values).max()) or 1.0
        im = ax.imshow(values, cmap=EFFECT_CMAP, vmin=-scale, vmax=scale, aspect="auto")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7)
    ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=7)
    ax.set_title(label if title is None else title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)


def head_heatmap(values, path=None, title: str = "", diverging: bool = True, label: str = ""):
    """A layer x head grid of values with L{l} / H{h} ticks; signed values (e.g. accuracy changes) on a diverging map
    centred on 0 (the title should say what the sign means); returns the figure."""
    import numpy as np

    plt = _plt()
    values = np.asarray(values, dtype=np.float64)
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.38 * H + 2.5), max(3, 0.32 * L + 1.6)))
    _effect_panel(fig, ax, values, label, title=title, diverging=diverging)
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
MAX_ALPHA = 0.85  # opacity of the strongest value
MIN_ALPHA = 0.35  # opacity floor: the map is visible wherever it is not (near) zero
RAMP = 0.03  # below this fraction of the scale the opacity ramps from 0 to the floor (so exact zeros stay clear)
RELATIVE_CMAP = "RdBu_r"  # signed maps: red towards the prompt, blue away, white (transparent) near zero
ABSOLUTE_CMAP = "viridis"


def colourise(values, relative: bool, scale=None):
    """[h, w] values -> ([h, w, 3] colours in [0, 1], [h, w] opacity in [0, MAX_ALPHA]).

    Relative (signed) maps: `RELATIVE_CMAP` centred on 0 over +-scale (default: the largest magnitude); absolute
    maps: `ABSOLUTE_CMAP` over [min, max] (or [0, scale] / the pair given). Opacity: 0 at zero (or at the minimum),
    rising to the floor `MIN_ALPHA` within `RAMP` of the scale and on to `MAX_ALPHA` at the scale's end, so every
    part of the map that is not zero is seen, and a map that is small on the row's shared scale stays faint (a
    prompt that does not match is not stretched to full colour)."""
    import numpy as np
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    if relative:
        s = float(scale) if scale else (float(np.abs(v).max()) or 1.0)
        t = np.clip(v / s, -1, 1)
        rgb = colormaps[RELATIVE_CMAP]((t + 1) / 2)[..., :3]
        strength = np.abs(t)
    else:
        lo, hi = (float(v.min()), float(v.max())) if scale is None else _bounds(scale)
        t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
        rgb = colormaps[ABSOLUTE_CMAP](t)[..., :3]
        strength = t
    alpha = np.minimum(strength / RAMP, 1.0) * MIN_ALPHA + (MAX_ALPHA - MIN_ALPHA) * strength
    return rgb, alpha


def _bounds(scale):
    """(lo, hi) of an absolute scale given as a number (0 .. it) or a pair."""
    return (float(scale[0]), float(scale[1])) if isinstance(scale, (tuple, list)) else (0.0, float(scale))


def _muted(img):
    """The image in grey, lightened and low in contrast: the map's colours never meet the scene's (a red object
    under a red map), and the scene stays recognisable."""
    import numpy as np

    rgb = np.asarray(img, dtype=np.float32) / 255
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat((0.3 + 0.55 * grey)[..., None], 3, axis=2)


def mask_outline(mask, size):
    """[H, W] bool: the boundary pixels (2 px) of a mask resized (nearest) to `size` (H, W)."""
    import numpy as np
    from PIL import Image as PILImage

    m = np.asarray(mask) > 0
    if m.shape != tuple(size):
        m = np.asarray(PILImage.fromarray(m.astype(np.uint8) * 255).resize((size[1], size[0]), PILImage.NEAREST)) > 0
    edge = np.zeros_like(m)
    for axis in (0, 1):
        for shift in (1, -1, 2, -2):
            edge |= m & ~np.roll(m, shift, axis=axis)
    return edge


def overlay(image, heat, relative: bool = True, scale=None, min_size: int = MIN_OVERLAY, mask=None):
    """A PIL image (at least `min_size` px on its short side): the image muted to grey, the map upsampled
    bilinearly and blended over it (see `colourise`), and, given a `mask`, its outline in black."""
    import numpy as np
    from PIL import Image as PILImage

    img = image.convert("RGB")
    short = min(img.size)
    if short < min_size:
        img = img.resize((round(img.size[0] * min_size / short), round(img.size[1] * min_size / short)),
                         PILImage.BICUBIC)
    base = _muted(img)
    h = upsample(heat, base.shape[:2]).numpy()
    rgb, alpha = colourise(h, relative, scale)
    out = (1 - alpha[..., None]) * base + alpha[..., None] * rgb
    if mask is not None:
        out[mask_outline(mask, base.shape[:2])] = 0.0
    return PILImage.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def overlay_figure(image, heat, title: str, path=None, relative: bool = True, scale=None, mask=None,
                   scale_note: str = ""):
    """One overlay (>= 224 px) beside the image, with its title (prompt, head) and a colour bar; `scale`: the
    colour scale (shared with the other prompts of the same image, so that they compare), default the map's own;
    `mask`: a ground-truth outline. Returns the figure."""
    import matplotlib as mpl

    plt = _plt()
    shown = overlay(image, heat, relative, scale=scale, mask=mask)
    ratio = shown.size[1] / shown.size[0]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0 * ratio + 0.7))
    axes[0].imshow(image.convert("RGB").resize(shown.size))
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(shown)
    axes[1].set_title(title + (f"\n{scale_note}" if scale_note else ""), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _colourbar(fig, axes[1], heat, relative, mpl, scale=scale)
    return _save(fig, path, 110)


def _colourbar(fig, ax, heat, relative, mpl, scale=None, label=None):
    import numpy as np

    v = np.asarray(heat, dtype=np.float64)
    if relative:
        s = float(scale) if scale else (float(np.abs(v).max()) or 1.0)
        sm = mpl.cm.ScalarMappable(mpl.colors.Normalize(-s, s), RELATIVE_CMAP)
        label = label or "relative to the\nmean over prompts"
    else:
        lo, hi = (float(v.min()), float(v.max())) if scale is None else _bounds(scale)
        sm = mpl.cm.ScalarMappable(mpl.colors.Normalize(lo, hi if hi > lo else lo + 1), ABSOLUTE_CMAP)
        label = label or "map value"
    bar = fig.colorbar(sm, ax=ax, shrink=0.8)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return bar


def row_scales(maps, relative: bool, mode: str = "row"):
    """Colour scales for an [n, k, ...] set of maps: per row (`"row"`: the k panels of an image share one, so they
    compare), one for the whole grid (`"grid"`), or per panel (`"panel"`): a list of n lists of k scales."""
    import numpy as np

    maps = np.asarray(maps, dtype=np.float64)
    n, k = maps.shape[:2]

    def scale_of(a):
        return (float(np.abs(a).max()) or 1.0) if relative else (float(a.min()), float(a.max()))

    if mode == "grid":
        return [[scale_of(maps)] * k for _ in range(n)]
    if mode == "panel":
        return [[scale_of(maps[i, j]) for j in range(k)] for i in range(n)]
    if mode != "row":
        raise ValueError(f"scale mode must be row, grid or panel; got {mode!r}")
    return [[scale_of(maps[i])] * k for i in range(n)]


SCALE_NOTES = {"row": "colour scale shared within each row", "grid": "one colour scale for the whole grid",
               "panel": "each panel on its own colour scale"}


def map_grid_image(images, maps, relative: bool = True, cell: int = 160, pad: int = 4, col_labels=None):
    """A PIL grid (no matplotlib, for many heads): column titles on top, one row per image, the image first, then
    each map [n, k, gh, gw] overlaid (scale shared within a row), and a colour bar per row on the right (its range
    written beside it)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image as PILImage, ImageDraw

    maps = np.asarray(maps, dtype=np.float64)
    n, k = maps.shape[:2]
    head_h, bar_w, label_w = 18, 12, 58
    width = (k + 1) * (cell + pad) + pad + bar_w + label_w
    sheet = PILImage.new("RGB", (width, head_h + n * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    titles = ["image"] + [str(t) for t in (col_labels or [f"map {j + 1}" for j in range(k)])]
    for j, t in enumerate(titles):
        limit = max(4, cell // 6)
        draw.text((pad + j * (cell + pad), 3), t if len(t) <= limit else t[:limit - 1] + "…", fill="black")
    cmap = colormaps[RELATIVE_CMAP if relative else ABSOLUTE_CMAP]
    scales = row_scales(maps, relative, "row")
    for i in range(n):
        y0 = head_h + pad + i * (cell + pad)
        img = images[i].convert("RGB").resize((cell, cell), PILImage.BICUBIC)
        sheet.paste(img, (pad, y0))
        for j in range(k):
            panel = overlay(img, maps[i, j], relative, scale=scales[i][j], min_size=cell).resize((cell, cell))
            sheet.paste(panel, (pad + (j + 1) * (cell + pad), y0))
        x0 = pad + (k + 1) * (cell + pad)
        grad = np.linspace(1, 0, cell)[:, None].repeat(bar_w, axis=1)  # top: the high end
        bar = (cmap(grad)[..., :3] * 255).astype(np.uint8)
        sheet.paste(PILImage.fromarray(bar), (x0, y0))
        lo, hi = (-scales[i][0], scales[i][0]) if relative else scales[i][0]
        draw.text((x0 + bar_w + 3, y0), f"{hi:+.3g}", fill="black")
        draw.text((x0 + bar_w + 3, y0 + cell - 11), f"{lo:+.3g}", fill="black")
        if relative:
            draw.text((x0 + bar_w + 3, y0 + cell // 2 - 5), "0", fill="black")
    return sheet


def overlay_grid(images, maps, row_labels, col_labels, path=None, title: str = "", relative: bool = True,
                 shared_scale=None, scale: str = "row", bar_label=None):
    """A grid figure: one row per image, the original image first, then one column per map (maps [n, k, gh, gw],
    each column titled with its prompt or head). `scale`: "row" (default: the panels of a row, compared with each
    other, share one colour scale, with a colour bar per row), "grid" (one scale and colour bar for all) or "panel"
    (each its own, a colour bar each); the title says which. (`shared_scale=True/False`: "grid"/"panel", as
    before.) Returns the figure."""
    import matplotlib as mpl
    import numpy as np

    if shared_scale is not None:
        scale = "grid" if shared_scale else "panel"
    plt = _plt()
    maps = np.asarray(maps, dtype=np.float64)
    n, k = maps.shape[:2]
    scales = row_scales(maps, relative, scale)
    extra = 0.9 * k if scale == "panel" else 0.9
    fig, axes = plt.subplots(n, k + 1, figsize=(2.5 * (k + 1) + extra, 2.5 * n + 0.8), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].convert("RGB"))
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(overlay(images[i], maps[i, j], relative, scale=scales[i][j], min_size=224))
            ax.set_title(col_labels[j], fontsize=8)
            if scale == "panel":
                _colourbar(fig, ax, maps[i, j], relative, mpl, scale=scales[i][j], label=bar_label)
        if scale == "row":
            _colourbar(fig, axes[i, 1:].tolist(), maps[i], relative, mpl, scale=scales[i][0], label=bar_label)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if scale == "grid":
        _colourbar(fig, axes.ravel().tolist(), maps, relative, mpl, scale=scales[0][0], label=bar_label)
    fig.suptitle((title + "\n" if title else "") + f"({SCALE_NOTES[scale]})", fontsize=10)
    return _save(fig, path, 110)


def sample_figure(image, heat, mask, title: str, path=None, relative: bool = False, threshold=None):
    """A segmentation sample: the image, the map over it with the ground-truth outline (black), and the binarised
    prediction with the same outline; a title (image, class, method) and a colour bar. Returns the figure."""
    import matplotlib as mpl
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.2))
    frame = image.convert("RGB")
    axes[0].imshow(frame)
    axes[0].set_title("image", fontsize=8)
    shown = overlay(frame, heat, relative, mask=mask)
    axes[1].imshow(shown)
    axes[1].set_title("map; black: ground truth", fontsize=7)
    up = upsample(heat, (shown.size[1], shown.size[0])).numpy()
    cut = float(np.mean(up)) if threshold is None else threshold
    pred = np.repeat((up > cut)[..., None], 3, axis=2).astype(np.float32) * 0.85 + 0.1
    pred[mask_outline(mask, up.shape)] = [1.0, 0.1, 0.1]
    axes[2].imshow(pred)
    axes[2].set_title("map > its mean; red: ground truth", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _colourbar(fig, axes[1], heat, relative, mpl)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, 100)


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


def compare_grid(path, frames, image_names, prompts, methods, shown, times, signed=None):
    """Rows: image x prompt; columns: the image, then each method's map. Maps in `shown` are upsampled and min-max
    normalised ([0, 1], the methods' published normalisation), one colour bar for them; maps in `signed` ({method:
    [b, P, H, W] raw signed maps}, e.g. the decomposition relative to the mean over prompts) are drawn on the
    diverging map with one symmetric scale per image shared by its prompts, so a prompt that does not match stays
    faint instead of being stretched to full range. Returns the figure (saved when `path` is not None)."""
    import matplotlib as mpl
    import numpy as np

    signed = signed or {}
    plt = _plt()
    rows = [(i, j) for i in range(len(frames)) for j in range(len(prompts))]
    fig, axes = plt.subplots(len(rows), len(methods) + 1, figsize=(1.9 * (len(methods) + 1) + 1.6, 1.9 * len(rows)
                                                                    + 0.9), squeeze=False)
    for r, (i, j) in enumerate(rows):
        img = np.asarray(frames[i].convert("RGB"))
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(f"{image_names[i]}\n{prompts[j]!r}", fontsize=7)
        for c, m in enumerate(methods, start=1):
            if m in signed:
                s = float(np.abs(signed[m][i]).max()) or 1.0
                axes[r, c].imshow(overlay(frames[i], signed[m][i, j], relative=True, scale=s))
            else:
                axes[r, c].imshow(overlay(frames[i], shown[m][i, j], relative=False, scale=1.0))
            if r == 0:
                axes[r, c].set_title(f"{m}{' (signed)' if m in signed else ''}\n{times[m]:.2f}s", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if signed:
        fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(-1, 1), RELATIVE_CMAP), ax=axes.ravel().tolist(),
                     shrink=0.6, fraction=0.02, pad=0.01, label="signed maps: fraction of the image's largest magnitude")
    fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0, 1), ABSOLUTE_CMAP), ax=axes.ravel().tolist(),
                 shrink=0.6, fraction=0.02, pad=0.01, label="relevance (min-max per map)")
    fig.suptitle("every explainer on the same images and prompts", fontsize=9)
    return _save(fig, path, 110)
