"""The command line's shared pieces: the click group that turns a `TextspanError` into a message, logging to the
invocation's stderr, and the option groups several commands share (one decorator each, as STYLE.md asks)."""
from __future__ import annotations

import functools
import logging
import os
import sys

import click

from .errors import translate


EXIT_INPUT = 1  # a problem with an input, a file, a folder, the disk or the device: one line names it
EXIT_USAGE = 2  # the command line itself (click: unknown option, missing argument, bad value)
EXIT_INTERNAL = 3  # anything else is a bug of textspan: a one-line message asks for --debug and a report


def debug_requested(ctx=None) -> bool:
    """--debug on the command line, or TEXTSPAN_DEBUG=1 in the environment."""
    if os.environ.get("TEXTSPAN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


class Group(click.Group):
    """The error boundary: every `TextspanError` (a user's mistake, named) and every ordinary fault (file system,
    encoding, unpickling, device, memory: `textspan.errors.translate`) becomes a one-line message and exit status 1;
    click's usage errors keep status 2; anything else is reported as an internal error (status 3). With --debug or
    TEXTSPAN_DEBUG=1 the traceback is shown instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug_requested(ctx):
                raise
            err = translate(exc)
            if err is not None:
                raise click.ClickException(str(err)) from exc
            error = click.ClickException(
                f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (this is a "
                f"bug of textspan: rerun with --debug, or TEXTSPAN_DEBUG=1, to see the traceback, and report it)")
            error.exit_code = EXIT_INTERNAL
            raise error from exc


def setup_logging(quiet: bool) -> None:
    """Log textspan's messages to this invocation's stderr (click's test runner swaps sys.stderr per call)."""
    root = logging.getLogger("textspan")
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.handlers = [h for h in root.handlers if not getattr(h, "_textspan", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler._textspan = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def notify(message: str) -> None:
    click.echo(message, err=True)


def options(*decorators):
    return lambda f: functools.reduce(lambda g, d: d(g), reversed(decorators), f)


def quiet_option(f):
    @click.option("--quiet", "-q", is_flag=True, help="no progress bars; warnings only.")
    @functools.wraps(f)
    def wrapper(*args, quiet, **kwargs):
        setup_logging(quiet)
        return f(*args, quiet=quiet, **kwargs)
    return wrapper


DEVICE = click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
OUTPUT = click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="output folder.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="start afresh over a run made with other settings.")
model_options = options(
    click.option("--model", "model_name", default="shapes", show_default=True,
                 help="open_clip model name (ViT-B-16, ...), 'hf-hub:...', 'local-dir:...', or the built-in 'shapes'."),
    click.option("--pretrained", default=None, help="open_clip pretrained tag (e.g. laion2b_s34b_b88k) or a local "
                                                    "checkpoint file; omit for random weights (or the built-in's)."),
    DEVICE)
cache_model_options = options(
    click.option("--model", "model_name", default=None,
                 help="model for the text tower (default: the one recorded in the cache's manifest)."),
    click.option("--pretrained", default=None, help="its pretrained tag or checkpoint (default: the cache's)."),
    DEVICE)
classifier_options = options(
    click.option("--classifier", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="a [d_embed, classes] .npy zero-shot classifier (else built from --classes/--templates)."),
    click.option("--classes", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="class names, one per line, in label order (default: the classes of the cache, or of the "
                      "image folder's class sub-folders)."),
    click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="prompt templates with '{}' (default: the built-in templates, the shapes-world ones for the "
                      "built-in models)."))
reference_options = options(
    click.option("--reference", default=None, type=click.Path(exists=True, file_okay=False),
                 help="cache whose means replace ablated terms (default: a seeded half of the cache)."),
    click.option("--same-set", is_flag=True, help="take the means over the evaluation set itself (published "
                                                  "protocol)."),
    click.option("--seed", default=0, show_default=True, help="seed of the reference split and random head sets."))
run_options = options(OUTPUT, OVERWRITE, quiet_option)
method_options = options(
    click.option("--method", default="decomposition", show_default=True,
                 help="the explainer whose maps are evaluated (textspan.list_methods())."),
    click.option("--option", "method_option", multiple=True, metavar="KEY=VALUE",
                 help="an option of the method (repeatable), e.g. layers=all, single_head=true, heads=L3H1."))


def distributed(device):
    """(rank, device for this rank): torch.distributed initialised when launched by torchrun."""
    from .cache import init_distributed
    from .jobs import default_device

    _, rank, device = init_distributed(device or default_device())
    return rank, device
