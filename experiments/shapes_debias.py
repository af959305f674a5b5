"""Spurious-feature removal on the built-in testbed (the spurious shapes world, Waterbirds layout).

Generates the testbed, caches its validation and test splits through the spurious-trained built-in model, and runs
`textspan.debias_cache` with automatic and concept head selection for several head counts, the means (and the
automatic choice of heads) taken on the validation split. The head count reported is the one with the best
validation worst-group accuracy (the test split is not used to choose). Prints one table and writes summary.json.
Everything goes through the Python API (the same functions the `textspan` commands call).

    python experiments/shapes_debias.py --output runs/shapes-debias [--model shapes-spurious] [--pretrained CKPT]
"""
import argparse
import json
from pathlib import Path

import textspan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--model", default="shapes-spurious")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--counts", default="1,2,3,4,6,8,10,12")
    args = ap.parse_args()
    out = Path(args.output)
    if not (out / "data" / "metadata.csv").is_file():
        textspan.write_shapes_waterbirds(out / "data", 0, args.n_val, args.n_test)
    loaded = textspan.jobs.resolve_model(args.model, args.pretrained, "cpu")
    for split in ("val", "test"):
        textspan.cache_images(out / "data", out / split, loaded, split=split)
    rows = []
    for select in ("auto", "concept"):
        for k in [int(x) for x in args.counts.split(",")]:
            res_dir = out / f"{select}-{k}"
            # validation run (choose k): means and evaluation on the validation split itself
            val = textspan.debias_cache(out / "val", res_dir / "val", same_set=True, select=select, n_heads=k,
                                        model=loaded).report
            rep = textspan.debias_cache(out / "test", res_dir, reference=out / "val", select=select, n_heads=k,
                                        model=loaded).report
            rows.append({"select": select, "n_heads": k, "heads": rep["heads"],
                         "val_worst_group": val["heads_ablated"]["worst_group"],
                         "test_worst_before": rep["baseline"]["worst_group"],
                         "test_worst_after": rep["heads_ablated"]["worst_group"],
                         "test_avg_before": rep["baseline"]["average"],
                         "test_avg_after": rep["heads_ablated"]["average"],
                         "random_best_worst": rep["random_heads"]["best_worst_group"],
                         "random_mean_worst": rep["random_heads"]["mean_worst_group"],
                         "generic_worst": rep["generic_ablated"]["worst_group"],
                         "heads_and_generic_worst": rep["heads_and_generic_ablated"]["worst_group"]})
    chosen = {s: max((r for r in rows if r["select"] == s), key=lambda r: r["val_worst_group"])
              for s in ("auto", "concept")}
    print(f"{'select':<8}{'k':>3}  {'val worst':>9}  {'test worst before->after':>25}  {'avg before->after':>19}"
          f"  {'random best/mean worst':>22}  heads")
    for r in rows:
        mark = " *" if r is chosen[r["select"]] else ""
        print(f"{r['select']:<8}{r['n_heads']:>3}  {r['val_worst_group']:>9.1f}  "
              f"{r['test_worst_before']:>11.1f} -> {r['test_worst_after']:>5.1f}{'':>6}  "
              f"{r['test_avg_before']:>7.1f} -> {r['test_avg_after']:>5.1f}  "
              f"{r['random_best_worst']:>10.1f} / {r['random_mean_worst']:>5.1f}{'':>5}  {','.join(r['heads'])}{mark}")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "chosen_on_validation": chosen}, indent=1))


if __name__ == "__main__":
    main()
