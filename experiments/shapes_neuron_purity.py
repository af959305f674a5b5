"""Do neurons specialise like heads? A check of the neurons' second-order effects against the shapes world's ground truth.

For every MLP layer of the built-in model that has a later block, over fresh images: each neuron's second-order
effects (`textspan.neuron_effects`), centred by their mean; the correlation ratio of each true attribute on them
(between-class over total variance, summed over dimensions) says which attribute explains the neuron; its principal
direction (the top-k centred effects, as `textspan neurons` computes it) decomposed by orthogonal matching pursuit
over the shapes bank's single-attribute entries (the published dictionary) gives its top text. A neuron *agrees*
when its top text names the attribute with the largest ratio. Printed per layer: the share of neurons that agree
(over the specialised ones, largest ratio >= 0.5, and over all), which attributes they are about, and the ablation
curve: zero-shot accuracy (shape, colour, background prompts) with that layer's second-order effects mean-ablated (all neurons; the significant
ones; the insignificant ones; each neuron reduced to its principal direction).

    python experiments/shapes_neuron_purity.py [--n 2000] [--top-k 100] [--output DIR]
"""
import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import textspan
from textspan import builtin, world
from textspan.metrics import correlation_ratio
from textspan.neuron_jobs import principal_directions, sparse_decomposition, text_dictionary
from textspan.text import TextBank, encode_texts


def text_attributes(text: str):
    words = set(text.split())
    return sorted(a for a, values in world.ATTRIBUTES.items() if words & set(values))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    model, _, tok = textspan.load_model("shapes")
    images, _, labels = world.batch(args.seed, 0, args.n)
    x = builtin.preprocess_batch(images)
    bank = TextBank([t for t in TextBank.load("shapes").texts if len(text_attributes(t)) == 1], "shapes")
    dictionary = text_dictionary(encode_texts(model, tok, bank.texts))
    prompts = {"shape": lambda v: f"a photo of a {v}", "colour": lambda v: f"a {v} object",
               "background": lambda v: f"an object on {v}"}
    tasks = {}
    for a, fmt in prompts.items():
        values = list(world.ATTRIBUTES[a])
        W_a = torch.from_numpy(encode_texts(model, tok, [fmt(v) for v in values])).double().t()
        tasks[a] = (W_a, torch.tensor([values.index(lab[a]) for lab in labels]))
    with torch.no_grad():
        e = textspan.decomposition.forward_image(model, x).double()
    r = e / e.norm(dim=-1, keepdim=True)
    report = {"n_images": args.n, "layers": {}}
    L = textspan.engine.read_tower(model).n_layers
    accuracy = lambda rep: {a: 100.0 * float(((rep @ Wa).argmax(1) == ya).float().mean())  # noqa: E731
                            for a, (Wa, ya) in tasks.items()}
    report["baseline"] = accuracy(r)
    print("baseline zero-shot accuracy: " + ", ".join(f"{a} {v:.1f}%" for a, v in report["baseline"].items()))
    for layer in range(L - 1):
        s = torch.cat([textspan.neuron_effects(model, x[i:i + 250], layer).double()
                       for i in range(0, args.n, 250)])  # [n, W, d']
        mean = s.mean(0)
        c = (s - mean).numpy()
        norms = np.linalg.norm(c, axis=-1)  # [n, W]
        top = np.argsort(-norms, axis=0, kind="stable")[:args.top_k]  # [k, W]
        W = c.shape[1]
        top_effects = np.stack([c[top[:, n], n] for n in range(W)])  # [W, k, d']
        pca, explained = principal_directions(top_effects)
        coef, recon = sparse_decomposition(pca, dictionary, 1)
        top_text = [bank.texts[int(np.argmax(np.abs(coef[n])))] for n in range(W)]
        agree, special, about = 0, 0, Counter()
        agree_all = 0
        for n in range(W):
            ratios = {a: correlation_ratio(c[:, n], [lab[a] for lab in labels]) for a in world.ATTRIBUTES}
            best = max(ratios, key=ratios.get)
            named = text_attributes(top_text[n])
            hit = best in named
            agree_all += hit
            if ratios[best] >= args.threshold:
                special += 1
                agree += hit
                about[best] += 1
        threshold = np.sort(norms, axis=0)[-args.top_k]  # the k-th largest centred norm per neuron
        sig = torch.from_numpy(norms > threshold[None])
        ct = torch.from_numpy(c)
        without = r - s.sum(1) + mean.sum(0)[None]
        variants = {"without all": without,
                    "without significant": without + (ct * (~sig)[..., None]).sum(1),
                    "without insignificant": without + (ct * sig[..., None]).sum(1),
                    "projected on PC": without + (torch.einsum("bnd,nd->bn", ct, torch.from_numpy(pca))[..., None]
                                                  * torch.from_numpy(pca)[None]).sum(1)}
        acc = {k: accuracy(v) for k, v in variants.items()}
        row = {"neurons": W, "specialised": special, "agree_specialised": agree, "agree_all": agree_all,
               "about": dict(about), "median_explained": float(np.median(explained)),
               "median_reconstruction": float(np.median(recon)), "accuracy": acc,
               "effect_norm": float(np.linalg.norm(s.numpy(), axis=-1).mean())}
        report["layers"][layer] = row
        print(f"block {layer}: {special}/{W} neurons specialised (ratio >= {args.threshold}); top text names the best "
              f"attribute for {agree}/{special} of them ({agree_all}/{W} of all); about {dict(about)}; median share "
              f"on the PC {row['median_explained']:.2f}; mean |effect| {row['effect_norm']:.4f}; accuracy "
              + "; ".join(f"{k}: " + ", ".join(f"{a} {v:.1f}%" for a, v in av.items()) for k, av in acc.items()))
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "neuron_purity.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
