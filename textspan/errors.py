"""textspan's errors: one family under `TextspanError`.

Every error a user can cause (a misspelt model name, a file that is not what it claims, a folder that belongs to
another run, weights that cannot be fetched) is a `TextspanError` whose message names the file, row, argument or
setting at fault; the command line prints that message without a traceback. Each error also derives from the
built-in exception it refines (ValueError, RuntimeError, FileNotFoundError), so older ``except`` clauses still work.
"""
from __future__ import annotations


class TextspanError(Exception):
    """Base of every error textspan raises on purpose."""


class BadInputError(TextspanError, ValueError):
    """An argument, file or dataset row that textspan cannot use (the message names it)."""


class InputNotFoundError(TextspanError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class UnknownModelError(BadInputError):
    """A model name that no loader knows (the message lists close names)."""


class UnsupportedModelError(TextspanError, ValueError):
    """The architecture is not one textspan can decompose exactly (yet)."""


class WeightsUnavailableError(TextspanError, RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable from here."""


class FolderMismatchError(TextspanError, RuntimeError):
    """An output folder holds a run made with other settings (the message names them)."""


class CacheMismatchError(FolderMismatchError):
    """The output folder holds a cache made with another model, image list or settings."""


class FolderBusyError(TextspanError, RuntimeError):
    """Another process is writing into the same output folder."""


class ModelMismatchError(TextspanError, ValueError):
    """Something made with one model (a cache, a classifier, text embeddings) was given another model."""


class EmbeddingMismatchError(ModelMismatchError):
    """Text embeddings made with another model or another bank."""


class CorruptCacheError(TextspanError, ValueError):
    """A cache folder whose files disagree with each other or with its manifest (cut short, edited, missing): the
    message names the file, what was expected and found, and how to resume or rebuild."""


class StorageError(TextspanError, OSError):
    """Reading or writing a file failed for a reason of the file system (disk full, read-only, permission, a path
    through a file); the message names the path and what was kept."""

    def __str__(self) -> str:  # the message as written (OSError would print "[Errno N] ..." once errno is set)
        return str(self.args[0]) if self.args else ""


class DeviceError(TextspanError, RuntimeError):
    """The torch device asked for is not there (e.g. --device cuda on a machine without a GPU)."""


_OS_REASONS = {
    "ENOSPC": "the disk is full",
    "EDQUOT": "the disk quota is exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "ENOTDIR": "a part of the path is a file, not a folder",
    "EISDIR": "it is a folder, not a file",
    "ENOENT": "no such file or folder",
    "EEXIST": "it exists already (as a file where a folder is needed?)",
    "ENAMETOOLONG": "the name is too long",
    "EMFILE": "too many open files",
    "EIO": "an input/output error of the device",
}


def describe_os_error(exc: OSError) -> str:
    """One line: the path(s) and the reason, in words."""
    import errno as _errno

    name = _errno.errorcode.get(exc.errno or 0, "")
    reason = _OS_REASONS.get(name) or exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else ""
    if getattr(exc, "filename2", None):
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {reason}" if where else reason


def translate(exc: BaseException):
    """The `TextspanError` an ordinary fault stands for (file system, text decoding, unpickling, device, memory),
    or None for anything else (a bug, to be reported)."""
    import pickle

    if isinstance(exc, TextspanError):
        return exc
    if isinstance(exc, OSError):
        err = StorageError(describe_os_error(exc))
        err.errno, err.filename = exc.errno, exc.filename
        return err
    if isinstance(exc, UnicodeDecodeError):
        return BadInputError(f"a file is not text in the expected encoding ({exc.encoding}: byte "
                             f"0x{exc.object[exc.start]:02x} at position {exc.start}); save it as UTF-8")
    if isinstance(exc, pickle.UnpicklingError):
        return BadInputError(f"a file could not be read as a checkpoint ({exc}); textspan loads state dicts of "
                             f"tensors only (.pt/.pth/.bin with weights_only=True, or .safetensors)")
    if isinstance(exc, (RuntimeError, AssertionError)):
        text = str(exc)
        if any(k in text for k in ("CUDA", "cuda", "NVIDIA driver", "Torch not compiled", "MPS")) and \
                any(k in text for k in ("not available", "no CUDA", "not compiled", "invalid device", "driver",
                                        "out of memory", "device-side", "busy or unavailable")):
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            return DeviceError(f"device error: {first}")
    if isinstance(exc, MemoryError):
        return TextspanError("out of memory: use a smaller --batch-size (or fewer images at once)")
    return None


def job(fn):
    """Decorator of the library's jobs: an ordinary fault (see `translate`) comes out as a `TextspanError` that
    names the path or device, the original chained as its cause."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TextspanError:
            raise
        except Exception as exc:
            err = translate(exc)
            if err is None:
                raise
            raise err from exc
    return wrapper
