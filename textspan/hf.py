"""Loading Hugging Face transformers CLIP and SigLIP models: the model, its image preprocessing and its tokenizer.

`load_hf_model("openai/clip-vit-base-patch16")` (what ``load_model("hf:...")`` calls) or a local folder holding a
``config.json`` (``save_pretrained`` output). Offline, a hub name whose files are not in the local cache fails within
seconds with the options spelled out (`WeightsUnavailableError`), as open_clip tags do.

The preprocessing is the model's own image processor (resize, crop, rescale, normalise), wrapped to take one PIL
image and return a [3, H, W] tensor like open_clip's transforms; the tokenizer is the model's own, wrapped to take a
list of texts and return what the text tower takes (SigLIP pads to its fixed length, as it was trained).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .errors import BadInputError, InputNotFoundError, UnsupportedModelError, WeightsUnavailableError

SUPPORTED = ("CLIPModel", "SiglipModel", "CLIPVisionModelWithProjection", "CLIPVisionModel", "SiglipVisionModel")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


class HFImageTransform:
    """One PIL image -> [3, H, W] float tensor through the model's own image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({type(self.processor).__name__})"

    def mask_transform(self) -> Callable:
        """The processor's geometric steps (resize, center crop) for a PIL mask, nearest-neighbour: so a mask stays
        aligned with its image (used by the segmentation evaluation)."""
        from PIL import Image

        p = self.processor
        size = getattr(p, "size", None) or {}
        crop = getattr(p, "crop_size", None) or {}
        resize = getattr(p, "do_resize", True)
        center = getattr(p, "do_center_crop", False)

        def apply(mask):
            w, h = mask.size
            if resize:
                if "shortest_edge" in size:  # the short side to s, the long one scaled (truncated, as transformers)
                    s = size["shortest_edge"]
                    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
                else:
                    nw, nh = size["width"], size["height"]
                mask = mask.resize((nw, nh), Image.NEAREST)
            if center and crop:
                w, h = mask.size
                top, left = (h - crop["height"]) // 2, (w - crop["width"]) // 2
                mask = mask.crop((left, top, left + crop["width"], top + crop["height"]))
            return mask

        return apply


class HFTokenizer:
    """A list of texts -> the text tower's inputs (a ``BatchEncoding`` with ``.to(device)``)."""

    def __init__(self, tokenizer, pad_to: Optional[int] = None, max_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.pad_to = pad_to
        self.max_length = max_length

    def __call__(self, texts: Union[str, Sequence[str]]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.pad_to:
            return self.tokenizer(texts, padding="max_length", max_length=self.pad_to, truncation=True,
                                  return_tensors="pt")
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")


HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                "image_processor_config.json")


def check_hf_name(name: str) -> None:
    """A local folder, or a Hugging Face hub id (NAME or ORG/NAME); anything else is refused naming it."""
    if os.path.isdir(name):
        return
    if "://" in name:
        raise BadInputError(f"hf:{name!r} is a URL; give the hub id (ORG/NAME, e.g. hf:openai/clip-vit-base-patch16) "
                            f"or a local folder")
    if name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").replace("/", "", 1) or \
            os.path.exists(name):
        raise InputNotFoundError(f"hf:{name}: no such model folder (a local transformers model is a folder "
                                 f"holding its config.json)")
    if not HUB_ID.match(name) or ".." in name or name.endswith((".", "-")):
        raise BadInputError(f"hf:{name!r} is not a Hugging Face hub id: expected NAME or ORG/NAME (letters, digits, "
                            f"'-', '_', '.'), e.g. hf:openai/clip-vit-base-patch16, or a local folder")


def refuse_remote_code(name: str, cache_dir: Optional[str] = None) -> None:
    """textspan never runs code shipped with a model: a folder (or cached hub model) whose configs name custom code
    (`auto_map`) is refused before transformers reads it, so its question "run the custom code?" is never asked."""
    import json

    from .models import hub_file_cached

    for fname in CONFIG_FILES:
        path = os.path.join(name, fname) if os.path.isdir(name) else hub_file_cached(name, fname, cache_dir)
        if not path or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: not a readable JSON config ({exc})") from None
        found = _auto_maps(data)
        if found:
            raise UnsupportedModelError(
                f"{path} names custom code ({', '.join(sorted(found))} in auto_map): textspan never runs code that "
                f"comes with a model. Load the model with its standard transformers CLIP/SigLIP classes (a config "
                f"without auto_map), or convert it to a supported family")


def _auto_maps(data) -> set:
    """The class names any `auto_map` (at any depth of a config) points to."""
    found = set()
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "auto_map" and v:
                found |= set(v) if isinstance(v, dict) else {str(v)}
            else:
                found |= _auto_maps(v)
    elif isinstance(data, list):
        for v in data:
            found |= _auto_maps(v)
    return found


def _local_or_cached(name: str, cache_dir: Optional[str]) -> bool:
    from .models import hub_file_cached

    return os.path.isdir(name) or hub_file_cached(name, "config.json", cache_dir) is not None


def load_hf_model(name: str, device: Union[str, torch.device] = "cpu", *, precision: str = "fp32",
                  cache_dir: Optional[str] = None) -> Tuple[torch.nn.Module, Callable, Optional[Callable]]:
    """(model, preprocess, tokenizer) of a transformers CLIP or SigLIP model (hub name or local folder), in eval mode.

    The tokenizer is None for a vision-only model or a folder without tokenizer files (text jobs then say so)."""
    from .models import _hub_reachable

    check_hf_name(name)
    refuse_remote_code(name, cache_dir)
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - a dependency
        raise UnsupportedModelError("Hugging Face models need the transformers package (pip install transformers)") \
            from err
    if not _local_or_cached(name, cache_dir) and not _hub_reachable():
        raise WeightsUnavailableError(
            f"Hugging Face model {name!r} is not in the local cache ({cache_dir or 'the huggingface hub cache'}) "
            f"and the hub cannot be reached from this machine. Options: (1) pass a local folder holding its "
            f"config.json and weights (save_pretrained output); (2) copy the model into the hub cache on a machine "
            f"with internet access; (3) use the built-in offline model 'shapes'")
    if precision not in PRECISIONS:
        raise UnsupportedModelError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    transformers.utils.logging.set_verbosity_error()  # no progress bars or config chatter in textspan's output
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(name, cache_dir=cache_dir, trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [""])[0]
    model_type = getattr(config, "model_type", "")
    if model_type not in ("clip", "siglip", "clip_vision_model", "siglip_vision_model"):
        raise UnsupportedModelError(
            f"{name}: model_type {model_type!r} ({arch or 'no architecture'}) is not a CLIP or SigLIP model; textspan "
            f"reads transformers {', '.join(SUPPORTED)}")
    cls = getattr(transformers, arch, None) if arch in SUPPORTED else None
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(name, cache_dir=cache_dir, torch_dtype=PRECISIONS[precision], trust_remote_code=False)
    model = model.to(device).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(name, cache_dir=cache_dir, trust_remote_code=False)
    tokenizer = None
    if hasattr(model, "get_text_features"):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name, cache_dir=cache_dir, trust_remote_code=False)
        except (OSError, ValueError):
            tok = None
        if tok is not None:
            text_cfg = getattr(config, "text_config", config)
            length = getattr(text_cfg, "max_position_embeddings", None)
            tokenizer = HFTokenizer(tok, pad_to=length if model_type.startswith("siglip") else None,
                                    max_length=length)
    from .engine import check_decomposable

    check_decomposable(model)
    return model, HFImageTransform(processor), tokenizer


def save_hf_model(model, folder, *, image_size: int, tokenizer=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    """Write a transformers model with an image processor (and a tokenizer when given) into `folder`, loadable with
    ``load_model(folder)``: how tests and users package a converted or randomly initialised model."""
    import transformers

    folder = Path(folder)
    model.save_pretrained(folder)
    siglip = type(model).__name__.startswith("Siglip")
    proc_cls = transformers.SiglipImageProcessor if siglip else transformers.CLIPImageProcessor
    kw = dict(size={"height": image_size, "width": image_size}) if siglip else dict(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc_cls(image_mean=list(mean), image_std=list(std), **kw).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
