"""The `textspan` command line (a click group with one verb per job)."""
from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import click

from . import __version__

log = logging.getLogger("textspan")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_options(f):
    """--model / --pretrained / --device, shared by every command that loads a model."""

    @click.option("--model", "model_name", default="shapes", show_default=True,
                  help="open_clip model name (ViT-B-16, ...), 'hf-hub:...', or the built-in 'shapes'.")
    @click.option("--pretrained", default=None,
                  help="open_clip pretrained tag (e.g. laion2b_s34b_b88k) or a local checkpoint file; "
                       "omit for random weights (or the built-in model's own).")
    @click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def run_options(f):
    """--batch-size / --quiet, shared by commands that loop over images."""

    @click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                  help="images per forward pass.")
    @click.option("--quiet", is_flag=True, help="no progress bars; warnings only.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _load(model_name, pretrained, device):
    from .models import UnsupportedModelError, WeightsUnavailableError, load_model

    try:
        return load_model(model_name, pretrained, device=device)
    except (WeightsUnavailableError, UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="textspan")
def main():
    """textspan: explain what the attention heads of CLIP vision transformers do, in words."""


@main.command()
@click.argument("images", type=click.Path(exists=True))
@model_options
@run_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="cache folder.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="storage dtype of the arrays.")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes for decoding images.")
@click.option("--overwrite", is_flag=True, help="replace a cache made with another model or settings.")
def cache(images, model_name, pretrained, device, batch_size, quiet, output, dtype, num_workers, overwrite):
    """Decompose every image in IMAGES (a folder or a list file) and stream the head terms to a cache folder.

    Resumable: rerun the same command after an interruption. Under `torchrun --nproc_per_node K` the images are
    split across K processes and merged into the same arrays.
    """
    from .cache import CacheMismatchError, build_cache, init_distributed
    from .datasets import ImageList
    from .models import describe_pretrained
    from .runinfo import write_run_json

    _setup_logging(quiet)
    t0 = time.time()
    world, rank, device = init_distributed(device or _default_device())
    try:
        image_list = ImageList.from_path(images)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    model, preprocess, _ = _load(model_name, pretrained, device)
    try:
        result = build_cache(model, preprocess, image_list, output, model_name=model_name,
                             pretrained=describe_pretrained(pretrained), batch_size=batch_size, dtype=dtype,
                             num_workers=num_workers, overwrite=overwrite, quiet=quiet)
    except CacheMismatchError as exc:
        raise click.ClickException(str(exc)) from exc
    if rank == 0:
        manifest = json.loads((Path(output) / "manifest.json").read_text())
        write_run_json(output, "cache", dict(images=images, model=model_name, pretrained=pretrained, device=device,
                                             batch_size=batch_size, dtype=dtype, num_workers=num_workers,
                                             world_size=world),
                       model_fingerprint=manifest["fingerprint"], started=t0)
        click.echo(f"{result.rows} images cached in {output} ({len(result.failures)} failed"
                   f"{', resumed at image %d' % result.resumed_from if result.resumed_from else ''})")
        for f in result.failures:
            click.echo(f"  failed: {f['path']}: {f['error']}", err=True)


@main.command("decompose")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--top", default=5, show_default=True, help="layers listed as top contributors in the summary.")
@click.option("--quiet", is_flag=True)
def decompose_cmd(images, model_name, pretrained, device, output, top, quiet):
    """Spatially decompose each IMAGE; save the terms as .npy and a JSON summary.

    Per image: NAME_heads.npy [layer, token, head, d_embed], NAME_mlps.npy [layer + 1, d_embed], and in summary.json
    the identity error (max |sum of terms - e/||e|||, with e from open_clip's own encode_image) and the layers whose
    terms contribute most to the embedding (dot product with e/||e||; all contributions sum to 1).
    """
    import numpy as np
    import torch

    from .datasets import load_rgb
    from .decomposition import decompose
    from .models import fingerprint
    from .runinfo import write_run_json

    _setup_logging(quiet)
    t0 = time.time()
    device = device or _default_device()
    model, preprocess, _ = _load(model_name, pretrained, device)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary, used = [], set()
    for i, path in enumerate(images):
        stem = Path(path).stem
        name = stem if stem not in used else f"{stem}_{i}"
        used.add(name)
        try:
            x = preprocess(load_rgb(path)).unsqueeze(0).to(device)
        except Exception as exc:
            click.echo(f"skipping {path}: {type(exc).__name__}: {exc}", err=True)
            summary.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        with torch.no_grad():
            d = decompose(model, x, spatial=True)
            e = model.encode_image(x) if hasattr(model, "encode_image") else model(x)
        e_hat = e / e.norm(dim=-1, keepdim=True)
        np.save(out / f"{name}_heads.npy", d.heads[0].float().cpu().numpy())
        np.save(out / f"{name}_mlps.npy", d.mlps[0].float().cpu().numpy())
        attn = (d.layer_attention()[0] @ e_hat[0]).cpu()  # [layer]
        mlp = (d.mlps[0] @ e_hat[0]).cpu()  # [layer + 1]
        layers = [{"layer": l, "attention": float(attn[l]), "mlp": float(mlp[l + 1]),
                   "total": float(attn[l] + mlp[l + 1])} for l in range(d.n_layers)]
        heads = d.head_terms()[0] @ e_hat[0]  # [layer, head]
        flat = heads.flatten().abs().argsort(descending=True)[:top]
        summary.append({
            "path": str(path), "name": name,
            "identity_error": float((d.total()[0] - e_hat[0]).abs().max()),
            "embedding_norm": float(d.norm[0]),
            "embedding_term": float(mlp[0]),
            "top_layers": sorted(layers, key=lambda r: -abs(r["total"]))[:top],
            "top_heads": [{"head": f"L{int(k) // d.n_heads}H{int(k) % d.n_heads}", "contribution": float(
                heads.flatten()[k])} for k in flat],
            "layers": layers,
        })
        if not quiet:
            click.echo(f"{path}: identity error {summary[-1]['identity_error']:.2e}; top layers "
                       + ", ".join(f"L{r['layer']} {r['total']:+.3f}" for r in summary[-1]["top_layers"]))
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    write_run_json(out, "decompose", dict(images=list(images), model=model_name, pretrained=pretrained,
                                          device=device), model_fingerprint=fingerprint(model), started=t0)


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON.")
def info(model_name, pretrained, device, as_json):
    """Layers, heads, widths and tokens of a model's image tower."""
    from .models import model_info

    _setup_logging(True)
    model, _, _ = _load(model_name, pretrained, device or "cpu")
    facts = model_info(model).as_dict()
    facts = {"model": model_name, "pretrained": pretrained, **facts}
    if as_json:
        click.echo(json.dumps(facts, indent=1))
    else:
        width = max(len(k) for k in facts)
        for k, v in facts.items():
            click.echo(f"{k:<{width}}  {v}")


@main.command("shapes-world")
@click.option("--n", "n", default=1000, show_default=True, type=click.IntRange(min=1), help="images to generate.")
@click.option("--seed", default=0, show_default=True, help="world seed (a sample is a function of seed and index).")
@click.option("--objects", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--spurious", type=click.Choice(["train", "val", "test"]), default=None,
              help="the Waterbirds-like world: label correlated 95% with background (train/val), balanced (test).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def shapes_world(n, seed, objects, spurious, output):
    """Write generated shapes-world images (ImageFolder layout by shape), their masks and metadata.

    OUTPUT/images/SHAPE/NNNNNN.png, OUTPUT/masks/SHAPE/NNNNNN.png (255 = object), OUTPUT/metadata.csv (path,
    caption and every attribute). Feed OUTPUT/images to `textspan cache`.
    """
    import csv

    from PIL import Image

    from . import world
    from .runinfo import write_run_json

    t0 = time.time()
    out = Path(output)
    spec = None
    if spurious:
        spec = world.Spurious(balanced=(spurious == "test"))
        seed = world.SPLIT_SEEDS[spurious] + seed
    rows = []
    for i in range(n):
        s = world.sample(seed, i, n_objects=int(objects), spurious=spec)
        rel = Path(s.labels["shape"]) / f"{i:06d}.png"
        for sub, arr in (("images", s.image), ("masks", s.mask.astype("uint8") * 255)):
            (out / sub / rel.parent).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(out / sub / rel)
        rows.append({"path": str(Path("images") / rel), "mask": str(Path("masks") / rel), "index": i,
                     "caption": s.caption, **s.labels})
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_run_json(out, "shapes-world", dict(n=n, seed=seed, objects=objects, spurious=spurious), started=t0)
    click.echo(f"{n} images written to {out / 'images'}")


@main.command("eval-shapes")
@click.option("--model", "model_name", default="shapes", show_default=True,
              type=click.Choice(["shapes", "shapes-spurious"]))
@click.option("--pretrained", default=None, help="a training checkpoint instead of the shipped weights.")
@click.option("--n", "n", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option("--seed", default=12345, show_default=True, help="seed of the fresh evaluation images.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def eval_shapes(model_name, pretrained, n, seed, output):
    """Zero-shot accuracy of a built-in model per attribute on N fresh single-object images -> accuracy.json.

    For shapes-spurious, also the per-group, average and worst-group accuracy of the circle/square classifier on a
    balanced split, and a linear probe's accuracy (key "spurious").
    """
    from . import training
    from .models import fingerprint
    from .runinfo import write_run_json

    t0 = time.time()
    model, _, tok = _load(model_name, pretrained, "cpu")
    acc = training.zero_shot_accuracy(model, tok, n=n, seed=seed)
    if model_name == "shapes-spurious":
        acc["spurious"] = training.spurious_report(model, tok, n=n, seed=seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(acc, indent=1))
    write_run_json(out, "eval-shapes", dict(model=model_name, pretrained=pretrained, n=n, seed=seed),
                   model_fingerprint=fingerprint(model), started=t0)
    for k, v in acc.items():
        click.echo(f"{k:<12} {v if isinstance(v, dict) else f'{100 * v:.1f}%'}")


if __name__ == "__main__":  # pragma: no cover
    main()
