#!/usr/bin/env bash
# The lab's report renders: a short `mha lab` run writes report.html, PNG
# heatmaps and summary.txt; headless Chromium (Debian's chromium) loads the
# page with no network, its script runs to the end (it adds #rendered last,
# so any exception leaves it out), and a screenshot is taken.
set -euo pipefail
mha=${1:?usage: test_report.sh path/to/mha}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "test_report: chromium is not installed (scripts/setup.sh installs it)" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mha" lab --out "$out" --steps 150 --gqa-steps 40 --threads 2 >"$out/stdout.txt" 2>/dev/null
for f in report.html summary.txt layer0_head0.png layer1_head3.png checkpoint.safetensors; do
    [ -s "$out/$f" ] || { echo "test_report: $f missing" >&2; exit 1; }
done
grep -q "previous-token\|induction\|mixed" "$out/summary.txt"
grep -q "http" "$out/report.html" && { echo "test_report: the report refers to the network" >&2; exit 1; }
flags=(--headless --disable-gpu --no-sandbox --user-data-dir="$out/profile")
timeout 120 "$browser" "${flags[@]}" --dump-dom "file://$out/report.html" 2>/dev/null >"$out/dom.html"
grep -q 'id="rendered"' "$out/dom.html" || { echo "test_report: the page's script did not finish" >&2; exit 1; }
timeout 120 "$browser" "${flags[@]}" --screenshot="$out/shot.png" --window-size=1200,2400 \
    "file://$out/report.html" >/dev/null 2>&1
size=$(stat -c %s "$out/shot.png")
[ "$size" -gt 20000 ] || { echo "test_report: screenshot of $size bytes" >&2; exit 1; }
[ -n "${MHA_REPORT_SHOT:-}" ] && cp "$out/shot.png" "$MHA_REPORT_SHOT"
echo "test_report: report rendered in $(basename "$browser"), screenshot $size bytes"
