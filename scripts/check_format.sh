#!/usr/bin/env bash
# Fails when a C or C++ file the repository tracks is not as .clang-format
# writes it; prints the files and the command that fixes them.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.c' '*.h' '*.cpp' 2>/dev/null || find src include lab tools tests bench -name '*.[ch]' -o -name '*.cpp')
bad=()
for f in "${files[@]}"; do
    clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done
if [ ${#bad[@]} -gt 0 ]; then
    printf 'check_format: not formatted: %s\n' "${bad[@]}"
    echo "check_format: run: clang-format -i ${bad[*]}"
    exit 1
fi
echo "check_format: ${#files[@]} files formatted as .clang-format says"
