#!/usr/bin/env python3
"""check_functions.py -- no function of the library, the lab or the CLI
runs past 60 lines, so each one can be read at a glance.

Counts every function body in the .c files under src/, lab/, tools/,
examples/ and python/ (as .clang-format writes them: the opening brace of a function alone at
the start of a line, the closing one likewise) from its brace to its
closing brace, and fails (exit 1, one line per function) past the limit.

Usage: scripts/check_functions.py [ROOT] [--max N]
"""
import os
import re
import sys

SCANNED = ("src", "lab", "tools", "examples", "python")


def functions(text):
    """(name, first line, lines) of each function body in a C file."""
    lines = text.split("\n")
    found = []
    i = 0
    while i < len(lines):
        if lines[i] == "{" and i > 0:
            start = i - 1
            while start > 0 and lines[start - 1].strip() and not lines[start - 1].rstrip().endswith((";", "}", "*/")):
                start -= 1
            name = re.search(r"(\w+)\s*\(", " ".join(lines[start:i]))
            end = i
            while end < len(lines) and lines[end] != "}":
                end += 1
            found.append((name.group(1) if name else "?", i + 1, end - i + 1))
            i = end
        i += 1
    return found


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    limit = 60
    if "--max" in sys.argv:
        limit = int(sys.argv[sys.argv.index("--max") + 1])
        args = [a for a in args if a != str(limit)]
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    long_ones, count = [], 0
    for top in SCANNED:
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in sorted(names):
                if not n.endswith(".c"):
                    continue
                path = os.path.join(d, n)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    for name, line, size in functions(fh.read()):
                        count += 1
                        if size > limit:
                            long_ones.append(f"{os.path.relpath(path, root)}:{line}: {name} is {size} lines")
    for entry in long_ones:
        print(f"check_functions: {entry} (at most {limit})")
    if long_ones:
        return 1
    print(f"check_functions: {count} functions, none over {limit} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
