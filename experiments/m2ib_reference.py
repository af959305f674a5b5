"""textspan's `m2ib` against the published M2IB code (YingWANGG/M2IB, `scripts/methods.py` `vision_heatmap_iba`)
on the same weights and inputs, and the time of each.

The published code runs on a Hugging Face `CLIPModel`: it replaces encoder layer `layer` by (layer, bottleneck),
runs the text and image towers on 10 copies per step and reads the bottleneck's capacity. Here both run on one
randomly initialised `CLIPModel` of the ViT-B/16 shape (or the weights of a local Hugging Face folder), after
``torch.manual_seed(seed)`` for the published call; textspan gets the published text features as its prompt
embeddings. Compared: the raw maps (capacity summed over channels at the patch tokens; the published
`_run_vision_training` output, before its resize and min-max) and the published 224 px min-max maps against textspan's
maps through the same bilinear resize and min-max.

The published code is not a textspan dependency and is not in this repository: pass a checkout of it. It needs the
transformers of its time (4.x: encoder layers return tuples, which its layer replacement relies on; with 5.x it
fails inside the encoder); textspan runs on both, so a side folder with transformers 4.46 does:

    git clone https://github.com/YingWANGG/M2IB /path/M2IB     # scripts/iba.py, scripts/methods.py, scripts/utils.py
    pip install --target /tmp/tf4 --no-deps transformers==4.46.3 tokenizers==0.20.3 huggingface-hub==0.26.5
    PYTHONPATH=/tmp/tf4 python experiments/m2ib_reference.py --m2ib /path/M2IB [--images 2] [--hf-folder DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
import types

import torch
import torch.nn.functional as F


def vit_b16_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512)
    return CLIPModel(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m2ib", required=True, help="a checkout of YingWANGG/M2IB (its scripts/ folder is imported)")
    ap.add_argument("--hf-folder", default=None, help="a local Hugging Face CLIP folder (default: random ViT-B/16)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, args.m2ib)
    sys.modules.setdefault("clip", types.ModuleType("clip"))  # imported by scripts/methods.py, not used by it
    from scripts import methods as published  # noqa: E402

    import textspan

    if args.hf_folder:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(args.hf_folder).eval()
    else:
        model = vit_b16_clip()
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.images, 3, size, size, generator=g)
    ids = torch.randint(1, 400, (1, 8), generator=g)
    ids[0, -1] = model.config.text_config.vocab_size - 1  # the end-of-text token (the largest id) read by the pooler
    with torch.no_grad():
        t = model.get_text_features(input_ids=ids)
    t = t if isinstance(t, torch.Tensor) else t.pooler_output
    worst_raw, worst_shown, t_pub, t_ours = 0.0, 0.0, 0.0, 0.0
    for i in range(args.images):
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        feats = published.extract_feature_map(model.vision_model, args.layer, x[i:i + 1])
        layer = published.extract_bert_layer(model.vision_model, args.layer)
        est = published.get_compression_estimator(1, layer, feats)
        reader = published.IBAInterpreter(model, est, beta=args.beta, lr=1, steps=10, progbar=False)
        cap = reader._run_vision_training(ids, x[i:i + 1])[0]  # what vision_heatmap reads
        theirs_raw = torch.nansum(cap, -1)[1:].detach()
        t_pub += time.perf_counter() - start
        torch.manual_seed(args.seed)
        theirs_shown = torch.as_tensor(published.vision_heatmap_iba(ids, x[i:i + 1], model, args.layer, args.beta, 1,
                                                                    progbar=False))
        start = time.perf_counter()
        ours = textspan.explain(model, x[i:i + 1], F.normalize(t, dim=-1), method="m2ib", layer=args.layer,
                                beta=args.beta, seed=args.seed)
        t_ours += time.perf_counter() - start
        worst_raw = max(worst_raw, float((ours.flatten() - theirs_raw).abs().max() / theirs_raw.abs().max()))
        up = F.interpolate(ours, size=224, mode="bilinear")[0, 0]
        shown = (up - up.min()) / (up.max() - up.min())
        worst_shown = max(worst_shown, float((shown - theirs_shown).abs().max()))
    print(f"m2ib vs the published M2IB on one {'local' if args.hf_folder else 'random ViT-B/16'} CLIPModel, "
          f"{args.images} images, layer {args.layer}, beta {args.beta}, 10 steps x 10 samples:")
    print(f"  largest difference of the raw maps, relative to the map's largest value: {worst_raw:.2e}")
    print(f"  largest difference of the published 224 px min-max maps: {worst_shown:.2e}")
    print(f"  time per image and prompt: published {t_pub / args.images:.2f} s, textspan {t_ours / args.images:.2f} s "
          f"({t_pub / t_ours:.2f}x faster)")


if __name__ == "__main__":
    main()
