#!/usr/bin/env python3
"""check_layers.py -- keep libmha's dependencies pointing down.

Reads every C source and header of the library (src/), the lab (lab/),
the CLI (tools/), the Python extension (python/) and the examples, and
builds two graphs over their files:
  - includes: file -> the project header it #includes;
  - calls:    file -> the .c file that defines an mha_/mha__ function it
              calls (definitions found by their bodies, so a prototype in
              a header is not mistaken for one).
It fails (exit 1, one line per problem) when
  - a file of src/ lies in no layer folder;
  - a file includes a header, or calls a function, of a folder its own
    folder may not use (the LAYERS table below: each folder names the
    folders below it that it may use; include/mha.h is open to all, and
    the folders outside src/ may call what it declares);
  - either graph has a cycle between files;
  - SIMD intrinsics appear outside src/kernels/.

Usage: scripts/check_layers.py [ROOT]   (default: the repository root)
"""
import os
import re
import sys

# Each folder and the folders it may use, lowest layer first. A folder
# may always use itself and include/ (the public API).
LAYERS = {
    "src/core": [],
    "src/kernels": ["src/core"],
    "src/io": ["src/core"],
    "src/gemm": ["src/core", "src/kernels"],
    "src/attn": ["src/core", "src/kernels"],
    "src/layer": ["src/core", "src/kernels", "src/io", "src/gemm", "src/attn"],
    # libmha_mpi, the top layer: it calls the public API (defined in the
    # layers below) and includes only core's errors and allocator; no layer
    # below it knows MPI.
    "src/mpi": ["src/core", "src/kernels", "src/io", "src/gemm", "src/attn", "src/layer"],
    "lab": [],  # the public API only
    "tools/mha": ["lab"],
    "python/mha": [],  # the Python extension: the public API only
    "examples": [],  # as another project uses the library
}
SCANNED = ("src", "lab", "tools", "python", "examples")
INTRINSICS = re.compile(r"#\s*include\s*<(immintrin|x86intrin|[a-z]mmintrin)\.h>|\b__m(128|256|512)\w*\b")


def strip_comments_and_strings(text):
    """The text with comments and string/char literals blanked, lines kept."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(\\.|[^"\\\n])*"|\'(\\.|[^\'\\\n])*\'', re.S)

    def blank(m):
        s = m.group(0)
        if s.startswith('"') or s.startswith("'"):
            return '""'
        return re.sub(r"[^\n]", " ", s)

    return pattern.sub(blank, text)


def layer_of(path):
    """The LAYERS folder holding path (relative), or None."""
    best = None
    for folder in LAYERS:
        if path.startswith(folder + "/") and (best is None or len(folder) > len(best)):
            best = folder
    return best


def source_files(root):
    for top in SCANNED:
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in sorted(names):
                if n.endswith((".c", ".h")):
                    yield os.path.relpath(os.path.join(d, n), root)


def resolve_include(root, path, name):
    """The project file that '#include "name"' in path reaches, or None."""
    here = os.path.dirname(path)
    for base in (here, "src", "include", "lab", "tools/mha"):
        candidate = os.path.normpath(os.path.join(base, name))
        if os.path.isfile(os.path.join(root, candidate)):
            return candidate
    return None


DEFINITION = re.compile(r"^[A-Za-z_][\w \t\*]*?\b(mha_\w+)\s*\(", re.M)
CALL = re.compile(r"\b(mha_\w+)\s*\(")


def definitions(code):
    """Names of the mha_ functions this file defines (with a body)."""
    found = []
    for m in DEFINITION.finditer(code):
        depth, i = 0, m.end() - 1
        while i < len(code):  # past the parameter list
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
            if depth == 0:
                break
        rest = code[i:].lstrip()
        if rest.startswith("{") or rest.startswith("__attribute__"):
            found.append(m.group(1))
    return found


def find_cycles(graph):
    """Each cycle of a {node: set(nodes)} graph, once, as a node list."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    files = list(source_files(root))
    code = {}
    for f in files:
        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
            code[f] = fh.read()
    problems = []

    public = set()  # declared in include/: what lab/ and tools/ may call
    for d, _, names in os.walk(os.path.join(root, "include")):
        for n in names:
            with open(os.path.join(d, n), encoding="utf-8", errors="replace") as fh:
                public.update(CALL.findall(strip_comments_and_strings(fh.read())))

    defined_in = {}
    for f in files:
        if f.endswith(".c"):
            for name in definitions(strip_comments_and_strings(code[f])):
                defined_in.setdefault(name, f)

    includes, calls = {f: set() for f in files}, {f: set() for f in files}
    for f in files:
        for m in re.finditer(r'^\s*#\s*include\s*"([^"]+)"', code[f], re.M):
            target = resolve_include(root, f, m.group(1))
            if target and not target.startswith("include/"):
                includes[f].add(target)
        stripped = strip_comments_and_strings(code[f])
        for m in CALL.finditer(stripped):
            target = defined_in.get(m.group(1))
            if target and target != f:
                calls[f].add((target, m.group(1)))
        if not f.startswith("src/kernels/") and INTRINSICS.search(stripped):
            problems.append(f"{f}: SIMD intrinsics outside src/kernels/")

    for f in files:
        own = layer_of(f)
        if f.startswith("src/") and own is None:
            problems.append(f"{f}: in no layer folder of src/ (see LAYERS in {os.path.basename(__file__)})")
            continue
        if own is None:
            continue
        allowed = {own, *LAYERS[own]}
        for target in sorted(includes[f]):
            if layer_of(target) not in allowed:
                problems.append(f"{f}: includes {target}, but {own}/ may not use {layer_of(target) or 'it'}")
        for target, name in sorted(calls[f]):
            if layer_of(target) not in allowed and not (name in public and not f.startswith("src/")):
                problems.append(f"{f}: calls {name}() of {target}, but {own}/ may not use {layer_of(target) or 'it'}")

    def report_cycles(graph, what):
        for cycle in find_cycles(graph):
            problems.append(f"{what} cycle between {', '.join(cycle)}")

    report_cycles(includes, "include")
    report_cycles({f: {t for t, _ in calls[f]} for f in files}, "call")

    for p in problems:
        print(f"check_layers: {p}")
    n_calls = sum(len(c) for c in calls.values())
    n_incl = sum(len(i) for i in includes.values())
    if problems:
        print(f"check_layers: {len(problems)} problems in {len(files)} files")
        return 1
    print(f"check_layers: {len(files)} files, {n_incl} includes and {n_calls} cross-file calls point down; no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
