#!/usr/bin/env bash
# Install what libmha needs on Debian, with sudo when not root; does
# nothing when all is there.
#   scripts/setup.sh        building and testing: a C compiler, make and
#                           CMake, zlib, valgrind, clang (libFuzzer),
#                           clang-format, python3 with venv and headers
#                           (the layering check, the Python package),
#                           pkg-config and chromium (the lab's report test),
#                           Open MPI (libmha_mpi and its tests under mpirun)
#   scripts/setup.sh --lab  running the head lab: the compiler, make,
#                           CMake and zlib only
# Both also fetch the pretrained model the lab studies into models/
# (scripts/get_model.sh).
set -euo pipefail

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ "${1:-}" != --lab ]; then
    command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    command -v clang-format >/dev/null 2>&1 || missing+=(clang-format)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)   # scripts/check_layers.py
    # The Python package's tests run on Debian's Python, with its numpy and PyTorch 1.13.
    /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    /usr/bin/python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        >/dev/null 2>&1 || missing+=(python3-dev)
    /usr/bin/python3 -c 'import numpy, torch' >/dev/null 2>&1 || missing+=(python3-numpy python3-torch)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium) # renders the lab's report in the tests
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config) # builds the examples as users do
    command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)   # libmha_mpi
    command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)     # its tests, -np 1 to 4
    # bench/bench_gemm (against OpenBLAS's sgemm) is built only where OpenBLAS
    # is: installed here so that the build with warnings as errors covers it.
    dpkg -s libopenblas-dev >/dev/null 2>&1 || missing+=(libopenblas-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "setup: installing ${missing[*]} with apt-get (a minute or more on a fresh machine)"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The pretrained model of `mha lab model` and its tests (once; 83 MB).
"$(dirname "$0")/get_model.sh"
