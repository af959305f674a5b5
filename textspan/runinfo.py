"""run.json: what every command writes beside its outputs (arguments, versions, model fingerprint, time)."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Optional


def versions() -> dict:
    import numpy
    import open_clip
    import torch

    from . import __version__

    return {"textspan": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_run_json(output, command: str, arguments: dict, *, model_fingerprint: Optional[str] = None,
                   started: Optional[float] = None, extra: Optional[dict] = None) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "command": command,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()},
        "argv": sys.argv,
        "versions": versions(),
        "model_fingerprint": model_fingerprint,
        "finished": now.isoformat(timespec="seconds"),
    }
    if started is not None:
        record["seconds"] = round(now.timestamp() - started, 3)
    if extra:
        record.update(extra)
    path = out / "run.json"
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    return path
