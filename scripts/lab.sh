#!/usr/bin/env bash
# The main job: the head lab.  Installs what it needs (a compiler, CMake and
# zlib; not the test tools), builds, trains a two-layer attention-only
# transformer on libmha's own gradients, watches its heads specialise (a
# previous-token head, induction heads), prunes heads by importance and at
# random, compares grouped-query attention, and writes
# lab-report/report.html (open it in any browser; it needs no network), the
# heatmaps as PNG and summary.txt; then asks the same of a real pretrained
# model, all-MiniLM-L6-v2 (scripts/get_model.sh fetches it once), and
# writes lab-report/model.html.  About a minute and a half on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --lab

# The build shows its progress: a percentage redrawn in place on a
# terminal, a line per tenth otherwise; its whole log only if it fails.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
tty=0
[ -t 2 ] && tty=1
echo "lab.sh: configuring and building build/mha" >&2
if ! { cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
       cmake --build build -j"$(nproc 2>/dev/null || echo 2)" --target mha; } 2>&1 | tee "$log" |
    awk -v tty="$tty" '
        /^\[ *[0-9]+%\]/ {
            match($0, /[0-9]+%/); p = substr($0, RSTART, RLENGTH - 1) + 0
            if (tty) printf "\rlab.sh: building %3d%%", p > "/dev/stderr"
            else if (p >= last + 10) { printf "lab.sh: building %d%%\n", p > "/dev/stderr"; last = p }
        }
        END { if (tty) printf "\n" > "/dev/stderr" }'; then
    cat "$log" >&2
    echo "lab.sh: the build failed (its log is above)" >&2
    exit 1
fi
build/mha lab --out lab-report "$@"
# The same questions of a real pretrained model (all-MiniLM-L6-v2, which
# setup.sh fetched into models/): lab-report/model.html.
build/mha lab model --out lab-report
