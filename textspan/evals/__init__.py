"""The evaluations: one scoring module each, registered here, all run by `textspan.evaluation.run_evaluation`.

    segmentation        ImageNet-segmentation protocol (pixel accuracy, mIoU, mAP, pointing)   evals/segmentation.py
    perturbation        positive / negative patch perturbation (Chefer et al. 2021)             evals/perturbation.py
    deletion_insertion  Grad-ECLIP's pixel deletion and insertion curves (top-1/5/10)          evals/deletion.py
    imagenet_s          ImageNet-S semantic segmentation mIoU (ignore label 1000)               evals/imagenet_s.py
    points              OpenImages-V7 point labels, p-mIoU                                      evals/points.py
    neuron_ablation     mean-ablation of neurons' second-order effects (accuracy)                evals/neuron_ablation.py

Adding an evaluation: a module with an `Evaluation` subclass (score / merge / finish / write) and one line in
`EVALUATIONS`; `textspan benchmark` then runs it on every dataset kind that lists it (`textspan.benchmark`).
"""
from __future__ import annotations

EVALUATIONS = {
    "segmentation": "textspan.evals.segmentation:SegmentationEvaluation",
    "perturbation": "textspan.evals.perturbation:PerturbationEvaluation",
    "deletion_insertion": "textspan.evals.deletion:DeletionInsertionEvaluation",
    "imagenet_s": "textspan.evals.imagenet_s:ImageNetSEvaluation",
    "points": "textspan.evals.points:PointsEvaluation",
    "neuron_ablation": "textspan.evals.neuron_ablation:NeuronAblationEvaluation",
}


def get_evaluation(name: str):
    """The `Evaluation` class registered as `name`."""
    import importlib

    from ..errors import BadInputError

    if name not in EVALUATIONS:
        raise BadInputError(f"unknown evaluation {name!r}; known: {', '.join(EVALUATIONS)}")
    module, cls = EVALUATIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)
