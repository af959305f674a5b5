"""The `textspan` commands of the evaluations on the papers' datasets, the benchmark and the neurons (registered on
the group of `textspan.cli`; the same rules: parse options, call one library function, print)."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import _method_options, main
from .cli_options import (cache_model_options, classifier_options, distributed, method_options, model_options, notify,
                          run_options)


_THRESHOLD = click.option("--threshold", default="0.5", show_default=True,
                          help="binarisation of the min-max normalised map: a number in [0, 1) or 'mean'.")


@main.command("neurons")
@click.argument("images", type=click.Path(exists=True))
@model_options
@click.option("--layer", default=-2, show_default=True, type=int,
              help="the MLP's block (negative counts from the end); it needs a later block.")
@click.option("--bank", default=None, help="a text bank (file or built-in name) for the sparse decomposition of each "
              "neuron's direction into texts.")
@click.option("--components", default=32, show_default=True, type=click.IntRange(min=1),
              help="texts per neuron in the sparse decomposition (published 32).")
@click.option("--top-k", default=100, show_default=True, type=click.IntRange(min=1),
              help="largest centred effects per neuron kept for its principal direction (published 100).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@run_options
def neurons(images, model_name, pretrained, device, layer, bank, components, top_k, batch_size, output, overwrite,
            quiet):
    """Second-order effects of one MLP layer's neurons over IMAGES -> their directions, top images and texts
    (resumable)."""
    from .neuron_jobs import analyse_neurons

    r = analyse_neurons(images, output, model_name, pretrained, layer=layer, bank=bank, components=components,
                        top_k=top_k, batch_size=batch_size, device=device, overwrite=overwrite, quiet=quiet,
                        notify=notify)
    click.echo(f"{len(r.pca)} neurons of block {r.layer}: median share of the top effects on one direction "
               f"{r.median_explained:.1%}; written to {output}")


@main.command("neuron-heatmap")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--neurons", "neurons_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="a `textspan neurons` folder.")
@click.option("--ids", default=None, help="neuron ids, comma-separated (default: the --top neurons by mean effect).")
@click.option("--top", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--prompts", "-p", multiple=True, help="a text to project on (default: each neuron's own direction).")
@cache_model_options
@run_options
def neuron_heatmap(images, neurons_dir, ids, top, prompts, model_name, pretrained, device, output, overwrite, quiet):
    """Per-patch second-order effects of neurons on IMAGES -> neuron_N.png (images x directions), maps.npy."""
    from .neuron_jobs import draw_neuron_maps

    r = draw_neuron_maps(list(images), neurons_dir, output, neuron_ids=ids, prompts=prompts, model=model_name,
                         pretrained=pretrained, top=top, device=device, overwrite=overwrite, quiet=quiet)
    click.echo(f"maps of neurons {', '.join(map(str, r.neurons))} of block {r.layer} written to {output}")


@main.command("neurons-ablate")
@click.argument("neurons_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", type=click.Path(exists=True), required=False)
@cache_model_options
@classifier_options
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@run_options
def neurons_ablate(neurons_dir, images, model_name, pretrained, device, classifier, classes, templates, batch_size,
                   output, overwrite, quiet):
    """Zero-shot accuracy on IMAGES (default: the images NEURONS_DIR was made from) with the neurons of NEURONS_DIR
    (from `textspan neurons`) mean-ablated: all, the significant ones, the insignificant ones, or each reduced to its
    principal direction (resumable)."""
    from .neuron_jobs import ablate_neurons

    r = ablate_neurons(neurons_dir, images, output, model_name, pretrained, classes=classes, templates=templates,
                       classifier=classifier, batch_size=batch_size, device=device, overwrite=overwrite, quiet=quiet,
                       notify=notify)
    click.echo("  ".join(f"{k} {v:.2f}%" for k, v in r["accuracy"].items()) + f"  ({r['n_images']} images)")


@main.command("deletion-eval")
@click.argument("images", type=click.Path(exists=True))
@model_options
@classifier_options
@method_options
@click.option("--target", type=click.Choice(["true", "predicted"]), default="true", show_default=True,
              help="the class explained: the class folder's (published *_gt) or the prediction.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--every", default=10, show_default=True, type=click.IntRange(min=1),
              help="classify after every N steps.")
@click.option("--max-side", default=640, show_default=True, type=click.IntRange(min=1),
              help="images whose shorter side is longer are resized to it first (published).")
@click.option("--start", type=click.Choice(["black", "blur"]), default="black", show_default=True,
              help="insertion's first image: black (published) or a blurred copy.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="a seeded sample of N images over the "
              "classes.")
@click.option("--seed", default=0, show_default=True, help="seed of the random colours (and of --limit).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@run_options
def deletion_eval(images, model_name, pretrained, device, classifier, classes, templates, method, method_option,
                  target, steps, every, max_side, start, limit, seed, batch_size, output, overwrite, quiet):
    """Grad-ECLIP's deletion and insertion curves of an explainer -> deletion_insertion.json/.csv/.png (resumable;
    sharded under torchrun)."""
    from .benchmark import evaluate_deletion_insertion

    rank, device = distributed(device)
    r = evaluate_deletion_insertion(images, output, model_name, pretrained, classes=classes, templates=templates,
                                    classifier=classifier, method=method,
                                    options=_method_options(method, method_option), target=target, steps=steps,
                                    every=every, max_side=max_side, start=start, seed=seed, limit=limit,
                                    batch_size=batch_size, device=device, overwrite=overwrite, quiet=quiet,
                                    notify=notify)
    if rank == 0:
        click.echo(f"{method}: deletion AUC {r['deletion_auc']:.2f} (lower is better), insertion AUC "
                   f"{r['insertion_auc']:.2f} (higher is better), top-1; {r['n_images']} images, "
                   f"{len(r['failures'])} failed")


@main.command("imagenet-s-eval")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@model_options
@click.option("--categories", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ImageNetS_categories_im*.txt (default: found beside the data, else the sorted class folders).")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None)
@method_options
@click.option("--target", type=click.Choice(["true", "predicted"]), default="true", show_default=True)
@_THRESHOLD
@click.option("--limit", default=None, type=click.IntRange(min=1), help="the first N images.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@run_options
def imagenet_s_eval(data, model_name, pretrained, device, categories, templates, method, method_option, target,
                    threshold, limit, batch_size, output, overwrite, quiet):
    """ImageNet-S zero-shot segmentation mIoU of an explainer -> imagenet_s.json (resumable; sharded under
    torchrun)."""
    from .benchmark import evaluate_imagenet_s

    rank, device = distributed(device)
    r = evaluate_imagenet_s(data, output, model_name, pretrained, categories=categories, templates=templates,
                            method=method, options=_method_options(method, method_option), target=target,
                            threshold=threshold, limit=limit, batch_size=batch_size, device=device,
                            overwrite=overwrite, quiet=quiet, notify=notify)
    if rank == 0:
        click.echo(f"{method}: mIoU {r['miou']:.2f}% over all {len(r['iou'])} ids (present classes: "
                   f"{r['miou_present']:.2f}%); {r['n_images']} images, {len(r['failures'])} failed")


@main.command("points-eval")
@click.argument("data", type=click.Path(exists=True))
@model_options
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None)
@method_options
@_THRESHOLD
@click.option("--limit", default=None, type=click.IntRange(min=1), help="the first N images.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@run_options
def points_eval(data, model_name, pretrained, device, templates, method, method_option, threshold, limit,
                batch_size, output, overwrite, quiet):
    """p-mIoU of an explainer on OpenImages-V7 point labels -> points.json (resumable; sharded under torchrun)."""
    from .benchmark import evaluate_points

    rank, device = distributed(device)
    r = evaluate_points(data, output, model_name, pretrained, templates=templates, method=method,
                        options=_method_options(method, method_option), threshold=threshold, limit=limit,
                        batch_size=batch_size, device=device, overwrite=overwrite, quiet=quiet, notify=notify)
    if rank == 0:
        click.echo(f"{method}: p-mIoU {r['p_miou']:.2f}% over {r['n_classes']} classes ({r['n_points']} points, "
                   f"{r['n_images']} images, {len(r['failures'])} failed)")
        for note in r.get("notes", []):
            click.echo(f"  note: {note}")


@main.command("benchmark")
@click.argument("data", type=click.Path(exists=True))
@click.option("--methods", default="all", show_default=True,
              help="'all' (every method defined on the model's tower) or comma-separated names.")
@click.option("--evaluations", default=None, help="comma-separated (default: every one the dataset supports).")
@model_options
@click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False),
              help="class names (one per line), for datasets that do not name their classes.")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--limit", default=None, type=click.IntRange(min=1), help="N images per evaluation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@run_options
def benchmark(data, methods, evaluations, model_name, pretrained, device, classes, templates, limit, seed,
              batch_size, output, overwrite, quiet):
    """Every method x every evaluation DATA supports, one resumable folder each -> leaderboard.csv/.md/.png."""
    from .benchmark import run_benchmark

    rank, device = distributed(device)
    r = run_benchmark(data, output, model_name, pretrained, methods=methods, evaluations=evaluations,
                      classes=classes, templates=templates, limit=limit, seed=seed, batch_size=batch_size,
                      device=device, overwrite=overwrite, quiet=quiet, notify=notify)
    if rank == 0:
        click.echo(f"{len(r['methods'])} methods x {', '.join(r['evaluations'])} on {data} ({r['kind']}): "
                   f"{Path(output) / 'leaderboard.md'}")
        click.echo((Path(output) / "leaderboard.md").read_text())


