"""Second-order effects of neurons: a slow reference written from the published definition (per token, per neuron,
per head, with the published shares), the identity that every upstream source's flow through one later head sums to
that head's decomposition term, the first-order effects summing to the MLP's term, and the refusals."""
import numpy as np
import pytest
import torch

from helpers import random_images, tiny_clip
import textspan
from textspan.errors import BadInputError
from textspan.neurons import first_order_effects, neuron_directions, neuron_effect_parts, neuron_effects


def _record(model, x):
    """The open_clip forward, by hand (float64): each block's input, post-attention and output streams, each
    block's attention probabilities, and the post-GELU of every MLP."""
    v = model.visual
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], dim=1) + v.positional_embedding
    t = v.ln_pre(t)
    rec = {"z0": t, "blocks": []}
    for blk in v.transformer.resblocks:
        a = blk.ln_1(t)
        D, H = a.shape[-1], blk.attn.num_heads
        qkv = a @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
        q, k, val = qkv.split(D, dim=-1)
        sh = lambda z: z.reshape(z.shape[0], z.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
        probs = ((sh(q) @ sh(k).transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1)  # [b, H, N, N]
        heads = (probs @ sh(val)).transpose(1, 2).reshape(t.shape)
        y = t + blk.ls_1(blk.attn.out_proj(heads))
        post = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(y)))
        out = y + blk.ls_2(blk.mlp.c_proj(post))
        rec["blocks"].append(dict(x_in=t, probs=probs, y=y, post=post, x_out=out))
        t = out
    rec["final"] = t
    return rec


def _flow(model, rec, comp, j, h, share, query="cls"):
    """[b, d'] the published path of one residual component comp [b, N, D] through head h of block j to the
    embedding (prs_second_order_neurons_hook.py: normalize_before_attention_per_neuron, apply_attention_matrix_per_
    neuron, project_attentions_to_output_per_neuron), with `share` = how many pieces the component is cut into
    (the MLP width for a neuron, 1 for a whole component), and without the published factor 100."""
    v = model.visual
    blk = v.transformer.resblocks[j]
    L, H = len(v.transformer.resblocks), blk.attn.num_heads
    D = comp.shape[-1]
    dh = D // H
    x_in = rec["blocks"][j]["x_in"]
    mu1 = x_in.mean(-1, keepdim=True)
    s1 = torch.sqrt(x_in.var(-1, unbiased=False, keepdim=True) + blk.ln_1.eps)
    norm_term = (1 + 2 * j) * share
    z = blk.ln_1.weight * (comp - mu1 / norm_term) / s1 + blk.ln_1.bias / norm_term
    Vw = blk.attn.in_proj_weight[2 * D:][h * dh:(h + 1) * dh]
    Vb = blk.attn.in_proj_bias[2 * D:][h * dh:(h + 1) * dh]
    val = z @ Vw.T + Vb / norm_term  # [b, N, d_head]
    row = rec["blocks"][j]["probs"][:, h, 0] if query == "cls" else rec["blocks"][j]["probs"][:, h, 1:].mean(1)
    xcls = (row[:, :, None] * val).sum(1)  # the pooled query's row: CLS, or the mean of the patch queries
    Ow = blk.attn.out_proj.weight[:, h * dh:(h + 1) * dh]
    o = xcls @ Ow.T + blk.attn.out_proj.bias / ((1 + 2 * j) * H * share)
    o = blk.ls_1(o)
    r = rec["final"][:, 0] if query == "cls" else rec["final"][:, 1:].mean(1)
    mup = r.mean(-1, keepdim=True)
    sp = torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + v.ln_post.eps)
    nt = (1 + 2 * j) * (1 + 2 * L) * H * share
    post_ln = v.ln_post.weight * (o - mup / nt) / sp + v.ln_post.bias / nt
    e = v.ln_post(r) @ v.proj
    return (post_ln @ v.proj) / e.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module", params=[None, 0.7], ids=["plain", "layer-scale"])
def setup(request):
    model = tiny_clip(3, layers=3, ls_init_value=request.param, dtype=torch.float64)
    if request.param is not None:  # layer-scale vectors drawn away from their constant init
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for blk in model.visual.transformer.resblocks:
                for ls in (blk.ls_1, blk.ls_2):
                    ls.gamma.copy_(0.5 + torch.rand(ls.gamma.shape, generator=g, dtype=torch.float64))
    x = random_images(2, dtype=torch.float64)
    return model, x, _record(model, x)


def test_second_order_equals_the_published_definition(setup):
    model, x, rec = setup
    layer = 0
    eff = neuron_effect_parts(model, x, layer, per_head=True)
    blk = model.visual.transformer.resblocks[layer]
    post = rec["blocks"][layer]["post"]  # [b, N, W]
    W = post.shape[-1]
    C = blk.ls_2(blk.mlp.c_proj.weight.T).T  # layer scale on each column's output
    bc = blk.ls_2(blk.mlp.c_proj.bias)
    H = model.visual.transformer.resblocks[1].attn.num_heads
    assert eff.second_order.shape == (2, W, 24) and eff.per_head.shape == (2, 2, H, W, 24)
    want = torch.zeros_like(eff.second_order)
    for n in range(W):
        comp = post[:, :, n, None] * C[:, n] + bc / W  # apply_mlp_post: the neuron's output at every token
        for k, j in enumerate((1, 2)):
            for h in range(H):
                f = _flow(model, rec, comp, j, h, W)
                torch.testing.assert_close(eff.per_head[:, k, h, n], f, rtol=1e-9, atol=1e-12)
                want[:, n] += f
    torch.testing.assert_close(eff.second_order, want, rtol=1e-9, atol=1e-12)
    assert eff.second_order.abs().max() > 1e-3  # not trivially zero
    dirs = neuron_directions(model, layer)  # reused across batches: the same effects
    again = neuron_effects(model, x, layer, directions=dirs)  # the public call: the [b, W, d'] tensor
    torch.testing.assert_close(again, eff.second_order)
    torch.testing.assert_close(neuron_effects(model, x, layer, per_head=True), eff.per_head)
    torch.testing.assert_close(eff.per_head.sum(dim=(1, 2)), eff.second_order)


def test_every_source_through_one_head_sums_to_its_decomposition_term(setup):
    model, x, rec = setup
    layer, j = 0, 2
    eff = neuron_effect_parts(model, x, layer, per_head=True)
    dec = textspan.decompose(model, x, spatial=False)
    H = dec.heads.shape[2]
    for h in range(H):
        total = _flow(model, rec, rec["z0"], j, h, 1)  # the embedding term
        for i in range(j):
            b = rec["blocks"][i]
            total = total + _flow(model, rec, b["y"] - b["x_in"], j, h, 1)  # block i's attention output
            if i == layer:  # this MLP as its neurons (their bias shares included)
                total = total + eff.per_head[:, j - layer - 1, h].sum(dim=1)
            else:
                total = total + _flow(model, rec, b["x_out"] - b["y"], j, h, 1)
        torch.testing.assert_close(total, dec.heads[:, j, h], rtol=1e-9, atol=1e-12)


def test_first_order_effects_sum_to_the_mlp_term(setup):
    model, x, _ = setup
    dec = textspan.decompose(model, x, spatial=False)
    for layer in (0, 1):
        torch.testing.assert_close(first_order_effects(model, x, layer).sum(dim=1), dec.mlps[:, layer + 1],
                                   rtol=1e-9, atol=1e-12)


def test_float32_agrees_with_float64(setup):
    model, x, _ = setup
    want = neuron_effects(model, x, -2)
    got = neuron_effects(model.float(), x.float(), -2)
    model.double()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_bad_layers_are_refused():
    model = tiny_clip(0, layers=3)
    x = random_images(1)
    with pytest.raises(BadInputError, match="out of range: this tower has 3 blocks"):
        neuron_effects(model, x, 3)
    with pytest.raises(BadInputError, match="the last block"):
        neuron_effects(model, x, -1)
    with pytest.raises(BadInputError, match="must be an integer"):
        neuron_effects(model, x, "1")
    assert neuron_effect_parts(model, x, -3).layer == 0


def test_neuron_maps_sum_over_tokens_to_the_effects(setup):
    from textspan.neurons import neuron_maps

    model, x, _ = setup
    T = torch.randn(3, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eff = neuron_effects(model, x, 0)
    maps = neuron_maps(model, x, 0, T, neurons=[0, 5, 77])
    assert maps.shape == (2, 3, 3, 17)
    want = torch.einsum("bne,ke->bnk", eff[:, [0, 5, 77]], T)
    torch.testing.assert_close(maps.sum(-1), want, rtol=1e-9, atol=1e-12)
    full = neuron_maps(model, x, 0, T)
    torch.testing.assert_close(full[:, [0, 5, 77]], maps)


def test_average_pooled_towers_follow_the_patch_queries_mean():
    # CLIPA-style: the embedding reads the mean of the patch tokens (ln_post after the pool); the pooled query's
    # attention row is the mean of the patch queries' rows
    model = tiny_clip(5, layers=3, pool_type="avg", final_ln_after_pool=True, dtype=torch.float64)
    x = random_images(2, dtype=torch.float64)
    rec = _record(model, x)
    eff = neuron_effect_parts(model, x, 0, per_head=True)
    dec = textspan.decompose(model, x, spatial=False)
    torch.testing.assert_close(eff.first_order.sum(dim=1), dec.mlps[:, 1], rtol=1e-9, atol=1e-12)
    j = 2
    for h in range(dec.heads.shape[2]):
        total = _flow(model, rec, rec["z0"], j, h, 1, "avg")
        for i in range(j):
            b = rec["blocks"][i]
            total = total + _flow(model, rec, b["y"] - b["x_in"], j, h, 1, "avg")
            total = total + (eff.per_head[:, j - 1, h].sum(dim=1) if i == 0 else
                             _flow(model, rec, b["x_out"] - b["y"], j, h, 1, "avg"))
        torch.testing.assert_close(total, dec.heads[:, j, h], rtol=1e-9, atol=1e-12)
