/*
 * exp_estrin.h -- the body of the vector exp (exp_poly.h's method and
 * constants) written once for every vector width; avx2.c and avx512.c
 * include it after defining
 *   EXP_VEC      the vector type (__m256, __m512)
 *   EXP_OP(op)   the intrinsic of that width for op (_mm256_##op)
 * and apply 2^n their own way: AVX2 shifts t's low bits into the exponent
 * field, AVX-512 hands n to vscalefps.
 *
 * n comes from the shifter: t = x log2(e) + shifter, where shifter is
 * 1.5 * 2^23 (plus a bias the caller wants in t's low bits), rounds
 * x log2(e) to an integer, and n = t - shifter recovers it exactly.  Then
 * r = x - n ln2 (ln2 in two parts) and exp(r) by Estrin's scheme, not
 * Horner's: four FMAs deep instead of six, for one more instruction.  A
 * softmax step over a tile's keys is bound by how many of these chains
 * the out-of-order window holds, not by the FMA pipes: the step went from
 * 0.67-0.70 to 0.51-0.53 ns a score on Zen 3 (AVX2) and from 0.34-0.35 to
 * 0.29-0.30 on Sapphire Rapids (AVX-512; docs/PERFORMANCE.md).
 *
 * exp2_fraction is 2^r on [0, 1] for the softmax step's 2^y, the caller
 * taking r = y - floor(y) and applying 2^floor(y); it takes Horner's
 * scheme instead (below).
 */
#include "kernels/exp_poly.h"

/* exp(r) for the reduced argument of x; sets *t and *n as above. */
static inline EXP_VEC exp_reduced(EXP_VEC x, EXP_VEC shifter, EXP_VEC *t, EXP_VEC *n)
{
    *t = EXP_OP(fmadd_ps)(x, EXP_OP(set1_ps)(MHA_EXP_LOG2E), shifter);
    *n = EXP_OP(sub_ps)(*t, shifter);
    EXP_VEC r = EXP_OP(fnmadd_ps)(*n, EXP_OP(set1_ps)(MHA_EXP_LN2_HI), x);
    r = EXP_OP(fnmadd_ps)(*n, EXP_OP(set1_ps)(MHA_EXP_LN2_LO), r);
    EXP_VEC r2 = EXP_OP(mul_ps)(r, r), r4 = EXP_OP(mul_ps)(r2, r2);
    EXP_VEC c54 = EXP_OP(fmadd_ps)(EXP_OP(set1_ps)(MHA_EXP_C4), r, EXP_OP(set1_ps)(MHA_EXP_C5));
    EXP_VEC c32 = EXP_OP(fmadd_ps)(EXP_OP(set1_ps)(MHA_EXP_C2), r, EXP_OP(set1_ps)(MHA_EXP_C3));
    EXP_VEC c10 = EXP_OP(fmadd_ps)(EXP_OP(set1_ps)(MHA_EXP_C0), r, EXP_OP(set1_ps)(MHA_EXP_C1));
    EXP_VEC p = EXP_OP(fmadd_ps)(c10, r4, EXP_OP(fmadd_ps)(c32, r2, c54));
    return EXP_OP(fmadd_ps)(p, r2, EXP_OP(add_ps)(r, EXP_OP(set1_ps)(1.0f)));
}

/* 2^r for r in [0, 1] (exp_poly.h's B1..B6): the polynomial after its 1
 * by Horner's scheme, then one FMA adds the 1, so the result rounds once
 * at its own scale (three roundings there, 1 + B1 r first, made Estrin's
 * form 1.43 FLT_EPSILON instead of 0.96).  Horner here, unlike exp's
 * Estrin above: six FMAs where Estrin takes two multiplies more, and the
 * softmax step on AMX machines is bound by the vector ports, not by a
 * chain's latency (the split products run on the tiles beside it): the
 * core 1.023-1.026x on Sapphire Rapids, even on the float32 paths
 * (docs/PERFORMANCE.md).  Also closer: 0.79 FLT_EPSILON against
 * Estrin's 0.96 over every float y in [-126, 0]. */
static inline EXP_VEC exp2_fraction(EXP_VEC r)
{
    EXP_VEC q = EXP_OP(fmadd_ps)(EXP_OP(set1_ps)(MHA_EXP2_B6), r, EXP_OP(set1_ps)(MHA_EXP2_B5));
    q = EXP_OP(fmadd_ps)(q, r, EXP_OP(set1_ps)(MHA_EXP2_B4));
    q = EXP_OP(fmadd_ps)(q, r, EXP_OP(set1_ps)(MHA_EXP2_B3));
    q = EXP_OP(fmadd_ps)(q, r, EXP_OP(set1_ps)(MHA_EXP2_B2));
    q = EXP_OP(fmadd_ps)(q, r, EXP_OP(set1_ps)(MHA_EXP2_B1));
    return EXP_OP(fmadd_ps)(q, r, EXP_OP(set1_ps)(1.0f));
}
