"""The comparison papers' benchmarks: ImageNet-S and OpenImages-V7 readers on their exact layouts (and odd rows),
the metrics on hand-worked cases, Grad-ECLIP's deletion/insertion against its published steps, the benchmark
command's leaderboard, resume after a kill, and torchrun equal to one process."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import textspan
from textspan.benchmark import dataset_kind, run_benchmark
from textspan.cli import main
from textspan.errors import BadInputError, TextspanError
from textspan.evals import deletion as dl
from textspan.evals._maps import binarise, frame_axes, point_in_frame
from textspan.evals.imagenet_s import imagenet_s_iou
from textspan.evals.points import point_iou
from textspan.imagenet import IGNORE, ImageNetS, decode_ids, encode_ids, write_imagenet_s
from textspan.openimages import OpenImagesPoints, write_openimages


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-S


def _ins(tmp_path, subset="ImageNetSMini", wnids=("n01443537", "n01440764"), sizes=None):
    rng = np.random.default_rng(0)
    images, masks, names = {}, {}, {}
    for k, w in enumerate(wnids):
        for j in range(2):
            h, wd = (sizes or {}).get((w, j), (40, 56))
            ids = np.zeros((h, wd), np.int64)
            ids[5:20, 10:30] = sorted(wnids).index(w) + 1
            ids[0:2] = IGNORE
            images.setdefault(w, []).append(rng.integers(0, 255, (h, wd, 3)))
            masks.setdefault(w, []).append(ids)
            names.setdefault(w, []).append(f"ILSVRC2012_val_{k}{j:07d}")
    return write_imagenet_s(tmp_path, subset, wnids, images, masks, names)


def test_imagenet_s_ids_are_r_plus_256_g():
    ids = np.array([[0, 1, 255], [256, 300, IGNORE]])
    rgb = encode_ids(ids)
    assert rgb[1, 1].tolist() == [44, 1, 0]  # 300 = 44 + 256 * 1
    assert (decode_ids(rgb) == ids).all()


def test_imagenet_s_reader_on_its_layout(tmp_path):
    base = _ins(tmp_path)
    ds = ImageNetS(tmp_path)  # the subset folder is found below the root
    assert ds.root == base and ds.wnids == ["n01440764", "n01443537"]  # class id = position in sorted order
    assert ds.names == ["tench", "goldfish"]  # CLIP's ImageNet names
    (e,) = list(ds.entries(0, 1))
    img, ids, cls = e.value
    assert e.name.startswith("n01440764/") and cls == 1 and ids[10, 15] == 1 and ids[0, 0] == IGNORE
    assert dataset_kind(tmp_path) == "imagenet-s"


def test_imagenet_s_odd_rows(tmp_path):
    base = _ins(tmp_path, sizes={("n01443537", 0): (20, 28), ("n01443537", 1): (30, 30)})
    # masks of another size than their images: the same shape is rescaled, another shape refused
    img_dir = base / "validation" / "n01443537"
    seg_dir = base / "validation-segmentation" / "n01443537"
    a, b = sorted(img_dir.iterdir())
    Image.new("RGB", (56, 40)).save(a)  # mask 28x20: same shape ratio
    Image.new("RGB", (56, 40)).save(b)  # mask 30x30: another shape
    bad_id = np.zeros((40, 56), np.int64)
    bad_id[3, 3] = 7  # no such class (2 categories)
    tench = sorted((base / "validation-segmentation" / "n01440764").iterdir())[0]
    Image.fromarray(encode_ids(bad_id)).save(tench)
    ds = ImageNetS(base)
    got = {e.name: e for e in ds.entries(0, len(ds))}
    assert got[str(a.relative_to(base / "validation"))].error is None
    assert got[str(a.relative_to(base / "validation"))].value[1].shape == (40, 56)
    assert "another shape" in got[str(b.relative_to(base / "validation"))].error
    assert "class ids [7]" in got[str(tench.with_suffix(".JPEG").relative_to(base / "validation-segmentation"))
                                      ].error
    Image.new("L", (56, 40)).save(seg_dir / a.with_suffix(".png").name)  # not RGB
    assert "RGB PNG" in next(e for e in ds.entries(0, 4) if e.name.endswith(a.name)).error


def test_imagenet_s_subset_needs_its_categories(tmp_path):
    _ins(tmp_path, subset="ImageNetS50")
    (tmp_path / "ImageNetS50" / "ImageNetS_categories_im50.txt").unlink()
    with pytest.raises(BadInputError, match="2 class folders, but ImageNetS50 has 50 classes"):
        ImageNetS(tmp_path)
    cats = tmp_path / "cats.txt"
    cats.write_text("\n".join(["n01440764", "n01443537"] + [f"n0200{k:04d}" for k in range(48)]) + "\n")
    assert len(ImageNetS(tmp_path, categories=cats).wnids) == 50


def test_imagenet_s_iou_hand_worked():
    # ids 0 (background), 1, 2; tp / (pred + true - tp)
    r = imagenet_s_iou(tp=[6, 2, 0], pred=[8, 4, 0], true=[10, 2, 0])
    assert r["iou"][0] == pytest.approx(50.0) and r["iou"][1] == pytest.approx(50.0) and r["iou"][2] == 0
    assert r["miou"] == pytest.approx(100 / 3) and r["miou_present"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------------------------------
# OpenImages-V7 points


def _oi(tmp_path, rows, names=None, crlf_bom=False):
    imgs = {"img1": np.zeros((20, 40, 3)), "img2": np.zeros((30, 30, 3))}
    write_openimages(tmp_path, "val", imgs, rows, names or {"/m/01": "cat", "/m/02": "dog"})
    if crlf_bom:
        p = tmp_path / "oidv7-val-annotations-point-labels.csv"
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return tmp_path


def test_openimages_reader_and_its_odd_rows(tmp_path):
    rows = [("img1", 0.5, 0.5, "/m/01", "yes"), ("img1", 0.1, 0.9, "/m/01", "no"),
            ("img1", 1.5, 0.5, "/m/01", "yes"),  # outside the image
            ("img1", 0.2, 0.2, "/m/99", "yes"),  # a MID without a name
            ("img1", 0.3, 0.3, "/m/02", "unsure"),
            ("img2", 0.5, 0.5, "/m/02", "no"),  # no 'yes' point: the image shows no class
            ("img3", 0.5, 0.5, "/m/02", "yes")]  # no image file
    ds = OpenImagesPoints(_oi(tmp_path, rows, crlf_bom=True))
    assert ds.ids == ["img1", "img3"] and ds.classes == ["cat", "dog"]
    assert any("outside" in n for n in ds.notes) and any("/m/99" in n for n in ds.notes)
    assert any("unsure" in n for n in ds.notes)
    e1, e3 = list(ds.entries(0, 2))
    img, pts = e1.value
    assert img.size == (40, 20) and pts == {"cat": [(20.0, 10.0, True), (4.0, 18.0, False)]}
    assert e3.value is None and "no image file img3.jpg" in e3.error
    assert dataset_kind(tmp_path) == "openimages"


def test_openimages_refuses_a_file_without_its_columns(tmp_path):
    _oi(tmp_path, [("img1", 0.5, 0.5, "/m/01", "yes")])
    p = tmp_path / "oidv7-val-annotations-point-labels.csv"
    p.write_text("ImageId,X,Y,Label\nimg1,0.5,0.5,/m/01\n")
    with pytest.raises(BadInputError, match=r"missing columns \['EstimatedYesNo'\]"):
        OpenImagesPoints(tmp_path)
    p.write_text("ImageId,X,Y,Label,EstimatedYesNo\nimg1,0.5,0.5,/m/01,maybe\n")
    with pytest.raises(BadInputError, match="line 2: EstimatedYesNo"):
        OpenImagesPoints(tmp_path)


def test_point_iou_hand_worked():
    r = point_iou({"a": [2, 1, 1], "b": [0, 0, 3], "c": [0, 0, 0]})
    assert r["per_class"] == {"a": 50.0, "b": 0.0} and r["p_miou"] == 25.0


def test_binarise_and_points_through_the_crop():
    m = np.array([[0.0, 1.0], [2.0, 4.0]])
    assert binarise(m, 0.5).tolist() == [[False, False], [False, True]]  # normalised: 0, .25, .5, 1; strictly above
    assert binarise(m, "mean").tolist() == [[False, False], [True, True]]  # mean .4375
    from torchvision import transforms as T

    to_mask = T.Compose([T.Resize(4, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(4)])
    sx, sy = frame_axes(to_mask, (8, 4))  # an 8 x 4 image: the crop keeps columns 2..5
    assert sx.tolist() == [2, 3, 4, 5] and sy.tolist() == [0, 1, 2, 3]
    assert point_in_frame(1.0, 1.0, sx, sy) is None
    assert point_in_frame(2.5, 0.2, sx, sy) == (0, 0) and point_in_frame(5.9, 3.9, sx, sy) == (3, 3)


# ---------------------------------------------------------------------------------------------------------------------
# deletion / insertion: the published steps, written here from imagenet_eval_deletion.py / _insertion.py


def _published_deletion(image, heatmap, L, cal_gap, seed):
    torch.manual_seed(seed)  # the scripts draw from torch's global generator
    image_array = np.array(image).copy()
    h, w = heatmap.shape
    sy, sx = torch.meshgrid(torch.arange(0, h, 1), torch.arange(0, w, 1), indexing="ij")
    grids = torch.stack((sx.reshape(-1), sy.reshape(-1)), dim=1)
    order = np.argsort(-heatmap.reshape(-1))
    pixel_once = max(1, int(h * w / (2 * L)))
    out = []
    for step in range(1, L + 1):
        poses = grids[order[(step - 1) * pixel_once:step * pixel_once]]
        random_patch = torch.rand(len(poses), 3) * 255.
        xs, ys = zip(*poses)
        image_array[ys, xs, :] = random_patch
        if step % cal_gap == 0:
            out.append(np.uint8(image_array).copy())  # the scripts preprocess it at once
    return out


def _published_insertion(image, heatmap, L, cal_gap):
    image_array = np.array(image).copy()
    h, w = heatmap.shape
    sy, sx = torch.meshgrid(torch.arange(0, h, 1), torch.arange(0, w, 1), indexing="ij")
    grids = torch.stack((sx.reshape(-1), sy.reshape(-1)), dim=1)
    order = np.argsort(-heatmap.reshape(-1))
    pixel_once = max(1, int(h * w / (2 * L)))
    input_img = np.zeros(image_array.shape)
    out = []
    for step in range(1, L + 1):
        poses = grids[order[(step - 1) * pixel_once:step * pixel_once]]
        xs, ys = zip(*poses)
        input_img[ys, xs, :] = image_array[ys, xs, :]
        if step % cal_gap == 0:
            out.append(np.uint8(input_img).copy())
    return out


@pytest.mark.parametrize("shape", [(23, 31), (16, 16)])
def test_deletion_and_insertion_equal_the_published_steps(shape):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    heat = rng.random(shape)  # no ties: the published unstable argsort and ours agree
    order = dl.pixel_order(heat)
    ours = dl.deletion_images(image, order, steps=20, every=5, seed=11)
    ref = _published_deletion(image, heat, 20, 5, 11)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert (a == b).all()
    assert (ours[-1] != image).any(axis=2).sum() > 0.4 * shape[0] * shape[1] * 0.5  # about half the pixels changed
    for a, b in zip(dl.insertion_images(image, order, steps=20, every=5), _published_insertion(image, heat, 20, 5)):
        assert (a == b).all()


def test_cap_size_map_stretch_and_auc():
    im = Image.new("RGB", (1280, 800))
    assert dl.cap_size(im).size == (1024, 640) and dl.cap_size(Image.new("RGB", (600, 700))).size == (600, 700)
    m = dl.stretch_map(np.array([[0.0, 2.0], [4.0, 8.0]]), (6, 10))
    assert m.shape == (6, 10) and m.min() >= 0 and m.max() <= 1 and m[0, 0] == 0 and m[-1, -1] == 1
    assert dl.curve_auc([100, 50, 0]) == 50.0 and dl.curve_auc([80, 80]) == 80.0
    hits = dl.topk_correct(torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]), [2, 2], ks=(1, 2, 3))
    assert hits[1].tolist() == [False, False] and hits[2].tolist() == [True, False] and hits[3].tolist() == [True, True]


# ---------------------------------------------------------------------------------------------------------------------
# the evaluations and the benchmark on the shapes world in both layouts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    textspan.write_shapes_world(root / "ins", 10, seed=3, layout="imagenet-s")
    textspan.write_shapes_world(root / "oi", 8, seed=4, objects=2, layout="openimages")
    return root


def test_shapes_world_layouts_read_back(layouts):
    ds = ImageNetS(layouts / "ins")
    assert ds.names == ["circle", "cross", "square", "star", "triangle"] and len(ds) == 10
    oi = OpenImagesPoints(layouts / "oi")
    assert len(oi) == 8 and set(oi.classes) <= set(ds.names)


def test_benchmark_leaderboard_and_resume_after_a_kill(layouts, tmp_path, monkeypatch):
    from textspan.evals.imagenet_s import ImageNetSEvaluation

    common = dict(methods="decomposition,gradcam", batch_size=4, device="cpu")
    whole = run_benchmark(layouts / "ins", tmp_path / "whole", "shapes", **common)
    assert [r["method"] for r in whole["rows"]] == ["decomposition", "gradcam"]
    header = (tmp_path / "whole" / "leaderboard.csv").read_text().splitlines()[0]
    assert header.startswith("method,ImageNet-S mIoU,deletion AUC,insertion AUC")
    assert (tmp_path / "whole" / "leaderboard.png").is_file() and "**" in (tmp_path / "whole" / "leaderboard.md"
                                                                              ).read_text()
    real, calls = ImageNetSEvaluation.score, []

    def dies(self, entries):
        calls.append(1)
        if len(calls) == 5:  # gradcam's second batch (decomposition took 3 batches of 4)
            raise KeyboardInterrupt("killed")
        return real(self, entries)

    monkeypatch.setattr(ImageNetSEvaluation, "score", dies)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(layouts / "ins", tmp_path / "cut", "shapes", **common)
    saved = json.loads((tmp_path / "cut" / "gradcam" / "imagenet_s" / "imagenet_s_progress.json").read_text())
    assert saved["next_entry"] == 4 and saved["images"] == 4
    monkeypatch.setattr(ImageNetSEvaluation, "score", real)
    again = run_benchmark(layouts / "ins", tmp_path / "cut", "shapes", **common)
    strip = lambda rows: [{k: v for k, v in r.items() if "s/img" not in k} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(whole["rows"])
    for m in ("decomposition", "gradcam"):
        for name in ("imagenet_s/imagenet_s.json", "deletion_insertion/deletion_insertion.json"):
            assert (tmp_path / "cut" / m / name).read_bytes() == (tmp_path / "whole" / m / name).read_bytes()
    with pytest.raises(TextspanError, match="other settings"):
        run_benchmark(layouts / "ins", tmp_path / "cut", "shapes", **dict(common, limit=3))


def test_benchmark_refusals(layouts, tmp_path):
    with pytest.raises(BadInputError, match="supports points; not segmentation"):
        run_benchmark(layouts / "oi", tmp_path / "b", "shapes", evaluations="segmentation", device="cpu")
    with pytest.raises(BadInputError, match="not defined on this model's tower"):
        run_benchmark(layouts / "oi", tmp_path / "b", "shapes", methods="nosuch", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="not a dataset textspan benchmarks"):
        dataset_kind(tmp_path / "empty")


def test_points_and_deletion_commands(layouts, tmp_path):
    r = CliRunner().invoke(main, ["points-eval", str(layouts / "oi"), "--method", "rollout", "--quiet",
                                  "-o", str(tmp_path / "p")])
    assert r.exit_code == 0 and "p-mIoU" in r.output, r.output
    res = json.loads((tmp_path / "p" / "points.json").read_text())
    counts = res["per_class_counts"]
    assert res["n_points"] == sum(sum(v.values()) for v in counts.values()) > 0
    r = CliRunner().invoke(main, ["deletion-eval", str(layouts / "ins" / "validation"), "--steps", "20", "--every",
                                  "5", "--quiet", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0 and "deletion AUC" in r.output, r.output
    d = json.loads((tmp_path / "d" / "deletion_insertion.json").read_text())
    assert d["deletion"]["fraction"] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert d["insertion"]["fraction"] == [0.125, 0.25, 0.375, 0.5, 1.0]
    assert d["deletion"]["top1"][0] == d["insertion"]["top1"][-1]  # the clean image in both curves
    rows = list(csv.reader(open(tmp_path / "d" / "deletion_insertion.csv")))
    assert rows[0] == ["curve", "point", "fraction", "top1"] and len(rows) == 11  # 5 classes: no top-5/10
    r = CliRunner().invoke(main, ["deletion-eval", str(layouts / "ins" / "validation"), "--steps", "20",
                                  "--every", "3", "-o", str(tmp_path / "d2")])
    assert r.exit_code == 1 and "multiple of every" in r.output


def _one_and_two_ranks(common, tmp_path):
    """Run a command in one process (into tmp_path/one) and under torchrun with 2 ranks (tmp_path/two), one thread
    each (the same thread count makes CPU matmuls round alike); returns the torchrun run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "textspan", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--module", "textspan", *common, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return two


@pytest.mark.slow
def test_torchrun_evaluation_equals_one_process(layouts, tmp_path):
    _one_and_two_ranks(["imagenet-s-eval", str(layouts / "ins"), "--method", "decomposition", "--batch-size", "3",
                        "--device", "cpu", "--quiet"], tmp_path)
    assert (tmp_path / "two" / "imagenet_s.json").read_bytes() == (tmp_path / "one" / "imagenet_s.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").glob("*.rank*")) == [
        "imagenet_s_progress.json.rank0-of-2", "imagenet_s_progress.json.rank1-of-2"]


def test_imagenet_s_decomposition_fast_path_equals_the_general_one(layouts):
    # options={"relative": False} changes nothing in the map (evaluations always explain with relative=False) but
    # takes the general path: explain() per pair instead of one projection of every class
    fast = textspan.evaluate_imagenet_s(layouts / "ins", None, "shapes", device="cpu", target="predicted")
    slow = textspan.evaluate_imagenet_s(layouts / "ins", None, "shapes", device="cpu", target="predicted",
                                        options={"relative": False})
    assert fast["zero_shot_accuracy"] == slow["zero_shot_accuracy"]
    np.testing.assert_allclose(list(fast["iou"].values()), list(slow["iou"].values()), atol=1e-6)


def test_imagenet_s_area_counts_leave_the_ignore_label_out():
    from textspan.evals.imagenet_s import area_counts

    gt = np.array([[0, 0, 2, 2], [IGNORE, IGNORE, 2, 2]])
    pred = np.array([[2, 0, 2, 0], [2, 2, 2, 2]])  # the ignored pixels predicted 2 count nowhere
    tp, p, t = area_counts(gt, pred, 2)
    # kept pixels (gt -> pred): 0->2, 0->0, 2->2, 2->0, 2->2, 2->2
    assert tp.tolist() == [1, 0, 3] and p.tolist() == [2, 0, 4] and t.tolist() == [2, 0, 4]
    r = imagenet_s_iou(tp, p, t)  # id 0: 1 / (2 + 2 - 1); id 1: nothing (0); id 2: 3 / (4 + 4 - 3)
    assert r["iou"][0] == pytest.approx(100 / 3) and r["iou"][1] == 0 and r["iou"][2] == pytest.approx(60.0)
    assert r["miou_present"] == pytest.approx((100 / 3 + 60) / 2) and r["miou"] == pytest.approx((100 / 3 + 60) / 3)


@pytest.mark.slow
def test_torchrun_segment_eval_equals_one_process(tmp_path):
    textspan.write_shapes_world(tmp_path / "w", 10, seed=12)
    _one_and_two_ranks(["segment-eval", str(tmp_path / "w"), "--method", "rollout", "--samples", "5",
                        "--batch-size", "3", "--device", "cpu", "--quiet"], tmp_path)
    for name in ("segmentation.json", "per_image.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    # the samples are rank 0's, numbered as one process numbers them (rank 1 draws none over them)
    assert sorted(p.name for p in (tmp_path / "two").glob("sample_*.png")) == \
        sorted(p.name for p in (tmp_path / "one").glob("sample_*.png")) == [f"sample_{k:02d}.png" for k in range(5)]


@pytest.mark.slow
def test_torchrun_benchmark_equals_one_process(layouts, tmp_path):
    two = _one_and_two_ranks(["benchmark", str(layouts / "oi"), "--methods", "decomposition,rollout",
                              "--batch-size", "3", "--device", "cpu", "--quiet"], tmp_path)
    assert two.stdout.count("leaderboard.md") == 1  # rank 0 prints
    for m in ("decomposition", "rollout"):
        assert (tmp_path / "two" / m / "points" / "points.json").read_bytes() == \
            (tmp_path / "one" / m / "points" / "points.json").read_bytes()
    strip = lambda p: [r.split(",")[:2] for r in p.read_text().splitlines()]  # noqa: E731 (no timings)
    assert strip(tmp_path / "two" / "leaderboard.csv") == strip(tmp_path / "one" / "leaderboard.csv")
