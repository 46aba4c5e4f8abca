#!/usr/bin/env bash
# libmha as another project uses it: `cmake --install` into a temporary
# prefix, the prefix moved elsewhere (nothing may point at where it was
# installed), then the four examples built against the installed library
# twice, through pkg-config and through CMake's find_package(mha), and run
# with no LD_LIBRARY_PATH: each checks its own result and exits non-zero
# if it is wrong.
set -euo pipefail
build=${1:?usage: test_install.sh BUILD_DIR SOURCE_DIR}
src=${2:?usage: test_install.sh BUILD_DIR SOURCE_DIR}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_install: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$tmp/installed" >/dev/null
mv "$tmp/installed" "$tmp/moved"
prefix="$tmp/moved"
unset LD_LIBRARY_PATH
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"

# pkg-config points into the prefix where the files are now.
cflags=$(pkg-config --cflags mha)
include=${cflags#-I}
include=${include%% *}
[ "$(realpath "$include")" = "$(realpath "$prefix/include")" ] || fail "pkg-config --cflags mha gives $cflags"
"$prefix/bin/mha" --version >/dev/null || fail "the installed mha does not run"

run_examples() { # DIR HOW
    for example in sdpa train_step decode layer_forward; do
        args=()
        [ "$example" = layer_forward ] && args=("$src/examples/demo.safetensors")
        "$1/$example" "${args[@]}" >"$tmp/out.txt" 2>&1 || { cat "$tmp/out.txt" >&2; fail "$example ($2) failed"; }
        # ldd's whole output first: grep -q stopping early would make ldd die of SIGPIPE under pipefail
        libs=$(ldd "$1/$example")
        grep -q "libmha.so.0 => $prefix/lib/" <<<"$libs" || fail "$example ($2) does not load the installed library"
    done
}

mkdir "$tmp/pc"
for example in sdpa train_step decode layer_forward; do
    # shellcheck disable=SC2046
    cc -std=c11 -Wall -Wextra -Werror $(pkg-config --cflags mha) "$src/examples/$example.c" -o "$tmp/pc/$example" \
        $(pkg-config --libs mha) -lm || fail "$example does not build through pkg-config"
done
run_examples "$tmp/pc" pkg-config

cmake -S "$src/examples" -B "$tmp/cm" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null || fail "find_package(mha) failed"
cmake --build "$tmp/cm" >/dev/null || fail "the examples do not build through find_package(mha)"
run_examples "$tmp/cm" find_package
echo "test_install: 4 examples built through pkg-config and find_package(mha) against a moved install; all pass"
