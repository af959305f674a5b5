"""Head and layer names, parsed and written in one place.

A head is written ``L{layer}H{head}`` everywhere (CLI, CSV, JSON, API, plots). Layer selections are written
``"-4:"`` (the last four), ``"2:6"``, ``"0,3,-1"``, ``"5"`` or ``"all"``; negative numbers count from the end.
Anything outside the model is an error that names the value and the model's size (never silently wrapped or
clipped).

    >>> parse_heads("L3H1, L-1H0", n_layers=4, n_heads=8)
    [(3, 1), (3, 0)]
    >>> parse_layers("-2:", n_layers=4)
    [2, 3]
    >>> head_name(3, 1)
    'L3H1'
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .errors import BadInputError

HeadsArg = Optional[Union[str, Iterable[Union[str, Tuple[int, int]]]]]
LayersArg = Optional[Union[str, int, Sequence[int]]]

_HEAD = re.compile(r"L(-?\d+)H(-?\d+)", flags=re.IGNORECASE)


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def _layer(value: int, n_layers: int, what: str = "layer") -> int:
    if not -n_layers <= int(value) < n_layers:
        raise BadInputError(f"{what} {value} is out of range for a model with {n_layers} layers "
                            f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    return int(value) % n_layers


def parse_layers(spec: LayersArg, n_layers: int) -> List[int]:
    """Layer indices (0-based, in the order given for lists, ascending for slices) from a selection.

    Accepts None / "all" / ":" (every layer), "a:b" slices (either bound optional, negative from the end), a
    comma-separated list "0,3,-1", an int, or a sequence of ints.
    """
    if spec is None:
        return list(range(n_layers))
    if isinstance(spec, int):
        return [_layer(spec, n_layers)]
    if not isinstance(spec, str):
        out = [_layer(int(v), n_layers) for v in spec]
        if not out:
            raise BadInputError("no layers chosen")
        return out
    text = spec.strip()
    if text in ("", "all", ":"):
        return list(range(n_layers))
    try:
        if ":" in text:
            a, b = (p.strip() for p in text.split(":", 1))
            start = _layer(int(a), n_layers, "layer range start") if a else 0
            if b:
                stop = int(b)
                if not -n_layers <= stop <= n_layers:
                    raise BadInputError(f"layer range end {stop} is out of range for a model with {n_layers} layers")
                stop = stop % n_layers if stop < 0 else stop
            else:
                stop = n_layers
            layers = list(range(start, stop))
        else:
            layers = [_layer(int(p), n_layers) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        if isinstance(exc, BadInputError):
            raise
        raise BadInputError(f"layer selection {spec!r} is not like '-4:', '2:6', '0,3,-1' or 'all'") from exc
    if not layers:
        raise BadInputError(f"layer selection {spec!r} selects no layer of {n_layers}")
    return layers


def parse_heads(spec: HeadsArg, n_layers: int, n_heads: int) -> List[Tuple[int, int]]:
    """[(layer, head), ...] from "L10H3,L-1H2" or a sequence of names or (layer, head) pairs; checked."""
    if spec is None:
        return []
    items = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            m = _HEAD.fullmatch(item.strip())
            if not m:
                raise BadInputError(f"{item!r} is not a head name like L10H3")
            layer, head = int(m.group(1)), int(m.group(2))
        else:
            try:
                layer, head = (int(v) for v in item)
            except (TypeError, ValueError) as exc:
                raise BadInputError(f"{item!r} is not a (layer, head) pair") from exc
        if not -n_layers <= layer < n_layers or not 0 <= head < n_heads:
            raise BadInputError(f"{head_name(layer, head)} is outside the model's {n_layers} layers x {n_heads} heads "
                                f"(layers 0..{n_layers - 1} or negative from the end, heads 0..{n_heads - 1})")
        out.append((layer % n_layers, head))
    if not out:
        raise BadInputError(f"no head named in {spec!r}")
    return out


def head_mask(n_layers: int, n_heads: int, heads: HeadsArg = None, layers: LayersArg = None):
    """[n_layers, n_heads] boolean torch mask of the named heads and/or every head of the named layers; all heads
    when both are None."""
    import torch

    if heads is None and layers is None:
        return torch.ones(n_layers, n_heads, dtype=torch.bool)
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for l, h in parse_heads(heads, n_layers, n_heads) if heads is not None else []:
        mask[l, h] = True
    if layers is not None:
        mask[parse_layers(layers, n_layers)] = True
    return mask


def parse_head_name(name: str) -> Tuple[int, int]:
    """(layer, head) of one stored name such as "L3H1" (no range check: the size is not known)."""
    m = _HEAD.fullmatch(str(name).strip())
    if not m:
        raise BadInputError(f"{name!r} is not a head name like L10H3")
    return int(m.group(1)), int(m.group(2))
