"""The shipped built-in model: loads offline, reproduces its recorded accuracies, decomposes exactly."""
import pytest
import torch

import textspan
from textspan import builtin, training, world

TARGETS = {"colour": 0.95, "background": 0.95, "shape": 0.90, "size": 0.85, "horizontal": 0.85, "vertical": 0.85}


def test_checkpoint_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights, info = builtin.checkpoint_paths("default")
    assert weights.stat().st_size <= 10 * 2 ** 20
    model, preprocess, tok = textspan.load_model("shapes")
    from open_clip.model import CLIP

    assert type(model) is CLIP and not model.training
    assert textspan.model_info(model).n_heads == 8


def test_reproduces_recorded_accuracy_and_meets_targets():
    facts = builtin.shipped_facts("default")
    model, _, tok = textspan.load_model("shapes")
    acc = training.zero_shot_accuracy(model, tok, n=2000, seed=12345)
    for attr, target in TARGETS.items():
        assert abs(acc[attr] - facts["accuracy"][attr]) <= 0.002, (attr, acc[attr], facts["accuracy"][attr])
        assert acc[attr] >= target, (attr, acc[attr])
    check = training.zero_shot_accuracy(model, tok, **facts["check_set"])
    for attr in TARGETS:
        assert abs(check[attr] - facts["check_set_accuracy"][attr]) <= 0.01


def test_decomposition_identity_on_the_shipped_model():
    model, _, _ = textspan.load_model("shapes")
    x = builtin.preprocess_batch(world.batch(5, 0, 4)[0])
    with torch.no_grad():
        e = model.encode_image(x)
    d = textspan.decompose(model, x)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    d64 = textspan.decompose(model.double(), x.double())
    with torch.no_grad():
        e64 = model.encode_image(x.double())
    torch.testing.assert_close(d64.total(), e64 / e64.norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)


def test_spurious_variant_reproduces_its_gap_and_probe():
    facts = builtin.shipped_facts("spurious")
    model, _, tok = textspan.load_model("shapes-spurious")
    rep = training.spurious_report(model, tok, n=2000)
    assert abs(rep["average"] - facts["spurious"]["average"]) <= 0.002
    assert abs(rep["worst_group"] - facts["spurious"]["worst_group"]) <= 0.004
    assert abs(rep["linear_probe"] - facts["spurious"]["linear_probe"]) <= 0.01
    # the testbed's purpose: a large group gap while the shape is still linearly decodable
    assert rep["average"] - rep["worst_group"] >= 0.20
    assert rep["linear_probe"] >= 0.90
    assert builtin.checkpoint_paths("spurious")[0].stat().st_size <= 10 * 2 ** 20
