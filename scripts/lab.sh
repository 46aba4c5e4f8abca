#!/usr/bin/env bash
# The main job: the head lab.  Installs what it needs, builds, trains a
# two-layer attention-only transformer on libmha's own gradients, watches
# its heads specialise (a previous-token head, induction heads), prunes
# heads by importance and at random, compares grouped-query attention, and
# writes lab-report/report.html (open it in any browser; it needs no
# network), the heatmaps as PNG and summary.txt.  About a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc 2>/dev/null || echo 2)" --target mha >/dev/null
build/mha lab --out lab-report "$@"
