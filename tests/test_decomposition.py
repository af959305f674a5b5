"""Identities of the decomposition (DESIGN.md sections 1-2), on tiny seeded stock open_clip models."""
import pytest
import torch
import torch.nn.functional as F

from helpers import encode_with_hooks, random_images, tiny_clip
from textspan import UnsupportedModelError, decompose, forward_image

VARIANTS = {
    "default": {},
    "quick_gelu": dict(quick_gelu=True),
    "layer_scale": dict(ls_init_value=0.5),
    "custom_block": dict(qk_norm=True, scale_heads=True),
    "no_ln_pre": dict(no_ln_pre=True),
    "final_ln_after_pool": dict(final_ln_after_pool=True),
    "grid8_3layers": dict(image_size=32, patch_size=4, layers=3, width=48, head_width=8),
    # a LayerNorm between the heads and out_proj (open_clip's scale_attn_inner), linearised at CLS as EVA's
    "inner_norm": dict(scale_attn_inner=True, scale_heads=True, qk_norm=True),
}


def _images(model, n=3, seed=0, dtype=torch.float64):
    return random_images(n, size=model.visual.image_size[0], seed=seed, dtype=dtype)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_equals_open_clip_float64(variant):
    model = tiny_clip(seed=1, dtype=torch.float64, **VARIANTS[variant])
    x = _images(model)
    with torch.no_grad():
        expected = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), expected, rtol=0, atol=1e-10)


def test_forward_equals_open_clip_float32(tiny_model):
    x = random_images(4)
    with torch.no_grad():
        expected = tiny_model.encode_image(x)
    torch.testing.assert_close(forward_image(tiny_model, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_total_is_normalised_embedding_float64(variant):
    model = tiny_clip(seed=2, dtype=torch.float64, **VARIANTS[variant])
    x = _images(model)
    with torch.no_grad():
        e = model.encode_image(x)
    d = decompose(model, x, spatial=True)
    target = e / e.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(d.total(), target, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.norm, e.norm(dim=-1), rtol=1e-12, atol=0)
    # the non-spatial path satisfies it too
    torch.testing.assert_close(decompose(model, x, spatial=False).total(), target, rtol=0, atol=1e-12)


def test_total_is_normalised_embedding_float32(tiny_model):
    x = random_images(5)
    with torch.no_grad():
        e = tiny_model.encode_image(x)
    d = decompose(tiny_model, x)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    assert d.heads.dtype == torch.float32


@pytest.mark.parametrize("variant", ["default", "layer_scale", "custom_block"])
def test_spatial_summed_over_tokens_equals_non_spatial(variant):
    model = tiny_clip(seed=3, dtype=torch.float64, **VARIANTS[variant])
    x = _images(model)
    sp = decompose(model, x, spatial=True)
    ns = decompose(model, x, spatial=False)
    assert sp.heads.shape == (3, 2, 17, 4, 24) and ns.heads.shape == (3, 2, 4, 24)
    torch.testing.assert_close(sp.heads.sum(dim=2), ns.heads, rtol=0, atol=1e-14)
    torch.testing.assert_close(sp.mlps, ns.mlps, rtol=0, atol=1e-15)
    # the CLS -> CLS term is source token 0
    torch.testing.assert_close(sp.heads[:, :, 0], sp.cls_to_cls, rtol=0, atol=1e-15)
    torch.testing.assert_close(ns.cls_to_cls, sp.cls_to_cls, rtol=0, atol=1e-15)


def _capture_stock(model, x):
    """Run open_clip's own forward, capturing each block's input, attention output and the final CLS stream."""
    visual = model.visual
    seen = {"block_in": [], "attn_out": []}
    handles = []
    for blk in visual.transformer.resblocks:
        handles.append(blk.register_forward_pre_hook(lambda m, a: seen["block_in"].append(a[0].detach())))
        handles.append(blk.attn.register_forward_hook(
            lambda m, a, o: seen["attn_out"].append((o[0] if isinstance(o, tuple) else o).detach())))
    handles.append(visual.transformer.register_forward_hook(lambda m, a, o: seen.__setitem__("final", o.detach())))
    return encode_with_hooks(model, x, handles), seen


def _slow_reference(model, x):
    """The decomposition written straight from its definition, with full attention maps (small models only)."""
    visual = model.visual
    e, seen = _capture_stock(model, x)
    blocks = visual.transformer.resblocks
    L = len(blocks)
    b, N, D = seen["block_in"][0].shape
    gamma, beta, P = visual.ln_post.weight, visual.ln_post.bias, visual.proj
    r = seen["final"][:, 0]
    mu = r.mean(-1)
    sigma = torch.sqrt(r.var(-1, unbiased=False) + visual.ln_post.eps)
    norm = e.norm(dim=-1)
    K = 2 * L + 1

    def f(t, share):  # t [b, ..., D]
        shape = (b,) + (1,) * (t.ndim - 2) + (1,)
        y = gamma * (t - share * mu.view(shape)) / sigma.view(shape) + share * beta
        return (y @ P) / norm.view(shape)

    heads, mlps, attn_sums = [], [f(seen["block_in"][0][:, 0], 1 / K)], []
    for l, blk in enumerate(blocks):
        attn = blk.attn
        H = attn.num_heads
        dh = D // H
        h = blk.ln_1(seen["block_in"][l])
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, N, H, dh).transpose(1, 2) for t in (q, k, v))
        if hasattr(attn, "ln_q"):
            q, k = attn.ln_q(q), attn.ln_k(k)
        A = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, dim=-1)  # [b, H, N, N]: the full map
        if getattr(attn, "head_scale", None) is not None:
            v = v * attn.head_scale
        ls1 = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else torch.ones(D, dtype=x.dtype)
        terms = torch.zeros(b, N, H, D, dtype=x.dtype)
        for m in range(N):
            for hh in range(H):
                w_o = attn.out_proj.weight[:, hh * dh:(hh + 1) * dh]
                terms[:, m, hh] = ls1 * (A[:, hh, 0, m, None] * (v[:, hh, m] @ w_o.t()) + attn.out_proj.bias / (N * H))
        attn_sums.append(terms.sum(dim=(1, 2)))
        heads.append(f(terms, 1 / (K * N * H)))
        x_mid = seen["block_in"][l] + blk.ls_1(seen["attn_out"][l])
        mlps.append(f(blk.ls_2(blk.mlp(blk.ln_2(x_mid)))[:, 0], 1 / K))
    return dict(heads=torch.stack(heads, 1), mlps=torch.stack(mlps, 1), attn_sums=attn_sums, seen=seen,
                ls1=[blk.ls_1 for blk in blocks])


@pytest.mark.parametrize("variant", ["default", "layer_scale", "custom_block", "quick_gelu"])
def test_terms_equal_the_definition(variant):
    model = tiny_clip(seed=4, dtype=torch.float64, **VARIANTS[variant])
    x = _images(model, n=2)
    ref = _slow_reference(model, x)
    d = decompose(model, x, spatial=True)
    torch.testing.assert_close(d.heads, ref["heads"], rtol=0, atol=1e-13)
    torch.testing.assert_close(d.mlps, ref["mlps"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", ["default", "layer_scale"])
def test_attention_terms_of_a_layer_sum_to_its_output_at_cls(variant):
    model = tiny_clip(seed=5, dtype=torch.float64, **VARIANTS[variant])
    x = _images(model, n=2)
    ref = _slow_reference(model, x)
    for l, (s, out) in enumerate(zip(ref["attn_sums"], ref["seen"]["attn_out"])):
        # raw residual-space terms sum to open_clip's attention output at CLS (times layer scale)
        torch.testing.assert_close(s, ref["ls1"][l](out)[:, 0], rtol=0, atol=1e-12)
    # and the projected terms of each layer sum to that output pushed through the linearised ln_post
    d = decompose(model, x, spatial=True)
    torch.testing.assert_close(d.layer_attention(), ref["heads"].sum(dim=(2, 3)), rtol=0, atol=1e-13)


def test_vit_b16_shapes_float32_identity():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        e = model.encode_image(x)
    d = decompose(model, x, spatial=True)
    assert d.heads.shape == (1, 12, 197, 12, 512)
    assert d.mlps.shape == (1, 13, 512)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(d.heads.sum(2), decompose(model, x, spatial=False).heads, rtol=0, atol=1e-5)


def test_model_left_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    decompose(tiny_model, random_images(2))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in tiny_model.parameters()]
    for m in tiny_model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_batch_independence(tiny_model64):
    x = random_images(4, dtype=torch.float64)
    full = decompose(tiny_model64, x)
    one = decompose(tiny_model64, x[2:3])
    torch.testing.assert_close(full.heads[2:3], one.heads, rtol=0, atol=1e-14)


def test_visual_tower_accepted(tiny_model):
    x = random_images(2)
    torch.testing.assert_close(decompose(tiny_model.visual, x).total(), decompose(tiny_model, x).total())


def test_wrong_image_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="expects"):
        decompose(tiny_model, random_images(1, size=48))
    with pytest.raises(ValueError, match=r"\[batch, 3"):
        decompose(tiny_model, torch.randn(3, 32, 32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4), "attentional pooling"),
    (dict(pool_type="avg"), "pool_type"),
])
def test_unsupported_architectures_are_refused(kwargs, match):
    model = tiny_clip(seed=0, **kwargs)
    with pytest.raises(UnsupportedModelError, match=match):
        decompose(model, random_images(1))


def test_resnet_is_refused():
    from open_clip.model import CLIP

    model = CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=8),
                 text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        decompose(model, random_images(1))
