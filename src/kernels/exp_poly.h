/*
 * exp_poly.h -- the constants of the vector exponentials shared by the
 * SIMD kernels (avx2.c, avx512.c), so both compute the same
 * approximations.
 *
 * exp(x), for the backward's probabilities and exp_shift:
 *   n = round(x log2 e),  r = x - n ln2  (ln2 split in two for accuracy),
 *   exp(r) ~ 1 + r + r^2 (C5 + r (C4 + r (C3 + r (C2 + r (C1 + r C0))))),
 *   exp(x) = 2^n exp(r).
 * The coefficients are the classic minimax fit of exp on |r| <= ln2/2
 * (Cephes expf); test_kernels measures the result below 4 FLT_EPSILON.
 *
 * 2^y, for the forward's softmax step (kernels.h), whose scores arrive in
 * base 2 from one FMA each:
 *   r = y - floor(y) in [0, 1],
 *   2^r ~ 1 + r (B1 + r (B2 + r (B3 + r (B4 + r (B5 + r B6))))),
 *   2^y = 2^floor(y) 2^r.
 * No range reduction by ln2, so r costs one instruction (vreduceps) where
 * exp's costs four.  The coefficients are our fit (scripts/fit_exp2.py:
 * Lawson's iterations on the relative error over [0, 1], each coefficient
 * rounded to float and the later ones fitted again around it): 2.1e-9 in
 * exact arithmetic; evaluated as exp_estrin.h does (Horner's scheme),
 * over every float y in [-126, 0], at most 0.79 FLT_EPSILON from exp2 in
 * double.
 */
#ifndef MHA_EXP_POLY_H
#define MHA_EXP_POLY_H

#define MHA_EXP_LOG2E  1.44269504088896341f
#define MHA_EXP_LN2_HI 0.693359375f
#define MHA_EXP_LN2_LO (-2.12194440e-4f)
#define MHA_EXP_C0     1.9875691500e-4f
#define MHA_EXP_C1     1.3981999507e-3f
#define MHA_EXP_C2     8.3334519073e-3f
#define MHA_EXP_C3     4.1665795894e-2f
#define MHA_EXP_C4     1.6666665459e-1f
#define MHA_EXP_C5     5.0000001201e-1f
/* The clamp above: exp(88.37) = 2.4e38 keeps 2^n a normal float (n <= 127)
 * and exp saturates there.  Every caller passes a score minus its row's
 * maximum, <= 0, so the clamp never bites in use. */
#define MHA_EXP_MAX_INPUT 88.37f

#define MHA_EXP2_B1 6.931470633e-01f
#define MHA_EXP2_B2 2.402290851e-01f
#define MHA_EXP2_B3 5.548618361e-02f
#define MHA_EXP2_B4 9.673775174e-03f
#define MHA_EXP2_B5 1.248228829e-03f
#define MHA_EXP2_B6 2.156598493e-04f
/* 2^y below 2^-126 comes out 0 (no subnormal results, which cost Intel
 * cores a microcode assist). */
#define MHA_EXP2_MIN_INPUT (-126.0f)

#endif /* MHA_EXP_POLY_H */
