"""The `textspan` command line: a click group with one verb per job. Each command parses its options, calls one
library function (`textspan.jobs`, `textspan.image_jobs`) and prints; the work, the files and the guarantees (resume,
refusals, locks, run.json) live in the library. A `TextspanError` becomes a one-line message, never a traceback."""
from __future__ import annotations

import json

import click

from ._version import __version__
from .cli_options import (OUTPUT, OVERWRITE, Group, cache_model_options, classifier_options, distributed,
                          method_options, model_options, notify, options, quiet_option, reference_options, run_options)


def _method_options(method: str, items) -> dict:
    from .methods import get_method, parse_options

    get_method(method)  # an unknown method is refused before any work
    return parse_options(items)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="textspan")
@click.option("--debug", is_flag=True, help="show the traceback of an error (also TEXTSPAN_DEBUG=1) instead of "
                                            "its one-line message.")
def main(debug):
    """textspan: explain what the attention heads of CLIP vision transformers do, in words.

    Exit status: 0 done; 1 a problem with an input, file, folder, disk or device (one line names it); 2 a mistake
    on the command line; 3 an internal error (a bug: rerun with --debug and report it)."""


@main.command()
@click.argument("images", type=click.Path(exists=True))
@model_options
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@OUTPUT
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes for decoding images.")
@OVERWRITE
@click.option("--split", default=None, help="Waterbirds-layout folders only: train, val, test (or 0, 1, 2).")
@quiet_option
def cache(images, model_name, pretrained, device, batch_size, output, dtype, num_workers, overwrite, split, quiet):
    """Decompose every image in IMAGES (a folder or a list file) into a cache folder (resumable; sharded under
    torchrun)."""
    from .cache import init_distributed
    from .jobs import cache_images, default_device

    world, rank, device = init_distributed(device or default_device())
    result = cache_images(images, output, model_name, pretrained, device=device, split=split, batch_size=batch_size,
                          dtype=dtype, num_workers=num_workers, overwrite=overwrite, quiet=quiet)
    if rank == 0:
        click.echo(f"{result.rows} images cached in {output} ({len(result.failures)} failed"
                   f"{', resumed at image %d' % result.resumed_from if result.resumed_from else ''})")
        for f in result.failures:
            click.echo(f"  failed: {f['path']}: {f['error']}", err=True)


@main.command("decompose")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_options
@OUTPUT
@click.option("--top", default=5, show_default=True, help="layers and heads listed as top contributors.")
@OVERWRITE
@quiet_option
def decompose_cmd(images, model_name, pretrained, device, output, top, overwrite, quiet):
    """Spatially decompose each IMAGE -> NAME_heads.npy, NAME_mlps.npy and summary.json."""
    from .jobs import decompose_images

    res = decompose_images(images, output, model_name, pretrained, device=device, top=top, overwrite=overwrite,
                           notify=notify)
    for s in res.images:
        if "error" not in s and not quiet:
            click.echo(f"{s['path']}: identity error {s['identity_error']:.2e}; top layers "
                       + ", ".join(f"L{r['layer']} {r['total']:+.3f}" for r in s["top_layers"]))


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON.")
@quiet_option
def info(model_name, pretrained, device, as_json, quiet):
    """Layers, heads, widths and tokens of a model's image tower."""
    from .jobs import default_device
    from .models import load_model, model_info

    model, _, _ = load_model(model_name, pretrained, device=device or default_device())
    facts = {"model": model_name, "pretrained": pretrained, **model_info(model).as_dict()}
    width = max(len(k) for k in facts)
    click.echo(json.dumps(facts, indent=1) if as_json else "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items()))


@main.command("shapes-world")
@click.option("--n", "n", default=1000, show_default=True, type=click.IntRange(min=1), help="images to generate.")
@click.option("--seed", default=0, show_default=True, help="world seed (a sample is a function of seed and index).")
@click.option("--objects", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--spurious", type=click.Choice(["train", "val", "test"]), default=None,
              help="the Waterbirds-like world: label correlated 95% with background (train/val), balanced (test).")
@click.option("--layout", type=click.Choice(["folders", "imagenet-s", "openimages"]), default="folders",
              show_default=True, help="folders: images/ and masks/ by shape; imagenet-s: the ImageNet-S validation "
              "layout; openimages: OpenImages-V7 point labels sampled from the masks.")
@run_options
def shapes_world(n, seed, objects, spurious, layout, output, overwrite, quiet):
    """Write shapes-world images (ImageFolder layout by shape), masks and metadata.csv (or another dataset's
    layout with --layout)."""
    from .jobs import write_shapes_world

    out = write_shapes_world(output, n, seed=seed, objects=int(objects), spurious=spurious, layout=layout,
                             overwrite=overwrite)
    click.echo(f"{n} images written to {out / 'images' if layout == 'folders' else out} ({layout} layout)")


@main.command("shapes-waterbirds")
@click.option("--n-train", default=2000, show_default=True)
@click.option("--n-val", default=1000, show_default=True)
@click.option("--n-test", default=2000, show_default=True)
@click.option("--correlation", default=0.95, show_default=True, help="label/background agreement in train and val.")
@run_options
def shapes_waterbirds(n_train, n_val, n_test, correlation, output, overwrite, quiet):
    """A Waterbirds-layout dataset from the spurious shapes world (circle 0 / square 1, land 0 / water 1)."""
    from .jobs import write_shapes_waterbirds

    out = write_shapes_waterbirds(output, n_train, n_val, n_test, correlation=correlation, overwrite=overwrite)
    click.echo(f"{n_train + n_val + n_test} images written to {out} (Waterbirds layout)")


@main.command("eval-shapes")
@click.option("--model", "model_name", default="shapes", show_default=True,
              type=click.Choice(["shapes", "shapes-spurious"]))
@click.option("--pretrained", default=None, help="a training checkpoint instead of the shipped weights.")
@click.option("--n", "n", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option("--seed", default=12345, show_default=True, help="seed of the fresh evaluation images.")
@run_options
def eval_shapes(model_name, pretrained, n, seed, output, overwrite, quiet):
    """Zero-shot accuracy of a built-in model per attribute on N fresh images -> accuracy.json."""
    from .jobs import evaluate_shapes

    acc = evaluate_shapes(output, model_name, pretrained, n=n, seed=seed, overwrite=overwrite)
    for k, v in acc.items():
        click.echo(f"{k:<12} {v if isinstance(v, dict) else f'{100 * v:.1f}%'}")


@main.command("encode-texts")
@click.argument("bank")
@model_options
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="FILE.npy (FILE.json records the model fingerprint and the bank; FILE.run.json the run).")
@click.option("--batch-size", default=256, show_default=True)
@quiet_option
def encode_texts_cmd(bank, model_name, pretrained, device, output, batch_size, quiet):
    """Encode a text bank (a file, one entry per line, or a built-in bank name) with the model's text tower."""
    from .jobs import encode_bank

    emb, path = encode_bank(bank, output, model_name, pretrained, device=device, batch_size=batch_size)
    click.echo(f"{emb.shape[0]} texts encoded -> {path} {tuple(emb.shape)}")


_CACHE = click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
_BANK = options(click.option("--bank", default=None, help="text bank file or built-in name (general, shapes)."),
                 click.option("--text-embeddings", default=None, type=click.Path(exists=True, dir_okay=False),
                              help="precomputed embeddings from `encode-texts` (checked against the cache's model)."))


@main.command("label-heads")
@_CACHE
@_BANK
@click.option("--n-texts", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--layers", default="-4:", show_default=True, help="layers to label: '-4:', '0,5,-1', 'all'.")
@click.option("--rank", default=80, show_default=True, type=click.IntRange(min=1))
@click.option("--pool-heads", is_flag=True, help="label the pooling heads of an attention-pooled (SigLIP) cache instead "
              "(written as layer L, one past the trunk: L{L}H{g}).")
@cache_model_options
@run_options
def label_heads_cmd(cache_dir, bank, text_embeddings, n_texts, layers, rank, pool_heads, model_name, pretrained, device,
                    output, overwrite, quiet):
    """Label every head of the chosen layers with TextSpan -> heads.csv, heads.json, heads.md."""
    from .jobs import label_cache

    if not bank and not text_embeddings:
        raise click.ClickException("give --bank or --text-embeddings")
    labels = label_cache(cache_dir, output, bank=bank, text_embeddings=text_embeddings, n_texts=n_texts,
                         layers=layers, rank=rank, pool_heads=pool_heads, model=model_name, pretrained=pretrained,
                         device=device, overwrite=overwrite, quiet=quiet)
    click.echo(f"{len(labels.results)} heads labelled -> {output}/heads.md")


@main.command()
@_CACHE
@_BANK
@classifier_options
@click.option("--n-texts", default="5,10,20,40,60", show_default=True, help="texts per head to try.")
@click.option("--layers", default="-4:", show_default=True, help="the analysed layers.")
@click.option("--rank", default=80, show_default=True)
@reference_options
@cache_model_options
@run_options
def completeness(cache_dir, bank, text_embeddings, classifier, classes, templates, n_texts, layers, rank, reference,
                 same_set, seed, model_name, pretrained, device, output, overwrite, quiet):
    """Accuracy with the heads replaced by their TextSpan reconstructions -> completeness.csv/.json/.png."""
    from .jobs import measure_completeness

    try:
        ms = [int(x) for x in n_texts.split(",")]
    except ValueError:
        raise click.BadParameter(f"{n_texts!r} is not a comma-separated list of numbers", param_hint="--n-texts")
    r = measure_completeness(cache_dir, output, bank=bank, text_embeddings=text_embeddings, classes=classes,
                             templates=templates, classifier=classifier, n_texts=ms, layers=layers, rank=rank,
                             reference=reference, same_set=same_set, seed=seed, model=model_name,
                             pretrained=pretrained, device=device, overwrite=overwrite, quiet=quiet)
    click.echo(f"baseline {r.baseline:.1f}%, heads intact {r.ablated_rest:.1f}%; "
               + ", ".join(f"{m} texts {a:.1f}%" for m, a in sorted(r.by_n_texts.items())) + f" ({r.protocol})")


@main.command()
@_CACHE
@click.option("--head", "head_name", required=True, help="head, e.g. L10H3 (negative layers count from the end).")
@click.option("--text", "query", required=True, help="the text to rank images by.")
@click.option("--top", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--bottom", is_flag=True, help="rank by least similar instead.")
@cache_model_options
@run_options
def retrieve(cache_dir, head_name, query, top, bottom, model_name, pretrained, device, output, overwrite, quiet):
    """Rank the cache's images by the similarity of one head's contribution to a text -> retrieval.csv/.png."""
    from .jobs import retrieve_images

    r = retrieve_images(cache_dir, head_name, query, output, top=top, bottom=bottom, model=model_name,
                        pretrained=pretrained, device=device, overwrite=overwrite, notify=notify)
    click.echo(f"top {len(r.rows)} images for {r.head} / {query!r} -> {output}/retrieval.png")


@main.command()
@_CACHE
@classifier_options
@reference_options
@click.option("--heads", default=None, help="a head set to compare with random sets: L3H1,L2H0,...")
@click.option("--draws", default=5, show_default=True, help="random head sets drawn for the comparison.")
@cache_model_options
@run_options
def ablate(cache_dir, classifier, classes, templates, reference, same_set, seed, heads, draws, model_name, pretrained,
           device, output, overwrite, quiet):
    """Mean-ablation experiments on a cache -> ablations.json, single_heads.csv, accumulated.csv and two plots."""
    from .jobs import ablate_cache

    r = ablate_cache(cache_dir, output, classes=classes, templates=templates, classifier=classifier,
                     reference=reference, same_set=same_set, heads=heads, draws=draws, seed=seed, model=model_name,
                     pretrained=pretrained, device=device, overwrite=overwrite, quiet=quiet).results
    click.echo(f"baseline {r['baseline']:.2f}%  mlps {r['mlps']:.2f}%  " + (
        f"cls_to_cls {r['cls_to_cls']:.2f}%  both {r['mlps_and_cls_to_cls']:.2f}%  " if "cls_to_cls" in r else "")
        + f"({r['protocol']})")


@main.command()
@_CACHE
@classifier_options
@reference_options
@click.option("--labels", "label_column", default="label", show_default=True, help="images.csv column of labels.")
@click.option("--groups", "group_column", default="group", show_default=True, help="images.csv column of groups.")
@click.option("--spurious", "spurious_column", default="place", show_default=True,
              help="images.csv column of the spurious attribute (for --select auto).")
@click.option("--select", type=click.Choice(["explicit", "concept", "auto"]), default="auto", show_default=True)
@click.option("--heads", default=None, help="explicit heads: L3H1,L2H0,...")
@click.option("--concept", default="water, land, an object on water, an object on land", show_default=True,
              help="comma-separated concept texts (--select concept).")
@click.option("--n-heads", default=None, type=int, help="how many heads to choose (auto/concept; default 4).")
@click.option("--threshold", default=None, type=float,
              help="minimum score to choose a head (auto: correlation ratio; concept: variance fraction).")
@click.option("--keep-last", default=4, show_default=True,
              help="generic ablation: heads of all but the last N layers, and all MLP-type terms.")
@click.option("--with-generic", is_flag=True, help="the saved classifier also applies the generic ablation.")
@click.option("--draws", default=5, show_default=True, help="random head sets of the same size.")
@cache_model_options
@run_options
def debias(cache_dir, classifier, classes, templates, reference, same_set, seed, label_column, group_column,
           spurious_column, select, heads, concept, n_heads, threshold, keep_last, with_generic, draws, model_name,
           pretrained, device, output, overwrite, quiet):
    """Mean-ablate the heads that encode a spurious feature: group accuracies and a debiased classifier."""
    from .jobs import debias_cache

    rep = debias_cache(cache_dir, output, reference=reference, same_set=same_set, classes=classes,
                       templates=templates, classifier=classifier, label_column=label_column,
                       group_column=group_column, spurious_column=spurious_column, select=select, heads=heads,
                       concept=concept, n_heads=n_heads, threshold=threshold, keep_last=keep_last,
                       with_generic=with_generic, draws=draws, seed=seed, model=model_name, pretrained=pretrained,
                       device=device, overwrite=overwrite).report
    b, a = rep["baseline"], rep["heads_ablated"]
    click.echo(f"heads {', '.join(rep['heads'])} ({rep['why']})")
    click.echo(f"worst-group {b['worst_group']:.1f}% -> {a['worst_group']:.1f}%, average {b['average']:.1f}% -> "
               f"{a['average']:.1f}%; random heads: best worst-group {rep['random_heads']['best_worst_group']:.1f}%")


_IMAGES = click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
_PROMPTS = click.option("--prompts", "-p", multiple=True, help="a prompt (repeat for several).")


@main.command()
@_IMAGES
@model_options
@_PROMPTS
@click.option("--heads", default=None, help="restrict to heads: L11H3,L10H1.")
@click.option("--layers", default=None, help="restrict to layers: '-4:', '9,10'.")
@click.option("--absolute", is_flag=True, help="raw maps instead of maps relative to the mean over prompts.")
@click.option("--labels", default=None, type=click.Path(exists=True, file_okay=False),
              help="label-heads output: one figure per labelled head with the maps of its top texts (only the "
                   "--heads given, when given).")
@click.option("--top", default=3, show_default=True, help="with --labels: texts per head.")
@click.option("--panel-scale", is_flag=True, help="grid figures: each panel on its own colour scale.")
@click.option("--head-grid", is_flag=True, help="also one grid per prompt of images x heads: head_grid_NN.png.")
@run_options
def heatmap(images, model_name, pretrained, device, prompts, heads, layers, absolute, labels, top, panel_scale,
            head_grid, output, overwrite, quiet):
    """Per-prompt (and per-head) maps from the decomposition -> overlays, maps.npy, grid figures."""
    from .image_jobs import draw_heatmaps

    draw_heatmaps(images, output, prompts, model_name, pretrained, device=device, heads=heads, layers=layers,
                  absolute=absolute, labels=labels, top=top, panel_scale=panel_scale, head_grid=head_grid,
                  overwrite=overwrite, quiet=quiet)
    click.echo(f"maps written to {output}")


@main.command("segment-eval")
@click.argument("data", type=click.Path(exists=True))
@model_options
@classifier_options
@click.option("--target", type=click.Choice(["predicted", "true"]), default="predicted", show_default=True,
              help="the class whose map is evaluated (true: the image's class sub-folder, folder data only).")
@click.option("--samples", default=8, show_default=True, help="overlays saved as examples.")
@method_options
@click.option("--threshold", default="mean", show_default=True,
              help="the prediction: the normalised map above its mean (the protocol) or above a number in [0, 1).")
@click.option("--no-clip", is_flag=True, help="min-max normalise without clipping the map at 0 first.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@run_options
def segment_eval(data, model_name, pretrained, device, classifier, classes, templates, target, samples, method,
                 method_option, threshold, no_clip, batch_size, output, overwrite, quiet):
    """Zero-shot segmentation of DATA (gtsegs_ijcv.mat, or images/ and masks/; masks/REL/CLASS.png per object for
    images with several objects) with an explainer's maps."""
    from .image_jobs import evaluate_segmentation

    rank, device = distributed(device)  # sharded under torchrun
    res = evaluate_segmentation(data, output, model_name, pretrained, classes=classes, templates=templates,
                                classifier=classifier, target=target, samples=samples, method=method,
                                options=_method_options(method, method_option), batch_size=batch_size, device=device,
                                threshold=threshold, clip=not no_clip, overwrite=overwrite, quiet=quiet, notify=notify)
    if rank != 0:
        return
    scored = "maps scored, one per object" if "by_objects" in res else "images"
    pointing = f"pointing {res['pointing']:.1f}%  " if res["pointing"] is not None else ""  # None: rows of old runs
    click.echo(f"pixel accuracy {res['pixel_accuracy']:.2f}%  mIoU {res['miou']:.2f}%  mAP {res['map']:.2f}%  "
               f"{pointing}({res['n_images']} {scored}, {len(res['failures'])} failed)")


@main.command("perturb-eval")
@click.argument("images", type=click.Path(exists=True))
@model_options
@classifier_options
@method_options
@click.option("--limit", default=None, type=click.IntRange(min=1),
              help="use N images: a seeded sample spread over the classes (see --seed).")
@click.option("--seed", default=0, show_default=True, help="seed of the --limit sample.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@run_options
def perturb_eval(images, model_name, pretrained, device, classifier, classes, templates, method, method_option,
                 limit, seed, batch_size, output, overwrite, quiet):
    """Positive/negative perturbation test of an explainer -> perturbation.json/.csv/.png (resumable)."""
    from .image_jobs import evaluate_perturbation

    rank, device = distributed(device)  # sharded under torchrun
    r = evaluate_perturbation(images, output, model_name, pretrained, classes=classes, templates=templates,
                              classifier=classifier, method=method, options=_method_options(method, method_option),
                              limit=limit, seed=seed, batch_size=batch_size, device=device, overwrite=overwrite, quiet=quiet,
                              notify=notify)
    if rank != 0:
        return
    click.echo(f"{method}: positive AUC {r['positive_auc']:.2f} (lower is better), negative AUC "
               f"{r['negative_auc']:.2f} (higher is better); {r['n_images']} images, {len(r['failures'])} failed")


@main.command()
@_IMAGES
@click.option("--methods", default=None, help="comma-separated explainers (default: every method of "
              "textspan.list_methods() defined on the model's tower).")
@click.option("--prompts", "-p", multiple=True, required=True, help="a prompt (repeat for several).")
@model_options
@run_options
def compare(images, methods, prompts, model_name, pretrained, device, output, overwrite, quiet):
    """Every explainer on the same images and prompts -> compare.png, maps_<method>.npy, times.json."""
    from .image_jobs import compare_methods

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    res = compare_methods(images, prompts, output, model_name, pretrained, methods=names, device=device,
                          overwrite=overwrite, quiet=quiet)
    click.echo("  ".join(f"{m} {s:.2f}s" for m, s in res.seconds.items()) + f"\nwritten to {output}")


@main.command()
@_CACHE
@click.option("--labels", required=True, type=click.Path(exists=True, file_okay=False), help="label-heads output.")
@click.option("--ablations", default=None, type=click.Path(exists=True, file_okay=False), help="ablate output.")
@click.option("--images", "n_images", default=6, show_default=True, type=click.IntRange(min=1),
              help="top images shown per text.")
@click.option("--map-images", default=4, show_default=True, type=click.IntRange(min=0),
              help="sample images for each head's maps (0: none).")
@click.option("--neurons", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="a `textspan neurons` folder: a neurons page for its layer (repeat for several).")
@cache_model_options
@run_options
def atlas(cache_dir, labels, ablations, n_images, map_images, neurons, model_name, pretrained, device, output,
          overwrite, quiet):
    """A static web site of the heads (open OUTPUT/index.html): grid, labels, top images, maps, search."""
    from .atlas import build_atlas

    r = build_atlas(cache_dir, labels, output, ablations=ablations, n_images=n_images, map_images=map_images,
                    model=model_name, pretrained=pretrained, device=device, neurons=list(neurons) or None,
                    overwrite=overwrite, notify=notify, quiet=quiet)
    click.echo(f"{r.n_heads} head pages, {r.n_thumbnails} thumbnails, {r.n_maps} map figures, "
               f"{r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s -> {output}/index.html")


from . import cli_eval  # noqa: E402,F401  (registers the evaluation, benchmark and neuron commands)

if __name__ == "__main__":  # pragma: no cover
    main()
