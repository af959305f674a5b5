"""The head cache: per-image decompositions of an image set, streamed to disk, resumable and shardable.

Layout of a cache folder (n = images that decoded; failed files take no row)::

    heads.npy        [n, L, H, d']   token-summed head terms
    cls_to_cls.npy   [n, L, H, d']   CLS -> CLS attention terms
    mlps.npy         [n, L+1, d']    embedding term + one per MLP (+ the pooling head's own terms: L+2 rows)
    embeddings.npy   [n, d']         e / ||e||
    pool_heads.npy   [n, G, d']      attention-pooled towers (SigLIP) only, instead of cls_to_cls: per pooling head
                                     the published pooling-level terms (summed over tokens)
    images.csv       row, path, label, class_name
    image_list.txt   the ordered input list (path<TAB>label), for resuming
    manifest.json    model, pretrained, fingerprint, image_size, dtype, rows_done, failures, ...

Crash safety: every batch is written to the arrays first (plain positioned writes into preallocated .npy files, so
memory stays bounded), then appended to images.csv, and only then committed by an atomic rewrite of manifest.json
(`rows_done`, `next_index`). A kill at any moment loses at most the batch in flight; a rerun truncates images.csv to
the committed rows and continues from `next_index` with the same batch boundaries, so the final arrays equal an
uninterrupted run's. At the end the arrays are shrunk in place to `rows_done` rows.

Under torchrun, each rank caches a contiguous, batch-aligned range of the list into ``shards/rank{r}-of-{k}`` (the
same resumable format), and rank 0 concatenates the shards in order; the result equals a one-process run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ._repr import concise
from ._version import __version__
from .datasets import ImageDataset, ImageList, collate_with_failures
from .decomposition import decompose
from .errors import (BadInputError, CacheMismatchError, CorruptCacheError, FolderBusyError, FolderMismatchError,
                     InputNotFoundError, StorageError, describe_os_error, job)
from .store import FolderLock, read_json, write_json_atomic, write_run_json
from .store import now as _now
from .models import fingerprint as model_fingerprint
from .models import model_info

log = logging.getLogger(__name__)

FORMAT = "textspan-cache/1"
ARRAYS = ("heads", "cls_to_cls", "mlps", "embeddings")
ALL_ARRAYS = ARRAYS + ("pool_heads",)  # pool_heads: attention-pooled towers only (they have no cls_to_cls)


def array_shapes(info) -> dict:
    """Per-row shapes of the cache's arrays for a model (`ModelInfo`): CLS-pooled towers store the CLS->CLS terms;
    attention-pooled ones (SigLIP) store the pooling heads' terms instead, and one more MLP-type row."""
    shapes = {"heads": (info.n_layers, info.n_heads, info.d_embed)}
    if info.pooling == "cls":
        shapes["cls_to_cls"] = (info.n_layers, info.n_heads, info.d_embed)
    shapes["mlps"] = (info.n_mlp_terms, info.d_embed)
    shapes["embeddings"] = (info.d_embed,)
    if info.pooling != "cls":
        shapes["pool_heads"] = (info.n_pool_heads, info.d_embed)
    return shapes
# images.csv is UTF-8; a file name that is not (Linux allows any bytes) keeps its bytes, so the path still opens
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
DTYPES = {"float32": np.float32, "float16": np.float16}
# Settings that must agree for a rerun to resume (anything else, e.g. batch size, may change).
IDENTITY_KEYS = ("model", "pretrained", "fingerprint", "image_size", "dtype", "images_digest", "n_images",
                 "world_size")


# --------------------------------------------------------------------------------------------------------------------
# .npy files written row by row


class NpyRows:
    """A preallocated .npy file written by row with positioned writes (no memory map held, so RSS stays flat)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: fortran-ordered arrays are not supported")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR)

    @classmethod
    def create(cls, path: Path, n_rows: int, row_shape: Tuple[int, ...], dtype) -> "NpyRows":
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (n_rows, *row_shape)}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.truncate(f.tell() + n_rows * int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(path)

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.shape[1:] != tuple(self.shape[1:]) or row + data.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: cannot write {data.shape} at row {row} into {self.shape}")
        os.pwrite(self._fd, data.tobytes(), self.offset + row * self.row_bytes)

    def shrink(self, n_rows: int) -> None:
        """Set the row count to `n_rows` in place (header rewritten at the same length, file truncated)."""
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (n_rows, *self.shape[1:])}
        text = repr(header).encode("latin1")
        room = self.offset - 10 - 1  # magic(6) + version(2) + length(2), trailing newline
        if len(text) > room:
            raise ValueError(f"{self.path}: header does not fit")
        with open(self.path, "r+b") as f:
            f.seek(10)
            f.write(text + b" " * (room - len(text)) + b"\n")
            f.truncate(self.offset + n_rows * self.row_bytes)
        self.shape = (n_rows, *self.shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------------------------
# manifest


def read_manifest(folder: Path) -> Optional[dict]:
    """The cache's manifest.json (None when there is none; unreadable JSON is an error naming the file)."""
    return read_json(Path(folder) / "manifest.json")


def _describe_mismatch(old: dict, new: dict) -> List[str]:
    return [f"{k}: cache has {old.get(k)!r}, this run has {new.get(k)!r}" for k in IDENTITY_KEYS
            if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------------------------------
# checks


def _corrupt(folder: Path, manifest: dict, text: str) -> CorruptCacheError:
    if manifest.get("complete"):
        todo = "rebuild it with the same `textspan cache` command and --overwrite"
    else:
        todo = ("rerun the same `textspan cache` command to resume it (or add --overwrite to rebuild it when the "
                "resume is refused)")
    return CorruptCacheError(f"{text}. The cache in {folder} is damaged: {todo}")


def npy_header(path: Path) -> Tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file; ValueError when the header cannot be read."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("fortran-ordered")
        return tuple(shape), np.dtype(dtype), f.tell()


def check_cache(folder, manifest: Optional[dict] = None, rows: Optional[Tuple[int, ...]] = None) -> dict:
    """Check that a cache folder's files agree with each other and with its manifest; returns the manifest.

    - every array the manifest lists exists, has a readable .npy header, the manifest's row shape and dtype, one of
      `rows` rows (default: ``rows_done``; an unfinished cache is preallocated for all its images) and exactly the bytes
      its header promises (a file cut short is caught here);
    - ``rows_done`` is a whole number no larger than the images listed, and, for a finished cache, images.csv holds
      exactly ``rows_done`` records (parsed as CSV), numbered 0, 1, ... in its ``row`` column.

    Raises `CorruptCacheError` naming the file, what was expected and what was found, and what to do."""
    folder = Path(folder)
    m = read_manifest(folder) if manifest is None else manifest
    if m is None:
        raise InputNotFoundError(f"{folder}: no manifest.json (not a textspan cache)")
    for key in ("rows_done", "next_index", "n_images", "arrays", "dtype"):
        if key not in m:
            raise _corrupt(folder, m, f"{folder / 'manifest.json'}: no {key!r} entry")
    done = m["rows_done"]
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= m["n_images"]:
        raise _corrupt(folder, m, f"{folder / 'manifest.json'}: rows_done is {done!r}; expected a whole number from "
                                  f"0 to {m['n_images']} (the images listed)")
    allowed = (done,) if rows is None else tuple(rows)
    dtype = np.dtype(DTYPES.get(m["dtype"], np.float32))
    for name, shape in m["arrays"].items():
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise _corrupt(folder, m, f"{path} is missing")
        try:
            found_shape, found_dtype, offset = npy_header(path)
        except (ValueError, OSError, EOFError) as exc:
            raise _corrupt(folder, m, f"{path}: not a readable .npy file ({exc})") from None
        expected = (found_shape[0] if found_shape[:1] and found_shape[0] in allowed else allowed[0],
                    *[int(d) for d in shape[1:]])
        if found_shape != expected:
            raise _corrupt(folder, m, f"{path}: shape {found_shape}, expected {expected} (rows_done "
                                      f"{done} in manifest.json)")
        if found_dtype != dtype:
            raise _corrupt(folder, m, f"{path}: dtype {found_dtype}, expected {dtype} (manifest.json)")
        size = path.stat().st_size
        need = offset + int(np.prod(expected, dtype=np.int64)) * dtype.itemsize
        if size != need:
            raise _corrupt(folder, m, f"{path}: {size} bytes, expected {need} for shape {expected} (the file was "
                                      f"cut short or extended)")
    table = folder / "images.csv"
    if not table.is_file():
        raise _corrupt(folder, m, f"{table} is missing")
    if m.get("complete"):
        with open(table, newline="", **CSV_ENCODING) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[:2] != ["row", "path"]:
                raise _corrupt(folder, m, f"{table}: header {header!r}, expected row, path, label, class_name, ...")
            n = 0
            for n, record in enumerate(reader, start=1):
                if not record or record[0] != str(n - 1):
                    raise _corrupt(folder, m, f"{table}, record {n}: row {record[0] if record else ''!r}, expected "
                                              f"{n - 1}")
        if n != done:
            raise _corrupt(folder, m, f"{table}: {n} image records, expected {done} (rows_done in manifest.json and "
                                      f"the arrays' rows)")
    return m


# --------------------------------------------------------------------------------------------------------------------
# writing


@concise
@dataclass
class CacheResult:
    folder: Path
    rows: int
    failures: List[dict]
    resumed_from: int
    seconds: float


def _write_image_list(path: Path, images: ImageList) -> None:
    with open(path, "w", **CSV_ENCODING) as f:
        for p, y in zip(images.paths, images.labels):
            f.write(f"{p}\t{y}\n")


def _new_csv(path: Path, extra_columns=()) -> int:
    """Write images.csv's header; returns its size in bytes (the committed length of an empty table)."""
    with open(path, "w", newline="", **CSV_ENCODING) as f:
        csv.writer(f).writerow(["row", "path", "label", "class_name", *extra_columns])
    return path.stat().st_size


def count_csv_records(path: Path) -> int:
    """Data records of images.csv, parsed as CSV (a quoted path may hold a newline)."""
    with open(path, newline="", **CSV_ENCODING) as f:
        reader = csv.reader(f)
        next(reader, None)
        return sum(1 for _ in reader)


def _truncate_csv(path: Path, rows: int, committed_bytes: Optional[int]) -> None:
    """Cut images.csv back to its header and first `rows` records (drops rows written after the last commit).
    `committed_bytes`: its length at that commit (recorded in the manifest); caches written before that was
    recorded are cut by CSV records. Refuses (CorruptCacheError) a table with fewer records than committed."""
    if not path.is_file():
        raise CorruptCacheError(f"{path} is missing ({rows} rows were committed); rerun with --overwrite to "
                                f"rebuild the cache")
    if committed_bytes is not None and path.stat().st_size >= committed_bytes:
        with open(path, "r+b") as f:
            f.truncate(committed_bytes)
    else:
        with open(path, newline="", **CSV_ENCODING) as f:
            reader = csv.reader(f)
            records = [r for _, r in zip(range(rows + 1), reader)]
        with open(path, "w", newline="", **CSV_ENCODING) as f:
            csv.writer(f).writerows(records)
    found = count_csv_records(path)
    if found != rows:
        raise CorruptCacheError(f"{path}: {found} image rows, but manifest.json says {rows} rows are done; the "
                                f"cache cannot be resumed safely: rerun with --overwrite to rebuild it")


def _prepare_folder(out: Path, settings: dict, overwrite: bool) -> Optional[dict]:
    """Return the manifest to resume from (None: fresh start). Refuses a folder made with other settings."""
    out.mkdir(parents=True, exist_ok=True)
    record = _readable_json(out / "run.json", overwrite)
    if record and record.get("command") not in (None, "cache") and not overwrite:
        raise FolderMismatchError(f"{out} holds the output of `textspan {record['command']}`, not a cache; write the "
                                  f"cache to another folder (or --overwrite)")
    old = _readable_json(out / "manifest.json", overwrite)
    if old is not None and old.get("format") != FORMAT and not overwrite:
        raise CacheMismatchError(f"{out}/manifest.json is not a textspan cache's manifest (format "
                                 f"{old.get('format')!r}); write the cache to another folder (or --overwrite)")
    if old is not None and not overwrite:
        problems = _describe_mismatch(old, settings)
        if problems:
            raise CacheMismatchError(
                f"{out} holds a cache made with other settings ({'; '.join(problems)}). Use another --output or "
                f"--overwrite to replace it.")
        return old
    if old is not None or any((out / f"{a}.npy").exists() for a in ALL_ARRAYS):
        if not overwrite:
            raise CacheMismatchError(f"{out} holds .npy files but no manifest.json; use --overwrite to replace them")
    for name in [f"{a}.npy" for a in ALL_ARRAYS] + ["images.csv", "image_list.txt", "manifest.json"]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    return None


def _readable_json(path: Path, overwrite: bool) -> Optional[dict]:
    """A JSON file of the folder; an unreadable one is an error naming it, unless ``overwrite`` (then it is
    replaced with the rest)."""
    try:
        return read_json(path)
    except BadInputError:
        if overwrite:
            return {}
        raise


def _cache_range(model, preprocess: Callable, images: ImageList, out: Path, settings: dict, *, batch_size: int,
                 num_workers: int, overwrite: bool, quiet: bool, progress_desc: str = "caching") -> CacheResult:
    """Cache `images` into `out` (one process, holding the folder's lock): fresh, resumed, or a no-op when already
    complete."""
    with FolderLock(out, "cache"):
        return _cache_range_locked(model, preprocess, images, out, settings, batch_size=batch_size,
                                   num_workers=num_workers, overwrite=overwrite, quiet=quiet,
                                   progress_desc=progress_desc)


def _cache_range_locked(model, preprocess: Callable, images: ImageList, out: Path, settings: dict, *,
                        batch_size: int, num_workers: int, overwrite: bool, quiet: bool,
                        progress_desc: str) -> CacheResult:
    t0 = time.time()
    info = model_info(model)
    manifest = _prepare_folder(out, settings, overwrite)
    np_dtype = DTYPES[settings["dtype"]]
    shapes = array_shapes(info)
    if manifest is None:
        manifest = dict(settings, format=FORMAT, textspan_version=__version__, created=_now(), rows_done=0,
                        next_index=0, failures=[], complete=False, arrays={a: [None, *s] for a, s in shapes.items()})
        if images.notes:
            manifest["notes"] = list(images.notes)
        writers = {a: NpyRows.create(out / f"{a}.npy", len(images), s, np_dtype) for a, s in shapes.items()}
        _write_image_list(out / "image_list.txt", images)
        manifest["csv_bytes"] = _new_csv(out / "images.csv", list(images.extra))
        write_json_atomic(out / "manifest.json", manifest)
    else:
        if manifest.get("complete"):
            check_cache(out, manifest)
            log.info("%s is already complete (%d rows); nothing to do", out, manifest["rows_done"])
            return CacheResult(out, manifest["rows_done"], manifest["failures"], manifest["next_index"], 0.0)
        # the arrays are preallocated for every image (or already shrunk, by a run killed just before it finished)
        check_cache(out, manifest, rows=(len(images),) if manifest["next_index"] < len(images)
                    else (len(images), manifest["rows_done"]))
        writers = {a: NpyRows(out / f"{a}.npy") for a in manifest["arrays"]}
        _truncate_csv(out / "images.csv", manifest["rows_done"], manifest.get("csv_bytes"))
        if manifest["next_index"]:
            log.info("resuming %s at image %d of %d (%d rows done)", out, manifest["next_index"], len(images),
                     manifest["rows_done"])
    resumed_from = manifest["next_index"]
    try:
        _stream_batches(model, preprocess, images, out, manifest, writers, batch_size=batch_size,
                        num_workers=num_workers, quiet=quiet, progress_desc=progress_desc)
    except OSError as exc:  # disk full, read-only, ...: the last commit stands
        committed = read_manifest(out) or {}
        raise StorageError(
            f"{describe_os_error(exc)}. The cache keeps the {committed.get('rows_done', 0)} images committed before "
            f"the fault (up to image {committed.get('next_index', 0)} of {len(images)}); fix the cause (free space, "
            f"write permission) and rerun the same command to resume") from exc
    rows_done = manifest["rows_done"]
    for a, w in writers.items():
        w.shrink(rows_done)
        w.close()
        manifest["arrays"][a][0] = rows_done
    manifest.update(complete=True, updated=_now())
    write_json_atomic(out / "manifest.json", manifest)
    return CacheResult(out, rows_done, manifest["failures"], resumed_from, time.time() - t0)


def _stream_batches(model, preprocess, images: ImageList, out: Path, manifest: dict, writers: dict, *,
                    batch_size: int, num_workers: int, quiet: bool, progress_desc: str) -> None:
    """Decompose the images from ``manifest["next_index"]`` on, committing the manifest after every batch (it is
    updated in place)."""
    rows_done = manifest["rows_done"]
    failures = list(manifest["failures"])
    notes = list(manifest.get("notes", []))
    if manifest["next_index"] < len(images):
        dataset = ImageDataset(images, preprocess, indices=range(manifest["next_index"], len(images)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=collate_with_failures)
        device = next(model.parameters()).device
        bar = tqdm(total=len(images), initial=manifest["next_index"], disable=quiet, desc=progress_desc,
                   unit="img")
        with open(out / "images.csv", "a", newline="", **CSV_ENCODING) as csv_file:
            rows_csv = csv.writer(csv_file)
            for indices, batch, bad, noted in loader:
                n_in_batch = len(indices) + len(bad)
                if batch is not None:
                    d = decompose(model, batch.to(device), spatial=False)
                    values = {"heads": d.heads, "cls_to_cls": d.cls_to_cls, "mlps": d.mlps,
                              "embeddings": d.embedding, "pool_heads": d.pool_heads}
                    for a in writers:
                        v = values[a]
                        writers[a].write(rows_done, v.float().cpu().numpy())
                    for k, idx in enumerate(indices):
                        y = images.labels[idx]
                        rows_csv.writerow([rows_done + k, images.paths[idx], y, images.class_name(y)]
                                          + [col[idx] for col in images.extra.values()])
                    csv_file.flush()
                    rows_done += len(indices)
                manifest["csv_bytes"] = os.fstat(csv_file.fileno()).st_size
                for idx, err in bad:
                    log.warning("skipping %s: %s", images.paths[idx], err)
                    failures.append({"path": images.paths[idx], "error": err})
                for idx, note in noted:
                    log.warning("%s: %s", images.paths[idx], note)
                    notes.append({"path": images.paths[idx], "note": note})
                if notes:
                    manifest["notes"] = notes
                manifest.update(rows_done=rows_done, next_index=manifest["next_index"] + n_in_batch,
                                failures=failures, updated=_now())
                write_json_atomic(out / "manifest.json", manifest)
                bar.update(n_in_batch)
        bar.close()


def cache_settings(model, *, model_name: str, pretrained: Optional[str], images: ImageList, dtype: str,
                   world_size: int = 1) -> dict:
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    info = model_info(model)
    return dict(model=model_name, pretrained=pretrained, fingerprint=model_fingerprint(model),
                image_size=list(info.image_size), dtype=dtype, n_layers=info.n_layers, n_heads=info.n_heads,
                d_embed=info.d_embed, n_tokens=info.n_tokens, images_source=images.source,
                images_digest=images.digest, n_images=len(images), classes=images.classes, world_size=world_size)


@job
def build_cache(model, preprocess: Callable, images: ImageList, output, *, model_name: str,
                pretrained: Optional[str] = None, batch_size: int = 32, dtype: str = "float32", num_workers: int = 0,
                overwrite: bool = False, quiet: bool = False, arguments: Optional[dict] = None) -> CacheResult:
    """Decompose every image of `images` and stream the results into the cache folder `output`.

    The folder is locked for the run (a second process writing into it is refused with `FolderBusyError`), a
    folder made with other settings is refused with `CacheMismatchError` (unless ``overwrite``), an interrupted run
    resumes where it stopped, and ``run.json`` is written when the cache is complete.

    Under ``torchrun`` (WORLD_SIZE > 1, with the process group initialised by `init_distributed`) each rank caches
    its share into a shard and rank 0 merges them; otherwise the folder is written directly. See the module doc.

    Args:
        model, preprocess: from `textspan.load_model`.
        images: the ordered image list.
        output: the cache folder.
        model_name, pretrained: recorded in the manifest (and checked on resume).
        batch_size: images per forward pass (does not change the results beyond float rounding).
        dtype: "float32" or "float16" storage.
        num_workers: DataLoader worker processes for image decoding.
        overwrite: replace a cache made with other settings instead of refusing.
        quiet: no progress bar.
        arguments: what run.json records as the arguments (default: these keyword arguments).

    Example:
        >>> model, preprocess, _ = textspan.load_model("shapes")                       # doctest: +SKIP
        >>> build_cache(model, preprocess, ImageList.from_path("shapes/images"), "cache", model_name="shapes")
    """
    out = Path(output)
    world, rank = _world()
    t0 = time.time()
    if arguments is None:
        arguments = dict(images=images.source, model=model_name, pretrained=pretrained, batch_size=batch_size,
                         dtype=dtype, num_workers=num_workers, overwrite=overwrite)
    settings = cache_settings(model, model_name=model_name, pretrained=pretrained, images=images, dtype=dtype,
                              world_size=world)

    def finish():  # under the folder's lock
        write_run_json(out, "cache", dict(arguments, world_size=world),
                       model_fingerprint=read_manifest(out)["fingerprint"], started=t0)

    if world == 1:
        with FolderLock(out, "cache"):
            result = _cache_range_locked(model, preprocess, images, out, settings, batch_size=batch_size,
                                         num_workers=num_workers, overwrite=overwrite, quiet=quiet,
                                         progress_desc="caching")
            finish()
            return result
    return _build_distributed(model, preprocess, images, out, settings, finish=finish, batch_size=batch_size,
                              num_workers=num_workers, overwrite=overwrite, quiet=quiet, world=world, rank=rank)


# --------------------------------------------------------------------------------------------------------------------
# torch.distributed


def _world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def init_distributed(device: str) -> Tuple[int, int, str]:
    """Initialise torch.distributed when launched by torchrun; returns (world_size, rank, device for this rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=_dt.timedelta(hours=24))
    rank = torch.distributed.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return world, rank, device


def shard_bounds(n_images: int, batch_size: int, world: int, rank: int) -> Tuple[int, int]:
    """Contiguous, batch-aligned [start, stop) of the image list for `rank`, so shards reuse one-process batches."""
    n_batches = -(-n_images // batch_size)
    first = rank * n_batches // world
    last = (rank + 1) * n_batches // world
    return min(first * batch_size, n_images), min(last * batch_size, n_images)


def _build_distributed(model, preprocess, images, out: Path, settings: dict, *, finish, batch_size, num_workers,
                       overwrite, quiet, world, rank) -> CacheResult:
    dist = torch.distributed
    t0 = time.time()
    error = [None]
    lock = FolderLock(out, "cache")
    if rank == 0:
        try:
            lock.acquire()  # held by rank 0 until the shards are merged

            old = read_manifest(out)
            if old is not None and (overwrite or _describe_mismatch(old, settings)):
                _prepare_folder(out, settings, overwrite)  # raises on mismatch unless overwrite
            out.mkdir(parents=True, exist_ok=True)
        except (CacheMismatchError, FolderBusyError) as exc:
            error = [(type(exc).__name__, str(exc))]
    dist.broadcast_object_list(error, src=0)  # every rank stops with rank 0's reason, none waits forever
    if error[0] is not None:
        lock.release()
        raise (FolderBusyError if error[0][0] == "FolderBusyError" else CacheMismatchError)(error[0][1])
    try:
        result = _shard_and_merge(model, preprocess, images, out, settings, batch_size=batch_size,
                                  num_workers=num_workers, quiet=quiet, world=world, rank=rank, t0=t0)
        if rank == 0:
            finish()
        return result
    finally:
        lock.release()


def _shard_and_merge(model, preprocess, images, out: Path, settings: dict, *, batch_size, num_workers, quiet, world,
                     rank, t0) -> CacheResult:
    dist = torch.distributed
    final = read_manifest(out)
    if final is not None and final.get("complete"):
        return CacheResult(out, final["rows_done"], final["failures"], final["next_index"], 0.0)
    start, stop = shard_bounds(len(images), batch_size, world, rank)
    shard_dir = out / "shards" / f"rank{rank}-of-{world}"
    shard_settings = dict(settings, shard=[start, stop], world_size=world)
    _cache_range(model, preprocess, images.subset(start, stop), shard_dir, shard_settings, batch_size=batch_size,
                 num_workers=num_workers, overwrite=False, quiet=quiet or rank != 0,
                 progress_desc=f"caching (rank 0 of {world})")
    dist.barrier()
    if rank == 0:
        merge_shards(out, [out / "shards" / f"rank{r}-of-{world}" for r in range(world)], settings)
    dist.barrier()
    m = read_manifest(out)
    return CacheResult(out, m["rows_done"], m["failures"], 0, time.time() - t0)


def merge_shards(out: Path, shard_dirs: List[Path], settings: dict, chunk_rows: int = 4096) -> dict:
    """Concatenate complete shard caches, in order, into `out` (streamed in chunks); returns the manifest."""
    manifests = [read_manifest(d) for d in shard_dirs]
    if any(m is None or not m.get("complete") for m in manifests):
        raise RuntimeError(f"cannot merge: not every shard under {out / 'shards'} is complete")
    total = sum(m["rows_done"] for m in manifests)
    first = manifests[0]
    writers = {}
    arrays = list(first["arrays"])
    for a in arrays:
        src = np.load(shard_dirs[0] / f"{a}.npy", mmap_mode="r")
        writers[a] = NpyRows.create(out / f"{a}.npy", total, src.shape[1:], src.dtype)
    row = 0
    failures, notes = [], []
    with open(shard_dirs[0] / "images.csv", newline="", **CSV_ENCODING) as g:
        header = next(csv.reader(g))
    with open(out / "images.csv", "w", newline="", **CSV_ENCODING) as f:
        w = csv.writer(f)
        w.writerow(header)
        for d, m in zip(shard_dirs, manifests):
            n = m["rows_done"]
            for a in arrays:
                src = np.load(d / f"{a}.npy", mmap_mode="r")
                for s in range(0, n, chunk_rows):
                    writers[a].write(row + s, np.asarray(src[s:s + chunk_rows]))
                del src
            with open(d / "images.csv", newline="", **CSV_ENCODING) as g:
                r = csv.reader(g)
                next(r)
                for k, rec in enumerate(r):
                    w.writerow([row + k] + rec[1:])
            row += n
            failures.extend(m["failures"])
            notes.extend(m.get("notes", []))
    for wr in writers.values():
        wr.close()
    with open(out / "image_list.txt", "wb") as f:
        for d in shard_dirs:
            f.write((d / "image_list.txt").read_bytes())
    manifest = dict(settings, format=FORMAT, textspan_version=__version__, created=first.get("created"),
                    updated=_now(), rows_done=total, next_index=settings["n_images"], failures=failures,
                    complete=True, arrays={a: [total, *first["arrays"][a][1:]] for a in arrays},
                    merged_from=[str(d.relative_to(out)) for d in shard_dirs], **({"notes": notes} if notes else {}),
                    csv_bytes=(out / "images.csv").stat().st_size)
    write_json_atomic(out / "manifest.json", manifest)
    shutil.rmtree(out / "shards", ignore_errors=True)
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# reading


class HeadCache:
    """Read access to a finished cache folder (arrays as read-only memory maps).

    Example:
        >>> cache = HeadCache("cache_dir")                          # doctest: +SKIP
        >>> cache.heads.shape                                       # doctest: +SKIP
        (1000, 12, 12, 512)
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        m = read_manifest(self.folder)
        if m is None:
            raise InputNotFoundError(f"{self.folder}: no manifest.json (not a textspan cache)")
        if m.get("format") != FORMAT:
            raise BadInputError(f"{self.folder}: unknown cache format {m.get('format')!r}")
        if not m.get("complete"):
            raise BadInputError(f"{self.folder}: the cache is incomplete ({m.get('rows_done')} rows, stopped at image "
                                f"{m.get('next_index')} of {m.get('n_images')}); rerun the same `textspan cache` "
                                f"command to finish it")
        check_cache(self.folder, m)
        self.manifest = m

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    @property
    def heads(self) -> np.ndarray:
        return self._array("heads")

    @property
    def cls_to_cls(self) -> Optional[np.ndarray]:
        """[n, L, H, d'] the CLS->CLS terms; None for an attention-pooled tower (no CLS token)."""
        return self._array("cls_to_cls") if (self.folder / "cls_to_cls.npy").exists() else None

    @property
    def pool_heads(self) -> Optional[np.ndarray]:
        """[n, G, d'] the pooling heads' terms of an attention-pooled tower (SigLIP); None otherwise."""
        return self._array("pool_heads") if (self.folder / "pool_heads.npy").exists() else None

    @property
    def mlps(self) -> np.ndarray:
        return self._array("mlps")

    @property
    def embeddings(self) -> np.ndarray:
        return self._array("embeddings")

    @property
    def images(self):
        import pandas as pd

        return pd.read_csv(self.folder / "images.csv", keep_default_na=False, encoding="utf-8",
                           encoding_errors="surrogateescape")

    @property
    def labels(self) -> np.ndarray:
        return self.images["label"].to_numpy()

    def __len__(self) -> int:
        return int(self.manifest["rows_done"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"HeadCache({str(self.folder)!r}: {len(self)} images, model {m.get('model')!r}, "
                f"{m.get('n_layers')} layers x {m.get('n_heads')} heads, d_embed {m.get('d_embed')}, "
                f"{len(m.get('classes') or [])} classes, {m.get('dtype')})")

    def check_model(self, model) -> None:
        """Refuse a model whose weights differ from the ones this cache was made with."""
        fp = model_fingerprint(model)
        if fp != self.manifest["fingerprint"]:
            raise CacheMismatchError(f"{self.folder} was made with model {self.manifest['model']!r} "
                                     f"(fingerprint {self.manifest['fingerprint']}); this model's is {fp}")
