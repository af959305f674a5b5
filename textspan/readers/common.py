"""What every reader shares: finding a CLIP model's image tower, small readers of norms and layer scales, and the
rest of a CLIP model that is not its image tower (the library's own encoders, logit scale, device). Like the readers,
this module may name a model library's attributes; nothing outside `textspan.readers` does."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..engine import Tower
from ..errors import UnsupportedModelError


def image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The image tower of a CLIP model (or the tower itself when given one): open_clip's ``visual``, transformers'
    ``vision_model``."""
    if isinstance(model, Tower):
        return model.module
    sub = getattr(model, "visual", None)
    if isinstance(sub, torch.nn.Module):
        return sub
    while isinstance(getattr(model, "vision_model", None), torch.nn.Module):  # transformers nests its wrappers
        model = model.vision_model
    return model


def is_transformers(module) -> bool:
    return type(module).__module__.startswith("transformers.")



def gamma(ls) -> Optional[torch.Tensor]:
    """The layer-scale vector of a LayerScale module (None: no layer scale)."""
    return getattr(ls, "gamma", None)


def affine(ln) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
    """(weight, bias, eps) of a LayerNorm."""
    return getattr(ln, "weight", None), getattr(ln, "bias", None), getattr(ln, "eps", 1e-5)


def identity(x):
    return x


def as_callable(module) -> Callable:
    """The module, or the identity for None / nn.Identity."""
    return identity if module is None or isinstance(module, torch.nn.Identity) else module


def timm_trunk(visual):
    """open_clip's timm trunk of an image tower (None when it has none)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return None
    return trunk if type(trunk).__module__.startswith("timm.") else None


def _features(out) -> torch.Tensor:
    """A transformers features call's tensor (v5 returns an output object with the features as pooler_output)."""
    if torch.is_tensor(out):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    raise UnsupportedModelError(f"cannot read features from {type(out).__name__}")


def library_image_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[b, d_embed]: the library's own (unnormalised) image embedding."""
    if hasattr(model, "encode_image"):
        return model.encode_image(images)
    if is_transformers(model):
        if hasattr(model, "get_image_features"):
            return _features(model.get_image_features(pixel_values=images))
        return _features(model(pixel_values=images))
    return model(images)


def library_text_embedding(model: torch.nn.Module, tokens) -> torch.Tensor:
    """[M, d_embed]: the library's own (unnormalised) text embedding. `tokens`: what the model's tokenizer returns
    (token ids, or a transformers ``BatchEncoding``)."""
    if is_transformers(model):
        if not hasattr(model, "get_text_features"):
            raise UnsupportedModelError(f"{type(model).__name__} has no text tower (pass the whole CLIPModel or "
                                        f"SiglipModel)")
        kw = dict(tokens) if not torch.is_tensor(tokens) else {"input_ids": tokens}
        return _features(model.get_text_features(**kw))
    if not hasattr(model, "encode_text"):
        raise UnsupportedModelError("this model has no text tower (pass the whole CLIP model, not its image tower)")
    return model.encode_text(tokens)


def learned_logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """The learnable log logit scale of a CLIP model (a parameter: training clamps it in place)."""
    return model.logit_scale


def logit_scale_and_bias(model: torch.nn.Module) -> Tuple[float, Optional[float]]:
    """(exp(logit_scale), logit_bias or None): how the model scores an image-text pair from the cosine. A bias means
    a sigmoid model (SigLIP: p = sigmoid(scale * cos + bias)); None a softmax one (CLIP)."""
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    return (float(scale.detach().exp()) if scale is not None else 1.0), (float(bias.detach()) if bias is not None else None)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def set_start_values(model: torch.nn.Module, positions: Optional[torch.Tensor] = None,
                     log_logit_scale: Optional[float] = None) -> None:
    """Set initial values before training (the built-in model's sin-cos positions and logit scale)."""
    with torch.no_grad():
        if positions is not None:
            image_tower(model).positional_embedding.copy_(positions)
        if log_logit_scale is not None:
            model.logit_scale.fill_(log_logit_scale)
