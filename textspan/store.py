"""Run folders: the output folder of one job, written by one process at a time, resumable, and described.

Every job (cache, labels, ablation, debias, evaluations, heatmaps, ...) writes into a `RunFolder`:

- a **lock** (``.textspan.lock``, an advisory ``flock`` held for the whole job): a second process pointed at the same
  folder is refused at once with a `FolderBusyError` naming the holder (pid, host, command, start time). The kernel
  releases the lock when its holder dies, so a lock left by a killed process is detected (the file still names it)
  and taken over with a warning;
- **settings that must agree** to resume: `load_progress` returns the saved state of an unfinished run with the same
  settings, and refuses one made with other settings (`FolderMismatchError` naming each differing setting) unless
  ``overwrite``; `save_progress` writes the state atomically (a kill loses at most the step in flight);
- a folder written by **another command** is refused unless ``overwrite`` (so ``ablate -o CACHE`` cannot scribble
  over a cache);
- ``run.json`` beside the outputs: command, arguments, versions, model fingerprint, time.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import BadInputError, FolderBusyError, FolderMismatchError

log = logging.getLogger(__name__)

LOCK_NAME = ".textspan.lock"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path, data: dict) -> None:
    """Write JSON to a temporary file, fsync it, then rename it over `path` (readers see the old or the new file)."""
    path = Path(path)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path) -> Optional[dict]:
    """The JSON object in `path`, or None when there is no such file; an unreadable file names itself."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BadInputError(f"{path}: unreadable JSON ({exc}); remove it or use --overwrite to start afresh") from exc


def read_finished_run(folder, command: str, fingerprint: Optional[str] = None) -> dict:
    """The run.json record of a finished `textspan COMMAND` folder; BadInputError naming the folder when it is not
    one, and when `fingerprint` is given and the folder was made with other weights."""
    folder = Path(folder)
    record = read_json(folder / "run.json")
    if not record or record.get("command") != command:
        what = f"of `textspan {record.get('command')}`" if record else "none"
        raise BadInputError(f"{folder}: not a finished `textspan {command}` folder (its run.json: {what})")
    if fingerprint is not None and record.get("model_fingerprint") != fingerprint:
        from .errors import ModelMismatchError

        raise ModelMismatchError(f"{folder} was made with another model (fingerprint "
                                 f"{record.get('model_fingerprint')}; this one is {fingerprint})")
    return record


def differences(old: dict, new: dict, keys=None) -> List[str]:
    """The settings (all of `new`'s keys, or `keys`) whose values differ, written 'key: folder has X, this run has Y'."""
    keys = list(new) if keys is None else list(keys)
    return [f"{k}: folder has {_short(old.get(k))}, this run has {_short(new.get(k))}" for k in keys
            if old.get(k) != new.get(k)]


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def versions() -> dict:
    import numpy
    import open_clip
    import torch

    from ._version import __version__

    return {"textspan": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_run_json(output, command: str, arguments: dict, *, model_fingerprint: Optional[str] = None,
                   started: Optional[float] = None, extra: Optional[dict] = None, name: str = "run.json") -> Path:
    """run.json (or `name`): command, arguments, argv, versions, model fingerprint, finish time and duration."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "command": command,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()},
        "argv": sys.argv,
        "versions": versions(),
        "model_fingerprint": model_fingerprint,
        "finished": stamp.isoformat(timespec="seconds"),
    }
    if started is not None:
        record["seconds"] = round(stamp.timestamp() - started, 3)
    if extra:
        record.update(extra)
    write_json_atomic(out / name, record)
    return out / name


class FolderLock:
    """An exclusive, non-blocking lock on a folder for one job (see the module doc)."""

    def __init__(self, folder, command: str):
        self.folder = Path(folder)
        self.command = command
        self._fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd)
        except OSError:
            holder = _read_fd(fd)
            os.close(fd)
            raise FolderBusyError(
                f"{self.folder} is being written by another textspan process ({_describe(holder)}); wait for it to "
                f"finish, or write to another output folder") from None
        previous = _read_fd(fd)
        if previous:
            log.warning("%s: taking over a lock left by a process that is no longer running (%s)", self.folder,
                        _describe(previous))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                             "since": now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file means "released cleanly"
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory locks, run unguarded
        log.warning("no file locking on this platform: two processes writing one folder are not prevented")
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_fd(fd: int) -> Optional[dict]:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data.decode())
    except ValueError:
        return {"raw": data.decode(errors="replace")[:200]}


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown"
    if "raw" in holder:
        return holder["raw"]
    return (f"pid {holder.get('pid')} on {holder.get('host')}, `textspan {holder.get('command')}`, since "
            f"{holder.get('since')}")


class RunFolder:
    """The output folder of one job, held for the duration of a ``with`` block.

    Args:
        path: the folder (made when missing).
        command: the job's name (``"ablate"``, ``"segment-eval"``, ...), recorded in run.json and the lock.
        settings: what must agree for an unfinished run to resume (JSON-serialisable).
        overwrite: start afresh over a run made with other settings, or over another command's folder.
        progress_name: the file that holds the saved progress.

    Example:
        >>> with RunFolder(tmp, "demo", {"n": 3}) as run:          # doctest: +SKIP
        ...     state = run.load_progress({"done": 0})
        ...     state["done"] += 1; run.save_progress(state)
        ...     run.write_run_json({"n": 3})
    """

    def __init__(self, path, command: str, settings: Optional[dict] = None, *, overwrite: bool = False,
                 progress_name: str = "progress.json"):
        self.path = Path(path)
        self.command = command
        # compared as JSON (tuples become lists, paths strings), as they are stored
        self.settings = json.loads(json.dumps(dict(settings or {}), default=str))
        self.overwrite = overwrite
        self.progress_file = self.path / progress_name
        self.started = time.time()
        self._lock = FolderLock(self.path, command)

    def __enter__(self) -> "RunFolder":
        if self.path.exists() and not self.path.is_dir():
            raise BadInputError(f"output {self.path} exists and is not a folder")
        self._lock.acquire()
        try:
            self._check_command()
            self._check_settings()
        except Exception:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _check_command(self) -> None:
        record = read_json(self.path / "run.json") if (self.path / "run.json").is_file() else None
        if record and record.get("command") not in (None, self.command) and not self.overwrite:
            raise FolderMismatchError(f"{self.path} holds the output of `textspan {record['command']}`, not of "
                                      f"`textspan {self.command}`; write to another folder (or --overwrite)")

    def _check_settings(self) -> None:
        """A finished run of this command made with other settings is refused unless ``overwrite`` (its files would
        be replaced, or mixed with this run's)."""
        if self.overwrite or not self.settings or self.progress_file.is_file():
            return  # a job with saved progress checks its settings there (`load_progress`)
        record = read_json(self.path / "run.json")
        if not record or record.get("command") != self.command or not isinstance(record.get("settings"), dict):
            return
        self._refuse_other_settings(record["settings"], f"a finished {self.command} run", "replace it")

    def _refuse_other_settings(self, old: dict, what: str, todo: str) -> None:
        """`FolderMismatchError` naming each setting of this run that `old` (a saved run's) has otherwise."""
        problems = differences(old, self.settings)
        if problems:
            keys = [k for k in self.settings if old.get(k) != self.settings[k]]
            raise FolderMismatchError(f"{self.path} holds {what} made with other settings ({', '.join(keys)}): "
                                      f"{'; '.join(problems)}. Use another output folder, or --overwrite to {todo}")

    def load_progress(self, fresh: dict) -> dict:
        """The saved state of an unfinished run with these settings, else `fresh` (a new dict with the settings).
        Refuses a saved run made with other settings unless ``overwrite``."""
        old = None if self.overwrite else read_json(self.progress_file)
        if old is None:
            return dict(self.settings, **fresh)
        self._refuse_other_settings(old, f"a {self.command} run", "start afresh")
        return old

    def save_progress(self, state: dict) -> None:
        write_json_atomic(self.progress_file, state)

    def write_run_json(self, arguments: Dict, *, model_fingerprint: Optional[str] = None,
                       extra: Optional[dict] = None) -> Path:
        extra = dict(extra or {})
        if self.settings:
            extra.setdefault("settings", self.settings)
        return write_run_json(self.path, self.command, arguments, model_fingerprint=model_fingerprint,
                              started=self.started, extra=extra)
