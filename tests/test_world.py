"""The shapes world: deterministic, and its labels agree with its pixels."""
import numpy as np
import pytest
import torch

from textspan import builtin, world


def test_deterministic_from_seed_and_index():
    a, b = world.sample(3, 17), world.sample(3, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.labels == b.labels
    assert np.array_equal(a.mask, b.mask)
    c = world.sample(3, 18)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(world.sample(4, 17).image, a.image)
    imgs, caps, labs = world.batch(3, 15, 4)
    assert np.array_equal(imgs[2], a.image) and caps[2] == a.caption and labs[2] == a.labels
    assert imgs.shape == (4, 64, 64, 3) and imgs.dtype == np.uint8


@pytest.fixture(scope="module")
def samples():
    return [world.sample(11, i) for i in range(300)]


def test_position_labels_match_the_mask(samples):
    for s in samples:
        ys, xs = np.nonzero(s.mask)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        assert (cx < 32) == (s.labels["horizontal"] == "left"), s.labels
        assert (cy < 32) == (s.labels["vertical"] == "top"), s.labels


def test_colour_labels_match_the_pixels(samples):
    for s in samples:
        mean = s.image[s.mask].astype(float).mean(0)
        nearest = min(world.COLOURS, key=lambda c: np.abs(mean - np.array(world.COLOURS[c])).sum())
        assert nearest == s.labels["colour"], (mean, s.labels)


def test_background_labels_match_the_pixels(samples):
    for s in samples:
        r, g, b = s.image[~s.mask].astype(float).mean(0)
        if s.labels["background"] == "water":
            assert b > r + 60 and b > g + 40, (r, g, b)
        else:
            assert max(r, g) > b + 20, (r, g, b)


def test_size_labels_match_the_extent(samples):
    for s in samples:
        ys, xs = np.nonzero(s.mask)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        if s.labels["size"] == "small":
            assert extent <= 21, (extent, s.labels)
        else:
            assert extent >= 22, (extent, s.labels)


def test_shapes_by_hand():
    circle = world.shape_mask("circle", 32, 32, 10)
    assert abs(circle.sum() - np.pi * 100) < 12
    square = world.shape_mask("square", 32, 32, 10)
    assert square.sum() == 18 * 18  # pixel centres k + 0.5 with |k + 0.5 - 32| <= 8.6: k = 23 .. 40
    cross = world.shape_mask("cross", 32.0, 32.0, 10)
    assert np.array_equal(cross, cross[::-1, ::-1]) and np.array_equal(cross, cross.T)
    star = world.shape_mask("star", 32, 32, 12)
    assert star[32 - 11, 31] and not star[32 - 6, 32 - 6]  # the top point is in, a notch is out
    tri = world.shape_mask("triangle", 32, 32, 12)
    rows = tri.sum(1)
    assert rows[23] < rows[38]  # wider at the base
    # each shape has a distinct footprint at the same size
    areas = {s: world.shape_mask(s, 32, 32, 14).sum() for s in world.SHAPES}
    assert len(set(areas.values())) == len(world.SHAPES)


def test_captions_name_only_true_attributes(samples):
    named = {k: 0 for k in world.ATTRIBUTES}
    for s in samples:
        words = s.caption.split()
        for attr, values in world.ATTRIBUTES.items():
            for v in values:
                if v in words:
                    assert s.labels[attr] == v, (s.caption, s.labels)
                    named[attr] += 1
    assert named["shape"] > 0.85 * len(samples)
    for attr in ("colour", "size", "horizontal", "vertical", "background"):
        assert 0.55 * len(samples) < named[attr] < 0.85 * len(samples), (attr, named[attr])


def test_two_objects():
    s = world.sample(0, 1, n_objects=2)
    assert len(s.masks) == 2 and len(s.objects) == 2
    quadrants = {(o["horizontal"], o["vertical"]) for o in s.objects}
    assert len(quadrants) == 2
    assert " and " in s.caption


def test_spurious_split_statistics():
    train = [world.sample(0, i, spurious=world.Spurious(0.95)).labels for i in range(2000)]
    agree = np.mean([(l["label"] == "1") == (l["background"] == "water") for l in train])
    assert 0.93 < agree < 0.97
    assert all(l["shape"] == world.SPURIOUS_CLASSES[int(l["label"])] for l in train)
    test = [world.sample(1, i, spurious=world.Spurious(balanced=True)).labels for i in range(2000)]
    counts = {g: sum(l["group"] == g for l in test) for g in {l["group"] for l in test}}
    assert len(counts) == 4 and min(counts.values()) > 430


def test_tokenizer():
    tok = builtin.WordTokenizer(world.vocabulary())
    ids = tok(["a photo of a red circle", "an object on water"])
    assert ids.shape == (2, builtin.CONTEXT)
    assert (ids.argmax(1) == torch.tensor([7, 5])).all()  # the end token is the largest id
    assert ids[0, 0] == tok.sot and ids[0, 7] == tok.eot and ids[0, 8:].eq(0).all()
    with pytest.raises(ValueError, match="dog"):
        tok("a dog")
    with pytest.raises(ValueError, match="longer"):
        tok(" ".join(["a"] * 20))
    for s in (world.sample(0, i) for i in range(200)):
        tok(s.caption)  # every caption is in the vocabulary and fits the context


def test_built_model_is_stock_open_clip_and_decomposes():
    from open_clip.model import CLIP

    import textspan

    model, tok = builtin.build_model(seed=0)
    model.eval()
    assert type(model) is CLIP
    pos = model.visual.positional_embedding
    assert pos[0].abs().sum() == 0 and pos[1:].std() > 0.3
    x = builtin.preprocess_batch(world.batch(0, 0, 3)[0])
    with torch.no_grad():
        e = model.encode_image(x)
        t = model.encode_text(tok(["a red circle"]))
    assert e.shape == (3, 64) and t.shape == (1, 64)
    d = textspan.decompose(model, x)
    assert d.heads.shape == (3, 4, 65, 8, 64)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    from PIL import Image

    img = Image.fromarray(world.sample(0, 0).image).convert("L").resize((100, 80))
    assert builtin.preprocess(img).shape == (3, 64, 64)
