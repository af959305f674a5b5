"""Run folders: one writer at a time (a second is refused at once, a dead one's lock is taken over), settings that
must agree to resume, another command's folder refused, and two real `textspan cache` processes into one folder."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import save_local_dir, write_images
from textspan import FolderBusyError, FolderMismatchError, TextspanError
from textspan.cache import HeadCache, read_manifest
from textspan.store import LOCK_NAME, FolderLock, RunFolder


def test_second_writer_is_refused_and_the_first_keeps_going(tmp_path):
    with RunFolder(tmp_path / "run", "ablate") as first:
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}.*textspan ablate"):
            with RunFolder(tmp_path / "run", "ablate"):
                pass
        first.write_run_json({"x": 1})  # still usable
    # released: the next one gets it, and the lock file is empty again (a clean release)
    with RunFolder(tmp_path / "run", "ablate"):
        pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""


def test_lock_is_released_when_the_job_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "run", "ablate"):
            raise RuntimeError("boom")
    with RunFolder(tmp_path / "run", "ablate"):
        pass


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    # what a killed process leaves: the lock file still names it, but no process holds the flock any more
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "command": "cache",
                                                "since": "2026-01-01T00:00:00+00:00"}))
    with caplog.at_level("WARNING"):
        with FolderLock(folder, "cache"):
            pass
    assert "no longer running" in caplog.text and "pid 999999" in caplog.text


def test_a_killed_process_does_not_block_the_folder(tmp_path):
    code = ("import sys, time; from textspan.store import FolderLock; FolderLock(sys.argv[1], 'cache').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusyError, match=f"pid {proc.pid}"):
        FolderLock(tmp_path / "run", "cache").acquire()
    proc.kill()
    proc.wait()
    with FolderLock(tmp_path / "run", "cache"):  # the kernel released the dead holder's lock
        pass


def test_settings_must_agree_to_resume(tmp_path):
    with RunFolder(tmp_path / "e", "segment-eval", {"method": "rollout", "target": "true"}) as run:
        state = run.load_progress({"done": 0})
        state["done"] = 3
        run.save_progress(state)
    with RunFolder(tmp_path / "e", "segment-eval", {"method": "rollout", "target": "true"}) as run:
        assert run.load_progress({"done": 0})["done"] == 3
    with RunFolder(tmp_path / "e", "segment-eval", {"method": "chefer", "target": "true"}) as run:
        with pytest.raises(FolderMismatchError, match=r"other settings \(method\).*'rollout'.*'chefer'"):
            run.load_progress({"done": 0})
    with RunFolder(tmp_path / "e", "segment-eval", {"method": "chefer", "target": "true"}, overwrite=True) as run:
        assert run.load_progress({"done": 0})["done"] == 0


def test_another_commands_folder_is_refused(tmp_path):
    with RunFolder(tmp_path / "f", "label-heads") as run:
        run.write_run_json({})
    with pytest.raises(FolderMismatchError, match="textspan label-heads"):
        with RunFolder(tmp_path / "f", "ablate"):
            pass
    assert issubclass(FolderMismatchError, TextspanError) and issubclass(FolderBusyError, TextspanError)
    with RunFolder(tmp_path / "f", "ablate", overwrite=True):
        pass


def test_two_concurrent_cache_runs_one_folder(tmp_path):
    """A `textspan cache` process pointed at a folder another writer holds (here: this test, holding the folder's
    lock as a running cache does) is refused at once with a message naming the holder, writes nothing, and the same
    command makes a correct cache once the folder is free (rows of images.csv equal rows of the arrays)."""
    name, _ = save_local_dir(tmp_path / "model", seed=0)
    write_images(tmp_path / "imgs", 12, size=16)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "textspan", "cache", str(tmp_path / "imgs"), "--model", name, "--batch-size", "4",
            "--device", "cpu", "--quiet", "--output", str(tmp_path / "c")]
    with FolderLock(tmp_path / "c", "cache"):
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and "being written by another textspan process" in second.stderr
        assert f"pid {os.getpid()}" in second.stderr and "Traceback" not in second.stderr
        assert not (tmp_path / "c" / "manifest.json").exists() and not (tmp_path / "c" / "heads.npy").exists()
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    cache = HeadCache(tmp_path / "c")
    rows = list(csv.DictReader(open(tmp_path / "c" / "images.csv")))
    assert len(rows) == len(cache) == cache.heads.shape[0] == 12
