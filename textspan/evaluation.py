"""One frame for every evaluation: settings that must agree, streamed batches, a pure per-batch score, atomic
progress, aggregation, run.json, the lock, and torchrun sharding.

An evaluation is an `Evaluation` (what a batch scores to, how scores add up, what the totals mean, which files say
so) run over a `Source` (a dataset's entries, addressable by position) by `run_evaluation`:

    state = fresh()
    for each batch of `batch_size` entries from the saved position on:
        state = merge([state, score(batch)])          # the batch's part, whole or not at all
        save progress (position, failures, state)     # atomically: a kill loses at most the batch in flight
    results = finish(state); write(folder, results, state)

Under torchrun (an initialised process group with several ranks) each rank scores a contiguous, batch-aligned range of
the entries into its own progress file (``<progress>.rank{r}-of-{k}``), and rank 0 merges the ranks' states in rank
order, so the results equal a one-process run's (rows in the same order, sums of the same counts). Rank 0 holds the
folder's lock and checks the settings; a refusal stops every rank with rank 0's reason.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

from .errors import BadInputError, FolderBusyError, FolderMismatchError, TextspanError
from .store import RunFolder

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One item of a dataset: its name (a path, an id), what the scorer needs (an image, a mask, points, a label),
    or the reason it cannot be read (then `value` is None). `index` is its position in the source."""

    index: int
    name: str
    value: Any = None
    error: Optional[str] = None


class Source:
    """A dataset's entries in a fixed order. Subclasses give `__len__`, `entries(start, stop)` and `identity`
    (a string that changes when the entries would: compared to resume)."""

    identity: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def entries(self, start: int, stop: int) -> Iterator[Entry]:
        raise NotImplementedError


class Evaluation:
    """What one evaluation computes. Subclasses set `command`, `progress_name`, `cursor` (the progress key of the
    next entry) and give:

    - `fresh()`: the state before any entry (a JSON-able dict; its keys are stored at the top of the progress file);
    - `score(entries)`: a batch's part of the state (pure: no files but optional figures; failures it finds are
      returned under "failures");
    - `merge(states)`: states added up, in order (rows concatenated, counts summed);
    - `finish(state)`: the results (a dict); `write(out, results, state)`: the files.
    """

    command = "evaluate"
    progress_name = "progress.json"
    cursor = "next_entry"
    description = "evaluation"

    def fresh(self) -> dict:
        return {}

    def begin(self, state: dict) -> None:
        """Called with the saved state before the first batch of a range (e.g. to number figures on)."""

    def without_side_outputs(self) -> None:
        """Stop writing files while scoring (figures): called on every rank but 0 under torchrun, whose ranges would
        otherwise number their figures from 0 again."""

    def score(self, entries: List[Entry]) -> dict:
        raise NotImplementedError

    def merge(self, states: Sequence[dict]) -> dict:
        raise NotImplementedError

    def finish(self, state: dict) -> dict:
        raise NotImplementedError

    def write(self, out: Path, results: dict, state: dict) -> None:
        pass

    def resume_message(self, position: int, total: int, state: dict) -> str:
        return f"resuming at entry {position} of {total}"

    def empty_error(self, source: Source, failures: list) -> str:
        return f"no usable entries ({len(failures)} failed)"


def run_evaluation(ev: Evaluation, source: Source, output, settings: dict, *, batch_size: int,
                   overwrite: bool = False, quiet: bool = True, notify: Callable[[str], None] = log.info,
                   arguments: Optional[dict] = None, fingerprint: Optional[str] = None) -> dict:
    """Run `ev` over `source` (see the module doc); returns `ev.finish`'s results (with "failures").

    Args:
        output: the run folder (None: nothing is written and nothing resumes).
        settings: what must agree for a saved run to resume (the folder's settings check names each difference).
        arguments: what run.json records.
    """
    if batch_size < 1:
        raise BadInputError(f"batch_size must be at least 1; got {batch_size}")
    from .cache import _world

    world, rank = _world()
    if world > 1 and output is not None:
        return _run_sharded(ev, source, output, settings, batch_size=batch_size, overwrite=overwrite, quiet=quiet,
                            notify=notify, arguments=arguments, fingerprint=fingerprint, world=world, rank=rank)
    if output is None:
        state, failures = _score_range(ev, source, 0, len(source), batch_size, None, settings, quiet, notify)
        return _finish(ev, source, state, failures, None)
    with RunFolder(output, ev.command, settings, overwrite=overwrite, progress_name=ev.progress_name) as run:
        state, failures = _score_range(ev, source, 0, len(source), batch_size, run, settings, quiet, notify)
        results = _finish(ev, source, state, failures, Path(output))
        run.write_run_json(dict(arguments or {}), model_fingerprint=fingerprint)
    return results


def _finish(ev: Evaluation, source: Source, state: dict, failures: list, out: Optional[Path]) -> dict:
    results = ev.finish(state)
    if results is None:
        raise BadInputError(ev.empty_error(source, failures))
    results["failures"] = failures
    if out is not None:
        ev.write(out, results, state)
    return results


def _score_range(ev: Evaluation, source: Source, start: int, stop: int, batch_size: int, run: Optional[RunFolder],
                 settings: dict, quiet: bool, notify, bar_desc: Optional[str] = None):
    """Score entries [start, stop) in batches, saving progress to `run` after each; returns (state, failures)."""
    from tqdm.auto import tqdm

    fresh = {ev.cursor: start, "failures": [], **ev.fresh()}
    progress = run.load_progress(fresh) if run is not None else dict(settings, **fresh)
    position = int(progress[ev.cursor])
    state = {k: progress[k] for k in ev.fresh()}
    failures = progress["failures"]
    ev.begin(state)
    if position > start:
        notify(ev.resume_message(position - start, stop - start, state))
    bar = tqdm(total=stop - start, initial=position - start, disable=quiet, desc=bar_desc or ev.description,
               unit="img")
    batch: List[Entry] = []

    def flush(next_position: int):
        nonlocal state
        t0 = time.perf_counter()
        good = [e for e in batch if e.error is None]
        failures.extend({"item": e.name, "error": e.error} for e in batch if e.error is not None)
        if good:
            part = ev.score(good)
            failures.extend(part.pop("failures", []))
            state = ev.merge([state, part])
        progress.update(state)
        # seconds spent scoring, over every session of the run (the results files stay free of timings)
        seconds = float(progress.get("seconds", 0.0)) + time.perf_counter() - t0
        progress.update({ev.cursor: next_position, "failures": failures, "seconds": round(seconds, 4)})
        if run is not None:
            run.save_progress(progress)  # a batch's part is saved whole or not at all
        bar.update(len(batch))
        batch.clear()

    for entry in source.entries(position, stop):
        batch.append(entry)
        if len(batch) == batch_size:
            flush(entry.index + 1)
    if batch:
        flush(batch[-1].index + 1)
    bar.close()
    return state, failures


def _run_sharded(ev: Evaluation, source: Source, output, settings: dict, *, batch_size, overwrite, quiet, notify,
                 arguments, fingerprint, world: int, rank: int) -> dict:
    import torch.distributed as dist

    from .cache import shard_bounds

    out = Path(output)
    folder = RunFolder(out, ev.command, settings, overwrite=overwrite, progress_name=ev.progress_name)
    error: List[Any] = [None]
    if rank == 0:
        try:
            folder.__enter__()  # the lock and the command/settings checks, held until the merge is written
        except (TextspanError, OSError) as exc:
            error = [(type(exc).__name__, str(exc))]
    dist.broadcast_object_list(error, src=0)  # every rank stops with rank 0's reason, none waits forever
    if error[0] is not None:
        kind = {"FolderBusyError": FolderBusyError, "FolderMismatchError": FolderMismatchError}.get(error[0][0],
                                                                                                    BadInputError)
        raise kind(error[0][1])
    try:
        start, stop = shard_bounds(len(source), batch_size, world, rank)
        if rank != 0:
            ev.without_side_outputs()
        name = f"{ev.progress_name}.rank{rank}-of-{world}"
        mine = RunFolder(out, ev.command, dict(settings, shard=[start, stop]), overwrite=overwrite,
                         progress_name=name)  # not entered: rank 0's lock covers the folder
        state, failures = _score_range(ev, source, start, stop, batch_size, mine, mine.settings,
                                       quiet or rank != 0, notify, bar_desc=f"{ev.description} (rank 0 of {world})")
        dist.barrier()
        results: List[Any] = [None]
        if rank == 0:
            from .store import read_json

            try:
                parts = [read_json(out / f"{ev.progress_name}.rank{r}-of-{world}") for r in range(world)]
                merged = ev.merge([{k: p[k] for k in ev.fresh()} for p in parts])
                all_failures = [f for p in parts for f in p["failures"]]
                results = [("ok", _finish(ev, source, merged, all_failures, out))]
                folder.write_run_json(dict(arguments or {}, world_size=world), model_fingerprint=fingerprint)
            except TextspanError as exc:
                results = [("error", str(exc))]
        dist.broadcast_object_list(results, src=0)  # rank 0's results, or its reason, reach every rank
        if results[0][0] == "error":
            raise BadInputError(results[0][1])
        return results[0][1]
    finally:
        if rank == 0:
            folder.__exit__(None, None, None)


__all__ = ["Entry", "Evaluation", "Source", "run_evaluation"]
