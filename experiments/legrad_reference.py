"""Check textspan's `legrad` against the published implementation (legrad-torch 1.1 on open_clip 2.23) on identical
weights and inputs. Two steps, two environments (the reference pins an old open_clip):

    # 1. in an environment with open_clip_torch==2.23.0, legrad-torch==1.1 (and opencv-python-headless):
    python experiments/legrad_reference.py reference --out runs/legrad_ref
    # 2. in textspan's environment:
    python experiments/legrad_reference.py compare --out runs/legrad_ref

Step 1 builds --model (default ViT-B-16) with a seeded random initialisation (or loads --pretrained), saves its state
dict, random images and prompt embeddings, and LeGrad's outputs: the upsampled min-max maps as
LeWrapper.compute_legrad returns them, and the raw patch-grid maps (the same call with its upsampling and min-max
replaced by the identity), for the default layers (layer_index=-2) and all layers (layer_index=0), at the model's own
size and at a grid 4 patches larger (resampled positions; 224 and 288 px for ViT-B-16). Step 2 loads the same weights
into the installed open_clip and compares `textspan.explain(..., method="legrad")` and `textspan.upsample_maps`.
"""
import argparse
import json
import types
from pathlib import Path

import numpy as np
import torch


def reference(out: Path, n_images: int, n_prompts: int, seed: int, pretrained, arch: str = "ViT-B-16"):
    import legrad
    import legrad.wrapper as lw
    import open_clip

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=pretrained).eval()
    torch.save(model.state_dict(), out / "weights.pt")
    g = torch.Generator().manual_seed(seed + 1)
    text = torch.nn.functional.normalize(torch.randn(n_prompts, model.visual.proj.shape[1], generator=g), dim=-1)
    results = {"text": text.numpy()}
    native = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    patch = model.visual.patch_size[0]
    sizes = (native, native + 4 * patch)  # the model's own size, and a larger grid (resampled positions)
    for size in sizes:
        images = torch.randn(n_images, 3, size, size, generator=g)
        results[f"images_{size}"] = images.numpy()
        for name, layer_index in (("default", -2), ("all", 0)):
            m = open_clip.create_model(arch, pretrained=None).eval()
            m.load_state_dict(torch.load(out / "weights.pt"))
            wrapped = legrad.LeWrapper(m, layer_index=layer_index)
            up, raw = [], []
            for img in images:
                up.append(wrapped.compute_legrad(text, image=img[None]).detach()[0])
                # the same computation without its upsampling and min-max: the raw patch-grid maps
                saved_f, saved_mm = lw.F, lw.min_max
                lw.F = types.SimpleNamespace(**{k: getattr(torch.nn.functional, k)
                                                for k in dir(torch.nn.functional) if not k.startswith("_")})
                lw.F.interpolate = lambda x, **kw: x
                lw.min_max = lambda x: x
                try:
                    raw.append(wrapped.compute_legrad(text, image=img[None]).detach()[0])
                finally:
                    lw.F, lw.min_max = saved_f, saved_mm
            results[f"up_{name}_{size}"] = torch.stack(up).numpy()
            results[f"raw_{name}_{size}"] = torch.stack(raw).numpy()
    np.savez(out / "reference.npz", **results)
    from open_clip.version import __version__ as oc
    (out / "reference.json").write_text(json.dumps({"open_clip": oc, "legrad": "1.1", "seed": seed,
                                                    "pretrained": pretrained, "model": arch,
                                                    "sizes": list(sizes)}))
    print(f"wrote {out / 'reference.npz'} (open_clip {oc})")


def compare(out: Path):
    import open_clip
    import textspan

    ref = np.load(out / "reference.npz")
    info = json.loads((out / "reference.json").read_text())
    model = open_clip.create_model(info.get("model", "ViT-B-16"), pretrained=None).eval()
    model.load_state_dict(torch.load(out / "weights.pt"))
    text = torch.from_numpy(ref["text"])
    rows = []
    for size in info.get("sizes", (224, 288)):
        images = torch.from_numpy(ref[f"images_{size}"])
        for name, layers in (("default", None), ("all", "all")):
            raw = textspan.explain(model, images, text, method="legrad", layers=layers)
            up = textspan.upsample_maps(raw, size)
            want_raw = torch.from_numpy(ref[f"raw_{name}_{size}"])
            want_up = torch.from_numpy(ref[f"up_{name}_{size}"])
            scale = float(want_raw.abs().max())
            rows.append(dict(size=size, layers=name,
                             raw_max_abs=float((raw - want_raw).abs().max()),
                             raw_max_rel=float((raw - want_raw).abs().max()) / scale,
                             up_max_abs=float((up - want_up).abs().max())))
    print(f"{'size':>5} {'layers':>8} {'raw max|d|':>12} {'raw rel':>10} {'upsampled max|d|':>17}")
    for r in rows:
        print(f"{r['size']:>5} {r['layers']:>8} {r['raw_max_abs']:>12.3g} {r['raw_max_rel']:>10.3g} "
              f"{r['up_max_abs']:>17.3g}")
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    ok = all(r["raw_max_rel"] < 1e-5 and r["up_max_abs"] < 1e-5 for r in rows)
    print("MATCH (float32 precision)" if ok else "MISMATCH")
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["reference", "compare"])
    ap.add_argument("--out", default="runs/legrad_ref")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrained", default=None, help="an open_clip pretrained tag or checkpoint (default: random)")
    ap.add_argument("--model", default="ViT-B-16", help="an open_clip ViT name (step reference; compare reads it)")
    args = ap.parse_args()
    if args.step == "reference":
        reference(Path(args.out), args.images, args.prompts, args.seed, args.pretrained, args.model)
    else:
        raise SystemExit(0 if compare(Path(args.out)) else 1)
