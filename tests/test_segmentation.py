"""Segmentation data: the .mat reader, image/mask folders, mask alignment with the crop, and segment-eval."""
import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import save_local_dir, save_shapes_checkpoint
import textspan
from textspan import segmentation as seg
from textspan.cli import main


def test_mat_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8) for i in range(3)]
    masks = [rng.random((30 + 5 * i, 40)) > 0.5 for i in range(3)]
    seg.write_mat(tmp_path / "gt.mat", images, masks)
    got = list(seg.iter_mat(tmp_path / "gt.mat"))
    assert [g[0] for g in got] == [0, 1, 2] and all(g[3] is None for g in got)
    for (_, im, m, _), img, mask in zip(got, images, masks):
        assert np.array_equal(np.asarray(im), img) and np.array_equal(m, mask)
    later = list(seg.iter_mat(tmp_path / "gt.mat", start=1))  # where a resumed segment-eval starts
    assert [g[0] for g in later] == [1, 2] and np.array_equal(later[1][2], masks[2])


def test_mask_stays_aligned_with_a_non_square_crop(tmp_path):
    name, _ = save_local_dir(tmp_path / "m")
    _, preprocess, _ = textspan.load_model(name)  # resize shortest side to 32, centre crop 32
    mask = np.zeros((60, 100), bool)
    mask[10:40, 62:80] = True  # off-centre, in a wide image (the crop keeps columns 20..80)
    # an image whose pixels are the mask: after preprocessing, its bright pixels are where the mask must be
    img = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    x = preprocess(img)  # normalised with mean 0.5, std 0.25
    bright = (x[0] * 0.25 + 0.5).numpy() > 0.5
    aligned = seg.mask_array(seg.mask_transform(preprocess)(Image.fromarray(mask.astype(np.uint8) * 255)))
    assert aligned.shape == (32, 32)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(aligned, bright) > 0.9
    squashed = np.asarray(Image.fromarray(mask).resize((32, 32), Image.NEAREST))  # what squashing would give
    assert iou(squashed, bright) < 0.7


def test_segment_eval_on_folder_and_mat(tmp_path):
    ckpt, model = save_shapes_checkpoint(tmp_path / "run")
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "6", "-o", str(tmp_path / "w")]).exit_code == 0
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    common = ["--model", "shapes", "--pretrained", str(ckpt), "--classes", str(tmp_path / "classes.txt")]
    res = r.invoke(main, ["segment-eval", str(tmp_path / "w"), *common, "--target", "true", "-o",
                          str(tmp_path / "s1")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "s1" / "segmentation.json").read_text())
    assert out["n_images"] == 6 and 0 <= out["miou"] <= 100 and 0 <= out["map"] <= 100
    assert {"pixel_accuracy", "miou", "map"} <= set(out)
    # the same images as a .mat (plus a broken entry, reported and skipped)
    from textspan import world

    samples = [world.sample(0, i) for i in range(6)]
    seg.write_mat(tmp_path / "gt.mat", [s.image for s in samples], [s.mask for s in samples])
    res = r.invoke(main, ["segment-eval", str(tmp_path / "gt.mat"), *common, "-o", str(tmp_path / "s2")])
    assert res.exit_code == 0, res.output
    out2 = json.loads((tmp_path / "s2" / "segmentation.json").read_text())
    assert out2["n_images"] == 6
    (tmp_path / "w" / "masks" / "circle").mkdir(parents=True, exist_ok=True)
    bad = next((tmp_path / "w" / "images").rglob("*.png"))
    (tmp_path / "w" / "masks" / bad.relative_to(tmp_path / "w" / "images")).unlink()
    res = r.invoke(main, ["segment-eval", str(tmp_path / "w"), *common, "-o", str(tmp_path / "s3")])
    assert res.exit_code == 0, res.output
    out3 = json.loads((tmp_path / "s3" / "segmentation.json").read_text())
    assert out3["n_images"] == 5 and len(out3["failures"]) == 1
    # a file that is not an ImageNet-segmentation .mat: a clear error naming it, not a traceback
    (tmp_path / "junk.mat").write_bytes(b"not hdf5")
    res = r.invoke(main, ["segment-eval", str(tmp_path / "junk.mat"), *common, "-o", str(tmp_path / "s4")])
    assert res.exit_code == 1 and "junk.mat: not an ImageNet-segmentation .mat file" in res.output
