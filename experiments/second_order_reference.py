"""Compare `textspan.neuron_effects` with the published second-order hook on identical weights and inputs, and time
both.

The hook is not part of this repository: pass a checkout of yossigandelsman/second_order_lens (--repo). This script
loads its `prs_second_order_neurons_hook.py`, gives its `SecondOrderPrsNeurons` a view of a stock open_clip model
with the few attributes its fork of open_clip has (`attn._split_qkv_weight()` / `_split_qkv_bias()`, `mlp_width`),
and fills what its hooks would record (each block's ln_1 input mean and std per token, the attention maps, the
MLP's post-GELU activations of --layer, ln_post's mean and std) from a plain forward of the same model. It then
calls the hook's own `apply_attention_head_and_project_layer_neurons` for every later block and head, sums them
as compute_second_order_neuron_prs.py does, divides by its factor 100, and prints the largest difference from
textspan's second-order effects (relative to their largest value), with the time of both on the same batch.

    python experiments/second_order_reference.py --repo second_order_lens --model ViT-B-16 [--pretrained openai] \\
        [--layer 8] [--batch 1]

The hook materialises [b, tokens, neurons, d_model] per head (ViT-B/16: 1.9 GB per image in float32), so keep the
batch small.
"""
import argparse
import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import textspan


class _Attn:
    """The attributes of second_order_lens' attention module that its hook reads, over a stock one."""

    def __init__(self, attn):
        self._a = attn
        self.num_heads, self.embed_dim = attn.num_heads, attn.embed_dim
        self.head_dim = attn.embed_dim // attn.num_heads
        self.out_proj = attn.out_proj

    def _split_qkv_weight(self):
        w = self._a.in_proj_weight
        return tuple(t.reshape(self.num_heads, self.head_dim, self.embed_dim) for t in w.chunk(3, dim=0))

    def _split_qkv_bias(self):
        b = self._a.in_proj_bias
        return tuple(t.reshape(1, self.num_heads, 1, self.head_dim) for t in b.chunk(3, dim=0))


def _view(model):
    v = model.visual
    blocks = [SimpleNamespace(ln_1=blk.ln_1, attn=_Attn(blk.attn), mlp=blk.mlp, mlp_width=blk.mlp.c_fc.out_features)
              for blk in v.transformer.resblocks]
    return SimpleNamespace(visual=SimpleNamespace(transformer=SimpleNamespace(resblocks=blocks), ln_post=v.ln_post,
                                                  proj=v.proj))


def _record(model, x, layer):
    """What the hook's loggers would hold after encode_image(x)."""
    v = model.visual
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], dim=1) + v.positional_embedding
    t = v.ln_pre(t)
    rec = dict(ln_1_mean=[], ln_1_std=[], attn_maps=[])
    for j, blk in enumerate(v.transformer.resblocks):
        rec["ln_1_mean"].append(t.mean(-1, keepdim=True).numpy())
        rec["ln_1_std"].append(torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + blk.ln_1.eps).numpy())
        a = blk.ln_1(t)
        D, H = a.shape[-1], blk.attn.num_heads
        q, k, val = (a @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).split(D, dim=-1)
        sh = lambda z: z.reshape(z.shape[0], z.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
        probs = ((sh(q) @ sh(k).transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1)
        rec["attn_maps"].append(probs.numpy())
        y = t + blk.ls_1(blk.attn.out_proj((probs @ sh(val)).transpose(1, 2).reshape(t.shape)))
        post = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(y)))
        if j == layer:
            rec["post_gelu"] = post.numpy()
        t = y + blk.ls_2(blk.mlp.c_proj(post))
    r = t[:, 0]
    rec["post_ln_mean"] = r.mean(-1, keepdim=True).numpy()
    rec["post_ln_std"] = torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + v.ln_post.eps).numpy()
    rec["e"] = v.ln_post(r) @ v.proj
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("prs_hook", args.repo / "prs_second_order_neurons_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)

    torch.manual_seed(0)
    model, _, _ = textspan.load_model(args.model, args.pretrained)
    size = textspan.engine.read_tower(model).image_size
    x = torch.randn(args.batch, 3, *size)
    with torch.no_grad():
        t0 = time.perf_counter()
        ours = textspan.neuron_effects(model, x, args.layer).numpy()
        t_ours = time.perf_counter() - t0
        rec = _record(model, x, args.layer)
        prs = hook.SecondOrderPrsNeurons(_view(model), args.layer, "cpu")
        prs.post_gelu_outputs, prs.post_ln_mean, prs.post_ln_std = (rec["post_gelu"], rec["post_ln_mean"],
                                                                     rec["post_ln_std"])
        prs.ln_1_mean, prs.ln_1_std, prs.attn_maps = rec["ln_1_mean"], rec["ln_1_std"], rec["attn_maps"]
        prs.finalize()
        L = len(model.visual.transformer.resblocks)
        H = model.visual.transformer.resblocks[0].attn.num_heads
        t0 = time.perf_counter()
        total = 0
        for j in range(args.layer + 1, L):
            for h in range(H):
                total = total + prs.apply_attention_head_and_project_layer_neurons(j, h, rec["e"])
        t_pub = time.perf_counter() - t0
    published = total / 100.0  # the hook's coefficient
    diff = np.abs(published - ours).max() / np.abs(published).max()
    print(f"{args.model}, block {args.layer}'s MLP, batch {args.batch}: largest difference {diff:.2e} of the largest "
          f"effect")
    print(f"published hook (arithmetic only, recorded state given): {t_pub:.2f} s; textspan neuron_effects (forward "
          f"included): {t_ours:.2f} s")


if __name__ == "__main__":
    main()
