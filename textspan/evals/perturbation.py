"""Positive and negative perturbation (Chefer et al. 2021) as an `Evaluation`: counts of correct zero-shot
predictions with 0%, 10%, ..., 90% of the patches removed, most (positive) or least (negative) relevant first
(`textspan.explain_eval`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation


class PerturbationEvaluation(Evaluation):
    command = "perturb-eval"
    progress_name = "perturbation_progress.json"
    cursor = "next_index"

    def __init__(self, loaded, W: np.ndarray, classnames: Sequence[str], *, method: str = "decomposition",
                 options: Optional[dict] = None, labels: Optional[Sequence[int]] = None, total: int = 0):
        """`labels`: per list index, the classifier column counted as correct (None: the unperturbed
        prediction)."""
        import torch

        from .. import engine, explain_eval

        self.loaded, self.method, self.options = loaded, method, dict(options or {})
        self.classnames = list(classnames)
        self.dev = engine.model_device(loaded.model)
        self.W = torch.from_numpy(W).to(self.dev)
        self.labels = labels
        self.total = total
        self.fractions = explain_eval.FRACTIONS
        self.description = f"perturbation ({method})"

    def fresh(self) -> dict:
        return {"n": 0, "counts": {k: [0] * len(self.fractions) for k in ("positive", "negative")}}

    def merge(self, states) -> dict:
        return {"n": sum(s["n"] for s in states),
                "counts": {k: [int(v) for v in np.sum([s["counts"][k] for s in states], axis=0)]
                           for k in ("positive", "negative")}}

    def resume_message(self, position, total, state) -> str:
        return (f"resuming at image {position} of {total} ({state['n']} done)" if position < total else
                f"all {total} images were done before; writing the results again")

    def empty_error(self, source, failures) -> str:
        return f"no readable images in {getattr(source.items, 'source', '')} ({len(failures)} failed)"

    def score(self, entries: List[Entry]) -> dict:
        import torch

        from .. import engine, explain_eval
        from ..errors import BadInputError

        x = torch.stack([e.value[2] for e in entries]).to(self.dev)
        with torch.no_grad():
            e = engine.library_image_embedding(self.loaded.model, x)
            pred = (torch.nn.functional.normalize(e, dim=-1) @ self.W).argmax(dim=1)
        labels = torch.tensor([self.labels[en.value[0]] for en in entries]) if self.labels is not None \
            else pred.cpu()
        try:
            maps = explain_eval.target_maps(self.loaded.model, x, self.W.t(), pred.tolist(), self.method,
                                            **self.options)
        except TypeError as exc:
            raise BadInputError(f"method {self.method!r}: {exc}") from exc
        c = explain_eval.perturbation_counts(self.loaded.model, x, maps, self.W, labels, self.fractions)
        return {"n": x.shape[0], "counts": {k: v.tolist() for k, v in c.items()}}

    def finish(self, state) -> Optional[dict]:
        from .. import explain_eval

        n = state["n"]
        if n == 0:
            return None
        acc = {k: 100.0 * np.asarray(v, np.int64) / n for k, v in state["counts"].items()}
        steps = [{"fraction": f, "positive_accuracy": float(acc["positive"][i]),
                  "negative_accuracy": float(acc["negative"][i])} for i, f in enumerate(self.fractions)]
        return {"method": self.method, "options": self.options, "n_images": n,
                "target": "class folder" if self.labels is not None else "unperturbed prediction",
                "positive_auc": explain_eval.area_under(self.fractions, acc["positive"]),
                "negative_auc": explain_eval.area_under(self.fractions, acc["negative"]),
                "steps": steps, "removal": "patches set to 0 in the normalised image (preprocessing mean colour)"}

    def write(self, out: Path, results: dict, state: dict) -> None:
        from ..visualize import perturbation_plot

        (out / "perturbation.json").write_text(json.dumps(results, indent=1))
        steps = results["steps"]
        with open(out / "perturbation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(steps[0]))
            w.writeheader()
            w.writerows(steps)
        acc = {k: [s[f"{k}_accuracy"] for s in steps] for k in ("positive", "negative")}
        perturbation_plot(out / "perturbation.png", self.fractions, acc, self.method)
