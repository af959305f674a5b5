#!/usr/bin/env bash
# Regenerates the README's figures (docs/*.png) on the built-in model, from nothing: a shapes world, its cache,
# head labels, ablations, heatmaps, the method comparison, and a screenshot of the atlas (needs chromium).
# Usage: bash scripts/docs_figures.sh [WORK_DIR]   (default: a temporary folder)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"
DOCS="$ROOT/docs"
mkdir -p "$W" && cd "$W"
textspan shapes-world --n 1000 -o shapes -q
textspan cache shapes/images -o cache -q
textspan label-heads cache --bank shapes -o labels -q
textspan ablate cache -o abl -q
# one image of each shape (the first of each folder, sorted)
IMGS=()
for s in circle square triangle star cross; do
    files=(shapes/images/$s/*.png)
    IMGS+=("${files[0]}")
done
textspan heatmap "${IMGS[@]:0:4}" -p "a circle" -p "a square" -p "a triangle" -p "a red object" -o hm -q
cp hm/grid.png "$DOCS/heatmaps_shapes.png"
textspan heatmap "${IMGS[@]:0:4}" --labels labels --heads L3H4 -o hm_head -q
cp hm_head/L3H4.png "$DOCS/head_L3H4.png"
textspan compare "${IMGS[@]:0:3}" -p "a circle" -p "a star" -o cmp -q
cp cmp/compare.png "$DOCS/compare_shapes.png"
textspan retrieve cache --head L3H1 --text "an object on water" -o ret -q
cp ret/retrieval.png "$DOCS/retrieval_L3H1_water.png"
textspan atlas cache --labels labels --ablations abl -o atlas -q
cp abl/head_importance.png "$DOCS/head_importance_shapes.png"
textspan segment-eval shapes --samples 1 -o seg -q
cp seg/sample_00.png "$DOCS/segment_sample_shapes.png"
cp atlas/heads/L3H4_maps.jpg "$DOCS/atlas_L3H4_maps.jpg"
# the benchmark leaderboard of the README (every method, 200 images in the ImageNet-S layout; about 5 minutes)
textspan shapes-world --n 200 --seed 77 --layout imagenet-s -o ins -q
textspan benchmark ins -o bins -q > /dev/null
cp bins/leaderboard.png "$DOCS/leaderboard_shapes_imagenet_s.png"
BROWSER="$(command -v chromium || command -v chromium-browser || true)"
if [ -n "$BROWSER" ]; then
    "$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1000 \
        --screenshot="$DOCS/atlas_shapes.png" "file://$W/atlas/index.html#search=water" 2>/dev/null
else
    echo "no chromium: docs/atlas_shapes.png not regenerated"
fi
echo "figures written to $DOCS (work in $W)"
