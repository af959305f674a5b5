"""Do TextSpan's labels name what a head really encodes? A check against the shapes world's ground truth.

For every head of the built-in model: TextSpan over fresh images with the shapes bank gives the head's top texts;
independently, the correlation ratio (between-class over total variance of the head's outputs, summed over
dimensions) of each true attribute says which attribute explains the head. A head *agrees* when the attribute
named by its top text is the attribute with the largest correlation ratio. Printed: the per-head table, the agreement
rate over specialised heads (largest ratio >= 0.5) and over all heads, and for colour and background: the heads whose
top text names them against the heads whose outputs they explain (ratio >= 0.5). By default only bank entries that
name at most one attribute are used (the shapes bank also holds attribute pairs and whole captions), so that each
label names one attribute.

    python experiments/shapes_label_purity.py [--model shapes] [--pretrained CKPT] [--n 2000] [--output DIR]
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

import textspan
from textspan import builtin, world
from textspan.metrics import correlation_ratio
from textspan.span import text_span
from textspan.text import TextBank, encode_texts


def text_attributes(text: str):
    words = set(text.split())
    return sorted(a for a, values in world.ATTRIBUTES.items() if words & set(values))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--bank", default="shapes")
    ap.add_argument("--n-texts", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--output", default=None)
    ap.add_argument("--all-texts", action="store_true",
                    help="use every bank entry (default: only entries naming at most one attribute, so that a "
                         "label names one attribute and agreement is unambiguous)")
    args = ap.parse_args()

    model, _, tok = textspan.load_model(args.model, args.pretrained)
    images, _, labels = world.batch(args.seed, 0, args.n)
    heads = []
    for i in range(0, args.n, 250):
        heads.append(textspan.decompose(model, builtin.preprocess_batch(images[i:i + 250]), spatial=False).heads)
    heads = torch.cat(heads).numpy()  # [n, L, H, d']
    bank = TextBank.load(args.bank)
    if not args.all_texts:
        bank = TextBank([t for t in bank.texts if len(text_attributes(t)) <= 1], bank.source)
    emb = encode_texts(model, tok, bank.texts)
    n, L, H, d = heads.shape
    rows = []
    for l in range(L):
        for h in range(H):
            C = heads[:, l, h]
            res = text_span(C, emb, bank.texts, n_texts=args.n_texts, rank=d)
            ratios = {a: correlation_ratio(C, [lab[a] for lab in labels]) for a in world.ATTRIBUTES}
            best = max(ratios, key=ratios.get)
            named = text_attributes(res.texts[0])
            rows.append({"head": f"L{l}H{h}", "top_text": res.texts[0], "texts": res.texts, "text_attributes": named,
                         "best_attribute": best, "best_ratio": round(ratios[best], 3),
                         "ratios": {a: round(r, 3) for a, r in ratios.items()},
                         "agree": best in named and len(named) == 1,
                         "specialised": ratios[best] >= args.threshold})
    spec = [r for r in rows if r["specialised"]]
    summary = {
        "n_images": n, "bank_texts": len(bank), "heads": len(rows), "specialised_heads": len(spec),
        "agreement_specialised": float(np.mean([r["agree"] for r in spec])) if spec else None,
        "agreement_all": float(np.mean([r["agree"] for r in rows])),
    }
    for attr in ("colour", "background", "shape", "size", "horizontal", "vertical"):
        labelled = {r["head"] for r in rows if r["text_attributes"] == [attr]}
        explained = {r["head"] for r in rows if r["ratios"][attr] >= args.threshold}
        summary[attr] = {"labelled": sorted(labelled), "explained": sorted(explained),
                         "labelled_and_explained": sorted(labelled & explained)}
    print(f"{'head':<6} {'top text':<34} {'named':<12} {'best attribute (ratio)':<26} agree")
    for r in rows:
        print(f"{r['head']:<6} {r['top_text']:<34} {','.join(r['text_attributes']) or '-':<12} "
              f"{r['best_attribute'] + ' (' + format(r['best_ratio'], '.2f') + ')':<26} "
              f"{'yes' if r['agree'] else 'no'}{'' if r['specialised'] else ' (not specialised)'}")
    print(json.dumps(summary, indent=1))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "label_purity.json").write_text(json.dumps({"summary": summary, "heads": rows}, indent=1))


if __name__ == "__main__":
    main()
