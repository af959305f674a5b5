"""Text banks and their embeddings.

A `TextBank` is an ordered list of distinct, non-blank texts read from a file (one entry per line) or a built-in bank
name (``textspan/banks/NAME.txt``, shipped inside the package; ``text_banks/`` in the repository points there). Blank lines are dropped and duplicates removed with a warning.
Its `digest` (sha256 of the entries) identifies it.

`encode_texts` runs the model's text tower (batched, normalised). `bank_embeddings` caches the result on disk keyed
by the model's weight fingerprint and the bank digest, and every saved embedding file carries a JSON sidecar with
both, so that embeddings of another model or bank are refused instead of silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from . import engine, textio
from .errors import BadInputError, EmbeddingMismatchError, InputNotFoundError
from .models import fingerprint as model_fingerprint

log = logging.getLogger(__name__)

BANK_DIR = Path(__file__).resolve().parent / "banks"  # package data (text_banks/ in the repository links here)


@dataclass
class TextBank:
    texts: List[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.texts).encode()).hexdigest()

    @classmethod
    def from_texts(cls, texts: Sequence[str], source: str = "") -> "TextBank":
        cleaned, seen, dupes, blank = [], set(), 0, 0
        for t in texts:
            t = t.strip()
            if not t:
                blank += 1
                continue
            if t in seen:
                dupes += 1
                continue
            seen.add(t)
            cleaned.append(t)
        if dupes:
            log.warning("%s: %d duplicate lines removed", source or "text bank", dupes)
        if not cleaned:
            raise BadInputError(f"{source or 'text bank'}: no texts (empty or blank lines only)")
        return cls(cleaned, source)

    @classmethod
    def load(cls, bank: Union[str, os.PathLike]) -> "TextBank":
        """A text file (one entry per line) or the name of a built-in bank (see `builtin_banks`)."""
        path = Path(bank)
        if not path.is_file():
            named = BANK_DIR / f"{bank}.txt"
            if named.is_file():
                path = named
            else:
                raise InputNotFoundError(f"text bank not found: {bank} (not a file; built-in banks: "
                                         f"{builtin_banks()})")
        return cls.from_texts(textio.read_text(path, "text bank").splitlines(), source=str(path))


def bank_path(name: str) -> Path:
    """The file of a built-in bank or template list (``general``, ``shapes``, ``templates``, ``shapes_templates``)."""
    path = BANK_DIR / f"{name}.txt"
    if not path.is_file():
        raise InputNotFoundError(f"no built-in text bank {name!r} (built-in: {builtin_banks()})")
    return path


def builtin_banks() -> List[str]:
    return sorted(p.stem for p in BANK_DIR.glob("*.txt")) if BANK_DIR.is_dir() else []


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """[M, d_embed] float32, unit-norm text embeddings (the model's text tower, batched)."""
    device = engine.model_device(model)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
            e = engine.library_text_embedding(model, tokens).float()
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def save_embeddings(path, embeddings: np.ndarray, bank: TextBank, fingerprint: str, model_name: str = "") -> Path:
    """embeddings.npy + embeddings.json (fingerprint, bank digest, the texts)."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_suffix(".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, embeddings)
    meta = {"fingerprint": fingerprint, "bank_digest": bank.digest, "bank_source": bank.source, "model": model_name,
            "shape": list(embeddings.shape), "texts": bank.texts}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def load_embeddings(path, *, fingerprint: Optional[str] = None, bank: Optional[TextBank] = None):
    """(embeddings [M, d'], TextBank) from `save_embeddings` output; refuses another model's or bank's."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise InputNotFoundError(f"{meta_path} missing: text embeddings need their sidecar (model fingerprint, bank)")
    meta = json.loads(meta_path.read_text())
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise EmbeddingMismatchError(f"{path} holds text embeddings of another model (fingerprint "
                                     f"{meta['fingerprint']}, expected {fingerprint})")
    if bank is not None and meta["bank_digest"] != bank.digest:
        raise EmbeddingMismatchError(f"{path} holds embeddings of another text bank ({meta['bank_source']})")
    emb = np.load(path)
    return emb, TextBank(meta["texts"], meta.get("bank_source", ""))


def default_cache_dir() -> Path:
    return Path(os.environ.get("TEXTSPAN_CACHE", Path.home() / ".cache" / "textspan")) / "text_embeddings"


def bank_embeddings(model, tokenizer, bank: TextBank, *, cache_dir=None, fingerprint: Optional[str] = None,
                    batch_size: int = 256) -> np.ndarray:
    """Embeddings of `bank`, computed once per (model weights, bank content) and kept in `cache_dir`."""
    fp = fingerprint or model_fingerprint(model)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{fp}-{bank.digest[:16]}.npy"
    if path.is_file() and path.with_suffix(".json").is_file():
        emb, _ = load_embeddings(path, fingerprint=fp, bank=bank)
        return emb
    emb = encode_texts(model, tokenizer, bank.texts, batch_size=batch_size)
    save_embeddings(path, emb, bank, fp)
    return emb
