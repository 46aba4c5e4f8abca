/*
 * exp_poly.h -- the constants of the vector exp shared by the SIMD kernels
 * (avx2.c, avx512.c), so both compute the same approximation:
 *   n = round(x log2 e),  r = x - n ln2  (ln2 split in two for accuracy),
 *   exp(r) ~ 1 + r + r^2 (C5 + r (C4 + r (C3 + r (C2 + r (C1 + r C0))))),
 *   exp(x) = 2^n exp(r).
 * The coefficients are the classic minimax fit of exp on |r| <= ln2/2
 * (Cephes expf); test_kernels measures the result below 4 FLT_EPSILON.
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

#endif /* MHA_EXP_POLY_H */
