#!/usr/bin/env bash
# The lab's reports render and read at a laptop's width and a phone's: a
# short `mha lab` run writes report.html, a PNG per head and summary.txt,
# and a short `mha lab model` run model.html and model-summary.txt;
# headless Chromium (Debian's chromium) loads the page with no network at
# 1280 and at 390 px, with tests/report_check.js injected after the page's
# own script: every chart, map and table row is there and drawn, nothing
# is wider than the window, no two chart labels overlap.  The check is
# then run on copies with a chart and a map removed, and must fail.
set -euo pipefail
mha=${1:?usage: test_report.sh path/to/mha}
here=$(cd "$(dirname "$0")" && pwd)
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "test_report: chromium is not installed (scripts/setup.sh installs it)" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mha" lab --out "$out" --steps 150 --gqa-steps 40 --threads 2 >"$out/stdout.txt" 2>/dev/null
for f in report.html summary.txt checkpoint.safetensors; do
    [ -s "$out/$f" ] || { echo "test_report: $f missing" >&2; exit 1; }
done
# A PNG per head, larger than the bare 256 x 256 map: title, axes, scale.
for l in 0 1; do for h in 0 1 2 3; do
    png="$out/layer${l}_head${h}.png"
    [ -s "$png" ] || { echo "test_report: $png missing" >&2; exit 1; }
    read -r w h_px < <(od -An -tu1 -j16 -N8 "$png" | awk '{print $3*256+$4, $7*256+$8}')
    [ "$w" -gt 300 ] && [ "$h_px" -gt 300 ] || { echo "test_report: $png is $w x $h_px" >&2; exit 1; }
done; done
grep -q "previous-token\|induction\|mixed" "$out/summary.txt"
grep -q "http" "$out/report.html" && { echo "test_report: the report refers to the network" >&2; exit 1; }

# The expected counts for 2 layers x 4 heads: the loss chart, the colour
# scale and the pruning chart; 8 maps; the head table (1 + 8 rows) and the
# GQA table (1 + 3 rows).
counts='"charts": 3, "maps": 8, "rows": 13'

# check PAGE WIDTH [COUNTS]: prints the page's problems at that width ("none").
check() {
    python3 - "$1" "$out/checked.html" "$here/report_check.js" "{${3:-$counts}, \"width\": $2}" <<'PY'
import sys
page, dst, js, expect = sys.argv[1:5]
html = open(page).read()
tail = '<script type="application/json" id="expect">%s</script><script>%s</script></body>' % (expect, open(js).read())
open(dst, "w").write(html.replace("</body>", tail))
PY
    timeout 120 "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --user-data-dir="$out/profile" \
        --window-size="$(($2 > 500 ? $2 : 500))",1200 --dump-dom "file://$out/checked.html" 2>/dev/null >"$out/dom.html"
    grep -q 'id="rendered"' "$out/dom.html" || { echo "the page's script did not finish"; return; }
    local verdict
    verdict=$(grep -o '<div id="check"[^>]*>' "$out/dom.html" || true)
    [ -n "$verdict" ] || { echo "the check did not run"; return; }
    grep -q "data-width=\"$2\"" <<<"$verdict" || echo "the window was not $2 px wide"
    sed 's/.*data-problems="//; s/".*//' <<<"$verdict"
}

for width in 1280 390; do
    verdict=$(check "$out/report.html" "$width")
    [ "$verdict" = none ] || { echo "test_report: at $width px: $verdict" >&2; exit 1; }
done

# The check must fail when a chart or a map is missing.
python3 - "$out/report.html" "$out/no_chart.html" "$out/no_map.html" <<'PY'
import re, sys
html = open(sys.argv[1]).read()
pruning = html.index('<svg viewBox="0 0 640 300" class="chart" role="img" aria-label="held-out loss')
open(sys.argv[2], "w").write(html[:pruning] + html[html.index("</svg>", pruning) + 6:])
open(sys.argv[3], "w").write(html.replace('<canvas id="m1_2"></canvas>', "", 1))
PY
for broken in no_chart no_map; do
    verdict=$(check "$out/$broken.html" 1280)
    [ "$verdict" != none ] || { echo "test_report: the check passed a page with $broken" >&2; exit 1; }
done

timeout 120 "$browser" --headless --disable-gpu --no-sandbox --user-data-dir="$out/profile" \
    --screenshot="$out/shot.png" --window-size=1280,2400 "file://$out/report.html" >/dev/null 2>&1
size=$(stat -c %s "$out/shot.png")
[ "$size" -gt 20000 ] || { echo "test_report: screenshot of $size bytes" >&2; exit 1; }
[ -n "${MHA_REPORT_SHOT:-}" ] && cp "$out/shot.png" "$MHA_REPORT_SHOT"

# The pretrained model's report (`mha lab model`, on 4 of the sentences to
# stay quick): the colour scale and the pruning chart; 72 maps of the one
# sample sentence kept; the layer x head grid (1 + 6 rows) and the relation
# table (1 + 6 rows).
"$mha" lab model --out "$out/model" --sentences 4 --threads 2 >"$out/model-stdout.txt" 2>/dev/null
for f in model.html model-summary.txt; do
    [ -s "$out/model/$f" ] || { echo "test_report: model/$f missing" >&2; exit 1; }
done
grep -q "determiner -> noun" "$out/model/model-summary.txt"
grep -q "http" "$out/model/model.html" && { echo "test_report: the model report refers to the network" >&2; exit 1; }
model_counts='"charts": 2, "maps": 72, "rows": 14'
for width in 1280 390; do
    verdict=$(check "$out/model/model.html" "$width" "$model_counts")
    [ "$verdict" = none ] || { echo "test_report: the model report at $width px: $verdict" >&2; exit 1; }
done
echo "test_report: the lab's and the pretrained model's reports checked at 1280 and 390 px in $(basename "$browser");" \
    "a missing chart or map fails the check"
