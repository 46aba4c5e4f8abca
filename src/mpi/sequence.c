/*
 * sequence.c -- what the sequence-parallel modes share (sequence.h).
 */
#include "mpi/sequence.h"

#include <math.h>
#include <string.h>

#include "core/internal.h"
#include "core/tensor.h"

/* A view of heads [h0, h0 + hn) and rows [r0, r0 + rn) of t. */
mha_tensor mha__mpi_piece(const mha_tensor *t, int64_t h0, int64_t hn, int64_t r0, int64_t rn)
{
    mha_tensor p = *t;
    p.data += h0 * t->stride[1] + r0 * t->stride[2];
    p.shape[1] = hn;
    p.shape[2] = rn;
    return p;
}

int64_t mha__mpi_numel(const mha_tensor *p) { return p->shape[0] * p->shape[1] * p->shape[2] * p->shape[3]; }

/* Copies a view to a contiguous block (out = true) or back. */
void mha__mpi_copy_piece(const mha_tensor *p, float *block, bool out)
{
    mha_tensor b = mha_tensor_4d(block, p->shape[0], p->shape[1], p->shape[2], p->shape[3]);
    if (out) mha__tensor_copy(p, &b);
    else mha__tensor_copy(&b, p);
}

void mha__mpi_merge_rows(float *o, float *m, float *s, const float *po, const float *pm, const float *ps, int64_t n,
                         int64_t width)
{
    for (int64_t i = 0; i < n; i++) {
        if (!(ps[i] > 0)) continue;
        float top = m[i] > pm[i] ? m[i] : pm[i];
        float wa = s[i] > 0 ? s[i] * expf(m[i] - top) : 0.0f, wb = ps[i] * expf(pm[i] - top), total = wa + wb;
        float *oi = o + i * width;
        const float *pi = po + i * width;
        for (int64_t c = 0; c < width; c++) oi[c] = (oi[c] * wa + pi[c] * wb) / total;
        m[i] = top, s[i] = total;
    }
}

void mha__mpi_add_piece(const mha_tensor *p, const float *block)
{
    for (int64_t a = 0; a < p->shape[0]; a++)
        for (int64_t b = 0; b < p->shape[1]; b++)
            for (int64_t c = 0; c < p->shape[2]; c++) {
                float *row = p->data + a * p->stride[0] + b * p->stride[1] + c * p->stride[2];
                for (int64_t e = 0; e < p->shape[3]; e++, block++) row[e * p->stride[3]] += *block;
            }
}

/* The fields every rank must agree on: the heads, widths and options. */
int mha__mpi_seq_describe(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *d,
                          bool lse, mha__mpi_field *f)
{
    int64_t scale_bits, softcap_bits = 0, mask_bits = 0;
    double scale = d->scale;
    memcpy(&scale_bits, &scale, sizeof scale_bits);
    memcpy(&softcap_bits, &d->softcap, sizeof d->softcap);
    for (int i = 0; i < 4; i++) mask_bits |= (int64_t)(d->mask.stride[i] == 0) << i;
    const mha__mpi_field fields[] = {
        {"q.shape[0] (batch)", q->shape[0]},
        {"q.shape[1] (heads)", q->shape[1]},
        {"q.shape[3] (head width)", q->shape[3]},
        {"k.shape[1] (kv heads)", k->shape[1]},
        {"v.shape[3] (value width)", v->shape[3]},
        {"scale", scale_bits},
        {"causal", d->causal},
        {"window_left", d->window_left},
        {"window_right", d->window_right},
        {"softcap", softcap_bits},
        {"alibi_slopes given", d->alibi_slopes != NULL},
        {"mask kind", d->mask.kind},
        {"mask broadcast dimensions", mask_bits},
        {"enable_gqa", d->enable_gqa},
        {"dtype", d->dtype},
        {"lse given", lse},
    };
    memcpy(f, fields, sizeof fields);
    return (int)(sizeof fields / sizeof fields[0]);
}

/* This rank's own arguments, before any rank compares: shapes that fit
 * together locally. */
mha_status mha__mpi_seq_check(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                              const mha_attn_desc *d)
{
    if (!q || !k || !v || !out || !d || !q->data || !k->data || !v->data || !out->data)
        return mha__fail(MHA_ERR_MISUSE, "NULL tensor or descriptor");
    /* The shapes that fit together, and strides that stay in bounds:
     * this rank's blocks are copied through them before any libmha call. */
    const int64_t any[4] = {-1, -1, -1, -1}, k_shape[4] = {q->shape[0], -1, -1, q->shape[3]};
    mha_status st = mha__check_tensor(q, "query", any);
    if (st == MHA_OK) st = mha__check_tensor(k, "key", k_shape);
    const int64_t v_shape[4] = {q->shape[0], k->shape[1], k->shape[2], -1};
    if (st == MHA_OK) st = mha__check_tensor(v, "value", v_shape);
    const int64_t out_shape[4] = {q->shape[0], q->shape[1], q->shape[2], v->shape[3]};
    return st == MHA_OK ? mha__check_tensor(out, "output", out_shape) : st;
}

/* The backward's own arguments beside the forward's. */
mha_status mha__mpi_seq_check_backward(const mha_tensor *dq, const mha_tensor *dk, const mha_tensor *dv,
                                       const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                       const mha_tensor *out, const float *lse, const mha_tensor *grad_out)
{
    if (!dq || !dk || !dv || !lse || !grad_out || !dq->data || !dk->data || !dv->data || !grad_out->data)
        return mha__fail(MHA_ERR_MISUSE, "NULL gradient, lse or grad_out");
    const mha_tensor *got[4] = {dq, dk, dv, grad_out}, *like[4] = {q, k, v, out};
    const char *names[4] = {"query.grad", "key.grad", "value.grad", "grad_output"};
    mha_status st = MHA_OK;
    for (int t = 0; t < 4 && st == MHA_OK; t++) st = mha__check_tensor(got[t], names[t], like[t]->shape);
    return st;
}
