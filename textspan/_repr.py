"""Short, readable reprs for result objects: `print(result)` in a notebook shows what the result holds (shapes of
arrays, sizes of lists and tables, a few values), never the whole arrays."""
from __future__ import annotations

import dataclasses


def summarize(value, depth: int = 0) -> str:
    """One short description of a value: arrays and tensors as shape and dtype, containers by size."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        dims = "x".join(str(int(d)) for d in shape) or "scalar"
        return f"{type(value).__name__}[{dims}, {str(value.dtype).replace('torch.', '')}]"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, bool)) or value is None:
        return repr(value)
    if isinstance(value, dict):
        if depth == 0 and len(value) <= 4 and all(isinstance(v, (int, float, str, bool)) or v is None
                                                  for v in value.values()):
            return "{" + ", ".join(f"{k!r}: {summarize(v, 1)}" for k, v in value.items()) + "}"
        keys = list(value)[:4]
        more = ", ..." if len(value) > 4 else ""
        return f"dict({len(value)} keys: {', '.join(map(repr, keys))}{more})"
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and all(isinstance(v, (int, float, str, bool)) for v in value):
            return "[" + ", ".join(summarize(v, 1) for v in value) + "]"
        return f"{type(value).__name__}({len(value)} items)"
    if hasattr(value, "columns") and hasattr(value, "__len__"):  # a DataFrame
        return f"DataFrame({len(value)} rows x {len(value.columns)} columns)"
    text = repr(value)
    return text if len(text) <= 60 else f"<{type(value).__name__}>"


def concise(cls):
    """Class decorator (above @dataclass): a __repr__ that summarizes each field."""
    def __repr__(self) -> str:
        if dataclasses.is_dataclass(self):
            names = [f.name for f in dataclasses.fields(self) if f.repr]
        else:
            names = [k for k in vars(self) if not k.startswith("_")]
        parts = [f"{n}={summarize(getattr(self, n, None))}" for n in names]
        return f"{type(self).__name__}(" + ", ".join(parts) + ")"

    cls.__repr__ = __repr__
    return cls
