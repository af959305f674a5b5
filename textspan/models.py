"""Loading CLIP models (open_clip names + pretrained tags, local checkpoints, the built-in model).

`load_model` is the one entry point. It returns a stock open_clip model: textspan never forks or patches it; the
decomposition reads its weights (see `textspan.decomposition`).

Offline behaviour: open_clip (through huggingface_hub) retries for about a minute before it gives up on a tag whose
weights are not cached. We look in the caches ourselves first and, when the file is not there and the hub cannot be
reached, fail within seconds with the options spelled out (`WeightsUnavailableError`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

from . import engine
from .errors import (BadInputError, DeviceError, InputNotFoundError, UnknownModelError, UnsupportedModelError,
                     WeightsUnavailableError, job)

__all__ = ["BUILTIN_MODELS", "ModelInfo", "UnsupportedModelError", "WeightsUnavailableError", "check_decomposable",
           "describe_pretrained", "fingerprint", "load_model", "model_info", "visual_of"]

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("shapes", "shapes-spurious")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a CLIP ViT image tower, in textspan's vocabulary."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_embed: int
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    grid_size: Tuple[int, int]
    n_tokens: int
    layer_scale: bool
    activation: str
    n_params_visual: int
    pooling: str = "cls"  # "cls" (the CLS token) or "attention" (SigLIP's attention-pooling head)
    n_pool_heads: int = 0
    family: str = "open_clip"

    @property
    def n_mlp_terms(self) -> int:
        """Rows of the MLP-type terms: the embedding term, one per MLP, and the pooling head's own terms (attention
        pooling)."""
        return self.n_layers + (2 if self.pooling == "attention" else 1)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("TEXTSPAN_OFFLINE"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file_cached(repo_id: str, filename: str, cache_dir: Optional[str]) -> Optional[str]:
    """The path of `filename` of Hugging Face repo `repo_id` in the local hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _cached_tag_file(tag_cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """Path of the already-downloaded checkpoint for an open_clip pretrained config, or None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = []
        if filename.endswith((".bin", ".pth")):
            stem = filename[:-4]
            candidates.append("open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                              else stem + ".safetensors")
        candidates.append(filename)
        for name in candidates:
            found = hub_file_cached(repo_id, name, cache_dir)
            if found is not None:
                return found
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _tag_preprocess_kwargs(tag_cfg: dict) -> dict:
    kw = {}
    for src, dst in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if tag_cfg.get(src) is not None:
            kw[dst] = tag_cfg[src]
    return kw


@job
def load_model(
    name: str,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
    *,
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> Tuple[torch.nn.Module, Callable, Callable]:
    """Load a CLIP model, its eval preprocessing and its tokenizer.

    Args:
        name: an open_clip model name (``"ViT-B-16"``; ``open_clip.list_models()``), an open_clip schema name
            (``"hf-hub:org/repo"``, ``"local-dir:/path"``), a Hugging Face transformers CLIP or SigLIP model
            (``"hf:openai/clip-vit-base-patch16"``, ``"hf:google/siglip-base-patch16-224"``, or a local folder holding
            its ``config.json``, weights, processor and tokenizer files), or a built-in model (``"shapes"``, ``"shapes-spurious"``;
            offline, shipped with textspan; ``pretrained`` may then name a training checkpoint of it).
        pretrained: an open_clip pretrained tag (``"laion2b_s34b_b88k"``; downloaded by open_clip when online), a local
            checkpoint (.pt/.pth/.bin/.safetensors, loaded with ``weights_only=True``), or None for random
            initialisation (tests).
        device: torch device.
        precision: open_clip precision string ("fp32", "fp16", "bf16", ...). Use "fp32" (or cast to float64 yourself)
            for exact decompositions.
        cache_dir: where open_clip / huggingface_hub keep downloads (default: their own defaults).

    Returns:
        (model, preprocess, tokenizer): the stock open_clip model in eval mode, the eval image transform, and the
        tokenizer.

    Raises:
        WeightsUnavailableError: a tag whose weights are not cached while the hub cannot be reached (within seconds).
        FileNotFoundError: ``pretrained`` looks like a path but no such file exists.
        UnsupportedModelError: the image tower cannot be decomposed exactly (checked here, before any work).

    Example:
        >>> model, preprocess, tokenizer = load_model("ViT-B-32")          # random init, no download
        >>> model_info(model).n_layers
        12
    """
    import open_clip

    check_device(device)
    if name in BUILTIN_MODELS:
        from .builtin import load_shapes_model

        variant = "default" if name == "shapes" else "spurious"
        return load_shapes_model(variant=variant, device=device, checkpoint=pretrained)
    if name.startswith("hf:") or (os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json"))):
        from .hf import load_hf_model

        return load_hf_model(name[3:] if name.startswith("hf:") else name, device=device, precision=precision,
                             cache_dir=cache_dir)

    kwargs = dict(precision=precision, device=device, cache_dir=cache_dir, pretrained_text=False)
    schema = name.split(":", 1)[0] if ":" in name else None
    if schema is None and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise UnknownModelError(_unknown_model_message(name))
    if pretrained is not None and schema is None:
        pretrained = str(pretrained)
        cfg_name = name.replace("/", "-")
        tag_cfg = open_clip.get_pretrained_cfg(cfg_name, pretrained)
        if tag_cfg:
            # open_clip 2.x built OpenAI tags with QuickGELU; 3.x only warns on the mismatch. The weights were trained
            # with the activation their tag names, so use it.
            kwargs.update(_tag_preprocess_kwargs(tag_cfg))
            if tag_cfg.get("quick_gelu") and not open_clip.get_model_config(cfg_name).get("quick_gelu", False):
                kwargs["force_quick_gelu"] = True
            cached = _cached_tag_file(tag_cfg, cache_dir)
            if cached is not None:
                log.info("using cached weights %s for %s/%s", cached, name, pretrained)
                pretrained = cached
            elif not _hub_reachable():
                tags = open_clip.list_pretrained_tags_by_model(cfg_name)
                raise WeightsUnavailableError(
                    f"weights for model {name!r} with pretrained tag {pretrained!r} are not in the local cache "
                    f"(huggingface hub cache / ~/.cache/clip{' / ' + cache_dir if cache_dir else ''}) and the hub "
                    f"cannot be reached from this machine. Options: (1) pass a local checkpoint file as pretrained "
                    f"(e.g. --pretrained /path/to/open_clip_pytorch_model.bin or .safetensors); (2) copy the weights "
                    f"into the cache on a machine with internet access; (3) use the built-in offline model "
                    f"'shapes'; (4) pretrained=None for random weights. Known tags for {cfg_name}: {tags}")
        elif any(str(pretrained).endswith(s) for s in CHECKPOINT_SUFFIXES) or os.sep in pretrained:
            if not os.path.isfile(pretrained):
                raise InputNotFoundError(f"pretrained checkpoint not found: {pretrained}")
        else:
            raise UnknownModelError(
                f"pretrained={pretrained!r} is neither a known tag for {cfg_name} "
                f"({open_clip.list_pretrained_tags_by_model(cfg_name)}) nor an existing checkpoint file")
    elif pretrained is not None:
        log.warning("ignoring pretrained=%r: model name %r carries its own weights", pretrained, name)
        pretrained = None

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained is not None and os.path.isfile(str(pretrained)):
            raise _checkpoint_error(str(pretrained), name, exc) from None
        raise
    tokenizer = _open_clip_tokenizer(name, cache_dir)
    model.eval()
    check_decomposable(model)
    return model, preprocess, tokenizer


class MissingTokenizer:
    """Stands in for a tokenizer whose files are not reachable: image jobs run; text jobs stop with the reason."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise WeightsUnavailableError(self.message)


def _open_clip_tokenizer(name: str, cache_dir: Optional[str]):
    """open_clip's tokenizer for `name`; a Hugging Face tokenizer that is neither cached nor reachable becomes a
    `MissingTokenizer` at once (instead of a minute of retries, for models whose image side runs offline)."""
    import open_clip

    cfg = open_clip.get_model_config(name.replace("/", "-")) if ":" not in name else None
    hf_name = ((cfg or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if hf_name and not _hub_reachable():
        if hub_file_cached(hf_name, "tokenizer_config.json", cache_dir) is None:
            msg = (f"the tokenizer of {name} ({hf_name}, Hugging Face) is not in the local cache and the hub cannot be "
                   f"reached: text embeddings need it (copy it into the hub cache, or pass precomputed embeddings)")
            log.warning("%s; image jobs still run", msg)
            return MissingTokenizer(msg)
    return open_clip.get_tokenizer(name)


def check_device(device) -> torch.device:
    """The torch device `device` names, refused (`DeviceError`) when this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadInputError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {device}: {why} on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def _checkpoint_error(path: str, name: str, exc: Exception) -> Exception:
    """A clear error for a checkpoint file open_clip could not load (never advising to unpickle arbitrary code)."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (PK..); older files a pickle (protocol mark 0x80)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") or "invalid load key" in text:
            return BadInputError(f"{path}: not a PyTorch checkpoint (it cannot be read as one: "
                                 f"{text.splitlines()[0][:200]})")
        return BadInputError(
            f"{path}: the checkpoint holds Python objects other than tensors (e.g. a whole pickled model), which "
            f"textspan does not unpickle, since unpickling can run code. Save the weights alone, e.g. "
            f"torch.save(model.state_dict(), path), or as .safetensors")
    if "Error(s) in loading state_dict" in text or isinstance(exc, (KeyError, StopIteration)):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:3]
        return BadInputError(f"{path}: not a state dict of model {name!r} (the weights do not fit: "
                             f"{' '.join(lines)[:400]})")
    if isinstance(exc, (AttributeError, TypeError)):
        return BadInputError(f"{path}: not a state dict (a mapping of parameter names to tensors) of model "
                             f"{name!r}: {text[:200]}")
    return exc


def _unknown_model_message(name: str) -> str:
    import difflib

    import open_clip

    known = list(BUILTIN_MODELS) + list(open_clip.list_models())
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
    close = close or difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=6, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (f"unknown open_clip model name {name!r}{hint}. Known: the built-in {', '.join(BUILTIN_MODELS)}, any name of "
            f"open_clip.list_models() ({len(known) - len(BUILTIN_MODELS)} names), 'hf-hub:ORG/REPO', "
            f"'local-dir:/path', or a transformers CLIP/SigLIP model as 'hf:ORG/NAME' or a folder with its config.json")


def visual_of(model: torch.nn.Module) -> torch.nn.Module:
    """The image tower of a CLIP model (or the tower itself when given one)."""
    return engine.image_tower(model)


def check_decomposable(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless textspan's forward reproduces this image tower exactly."""
    engine.check_decomposable(model)


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Layers, heads, widths and token count of a CLIP ViT image tower."""
    t = engine.read_tower(model)
    return ModelInfo(
        n_layers=t.n_layers,
        n_heads=t.n_heads,
        d_model=t.d_model,
        d_head=t.d_model // t.n_heads,
        d_mlp=t.d_mlp,
        d_embed=t.d_embed,
        image_size=t.image_size,
        patch_size=t.patch_size,
        grid_size=t.grid_size,
        n_tokens=t.n_tokens,
        layer_scale=t.layer_scale,
        activation=t.activation,
        n_params_visual=sum(p.numel() for p in t.module.parameters()),
        pooling="cls" if t.pool_head is None else "attention",
        n_pool_heads=0 if t.pool_head is None else t.pool_head.n_heads,
        family=t.family,
    )


def fingerprint(model: torch.nn.Module) -> str:
    """A content hash of all the model's weights (names, dtypes, shapes and values).

    Two models with the same fingerprint give the same decompositions; caches and text embeddings record it and
    refuse to be mixed with another model's.
    """
    h = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        t = t.contiguous().cpu()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe_pretrained(pretrained: Optional[Union[str, os.PathLike]]) -> Optional[str]:
    """What to record of `pretrained` in a manifest: the tag, or the absolute path of a checkpoint."""
    if pretrained is None:
        return None
    p = str(pretrained)
    return str(Path(p).resolve()) if os.path.isfile(p) else p
