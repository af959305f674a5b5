"""Training of the built-in model: a resumed run equals an uninterrupted one; the recipe's pieces."""
import json

import torch

from textspan import builtin, training

TINY = dict(embed_dim=16, vision_cfg=dict(image_size=64, patch_size=16, width=32, layers=1, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=0, width=32, heads=2, layers=1))


def _state(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(steps=4, batch_size=8, warmup=2, eval_every=100, checkpoint_every=100, config=TINY, threads=1)
    training.train(tmp_path / "a", **kw)
    training.train(tmp_path / "b", stop_after=2, **kw)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 2
    training.train(tmp_path / "b", **kw)
    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in open(tmp_path / "b" / "train.log")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["zero_shot"]["colour"] >= 0
    # the training checkpoint loads as the built-in model
    model, _, tok = builtin.load_shapes_model(checkpoint=tmp_path / "a" / "last.pt")
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)


def test_soft_targets_treat_identical_captions_as_positives():
    import math

    # 1-d features, so the logits are easy to write out: logits[i, j] = scale * img[i] * txt[j]
    img = torch.tensor([[1.0], [0.5], [-1.0]])
    txt = torch.tensor([[1.0], [0.2], [-1.0]])
    caps = ["a star", "a star", "a circle"]
    loss = training.soft_clip_loss(img, txt, torch.tensor(2.0), caps)

    def row_loss(logits, targets):
        z = math.log(sum(math.exp(v) for v in logits))
        return -sum(t * (v - z) for v, t in zip(logits, targets))

    L = [[2.0 * a * b for b in (1.0, 0.2, -1.0)] for a in (1.0, 0.5, -1.0)]
    T = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    img_side = sum(row_loss(L[i], T[i]) for i in range(3)) / 3
    txt_side = sum(row_loss([L[j][i] for j in range(3)], T[i]) for i in range(3)) / 3
    assert abs(float(loss) - 0.5 * (img_side + txt_side)) < 1e-6


def test_weight_decay_groups():
    model, _ = builtin.build_model(seed=0)
    decay, no_decay = training._param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "visual.conv1.weight" in decayed and "visual.proj" in decayed
    assert not any("embedding" in n or n.endswith("bias") or "ln_" in n or n == "logit_scale" for n in decayed)


def test_learning_rate_schedule():
    lrs = [training._lr(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == 1e-4 and abs(lrs[9] - 1e-3) < 1e-12 and lrs[10] == 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-5


def test_spurious_mixture_fine_tune_and_snapshots(tmp_path):
    """The spurious variant with part of each batch from the default world, fine-tuned from a checkpoint, keeping
    weight snapshots; the options are recorded."""
    kw = dict(steps=2, batch_size=8, warmup=1, eval_every=100, checkpoint_every=100, config=TINY, threads=1)
    training.train(tmp_path / "a", **kw)
    training.train(tmp_path / "b", variant="spurious", init=str(tmp_path / "a" / "last.pt"), snapshot_every=1,
                   spurious_spec={"mix": 0.5, "background_named": 0.5}, **kw)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["spurious"]["mix"] == 0.5 and cfg["spurious"]["background_named"] == 0.5
    assert cfg["init"].endswith("last.pt") and cfg["config"]["embed_dim"] == 16
    assert (tmp_path / "b" / "step1.pt").is_file() and (tmp_path / "b" / "step2.pt").is_file()
    a, b = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained from there
    import pytest

    with pytest.raises(ValueError, match="mix"):
        training.train(tmp_path / "c", variant="spurious", spurious_spec={"mix": 1.0}, **kw)
