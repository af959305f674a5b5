"""Neurons: the zero-shot segmentation map of the second-order lens (second_order_lens: compute_segmentation.py).

For each prompt t, the neurons of the analysed MLP layers (one or more `textspan neurons` folders) are ranked by
|p_n . t|, p_n a neuron's principal second-order direction; the map is the mean post-activation of the
`top_neurons` best (published 200) at each patch token. The published evaluation then upsamples, min-max normalises
and thresholds at 0.5 without clipping (`segment-eval --method neurons --threshold 0.5 --no-clip`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import register
from ..errors import BadInputError
from ..store import read_finished_run


def load_neuron_folders(neurons):
    """[(layer, pca [W, d'])] from one folder, a comma-separated list, or a list of folders."""
    folders = neurons.split(",") if isinstance(neurons, str) else list(neurons)
    out = []
    for f in folders:
        f = Path(str(f).strip())
        rec = read_finished_run(f, "neurons")
        try:
            pca = np.load(f / "pca.npy")
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{f}/pca.npy: unreadable ({exc})") from exc
        out.append((int(rec["arguments"]["layer"]), pca, rec.get("model_fingerprint")))
    return out


@register("neurons", towers=("cls", "avg"), requires=("neurons",))
def neurons(tower, images, T, neurons=None, top_neurons: int = 200):
    """Options: neurons (a `textspan neurons` folder, or several, comma-separated), top_neurons (published 200)."""
    folders = load_neuron_folders(neurons)
    for layer, pca, _ in folders:
        if layer >= tower.n_layers or pca.shape != (tower.d_mlp, tower.d_embed):
            raise BadInputError(f"neurons folder of block {layer} with directions {pca.shape} does not fit this tower "
                                f"({tower.n_layers} blocks, {tower.d_mlp} neurons, embedding {tower.d_embed})")
    layers = [layer for layer, _, _ in folders]
    P = torch.from_numpy(np.concatenate([p for _, p, _ in folders])).to(T.dtype).to(T.device)  # [sum W, d']
    top = min(int(top_neurons), P.shape[0])
    with torch.no_grad():
        x = tower.embed(tower.to_input(images))
        post = {}
        for j, block in enumerate(tower.blocks[:max(layers) + 1]):
            if j in layers:
                tr = block.forward(x)
                post[j] = block.act(tr.hidden)  # [b, N, W]
                x = tr.x_out
            else:
                x = block.fast(x)
        acts = torch.cat([post[layer] for layer in layers], dim=2)  # [b, N, sum W] in the folders' order
        chosen = torch.topk((P @ T.t()).abs(), top, dim=0).indices  # [top, k]
        gh, gw = tower.grid_of(images)
        n_prefix = tower.n_prefix
        maps = torch.stack([acts[:, n_prefix:, chosen[:, k]].mean(dim=2) for k in range(T.shape[0])], dim=1)
    return maps.reshape(maps.shape[0], T.shape[0], gh, gw)
