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
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
