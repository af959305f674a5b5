"""The built-in model: a small stock open_clip CLIP trained on the shapes world (`textspan.world`), shipped as package
data so that textspan runs offline.

It is a plain `open_clip.model.CLIP` (ViT image tower: 64 px, patch 8, 4 blocks x 8 heads, width 128; embed dim 64)
with a word-level tokenizer over the world's vocabulary (the end token has the highest id, because open_clip pools
the text at the argmax token). Only initial values were special in training (a 2-D sin-cos positional embedding), so
the decomposition engine treats it like any open_clip ViT.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import world
from .errors import BadInputError, InputNotFoundError

DATA = Path(__file__).resolve().parent / "data"
VARIANTS = {"default": "shapes_clip", "spurious": "shapes_clip_spurious"}
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CONTEXT = 16


def default_config(vocab_size: int) -> dict:
    return dict(
        embed_dim=64,
        vision_cfg=dict(image_size=world.SIZE, patch_size=8, width=128, layers=4, head_width=16, mlp_ratio=4.0),
        text_cfg=dict(context_length=CONTEXT, vocab_size=vocab_size, width=128, heads=4, layers=3),
    )


class WordTokenizer:
    """Word-level tokenizer: pad 0, start 1, words 2.., end = the highest id. Callable like open_clip's tokenizers.

    Unknown words raise a ValueError naming them (the model has never seen them, so a silent <unk> would hide it).
    """

    def __init__(self, words: Sequence[str], context_length: int = CONTEXT):
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        self.sot = 1
        self.eot = len(self.words) + 2
        self.vocab_size = self.eot + 1
        self.context_length = context_length

    @staticmethod
    def _words(text: str) -> List[str]:
        return text.lower().replace(",", " ").replace(".", " ").split()

    def unknown_words(self, texts: Sequence[str]) -> dict:
        """{word: the first text using it} for every word of `texts` this tokenizer does not know, in order."""
        found: dict = {}
        for t in texts:
            for w in self._words(t):
                if w not in self.index and w not in found:
                    found[w] = t
        return found

    def encode(self, text: str) -> List[int]:
        tokens = self._words(text)
        unknown = [t for t in tokens if t not in self.index]
        if unknown:
            raise BadInputError(f"words not in the shapes-world vocabulary: {unknown} (known: {self.words})")
        ids = [self.sot] + [self.index[t] for t in tokens] + [self.eot]
        if len(ids) > self.context_length:
            raise BadInputError(f"{text!r} is longer than the context ({self.context_length} tokens with start/end)")
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def preprocess(image) -> torch.Tensor:
    """PIL image or uint8 array [H, W, 3] -> normalised float tensor [3, 64, 64] (resized to 64 px, RGB)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
    else:
        img = image.convert("RGB")
        if img.size != (world.SIZE, world.SIZE):
            img = img.resize((world.SIZE, world.SIZE), Image.BICUBIC)
        arr = np.asarray(img)
    t = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def preprocess_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> [n, 3, H, W] normalised, vectorised."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """[1 + grid^2, width]: CLS row zero, then half the width encodes the row, half the column (sin/cos pairs)."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * freqs[None]  # [grid, quarter]
    enc = torch.cat([ang.sin(), ang.cos()], dim=1)  # [grid, width/2]
    rows = enc[:, None, :].expand(grid, grid, -1)
    cols = enc[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return torch.cat([torch.zeros(1, table.shape[1], dtype=torch.float64), table]).float()


def build_model(config: Optional[dict] = None, vocab: Optional[Sequence[str]] = None, seed: int = 0):
    """A freshly initialised stock open_clip CLIP for the shapes world, with the sin-cos positional start."""
    from open_clip.model import CLIP

    tok = WordTokenizer(vocab or world.vocabulary())
    cfg = config or default_config(tok.vocab_size)
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    from .engine import read_tower, set_start_values

    tower = read_tower(model)
    set_start_values(model, positions=sincos_2d(tower.d_model, tower.grid_size[0]), log_logit_scale=math.log(10.0))
    return model, tok


def checkpoint_paths(variant: str = "default"):
    if variant not in VARIANTS:
        raise BadInputError(f"unknown built-in variant {variant!r}; known: {sorted(VARIANTS)}")
    stem = DATA / VARIANTS[variant]
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(model, tokenizer: WordTokenizer, config: dict, variant: str, meta: dict) -> None:
    """Ship a model as package data: fp16 safetensors + a JSON with the config, vocabulary and facts."""
    from safetensors.torch import save_file

    weights, info = checkpoint_paths(variant)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    info.write_text(json.dumps(dict(config=config, vocab=tokenizer.words, mean=MEAN, std=STD, **meta), indent=1))


def load_shapes_model(variant: str = "default", device: Union[str, torch.device] = "cpu",
                      checkpoint: Optional[Union[str, Path]] = None):
    """(model, preprocess, tokenizer) of a built-in model, offline.

    Without `checkpoint`, the shipped weights (fp16, loaded into fp32). With it, a training checkpoint of
    `textspan.training` (``last.pt``; its folder's config.json gives the architecture) or a .safetensors file.
    """
    from safetensors.torch import load_file

    if checkpoint is None:
        weights, info = checkpoint_paths(variant)
        if not weights.is_file() or not info.is_file():
            raise InputNotFoundError(f"the built-in model {variant!r} is not shipped in this installation ({weights})")
        meta = json.loads(info.read_text())
        state = load_file(str(weights))
    else:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputNotFoundError(f"checkpoint not found: {checkpoint}")
        cfg_file = checkpoint.parent / "config.json"
        meta = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if str(checkpoint).endswith(".safetensors"):
            state = load_file(str(checkpoint))
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("model", state)
    vocab = meta.get("vocab") or world.vocabulary()
    model, tok = build_model(meta.get("config") or default_config(len(vocab) + 3), vocab)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval(), preprocess, tok


def shipped_facts(variant: str = "default") -> Dict:
    return json.loads(checkpoint_paths(variant)[1].read_text())
