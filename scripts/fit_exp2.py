#!/usr/bin/env python3
"""The coefficients of 2^r on [0, 1] in src/kernels/exp_poly.h.

P(r) = 1 + B1 r + ... + B6 r^6, P(0) = 1 exactly, fitted for the smallest
largest relative error by Lawson's iterations (weighted least squares whose
weights grow where the error is largest).  Each coefficient is rounded to
float32 in turn and the later ones fitted again around it, which keeps the
rounding's cost small (1.4e-8 rounded all at once, 2.1e-9 this way).

    python3 scripts/fit_exp2.py        # prints the #defines
"""
import numpy as np

DEGREE = 6
R = np.linspace(0.0, 1.0, 40001)
F = np.exp2(R)


def fit_rest(fixed):
    """Minimax fit of the coefficients after `fixed` (B1 .. Bk, floats)."""
    base = 1.0 + sum(b * R ** (i + 1) for i, b in enumerate(fixed))
    powers = range(len(fixed) + 1, DEGREE + 1)
    a = np.stack([R ** k for k in powers], axis=1) / F[:, None]
    rhs = (F - base) / F
    w = np.full(R.shape, 1.0 / R.size)
    for _ in range(3000):
        sw = np.sqrt(w)
        coef, *_ = np.linalg.lstsq(a * sw[:, None], rhs * sw, rcond=None)
        err = np.abs(a @ coef - rhs)
        w = w * err
        w /= w.sum()
    return coef


def main():
    fixed = []
    for _ in range(DEGREE):
        fixed.append(float(np.float32(fit_rest(fixed)[0])))
    p = 1.0 + sum(b * R ** (i + 1) for i, b in enumerate(fixed))
    print(f"/* largest relative error in exact arithmetic: {np.abs(p / F - 1).max():.2e} */")
    for k, b in enumerate(fixed, 1):
        print(f"#define MHA_EXP2_B{k} {b:.9e}f")


if __name__ == "__main__":
    main()
