#!/usr/bin/env bash
# The layering check must pass on this tree and fail on trees that break
# each of its rules: an include from a lower layer to a higher one, a call
# up into a higher layer, a cycle of calls inside one folder, a file of
# src/ in no layer, intrinsics outside src/kernels/.  The function-length
# check likewise: this tree passes, a 61-line function fails.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
check="$here/scripts/check_layers.py"
python3 "$check" "$here"
python3 "$here/scripts/check_functions.py" "$here"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

# A minimal tree that satisfies every rule.
base_tree() {
    rm -rf "$tmp/t"
    mkdir -p "$tmp/t/include" "$tmp/t/src/core" "$tmp/t/src/attn" "$tmp/t/src/layer"
    echo 'void mha_api(void);' >"$tmp/t/include/mha.h"
    printf '#include "core/base.h"\nint mha__base(void)\n{\n    return 1;\n}\n' >"$tmp/t/src/core/base.c"
    echo 'int mha__base(void);' >"$tmp/t/src/core/base.h"
    printf '#include "core/base.h"\nint mha__attn(void)\n{\n    return mha__base();\n}\n' >"$tmp/t/src/attn/a.c"
    printf 'int mha__attn(void);\nvoid mha_api(void)\n{\n    mha__attn();\n}\n' >"$tmp/t/src/layer/l.c"
}

expect() {  # expect pass|fail "what" -- runs the check on $tmp/t
    local want=$1 what=$2 out rc=0
    out=$(python3 "$check" "$tmp/t" 2>&1) || rc=$?
    if { [ "$want" = pass ] && [ $rc -eq 0 ]; } || { [ "$want" = fail ] && [ $rc -eq 1 ]; }; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: $what: expected $want, exit $rc: $out"
    fi
}

base_tree
expect pass "a tree that follows the rules"

base_tree
printf '#include "attn/up.h"\n' >>"$tmp/t/src/core/base.c"
echo 'int x;' >"$tmp/t/src/attn/up.h"
expect fail "core/ includes a header of attn/"

base_tree
printf 'int mha__attn(void);\nint mha__up(void)\n{\n    return mha__attn();\n}\n' >>"$tmp/t/src/core/base.c"
expect fail "core/ calls a function defined in attn/"

base_tree
printf 'int mha__b2(void);\nint mha__a2(void)\n{\n    return mha__b2();\n}\n' >"$tmp/t/src/attn/a2.c"
printf 'int mha__a2(void);\nint mha__b2(void)\n{\n    return mha__a2();\n}\n' >"$tmp/t/src/attn/b2.c"
expect fail "two files of attn/ call each other"

base_tree
echo 'int y;' >"$tmp/t/src/stray.c"
expect fail "a file of src/ in no layer folder"

base_tree
printf '#include <immintrin.h>\n' >>"$tmp/t/src/attn/a.c"
expect fail "intrinsics outside src/kernels/"

base_tree
{
    printf 'int mha__long(void)\n{\n    int x = 0;\n'
    for i in $(seq 1 58); do printf '    x += %d;\n' "$i"; done
    printf '    return x;\n}\n'
} >"$tmp/t/src/attn/long.c"
if python3 "$here/scripts/check_functions.py" "$tmp/t" >/dev/null; then
    failed=$((failed + 1))
    echo "FAIL: a 62-line function passed the function-length check"
else
    passed=$((passed + 1))
fi

echo "test_check_layers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
