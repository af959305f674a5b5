"""The inputs users have: images read as a viewer shows them (or refused with the file named), dataset rows with bad
labels named by file, line and value, and world folders that are not overwritten by accident."""
import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import textspan
from textspan import BadInputError
from textspan.cli import main
from textspan.datasets import ImageList, read_image


def _gradient(w=40, h=24):
    """An RGB image whose every pixel differs (so orientation and scaling are visible)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    upright = _gradient()
    # a phone stores the sensor's (rotated) pixels and orientation 6: "rotate 90 degrees clockwise to show"
    stored = Image.fromarray(np.rot90(upright, k=1))  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100, subsampling=0)
    shown = np.asarray(read_image(tmp_path / "phone.jpg"), dtype=np.float64)
    assert shown.shape == upright.shape
    assert np.abs(shown - upright).mean() < 4  # JPEG noise only; sideways would differ by ~60


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    grey = (np.linspace(0, 65535, 64 * 8).reshape(8, 64)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "scan16.png")
    assert Image.open(tmp_path / "scan16.png").mode.startswith("I")
    shown = np.asarray(read_image(tmp_path / "scan16.png"))[..., 0].astype(int)
    want = np.round(grey / 257.0).astype(int)
    assert np.abs(shown - want).max() <= 1
    assert (shown == 255).mean() < 0.01  # not 99.6% white


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgba[2:, :2, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    shown = np.asarray(read_image(tmp_path / "a.png")).astype(int)
    assert (shown[0, 0] == [200, 0, 0]).all()
    assert (shown[3, 3] == [255, 255, 255]).all()  # transparent -> white, not black
    assert abs(shown[2, 0, 1] - 127) <= 1  # half transparent: half way to white


def test_cmyk_is_converted(tmp_path):
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "scan.jpg", quality=100)
    shown = read_image(tmp_path / "scan.jpg")
    assert shown.mode == "RGB" and np.abs(np.asarray(shown, float) - _gradient()).mean() < 6


def test_multi_frame_files_use_the_first_frame_and_say_so(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    notes = []
    shown = np.asarray(read_image(tmp_path / "anim.gif", notes=notes))
    assert abs(int(shown[0, 0, 0]) - 10) <= 2 and notes == ["2 frames: the first is used"]


def test_the_cache_records_notes_and_failures_for_odd_files(tmp_path):
    from helpers import save_local_dir

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_gradient()).save(folder / "a.png")
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(folder / "b.gif", save_all=True, append_images=frames[1:])
    os.symlink("c.png", folder / "c.png")  # a symlink to itself
    (folder / "d.png").write_bytes(b"not an image")
    images = ImageList.from_folder(folder)
    assert [os.path.basename(p) for p in images.paths] == ["a.png", "b.gif", "c.png", "d.png"]  # the loop listed
    name, _ = save_local_dir(tmp_path / "model")
    res = textspan.cache_images(folder, tmp_path / "cache", name, device="cpu")
    assert res.rows == 2
    failed = {os.path.basename(f["path"]): f["error"] for f in res.failures}
    assert set(failed) == {"c.png", "d.png"} and "symbolic links" in failed["c.png"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert [os.path.basename(n["path"]) for n in manifest["notes"]] == ["b.gif"]
    assert "first is used" in manifest["notes"][0]["note"]


def test_an_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInputError, match="broken.png: cannot read the image"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty.jpg.*empty file"):
        read_image(tmp_path / "empty.jpg")


def _waterbirds(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_filename", "y", "split", "place"])
        w.writerows(rows)
    return folder


@pytest.mark.parametrize("bad, col, value", [(["a.png", "", "0", "1"], "y", "''"), (["a.png", "5", "0", "1"], "y", "'5'"),
                                             (["a.png", "1", "7", "0"], "split", "'7'"),
                                             (["a.png", "x", "0", "0"], "y", "'x'")])
def test_waterbirds_bad_rows_are_named(tmp_path, bad, col, value):
    meta = _waterbirds(tmp_path / "wb", [["ok.png", "0", "0", "0"], ["ok2.png", "1", "2", "1"], bad])
    with pytest.raises(BadInputError) as err:
        ImageList.from_path(meta)
    msg = str(err.value)
    assert "metadata.csv, line 4" in msg and repr(col) in msg and value in msg
    res = CliRunner().invoke(main, ["cache", str(meta), "-o", str(tmp_path / "c")])
    assert res.exit_code == 1 and "line 4" in res.output and "Traceback" not in res.output


def test_waterbirds_split_takes_the_files_own_values(tmp_path):
    meta = _waterbirds(tmp_path / "wb", [["a.png", "0", "0", "0"], ["b.png", "1", "2", "1"], ["c.png", "1", "2", "0"]])
    assert len(ImageList.from_path(meta, split="2")) == len(ImageList.from_path(meta, split="test")) == 2
    with pytest.raises(BadInputError, match="split must be one of"):
        ImageList.from_path(meta, split="holdout")


def test_csv_list_mixing_integer_labels_and_names_is_refused(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\na.png,0\nb.png,cat\nc.png,1\n")
    with pytest.raises(BadInputError, match=r"mixes integers \(line 2: '0'\) and class names \(line 3: 'cat'\)"):
        ImageList.from_file(tmp_path / "list.csv")
    (tmp_path / "names.csv").write_text("path,label\na.png,dog\nb.png,cat\n")
    assert ImageList.from_file(tmp_path / "names.csv").classes == ["cat", "dog"]


def test_shapes_world_refuses_a_folder_holding_another_world(tmp_path):
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "12", "-o", str(tmp_path / "w")]).exit_code == 0
    res = r.invoke(main, ["shapes-world", "--n", "5", "-o", str(tmp_path / "w")])
    assert res.exit_code == 1 and "holds another world" in res.output and "n: folder has 12" in res.output
    assert len(list((tmp_path / "w" / "images").rglob("*.png"))) == 12  # untouched
    # the same world again is fine; --overwrite replaces another world whole (no stale images left behind)
    assert r.invoke(main, ["shapes-world", "--n", "12", "-o", str(tmp_path / "w")]).exit_code == 0
    res = r.invoke(main, ["shapes-world", "--n", "5", "-o", str(tmp_path / "w"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "w" / "images").rglob("*.png"))) == 5
    assert len(list(csv.DictReader(open(tmp_path / "w" / "metadata.csv")))) == 5
    # a folder with images this command did not write is refused too
    (tmp_path / "mine" / "images").mkdir(parents=True)
    res = r.invoke(main, ["shapes-world", "--n", "5", "-o", str(tmp_path / "mine")])
    assert res.exit_code == 1 and "did not write" in res.output
