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
