#!/usr/bin/env bash
# Install what building and testing libmha needs on Debian: a C compiler,
# make and CMake, valgrind, clang (libFuzzer), clang-format, zlib, python3
# (the layering check) and chromium (the lab's report test).  Uses sudo
# when not root; does nothing when all is there.
set -euo pipefail

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v clang-format >/dev/null 2>&1 || missing+=(clang-format)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)    # scripts/check_layers.py
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # renders the lab's report in the tests
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "setup: installing ${missing[*]} with apt-get"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
