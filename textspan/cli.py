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


def method_options(f):
    """--method / --option, shared by the commands that evaluate an explainer."""
    from .methods import list_methods

    @click.option("--method", type=click.Choice(list_methods()), default="decomposition", show_default=True,
                  help="the explainer whose maps are evaluated.")
    @click.option("--option", "method_option", multiple=True, metavar="KEY=VALUE",
                  help="an option of the method (repeatable), e.g. layers=all, single_head=true, heads=L3H1.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _parse_method_options(items) -> dict:
    """KEY=VALUE pairs; values parsed as JSON when they are (true, 3, [10, 11]), else kept as strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.ClickException(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _read_images(paths):
    """PIL images of the given files; an unreadable one stops the command with its name."""
    from .datasets import load_rgb

    out = []
    for p in paths:
        try:
            out.append(load_rgb(p))
        except Exception as exc:  # decoding errors come in many types
            raise click.ClickException(f"{p}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    return out


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
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Waterbirds-layout folders only: the split to cache (default: all rows).")
def cache(images, model_name, pretrained, device, batch_size, quiet, output, dtype, num_workers, overwrite, split):
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
        image_list = ImageList.from_path(images, split=split)
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


@main.command("shapes-waterbirds")
@click.option("--n-train", default=2000, show_default=True)
@click.option("--n-val", default=1000, show_default=True)
@click.option("--n-test", default=2000, show_default=True)
@click.option("--correlation", default=0.95, show_default=True, help="label/background agreement in train and val.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def shapes_waterbirds(n_train, n_val, n_test, correlation, output):
    """A Waterbirds-layout dataset from the spurious shapes world: OUTPUT/metadata.csv (img_filename, y, split,
    place, class_name) and OUTPUT/images/. Labels: circle (0) / square (1); place: land (0) / water (1); squares
    go with water in train/val with probability CORRELATION; the test split has the four groups in equal numbers."""
    import csv

    from PIL import Image

    from . import world
    from .runinfo import write_run_json

    t0 = time.time()
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n, code in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        spec = world.Spurious(correlation=correlation, balanced=(split == "test"))
        for i in range(n):
            s = world.sample(world.SPLIT_SEEDS[split], i, spurious=spec)
            name = f"images/{split}_{i:06d}.png"
            Image.fromarray(s.image).save(out / name)
            rows.append({"img_filename": name, "y": s.labels["label"], "split": code,
                         "place": int(s.labels["background"] == "water"),
                         "class_name": world.SPURIOUS_CLASSES[int(s.labels["label"])]})
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_run_json(out, "shapes-waterbirds", dict(n_train=n_train, n_val=n_val, n_test=n_test,
                                                  correlation=correlation), started=t0)
    click.echo(f"{len(rows)} images written to {out} (Waterbirds layout)")


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


def _open_cache(folder):
    from .cache import HeadCache

    try:
        return HeadCache(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _model_for_cache(cache, model_name, pretrained, device):
    """The model a cache was made with (by default from its manifest); refuses one with other weights."""
    from .cache import CacheMismatchError

    name = model_name or cache.manifest["model"]
    pre = pretrained if model_name else (pretrained or cache.manifest.get("pretrained"))
    model, preprocess, tokenizer = _load(name, pre, device or "cpu")
    try:
        cache.check_model(model)
    except CacheMismatchError as exc:
        raise click.ClickException(str(exc)) from exc
    return model, preprocess, tokenizer


def _bank_embeddings(bank_arg, text_embeddings, model, tokenizer, fingerprint):
    from .text import EmbeddingMismatchError, TextBank, bank_embeddings, load_embeddings

    try:
        if text_embeddings:
            bank = TextBank.load(bank_arg) if bank_arg else None
            emb, loaded = load_embeddings(text_embeddings, fingerprint=fingerprint, bank=bank)
            return emb, loaded
        bank = TextBank.load(bank_arg)
        return bank_embeddings(model, tokenizer, bank, fingerprint=fingerprint), bank
    except (FileNotFoundError, ValueError, EmbeddingMismatchError) as exc:
        msg = str(exc)
        if "shapes-world vocabulary" in msg:  # a general bank with a built-in model
            msg = (f"text bank {bank_arg!r} has words the built-in model cannot read; use --bank shapes (the "
                   f"shapes-world bank).\n{msg[:400]}")
        raise click.ClickException(msg) from exc


def cache_model_options(f):
    """--model/--pretrained/--device for commands reading a cache (default: the cache's own model)."""

    @click.option("--model", "model_name", default=None,
                  help="model for the text tower (default: the one recorded in the cache's manifest).")
    @click.option("--pretrained", default=None, help="its pretrained tag or checkpoint (default: the cache's).")
    @click.option("--device", default=None)
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


@main.command("encode-texts")
@click.argument("bank")
@model_options
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="FILE.npy (a FILE.json sidecar records the model fingerprint and the bank).")
@click.option("--batch-size", default=256, show_default=True)
def encode_texts_cmd(bank, model_name, pretrained, device, output, batch_size):
    """Encode a text bank (a file, one entry per line, or a built-in bank name) with the model's text tower."""
    from .models import fingerprint
    from .text import TextBank, encode_texts, save_embeddings

    _setup_logging(False)
    try:
        tb = TextBank.load(bank)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    model, _, tokenizer = _load(model_name, pretrained, device or "cpu")
    emb = encode_texts(model, tokenizer, tb.texts, batch_size=batch_size)
    path = save_embeddings(output, emb, tb, fingerprint(model), model_name)
    click.echo(f"{len(tb)} texts encoded -> {path} {tuple(emb.shape)}")


@main.command("label-heads")
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@click.option("--bank", default=None, help="text bank file or built-in name (e.g. general, shapes).")
@click.option("--text-embeddings", default=None, type=click.Path(exists=True, dir_okay=False),
              help="precomputed embeddings from `encode-texts` (checked against the cache's model).")
@click.option("--n-texts", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--layers", default="-4:", show_default=True, help="layers to label: '-4:', '0,5,-1', 'all'.")
@click.option("--rank", default=80, show_default=True, type=click.IntRange(min=1))
@cache_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True)
def label_heads_cmd(cache_dir, bank, text_embeddings, n_texts, layers, rank, model_name, pretrained, device,
                    output, quiet):
    """Label every head of the chosen layers with TextSpan -> heads.csv, heads.json, heads.md."""
    import csv

    from .span import label_heads, parse_layers
    from .runinfo import write_run_json

    _setup_logging(quiet)
    t0 = time.time()
    if not bank and not text_embeddings:
        raise click.ClickException("give --bank or --text-embeddings")
    cache = _open_cache(cache_dir)
    fp = cache.manifest["fingerprint"]
    model = tokenizer = None
    if not text_embeddings:
        model, _, tokenizer = _model_for_cache(cache, model_name, pretrained, device)
    emb, tb = _bank_embeddings(bank, text_embeddings, model, tokenizer, fp)
    n_layers = cache.manifest["n_layers"]
    try:
        chosen = parse_layers(layers, n_layers)
    except ValueError as exc:
        raise click.ClickException(f"--layers: {exc}") from exc
    if n_texts > len(tb):
        raise click.ClickException(f"--n-texts {n_texts} is more than the {len(tb)} texts of the bank")
    results = label_heads(cache.heads, emb, tb.texts, chosen, n_texts=n_texts, rank=rank, progress=not quiet)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out / "heads.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "rank", "text", "variance_explained", "cumulative"])
        for (l, h), r in sorted(results.items()):
            for k, (t, v, c) in enumerate(zip(r.texts, r.variance_explained, r.cumulative)):
                w.writerow([l, h, k, t, f"{v:.6f}", f"{c:.6f}"])
            records.append({"head": f"L{l}H{h}", "layer": l, "head_index": h,
                            "total_variance": r.total_variance,
                            "texts": [{"rank": k, "text": t, "variance_explained": float(v), "cumulative": float(c)}
                                      for k, (t, v, c) in enumerate(zip(r.texts, r.variance_explained,
                                                                          r.cumulative))]})
    (out / "heads.json").write_text(json.dumps({"cache": str(cache_dir), "bank": tb.source, "rank": rank,
                                                "n_texts": n_texts, "heads": records}, indent=1))
    lines = [f"# TextSpan labels: {cache.manifest['model']} ({len(cache)} images), bank {tb.source}", ""]
    for rec in records:
        top = rec["texts"]
        lines.append(f"## {rec['head']} ({100 * top[-1]['cumulative']:.1f}% of its variance with {len(top)} texts)")
        lines += [f"{t['rank'] + 1}. {t['text']} ({100 * t['variance_explained']:.1f}%)" for t in top]
        lines.append("")
    (out / "heads.md").write_text("\n".join(lines))
    write_run_json(out, "label-heads", dict(cache=cache_dir, bank=bank, text_embeddings=text_embeddings,
                                            n_texts=n_texts, layers=layers, rank=rank),
                   model_fingerprint=fp, started=t0)
    click.echo(f"{len(results)} heads labelled -> {out / 'heads.md'}")


@main.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@click.option("--bank", default=None, help="text bank for TextSpan (default: general; shapes for built-in models).")
@click.option("--text-embeddings", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False),
              help="class names, one per line, in label order (default: the cache's class folders).")
@click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False),
              help="prompt templates with '{}' (default: text_banks/templates.txt; shapes_templates.txt for the "
                   "built-in models).")
@click.option("--n-texts", default="5,10,20,40,60", show_default=True, help="texts per head to try.")
@click.option("--layers", default="-4:", show_default=True, help="the analysed layers.")
@click.option("--rank", default=80, show_default=True)
@click.option("--reference", default=None, type=click.Path(exists=True, file_okay=False),
              help="cache whose means replace ablated terms (default: the evaluated cache itself).")
@cache_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True)
def completeness(cache_dir, bank, text_embeddings, classes, templates, n_texts, layers, rank, reference,
                 model_name, pretrained, device, output, quiet):
    """Zero-shot accuracy with the analysed heads replaced by their TextSpan reconstructions (the rest
    mean-ablated), against the baseline, per number of texts -> completeness.csv, completeness.json, .png."""
    import csv

    from . import span
    from .runinfo import write_run_json

    _setup_logging(quiet)
    t0 = time.time()
    cache = _open_cache(cache_dir)
    fp = cache.manifest["fingerprint"]
    model, _, tokenizer = _model_for_cache(cache, model_name, pretrained, device)
    default_bank = "shapes" if _is_builtin(model_name or cache.manifest["model"]) else "general"
    emb, tb = _bank_embeddings(bank or default_bank, text_embeddings, model, tokenizer, fp)
    W, classnames = _classifier(cache, None, classes, templates, model_name, pretrained, device)
    ms = sorted({int(x) for x in n_texts.split(",")})
    chosen = span.parse_layers(layers, cache.manifest["n_layers"])
    results = span.label_heads(cache.heads, emb, tb.texts, chosen, n_texts=max(ms), rank=rank, progress=not quiet)
    ref = _open_cache(reference) if reference else None
    if ref is not None and ref.manifest["fingerprint"] != fp:
        raise click.ClickException(f"--reference {reference} was made with another model")
    acc = span.completeness(cache.heads, cache.mlps, cache.embeddings, W, cache.labels, results, ms,
                            ref_heads=ref.heads if ref else None, ref_mlps=ref.mlps if ref else None)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "completeness.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["n_texts", "accuracy"])
        for m in ms:
            w.writerow([m, f"{acc['by_n_texts'][m]:.3f}"])
    (out / "completeness.json").write_text(json.dumps({"baseline": acc["baseline"],
                                                       "ablated_rest": acc["ablated_rest"],
                                                       "by_n_texts": {str(k): v for k, v in acc["by_n_texts"].items()},
                                                       "layers": chosen, "bank": tb.source}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ms, [acc["by_n_texts"][m] for m in ms], "o-", label="TextSpan reconstruction")
    ax.axhline(acc["baseline"], color="k", ls="--", label="baseline")
    ax.axhline(acc["ablated_rest"], color="gray", ls=":", label="heads intact, rest mean-ablated")
    ax.set_xlabel("texts per head")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "completeness.png", dpi=120)
    plt.close(fig)
    write_run_json(out, "completeness", dict(cache=cache_dir, bank=bank, n_texts=n_texts, layers=layers,
                                             rank=rank, reference=reference), model_fingerprint=fp, started=t0)
    click.echo(f"baseline {acc['baseline']:.1f}%, heads intact {acc['ablated_rest']:.1f}%; "
               + ", ".join(f"{m} texts {acc['by_n_texts'][m]:.1f}%" for m in ms))


@main.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@click.option("--head", "head_name", required=True, help="head, e.g. L10H3 (negative layers count from the end).")
@click.option("--text", "query", required=True, help="the text to rank images by.")
@click.option("--top", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--bottom", is_flag=True, help="rank by least similar instead.")
@cache_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def retrieve(cache_dir, head_name, query, top, bottom, model_name, pretrained, device, output):
    """Rank the cache's images by the similarity of one head's contribution to a text -> retrieval.csv/.png."""
    import csv

    import numpy as np

    from .datasets import load_rgb
    from .runinfo import write_run_json
    from .span import parse_heads
    from .text import encode_texts

    t0 = time.time()
    cache = _open_cache(cache_dir)
    try:
        (layer, head), = parse_heads(head_name, cache.manifest["n_layers"], cache.manifest["n_heads"])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    model, _, tokenizer = _model_for_cache(cache, model_name, pretrained, device)
    try:
        t = encode_texts(model, tokenizer, [query])[0]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    scores = np.asarray(cache.heads[:, layer, head], dtype=np.float64) @ t
    order = np.argsort(scores if bottom else -scores, kind="stable")[:top]
    images = cache.images
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "retrieval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "row", "path", "score"])
        for k, i in enumerate(order):
            w.writerow([k, int(i), images["path"][i], f"{scores[i]:.6f}"])
    from .visualize import contact_sheet

    thumbs = []
    for i in order:
        try:
            thumbs.append((load_rgb(images["path"][i]), f"{scores[i]:+.3f}"))
        except Exception as exc:  # a file moved since caching: keep the CSV, skip its thumbnail
            log.warning("cannot show %s: %s", images["path"][i], exc)
    contact_sheet(thumbs, out / "retrieval.png", title=f"L{layer}H{head}: {query}")
    write_run_json(out, "retrieve", dict(cache=cache_dir, head=head_name, text=query, top=top, bottom=bottom),
                   model_fingerprint=cache.manifest["fingerprint"], started=t0)
    click.echo(f"top {len(order)} images for L{layer}H{head} / {query!r} -> {out / 'retrieval.png'}")


def classifier_options(f):
    @click.option("--classifier", "classifier_file", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="a [d_embed, classes] .npy zero-shot classifier (else built from --classes/--templates).")
    @click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="class names, one per line, in label order (default: the cache's classes).")
    @click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="prompt templates with '{}' (default: text_banks/templates.txt, or shapes_templates.txt for "
                       "the built-in models).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _is_builtin(model_name) -> bool:
    from .models import BUILTIN_MODELS

    return model_name in BUILTIN_MODELS


def _default_templates(model_name):
    """text_banks/templates.txt, or the shapes-world templates for the built-in models."""
    from .text import BANK_DIR

    return BANK_DIR / ("shapes_templates.txt" if _is_builtin(model_name) else "templates.txt")


def _classifier(cache, classifier_file, classes, templates, model_name, pretrained, device):
    """(W [d', C], class names) from a .npy or built with the cache's model."""
    import numpy as np

    from .zeroshot import build_classifier, read_lines, read_templates

    classnames = read_lines(classes, "classes") if classes else list(cache.manifest.get("classes") or [])
    if classifier_file:
        W = np.load(classifier_file)
        if W.ndim != 2 or W.shape[0] != cache.manifest["d_embed"]:
            raise click.ClickException(f"{classifier_file}: expected [{cache.manifest['d_embed']}, classes], "
                                       f"got {W.shape}")
        return W.astype(np.float32), classnames or [str(i) for i in range(W.shape[1])]
    if not classnames:
        raise click.ClickException("the cache has no class names: give --classes or --classifier")
    tmpl = read_templates(templates or _default_templates(model_name or cache.manifest["model"]))
    model, _, tokenizer = _model_for_cache(cache, model_name, pretrained, device)
    try:
        return build_classifier(model, tokenizer, classnames, tmpl), classnames
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _reference(cache, reference, same_set, seed=0):
    """(term arrays for means, eval rows, ref rows, protocol): another cache, the set itself, or a seeded split."""
    from .ablation import split_rows

    if reference and same_set:
        raise click.ClickException("--reference and --same-set exclude each other")
    if reference:
        ref = _open_cache(reference)
        if ref.manifest["fingerprint"] != cache.manifest["fingerprint"]:
            raise click.ClickException(f"--reference {reference} was made with another model")
        return ref, None, None, f"means from {reference}"
    if same_set:
        return cache, None, None, "means from the evaluation set itself (published protocol)"
    ref_rows, eval_rows = split_rows(len(cache), 0.5, seed)
    return cache, eval_rows, ref_rows, f"means from a seeded half of the cache (seed {seed}), evaluated on the other"


@main.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@classifier_options
@click.option("--reference", default=None, type=click.Path(exists=True, file_okay=False),
              help="cache whose means replace ablated terms.")
@click.option("--same-set", is_flag=True, help="take the means over the evaluation set itself (published protocol).")
@click.option("--heads", "head_spec", default=None, help="a head set to compare with random sets: L3H1,L2H0,...")
@click.option("--draws", default=5, show_default=True, help="random head sets drawn for the comparison.")
@click.option("--seed", default=0, show_default=True)
@cache_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def ablate(cache_dir, classifier_file, classes, templates, reference, same_set, head_spec, draws, seed, model_name,
           pretrained, device, output):
    """Mean-ablation experiments on a cache -> ablations.json, single_heads.csv, accumulated.csv and two plots."""
    import csv

    from . import ablation
    from .runinfo import write_run_json
    from .span import parse_heads
    from .visualize import head_heatmap, line_plot

    _setup_logging(True)
    t0 = time.time()
    cache = _open_cache(cache_dir)
    W, classnames = _classifier(cache, classifier_file, classes, templates, model_name, pretrained, device)
    ref, eval_rows, ref_rows, protocol = _reference(cache, reference, same_set, seed)
    labels = cache.labels if eval_rows is None else cache.labels[eval_rows]
    t = ablation.term_logits(cache.heads, cache.cls_to_cls, cache.mlps, W, rows=eval_rows, ref_heads=ref.heads,
                             ref_cls=ref.cls_to_cls, ref_mlps=ref.mlps, ref_rows=ref_rows)
    res = ablation.standard_ablations(t, labels)
    single = ablation.single_head_importance(t, labels)
    res["single_heads"] = single.tolist()
    res["protocol"] = protocol
    res["n_evaluated"] = int(len(labels))
    if head_spec:
        try:
            chosen = parse_heads(head_spec, t.n_layers, t.n_heads)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        res["head_set"] = dict(heads=head_spec, **ablation.head_set_comparison(t, labels, chosen, draws, seed))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(res, indent=1))
    with open(out / "single_heads.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "accuracy", "drop"])
        for l in range(single.shape[0]):
            for h in range(single.shape[1]):
                w.writerow([l, h, f"{single[l, h]:.3f}", f"{res['baseline'] - single[l, h]:.3f}"])
    with open(out / "accumulated.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layers_ablated_up_to", "accuracy"])
        for k, a in enumerate(res["accumulated"]):
            w.writerow([k - 1, f"{a:.3f}"])
    line_plot(list(range(-1, len(res["accumulated"]) - 1)), res["accumulated"], out / "accumulated.png",
              xlabel="attention of layers 0..l mean-ablated (l = -1: none)", ylabel="zero-shot accuracy (%)",
              hline=res["baseline"])
    head_heatmap(res["baseline"] - single, out / "head_importance.png", title="accuracy drop when mean-ablated (pts)")
    write_run_json(out, "ablate", dict(cache=cache_dir, reference=reference, same_set=same_set, heads=head_spec,
                                       draws=draws, seed=seed), model_fingerprint=cache.manifest["fingerprint"],
                   started=t0)
    click.echo(f"baseline {res['baseline']:.2f}%  mlps {res['mlps']:.2f}%  cls_to_cls {res['cls_to_cls']:.2f}%  "
               f"both {res['mlps_and_cls_to_cls']:.2f}%  ({protocol})")


@main.command()
@click.argument("cache_dir", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@classifier_options
@click.option("--reference", default=None, type=click.Path(exists=True, file_okay=False),
              help="cache (e.g. the validation split) for the means and for choosing heads.")
@click.option("--same-set", is_flag=True, help="take means over the evaluation set itself (published protocol).")
@click.option("--labels", "label_col", default="label", show_default=True, help="images.csv column of labels.")
@click.option("--groups", "group_col", default="group", show_default=True, help="images.csv column of groups.")
@click.option("--spurious", "spurious_col", default="place", show_default=True,
              help="images.csv column of the spurious attribute (for --select auto).")
@click.option("--select", type=click.Choice(["explicit", "concept", "auto"]), default="auto", show_default=True)
@click.option("--heads", "head_spec", default=None, help="explicit heads: L3H1,L2H0,...")
@click.option("--concept", default="water, land, an object on water, an object on land",
              show_default=True, help="comma-separated concept texts (--select concept).")
@click.option("--n-heads", default=None, type=int, help="how many heads to choose (auto/concept).")
@click.option("--threshold", default=None, type=float,
              help="minimum score to choose a head (auto: correlation ratio; concept: variance fraction).")
@click.option("--keep-last", default=4, show_default=True,
              help="generic ablation: heads of all but the last N layers, and all MLP-type terms.")
@click.option("--with-generic", is_flag=True, help="the saved classifier also applies the generic ablation.")
@click.option("--draws", default=5, show_default=True, help="random head sets of the same size.")
@click.option("--seed", default=0, show_default=True)
@cache_model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def debias(cache_dir, classifier_file, classes, templates, reference, same_set, label_col, group_col, spurious_col,
           select, head_spec, concept, n_heads, threshold, keep_last, with_generic, draws, seed, model_name,
           pretrained, device, output):
    """Remove a spurious feature by mean-ablating the heads that encode it; report per-group, average and
    worst-group accuracy before/after (against random heads, with/without generic ablations) and save a reusable
    debiased classifier (debiased_classifier.json/.npz)."""
    import csv

    import numpy as np

    from . import ablation, debias as db
    from .runinfo import write_run_json
    from .span import parse_heads
    from .text import encode_texts

    _setup_logging(True)
    t0 = time.time()
    cache = _open_cache(cache_dir)
    W, classnames = _classifier(cache, classifier_file, classes, templates, model_name, pretrained, device)
    ref, eval_rows, ref_rows, protocol = _reference(cache, reference, same_set, seed)
    table = cache.images
    for col in (label_col, group_col):
        if col not in table.columns:
            raise click.ClickException(f"{cache_dir}/images.csv has no column {col!r} (columns: {list(table.columns)})")
    labels = table[label_col].to_numpy().astype(int)
    groups = table[group_col].astype(str).to_numpy()
    if eval_rows is not None:
        labels, groups = labels[eval_rows], groups[eval_rows]
    L, H = cache.manifest["n_layers"], cache.manifest["n_heads"]
    scores = None
    if select == "explicit":
        if not head_spec:
            raise click.ClickException("--select explicit needs --heads")
        try:
            chosen = parse_heads(head_spec, L, H)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        why = "given explicitly"
    elif select == "auto":
        ref_table = ref.images
        if spurious_col not in ref_table.columns:
            raise click.ClickException(f"the reference images.csv has no column {spurious_col!r}")
        attr = ref_table[spurious_col].astype(str).to_numpy()
        attr = attr if ref_rows is None else attr[ref_rows]
        scores = db.head_scores_auto(ref.heads, attr, rows=ref_rows)
        chosen = db.top_heads(scores, n_heads if n_heads or threshold is not None else 4, threshold)
        why = f"largest correlation ratio of the head's outputs with {spurious_col!r} on the reference set"
    else:
        texts = [t.strip() for t in concept.split(",") if t.strip()]
        model, _, tokenizer = _model_for_cache(cache, model_name, pretrained, device)
        try:
            emb = encode_texts(model, tokenizer, texts)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        scores = db.head_scores_concept(ref.heads, emb, rows=ref_rows)
        chosen = db.top_heads(scores, n_heads if n_heads or threshold is not None else 4, threshold)
        why = f"largest fraction of variance in the span of the concept texts {texts}"
    if not chosen:
        raise click.ClickException("no head was selected (lower --threshold?)")
    t = ablation.term_logits(cache.heads, cache.cls_to_cls, cache.mlps, W, rows=eval_rows, ref_heads=ref.heads,
                             ref_cls=ref.cls_to_cls, ref_mlps=ref.mlps, ref_rows=ref_rows)
    generic = dict(layers=list(range(max(0, L - keep_last))), mlps=True)
    metrics = lambda logits: db.group_metrics(logits.argmax(axis=1), labels, groups)  # noqa: E731
    report = {"protocol": protocol, "heads": [f"L{l}H{h}" for l, h in chosen], "selection": select, "why": why,
              "baseline": metrics(t.base), "heads_ablated": metrics(ablation.ablate_heads(t, chosen)),
              "generic_ablated": metrics(ablation.ablate_heads(t, [], **generic)),
              "heads_and_generic_ablated": metrics(ablation.ablate_heads(t, chosen, **generic)),
              "generic": {"layers": generic["layers"], "mlps": True}}
    for name, kw in (("random_heads", {}), ("random_heads_and_generic", generic)):
        runs = [metrics(ablation.ablate_heads(t, s, **kw)) for s in
                ablation.random_head_sets(L, H, len(chosen), draws, seed)]
        report[name] = {"worst_group": [r["worst_group"] for r in runs], "average": [r["average"] for r in runs],
                        "best_worst_group": max(r["worst_group"] for r in runs),
                        "mean_worst_group": float(np.mean([r["worst_group"] for r in runs])),
                        "mean_average": float(np.mean([r["average"] for r in runs]))}
    if scores is not None:
        report["scores"] = {f"L{l}H{h}": float(scores[l, h]) for l in range(L) for h in range(H)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    clf = db.DebiasedClassifier.from_reference(
        ref.heads if ref_rows is None else ref.heads[ref_rows], ref.mlps if ref_rows is None else ref.mlps[ref_rows],
        W, classnames, chosen, cache.manifest["fingerprint"], layers=generic["layers"] if with_generic else (),
        mlps=with_generic, model=cache.manifest["model"], pretrained=cache.manifest.get("pretrained"),
        info={"selection": select, "why": why, "protocol": protocol})
    clf.save(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    with open(out / "groups.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "group", "accuracy"])
        for setting in ("baseline", "heads_ablated", "generic_ablated", "heads_and_generic_ablated"):
            for g, a in report[setting]["per_group"].items():
                w.writerow([setting, g, f"{a:.3f}"])
            w.writerow([setting, "average", f"{report[setting]['average']:.3f}"])
            w.writerow([setting, "worst_group", f"{report[setting]['worst_group']:.3f}"])
    write_run_json(out, "debias", dict(cache=cache_dir, reference=reference, select=select, heads=head_spec,
                                       concept=concept, n_heads=n_heads, threshold=threshold, keep_last=keep_last,
                                       draws=draws, seed=seed), model_fingerprint=cache.manifest["fingerprint"],
                   started=t0)
    b, a = report["baseline"], report["heads_ablated"]
    click.echo(f"heads {', '.join(report['heads'])} ({why})")
    click.echo(f"worst-group {b['worst_group']:.1f}% -> {a['worst_group']:.1f}%, average {b['average']:.1f}% -> "
               f"{a['average']:.1f}%; random heads: best worst-group {report['random_heads']['best_worst_group']:.1f}%")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_options
@click.option("--prompts", "-p", multiple=True, help="a prompt (repeat for several).")
@click.option("--heads", "head_spec", default=None, help="restrict to heads: L11H3,L10H1.")
@click.option("--layers", default=None, help="restrict to layers: '-4:', '9,10'.")
@click.option("--absolute", is_flag=True, help="raw maps instead of maps relative to the mean over prompts.")
@click.option("--labels", "labels_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="label-heads output: one figure per labelled head with the maps of its top texts.")
@click.option("--top", default=3, show_default=True, help="with --labels: texts per head.")
@click.option("--panel-scale", is_flag=True, help="grid figures: each panel on its own colour scale.")
@click.option("--head-grid", is_flag=True,
              help="also one grid per prompt of images x heads (each listed head alone): head_grid_NN.png.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def heatmap(images, model_name, pretrained, device, prompts, head_spec, layers, absolute, labels_dir, top, panel_scale,
            head_grid, output):
    """Per-prompt spatial maps from the decomposition: an overlay PNG per image and prompt, the raw maps (.npy) and
    one grid PNG; with --labels, a figure per head for its top TextSpan texts."""
    import numpy as np
    import torch

    from .heatmaps import heatmaps as make_maps
    from .models import fingerprint, model_info
    from .runinfo import write_run_json
    from .text import encode_texts
    from .visualize import overlay, overlay_grid

    _setup_logging(True)
    t0 = time.time()
    if not prompts and not labels_dir:
        raise click.ClickException("give --prompts and/or --labels")
    model, preprocess, tokenizer = _load(model_name, pretrained, device or "cpu")
    pil = _read_images(images)
    x = torch.stack([preprocess(im) for im in pil]).to(next(model.parameters()).device)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(p).stem for p in images]
    shown = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]  # the maps live on the preprocessed frame
    if prompts:
        try:
            T = torch.from_numpy(encode_texts(model, tokenizer, list(prompts)))
            maps = make_maps(model, x, T, heads=head_spec, layers=layers, relative=not absolute).cpu().numpy()
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        np.save(out / "maps.npy", maps)
        for i, name in enumerate(names):
            for j, prompt in enumerate(prompts):
                overlay(shown[i], maps[i, j]).save(out / f"{name}_{j:02d}.png")
        overlay_grid(shown, maps, names, list(prompts), out / "grid.png",
                     title=("relative " if not absolute else "") + "decomposition maps", shared_scale=not panel_scale)
        if head_grid:
            if not head_spec:
                raise click.ClickException("--head-grid needs --heads")
            from .span import parse_heads

            info = model_info(model)
            pairs = parse_heads(head_spec, info.n_layers, info.n_heads)
            per_head = np.stack([make_maps(model, x, T, heads=[p], relative=not absolute).cpu().numpy()
                                 for p in pairs], axis=2)  # [b, k, heads, g, g]
            for j, prompt in enumerate(prompts):
                overlay_grid(shown, per_head[:, j], names, [f"L{l}H{h}" for l, h in pairs],
                             out / f"head_grid_{j:02d}.png", title=f"{prompt!r} per head",
                             shared_scale=not panel_scale)
    if labels_dir:
        spec = json.loads((Path(labels_dir) / "heads.json").read_text())
        for rec in spec["heads"]:
            texts = [t["text"] for t in rec["texts"][:top]]
            T = torch.from_numpy(encode_texts(model, tokenizer, texts))
            m = make_maps(model, x, T, heads=rec["head"], relative=not absolute).cpu().numpy()
            np.save(out / f"{rec['head']}.npy", m)
            overlay_grid(shown, m, names, texts, out / f"{rec['head']}.png", title=f"{rec['head']}: top texts",
                         shared_scale=not panel_scale)
    write_run_json(out, "heatmap", dict(images=list(images), model=model_name, pretrained=pretrained,
                                        prompts=list(prompts), heads=head_spec, layers=layers, absolute=absolute,
                                        labels=labels_dir), model_fingerprint=fingerprint(model), started=t0)
    click.echo(f"maps written to {out}")


@main.command("segment-eval")
@click.argument("data", type=click.Path(exists=True))
@model_options
@click.option("--classifier", "classifier_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="[d_embed, classes] .npy (else --classes/--templates).")
@click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["predicted", "true"]), default="predicted", show_default=True,
              help="the class whose map is evaluated (true: the image's class sub-folder, folder data only).")
@click.option("--samples", default=8, show_default=True, help="overlays saved as examples.")
@method_options
@click.option("--batch-size", default=16, show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True)
@click.option("--overwrite", is_flag=True, help="start afresh over an unfinished run made with other settings.")
def segment_eval(data, model_name, pretrained, device, classifier_file, classes, templates, target, samples,
                 method, method_option, batch_size, output, quiet, overwrite):
    """Zero-shot segmentation with an explainer's maps (default: the decomposition): DATA is gtsegs_ijcv.mat or a
    folder with images/ and masks/ (same relative paths). Map of the chosen class (decomposition: minus the mean over
    classes), clipped at 0, min-max normalised, thresholded at its mean -> segmentation.json (pixel_accuracy, miou,
    map), per-image CSV, sample overlays. Per-image results are saved after every batch (segment_progress.json):
    rerun the same command to resume an interrupted run."""
    import csv
    import hashlib

    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from . import segmentation as seg
    from .cache import write_json_atomic
    from .decomposition import project
    from .explain_eval import target_maps
    from .heatmaps import patch_maps
    from .metrics import aggregate_segmentation, normalise_map, segmentation_row
    from .models import fingerprint, model_info
    from .runinfo import write_run_json
    from .visualize import overlay, upsample

    _setup_logging(quiet)
    t0 = time.time()
    model, preprocess, tokenizer = _load(model_name, pretrained, device or "cpu")
    dev = next(model.parameters()).device
    W, classnames = _zero_shot_classifier(model, tokenizer, model_name, classifier_file, classes, templates)
    T = torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float32))
    grid = model_info(model).grid_size
    is_mat = Path(data).is_file()
    if target == "true" and is_mat:
        raise click.ClickException("--target true needs class sub-folders (folder data); the .mat has no labels")
    options = _parse_method_options(method_option)
    try:
        if is_mat:
            data_id = f"{Path(data).resolve()} ({Path(data).stat().st_size} bytes, {seg.mat_entries(data)} entries)"
        else:
            listed = seg.folder_images(data)
            data_id = hashlib.sha256("\n".join(str(q.relative_to(Path(data))) for q in listed).encode()).hexdigest()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    fp = fingerprint(model)
    settings = _eval_settings(model_name, pretrained, fp, method, options, W, classnames, data=data_id, target=target)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    progress_file = out / "segment_progress.json"
    progress = _saved_progress(progress_file, settings, overwrite, "segment-eval",
                               dict(next_entry=0, rows=[], failures=[], samples=0))
    rows, failures = progress["rows"], progress["failures"]
    consumed = progress["next_entry"]
    if consumed:
        click.echo(f"resuming after {consumed} entries ({len(rows)} images scored)", err=True)
    entries = seg.iter_mat(data, start=consumed) if is_mat else seg.iter_folder(data, start=consumed)
    to_mask = seg.mask_transform(preprocess)
    pending = []

    def save():
        progress["next_entry"] = consumed
        write_json_atomic(progress_file, progress)

    def flush():
        x = torch.stack([preprocess(im) for _, im, _ in pending]).to(dev)
        if method == "decomposition" and not options:
            p = project(model, x, T)  # one forward gives the maps and the zero-shot logits
            rel = patch_maps(p, grid, relative=False)  # [b, C, g, g]
            logits = p.total()  # (e / ||e||) @ W
        else:
            logits = torch.nn.functional.normalize(model.encode_image(x).detach(), dim=-1) @ T.t().to(x.dtype)
        chosen = []
        for k, (name, im, mask) in enumerate(pending):
            if target == "true":
                cls = name.split("/")[0]
                if cls not in classnames:
                    failures.append({"item": name, "error": f"class folder {cls!r} is not in --classes"})
                    continue
                chosen.append((k, classnames.index(cls)))
            else:
                chosen.append((k, int(logits[k].argmax())))
        if not chosen:
            pending.clear()
            save()
            return
        if method == "decomposition" and not options:
            class_maps = torch.stack([rel[k, c] - rel[k].mean(dim=0) for k, c in chosen])
        else:
            picked = [k for k, _ in chosen]
            try:
                class_maps = target_maps(model, x[picked], T, [c for _, c in chosen], method, **options)
            except (TypeError, ValueError) as exc:
                raise click.ClickException(f"--method {method}: {exc}") from exc
        for (k, c), m in zip(chosen, class_maps):
            name, im, mask = pending[k]
            up = upsample(m.cpu(), x.shape[-2:]).numpy()
            rows.append({"item": name, "index": len(rows), **segmentation_row(normalise_map(up), mask)})
            if progress["samples"] < samples:
                shown = im.resize((x.shape[-1], x.shape[-2]))
                overlay(shown, m.cpu().numpy()).save(out / f"sample_{progress['samples']:02d}.png")
                progress["samples"] += 1
        pending.clear()
        save()  # a batch's rows are saved whole or not at all

    for name, im, mask, err in tqdm(entries, disable=quiet, desc="segmentation", unit="img"):
        consumed += 1
        if err is not None:
            failures.append({"item": str(name), "error": err})
            continue
        aligned = seg.mask_array(to_mask(Image.fromarray(mask.astype(np.uint8) * 255)))
        pending.append((str(name), im, aligned))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    save()
    if not rows:
        raise click.ClickException(f"no usable entries in {data} ({len(failures)} failed)")
    res = aggregate_segmentation(rows)
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res["failures"] = failures
    (out / "segmentation.json").write_text(json.dumps(res, indent=1))
    write_run_json(out, "segment-eval", dict(data=data, model=model_name, pretrained=pretrained, target=target,
                                             method=method, options=options),
                   model_fingerprint=fp, started=t0)
    click.echo(f"pixel accuracy {res['pixel_accuracy']:.2f}%  mIoU {res['miou']:.2f}%  mAP {res['map']:.2f}%  "
               f"({res['n_images']} images, {len(failures)} failed)")


def _zero_shot_classifier(model, tokenizer, model_name, classifier_file, classes, templates):
    """(W [d', C] float32, class names) from a .npy, or built from --classes / --templates."""
    import numpy as np

    from .zeroshot import build_classifier, read_lines, read_templates

    if classifier_file:
        W = np.load(classifier_file)
        classnames = read_lines(classes, "classes") if classes else [str(i) for i in range(W.shape[1])]
        if W.ndim != 2 or len(classnames) != W.shape[1]:
            raise click.ClickException(f"{classifier_file}: expected [d_embed, {len(classnames)}], got {W.shape}")
        return W.astype(np.float32), classnames
    if not classes:
        raise click.ClickException("give --classifier or --classes (and optionally --templates)")
    classnames = read_lines(classes, "classes")
    try:
        return build_classifier(model, tokenizer, classnames, read_templates(templates or
                                                                             _default_templates(model_name))), \
            classnames
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("perturb-eval")
@click.argument("images", type=click.Path(exists=True))
@model_options
@click.option("--classifier", "classifier_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="[d_embed, classes] .npy (else --classes/--templates).")
@click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False),
              help="class names, one per line (matched to the images' class sub-folders).")
@click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False))
@method_options
@click.option("--limit", default=None, type=click.IntRange(min=1), help="use the first N images only.")
@run_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="start afresh over an unfinished run made with other settings.")
def perturb_eval(images, model_name, pretrained, device, classifier_file, classes, templates, method, method_option,
                 limit, batch_size, quiet, output, overwrite):
    """Positive and negative perturbation: remove the most (positive) or least (negative) relevant patches for the
    predicted class, 10% .. 90% in steps of 10%, and measure zero-shot accuracy at each step (against the class
    sub-folder when the images have one, else against the unperturbed prediction). A removed patch is set to 0 in
    the normalised image (the preprocessing mean colour), the same for every method. Writes perturbation.json
    (positive_auc, negative_auc, steps), perturbation.csv and perturbation.png. The counts so far are saved after
    every batch (perturbation_progress.json): rerun the same command to resume an interrupted run."""
    import csv

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .cache import write_json_atomic
    from .datasets import ImageDataset, ImageList, collate_with_failures
    from .explain_eval import FRACTIONS, area_under, perturbation_counts, target_maps
    from .models import fingerprint
    from .runinfo import write_run_json

    _setup_logging(quiet)
    t0 = time.time()
    model, preprocess, tokenizer = _load(model_name, pretrained, device or "cpu")
    dev = next(model.parameters()).device
    W, classnames = _zero_shot_classifier(model, tokenizer, model_name, classifier_file, classes, templates)
    Wt = torch.from_numpy(W).to(dev)
    options = _parse_method_options(method_option)
    try:
        items = ImageList.from_path(images)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if limit:
        items = items.subset(0, min(limit, len(items)))
    # the label of an image: its class folder's name among --classes; without folders, the clean prediction
    has_labels = all(lab >= 0 for lab in items.labels) and bool(items.classes)
    if has_labels:
        missing = sorted(set(items.classes) - set(classnames))
        if missing:
            raise click.ClickException(f"class folders not in the classifier's classes: {missing[:5]}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model)
    settings = _eval_settings(model_name, pretrained, fp, method, options, W, classnames, images_digest=items.digest,
                              n_images=len(items), target="class folder" if has_labels else "unperturbed prediction")
    progress_file = out / "perturbation_progress.json"
    progress = _saved_progress(progress_file, settings, overwrite, "perturb-eval",
                               dict(next_index=0, n=0, failures=[],
                                    counts={k: [0] * len(FRACTIONS) for k in ("positive", "negative")}))
    counts = {k: np.asarray(progress["counts"][k], np.int64) for k in ("positive", "negative")}
    n, failures, start = progress["n"], progress["failures"], progress["next_index"]
    if start:
        click.echo(f"resuming at image {start} of {len(items)} ({n} done)" if start < len(items) else
                   f"all {len(items)} images were done before; writing the results again", err=True)
    loader = torch.utils.data.DataLoader(ImageDataset(items, preprocess, indices=range(start, len(items))),
                                         batch_size=batch_size, collate_fn=collate_with_failures)
    for idx, x, bad in tqdm(loader, disable=quiet, desc=f"perturbation ({method})", unit="batch"):
        failures += [{"item": items.paths[i], "error": e} for i, e in bad]
        progress["next_index"] = max(list(idx) + [i for i, _ in bad]) + 1
        if x is None:
            write_json_atomic(progress_file, progress)
            continue
        x = x.to(dev)
        with torch.no_grad():
            pred = (torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ Wt).argmax(dim=1)
        labels = torch.tensor([classnames.index(items.classes[items.labels[i]]) for i in idx]) if has_labels \
            else pred.cpu()
        try:
            maps = target_maps(model, x, Wt.t(), pred.tolist(), method, **options)
        except (TypeError, ValueError) as exc:
            raise click.ClickException(f"--method {method}: {exc}") from exc
        c = perturbation_counts(model, x, maps, Wt, labels, FRACTIONS)
        for k in counts:
            counts[k] += c[k]
        n += x.shape[0]
        progress.update(n=n, failures=failures, counts={k: v.tolist() for k, v in counts.items()})
        write_json_atomic(progress_file, progress)  # a batch's counts are saved whole or not
    if n == 0:
        raise click.ClickException(f"no readable images in {images} ({len(failures)} failed)")
    acc = {k: 100.0 * v / n for k, v in counts.items()}
    steps = [{"fraction": f, "positive_accuracy": float(acc["positive"][i]),
              "negative_accuracy": float(acc["negative"][i])} for i, f in enumerate(FRACTIONS)]
    result = {"method": method, "options": options, "n_images": n, "target": settings["target"],
              "positive_auc": area_under(FRACTIONS, acc["positive"]),
              "negative_auc": area_under(FRACTIONS, acc["negative"]),
              "steps": steps, "removal": "patches set to 0 in the normalised image (preprocessing mean colour)",
              "failures": failures}
    (out / "perturbation.json").write_text(json.dumps(result, indent=1))
    with open(out / "perturbation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(steps[0]))
        w.writeheader()
        w.writerows(steps)
    _perturbation_plot(out / "perturbation.png", FRACTIONS, acc, method)
    write_run_json(out, "perturb-eval", dict(images=images, model=model_name, pretrained=pretrained, method=method,
                                             options=options, limit=limit), model_fingerprint=fp,
                   started=t0)
    click.echo(f"{method}: positive AUC {result['positive_auc']:.2f} (lower is better), negative AUC "
               f"{result['negative_auc']:.2f} (higher is better); {n} images, {len(failures)} failed")


def _eval_settings(model_name, pretrained, fp, method, options, W, classnames, **data) -> dict:
    """What must agree for an evaluation to resume: model, method and options, classifier, and the `data` keys."""
    import hashlib

    import numpy as np

    return {"model": model_name, "pretrained": pretrained, "fingerprint": fp, "method": method, "options": options,
            "classifier": hashlib.sha256(np.ascontiguousarray(W).tobytes()).hexdigest(), "classes": list(classnames),
            **data}


def _saved_progress(path: Path, settings: dict, overwrite: bool, command: str, fresh: dict) -> dict:
    """The saved state of a `command` run in this folder with these settings, or `fresh` (with the settings).
    Refuses (unless --overwrite) a saved run made with other settings: mixing its results with these would be
    wrong."""
    if not path.is_file() or overwrite:
        return dict(settings, **fresh)
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise click.ClickException(f"{path}: unreadable ({exc}); use --overwrite to start afresh") from exc
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        raise click.ClickException(f"{path.parent} holds a {command} run made with other settings "
                                   f"({', '.join(differ)}); use another --output, or --overwrite to start afresh")
    return old


def _perturbation_plot(path, fractions, acc, method):
    from .visualize import _plt

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


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--methods", default="decomposition,legrad,gradeclip,gradcam,rollout,raw_attention,chefer",
              show_default=True, help="comma-separated explainers (textspan.list_methods()).")
@click.option("--prompts", "-p", multiple=True, required=True, help="a prompt (repeat for several).")
@model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
def compare(images, methods, prompts, model_name, pretrained, device, output):
    """Every method on the same images and prompts: compare.png (rows: image x prompt, columns: methods; each map
    upsampled and min-max normalised, one shared colour bar), maps_<method>.npy (raw [b, P, grid_h, grid_w]) and
    times.json (seconds per method)."""
    import numpy as np
    import torch

    from .methods import explain, list_methods, upsample_maps
    from .models import fingerprint
    from .runinfo import write_run_json
    from .text import encode_texts

    _setup_logging(True)
    t0 = time.time()
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in list_methods()]
    if unknown:
        raise click.ClickException(f"unknown methods {unknown}; known: {', '.join(list_methods())}")
    model, preprocess, tokenizer = _load(model_name, pretrained, device or "cpu")
    pil = _read_images(images)
    x = torch.stack([preprocess(im) for im in pil]).to(next(model.parameters()).device)
    try:
        T = torch.from_numpy(encode_texts(model, tokenizer, list(prompts)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    times, shown = {}, {}
    for m in names:
        start = time.perf_counter()
        raw = explain(model, x, T, method=m, **({"relative": len(prompts) > 1} if m == "decomposition" else {}))
        times[m] = time.perf_counter() - start
        np.save(out / f"maps_{m}.npy", raw.cpu().numpy())
        shown[m] = upsample_maps(raw.cpu(), tuple(x.shape[-2:])).numpy()  # [b, P, H, W] in [0, 1]
    frames = [im.resize((x.shape[-1], x.shape[-2])) for im in pil]
    _compare_grid(out / "compare.png", frames, [Path(p).stem for p in images], list(prompts), names, shown, times)
    (out / "times.json").write_text(json.dumps({"seconds": times, "images": len(images), "prompts": len(prompts),
                                                "device": str(x.device)}, indent=1))
    write_run_json(out, "compare", dict(images=list(images), methods=names, prompts=list(prompts), model=model_name,
                                        pretrained=pretrained), model_fingerprint=fingerprint(model), started=t0)
    click.echo("  ".join(f"{m} {times[m]:.2f}s" for m in names) + f"\nwritten to {out}")


def _compare_grid(path, frames, image_names, prompts, methods, shown, times):
    import numpy as np

    from .visualize import _plt

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


if __name__ == "__main__":  # pragma: no cover
    main()
