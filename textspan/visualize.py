"""Figures: contact sheets (and, later, heatmap overlays). All drawing lives here."""
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(x, y, path, xlabel: str = "", ylabel: str = "", hline=None, label: str = ""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, y, "o-", label=label or None)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def head_heatmap(values, path, title: str = ""):
    """A layer x head grid of values (e.g. accuracy drops), heads named L{l}H{h} on the axes."""
    import numpy as np

    plt = _plt()
    values = np.asarray(values)
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * H + 2), max(3, 0.3 * L + 1.5)))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xlabel("head (L{layer}H{head})")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7)
    ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def upsample(maps, size):
    """[..., g_h, g_w] -> [..., size_h, size_w], bilinear (align_corners=False)."""
    import torch

    t = torch.as_tensor(maps, dtype=torch.float32)
    lead = t.shape[:-2]
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = torch.nn.functional.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear",
                                         align_corners=False)
    return up.reshape(*lead, *size)


def overlay(image, heat, cmap: str = "jet", alpha: float = 0.5, vmin=None, vmax=None):
    """A PIL image with a heat map (any [h, w] array, upsampled to the image) blended over it."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image as PILImage

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    h = upsample(heat, img.shape[:2]).numpy()
    lo = float(h.min()) if vmin is None else vmin
    hi = float(h.max()) if vmax is None else vmax
    norm = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    colour = colormaps[cmap](np.clip(norm, 0, 1))[..., :3]
    out = (1 - alpha) * img + alpha * colour
    return PILImage.fromarray((out * 255).astype(np.uint8))


def overlay_grid(images, maps, row_labels, col_labels, path, title: str = "", cmap: str = "jet",
                 shared_scale: bool = True):
    """A grid figure: one row per image, one column per map (maps [n_images, n_cols, g, g]), with a colour bar."""
    import numpy as np

    plt = _plt()
    maps = np.asarray(maps)
    n, k = maps.shape[:2]
    vmin, vmax = (float(maps.min()), float(maps.max())) if shared_scale else (None, None)
    fig, axes = plt.subplots(n, k, figsize=(2.2 * k + 0.8, 2.2 * n + 0.4), squeeze=False)
    for i in range(n):
        img = np.asarray(images[i].convert("RGB"))
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(img)
            up = upsample(maps[i, j], img.shape[:2]).numpy()
            im = ax.imshow(up, cmap=cmap, alpha=0.5, vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def completeness_plot(ms, acc, path):
    """Accuracy of the TextSpan reconstructions per number of texts, against the baseline and the heads kept
    intact with the rest mean-ablated."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ms, [acc["by_n_texts"][m] for m in ms], "o-", label="TextSpan reconstruction")
    ax.axhline(acc["baseline"], color="k", ls="--", label="baseline")
    ax.axhline(acc["ablated_rest"], color="gray", ls=":", label="heads intact, rest mean-ablated")
    ax.set_xlabel("texts per head")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def perturbation_plot(path, fractions, acc, method):
    """Accuracy against the fraction of patches removed, most relevant first (positive) and least (negative)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    pct = [100 * f for f in fractions]
    ax.plot(pct, acc["positive"], "o-", label="positive (most relevant removed first)")
    ax.plot(pct, acc["negative"], "s-", label="negative (least relevant removed first)")
    ax.set_xlabel("patches removed (%)")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"perturbation: {method}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_grid(path, frames, image_names, prompts, methods, shown, times):
    """Rows: image x prompt; columns: the image, then each method's map (upsampled, min-max), one colour bar."""
    import numpy as np

    plt = _plt()
    rows = [(i, j) for i in range(len(frames)) for j in range(len(prompts))]
    fig, axes = plt.subplots(len(rows), len(methods) + 1, figsize=(1.9 * (len(methods) + 1) + 0.9, 1.9 * len(rows)
                                                                    + 0.5), squeeze=False)
    im = None
    for r, (i, j) in enumerate(rows):
        img = np.asarray(frames[i].convert("RGB"))
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(f"{image_names[i]}\n{prompts[j]!r}", fontsize=7)
        for c, m in enumerate(methods, start=1):
            axes[r, c].imshow(img)
            im = axes[r, c].imshow(shown[m][i, j], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if r == 0:
                axes[r, c].set_title(f"{m}\n{times[m]:.2f}s", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="relevance (min-max per map)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
