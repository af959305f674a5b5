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
