// test_header_cxx.cpp -- mha.h compiles and links as C++.
#include "mha.h"

#include <cstdio>
#include <cstring>

int main()
{
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    mha_ctx *ctx = nullptr;
    if (mha_ctx_create(1, &ctx) != MHA_OK) return 1;
    float q[4] = {1, 0, 0, 1}, k[4] = {1, 0, 0, 1}, v[4] = {1, 2, 3, 4}, out[4];
    mha_tensor tq = mha_tensor_4d(q, 1, 1, 2, 2), tk = mha_tensor_4d(k, 1, 1, 2, 2);
    mha_tensor tv = mha_tensor_4d(v, 1, 1, 2, 2), to = mha_tensor_4d(out, 1, 1, 2, 2);
    mha_status st = mha_attention(ctx, &to, nullptr, &tq, &tk, &tv, &desc);
    mha_ctx_free(ctx);
    bool ok = st == MHA_OK && std::strcmp(mha_version(), MHA_VERSION_STRING) == 0 && out[0] > 1 && out[0] < 3;
    std::printf("test_header_cxx: %d passed, %d failed\n", ok ? 1 : 0, ok ? 0 : 1);
    return ok ? 0 : 1;
}
