"""Mean-ablation of neurons' second-order effects (second_order_lens: compute_ablations.py) as an `Evaluation`.

With the mean effect m_n, the threshold t_n (the k-th largest centred norm) and the principal direction p_n of each
neuron from an `analyse_neurons` folder, and per image the normalised embedding r and the effects s_n:

    without all        r - sum_n s_n + sum_n m_n
    w/o significant    without all + sum of (s_n - m_n) over the neurons with |s_n - m_n| <= t_n
    w/o insignificant  without all + sum of (s_n - m_n) over the neurons with |s_n - m_n| > t_n
    projected on PC    without all + sum_n ((s_n - m_n) . p_n) p_n

and the zero-shot top-1 accuracy of each (and of r) against the images' class folders. The published code scales r
and s by 100, which changes no prediction.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation

VARIANTS = ("baseline", "without_all", "without_significant", "without_insignificant", "projected_on_pc")


class NeuronAblationEvaluation(Evaluation):
    command = "neurons-ablate"
    progress_name = "ablation_progress.json"
    cursor = "next_index"
    description = "neuron ablation"

    def __init__(self, loaded, W: np.ndarray, labels: Sequence[int], layer: int, mean, threshold, pca):
        import torch

        from .. import engine
        from ..neurons import neuron_directions

        self.loaded, self.layer, self.labels = loaded, layer, labels
        self.dev = engine.model_device(loaded.model)
        self.W = torch.from_numpy(np.asarray(W, np.float32))
        self.mean = torch.from_numpy(np.asarray(mean, np.float64))
        self.threshold = torch.from_numpy(np.nan_to_num(np.asarray(threshold, np.float64), nan=np.inf))
        self.pca = torch.from_numpy(np.asarray(pca, np.float64))
        self.dirs = neuron_directions(loaded.model, layer)

    def fresh(self) -> dict:
        return {"n": 0, "correct": {v: 0 for v in VARIANTS}}

    def merge(self, states) -> dict:
        return {"n": sum(s["n"] for s in states),
                "correct": {v: sum(s["correct"][v] for s in states) for v in VARIANTS}}

    def resume_message(self, position, total, state) -> str:
        return f"resuming at image {position} of {total} ({state['n']} done)"

    def representations(self, x) -> dict:
        """{variant: [b, d'] the normalised embedding with the layer's effects ablated that way} (double)."""
        import torch

        from ..decomposition import forward_image
        from ..neurons import neuron_effects

        s = neuron_effects(self.loaded.model, x, self.layer, directions=self.dirs).double().cpu()  # [b, W, d']
        with torch.no_grad():
            e = forward_image(self.loaded.model, x).double().cpu()
        r = e / e.norm(dim=-1, keepdim=True)
        c = s - self.mean[None]
        without = r - s.sum(1) + self.mean.sum(0)[None]
        sig = c.norm(dim=-1) > self.threshold[None]  # [b, W]
        return {"baseline": r, "without_all": without,
                "without_significant": without + (c * (~sig)[..., None]).sum(1),
                "without_insignificant": without + (c * sig[..., None]).sum(1),
                "projected_on_pc": without + (torch.einsum("bnd,nd->bn", c, self.pca)[..., None]
                                              * self.pca[None]).sum(1)}

    def score(self, entries: List[Entry]) -> dict:
        import torch

        x = torch.stack([e.value[2] for e in entries]).to(self.dev)
        reps = self.representations(x)
        y = torch.tensor([self.labels[en.value[0]] for en in entries])
        W = self.W.double()
        return {"n": len(entries), "correct": {v: int(((reps[v] @ W).argmax(1) == y).sum()) for v in VARIANTS}}

    def finish(self, state) -> Optional[dict]:
        n = state["n"]
        if n == 0:
            return None
        return {"layer": self.layer, "n_images": n,
                "accuracy": {v: 100.0 * state["correct"][v] / n for v in VARIANTS}}

    def write(self, out: Path, results: dict, state: dict) -> None:
        (out / "neuron_ablation.json").write_text(json.dumps(results, indent=1))
