/*
 * test_safetensors.c -- the reader against hand-made corrupt files, and
 * the writer's round trip of every dtype.  Leaks are caught by the
 * sanitizer build of the same test.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <dirent.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

/* A file image: 8-byte length of `header`, the header, `data_len` bytes
 * of data (a counting pattern).  `claimed` overrides the length prefix
 * when non-zero. */
static unsigned char *image(const char *header, size_t data_len, uint64_t claimed, size_t *len)
{
    size_t h = strlen(header);
    *len = 8 + h + data_len;
    unsigned char *buf = malloc(*len);
    uint64_t n = claimed ? claimed : h;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(n >> (8 * i));
    memcpy(buf + 8, header, h);
    for (size_t i = 0; i < data_len; i++) buf[8 + h + i] = (unsigned char)i;
    return buf;
}

/* The image must be refused as CORRUPT with `needle` in the message. */
static void expect_corrupt(const char *header, size_t data_len, uint64_t claimed, const char *needle)
{
    size_t len;
    unsigned char *buf = image(header, data_len, claimed, &len);
    mha_st_file *f = (mha_st_file *)buf; /* must be reset to NULL on failure */
    CHECK_FAILS(mha_st_open_memory(buf, len, &f), MHA_ERR_CORRUPT, needle);
    CHECK(f == NULL, "out pointer not cleared for header %s", header);
    mha_st_close(f == (mha_st_file *)buf ? NULL : f);
    free(buf);
}

static void test_malformed(void)
{
    mha_st_file *f = NULL;
    CHECK_FAILS(mha_st_open_memory("", 0, &f), MHA_ERR_CORRUPT, "shorter than the 8-byte");
    CHECK_FAILS(mha_st_open_memory("\x02\0\0", 3, &f), MHA_ERR_CORRUPT, "3 bytes");
    expect_corrupt("{}", 0, UINT64_C(1) << 62, "exceeds the 100 MB limit");
    expect_corrupt("{}", 0, 100, "runs past the end");
    expect_corrupt("{}", 0, 0xffffffffffffffffu, "exceeds");
    expect_corrupt("{", 0, 0, "too short");
    /* Invalid JSON. */
    expect_corrupt("[1, 2]   ", 0, 0, "must be a JSON object");
    expect_corrupt("{\"a\":", 0, 0, "a tensor entry must be an object");
    expect_corrupt("{\"a\" {}}", 0, 0, "expected ':'");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, 0, "expected ',' or '}'");
    expect_corrupt("{} x", 0, 0, "data after the closing");
    expect_corrupt("{\"a\\q\":{}}", 0, 0, "unknown escape");
    expect_corrupt("{\"a\x01\":{}}", 0, 0, "control character");
    expect_corrupt("{\"a\\u12\":{}}", 0, 0, "bad \\u escape");
    expect_corrupt("{\"a\\ud800\":{}}", 0, 0, "unpaired high surrogate");
    expect_corrupt("{\"a\\u0000\":{}}", 0, 0, "NUL character");
    expect_corrupt("{\"abc", 0, 0, "unterminated string");
    expect_corrupt("{\"a\\", 0, 0, "unterminated string");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":[[[[[[[[[[[[[[[[[[[[[[[["
                   "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]"
                   "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}",
                   4, 0, "nesting too deep");
    /* Schema and values. */
    expect_corrupt("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0, "no \"dtype\"");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, 0, "no \"shape\"");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, 0, "no \"data_offsets\"");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0,
                   "appears twice");
    expect_corrupt("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 0,
                   "unknown dtype \"F8_E4M3\"");
    expect_corrupt("{\"a\":{\"dtype\":\"FLOAT8_E4M3FN\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 0,
                   "unknown dtype \"?\"");
    expect_corrupt("{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 0, "unknown dtype \"Q4\"");
    expect_corrupt("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,1]}}", 1, 0, "expected a string");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, 0, "non-negative integer");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, 0, "fraction");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4, 0, "leading zero");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}}", 4, 0,
                   "too large for 64 bits");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, 0,
                   "too many elements");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, 0, "two integers");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[0,4]}}", 4, 0,
                   "overflows 64 bits");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, 0,
                   "needs 12 bytes but data_offsets span 8");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, 0, "end before they begin");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                   12, 0, "overlaps");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                   12, 0, "previous tensor ends");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, 0, "data begins at 4");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, 0,
                   "cover 16 bytes of data but the file holds 8");
    expect_corrupt("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 6, 0,
                   "cover 4 bytes of data but the file holds 6");
    expect_corrupt("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                   "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                   2, 0, "\"a\" appears twice");
    expect_corrupt("{\"__metadata__\":{\"k\":1}}", 0, 0, "expected a string");
    expect_corrupt("{\"__metadata__\":[]}", 0, 0, "must be an object");
    expect_corrupt("{\"__metadata__\":{},\"__metadata__\":{}}", 0, 0, "__metadata__ appears twice");
}

static void test_valid_images(void)
{
    size_t len;
    mha_st_file *f = NULL;
    /* No tensors at all, padded with spaces as writers do. */
    unsigned char *buf = image("{}      ", 0, 0, &len);
    CHECK_OK(mha_st_open_memory(buf, len, &f));
    CHECK(mha_st_count(f) == 0, "empty file has tensors");
    mha_st_close(f);
    free(buf);
    /* JSON order need not be offset order; unknown fields are skipped;
     * escapes decode to UTF-8; scalars have rank 0. */
    buf =
        image("{\"z\\u00e9\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[4,8],\"extra\":{\"x\":[1,-2.5e3,null]}},"
              "\"__metadata__\":{\"format\":\"pt\"},"
              "\"a\":{\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[0,4]}}",
              8, 0, &len);
    CHECK_OK(mha_st_open_memory(buf, len, &f));
    mha_st_info info;
    CHECK(mha_st_count(f) == 2, "two tensors expected");
    CHECK_OK(mha_st_find(f, "z\xc3\xa9", &info));
    CHECK(info.rank == 0 && info.numel == 1 && info.dtype == MHA_DTYPE_F32, "scalar info wrong");
    CHECK_OK(mha_st_info_at(f, 0, &info));
    CHECK(strcmp(info.name, "a") == 0 && info.rank == 2 && info.numel == 4, "index order is offset order");
    CHECK(mha_st_metadata(f, "format") && strcmp(mha_st_metadata(f, "format"), "pt") == 0, "metadata lost");
    CHECK(mha_st_metadata(f, "absent") == NULL, "absent metadata found");
    float vals[4];
    CHECK_OK(mha_st_read_f32(f, "a", vals, 4));
    CHECK(vals[0] == 0 && vals[3] == 3, "U8 conversion wrong");
    CHECK_FAILS(mha_st_read_f32(f, "a", vals, 3), MHA_ERR_INVALID_ARG, "4 elements, more than the 3 given");
    CHECK_FAILS(mha_st_find(f, "b", &info), MHA_ERR_NOT_FOUND, "no tensor named \"b\"");
    CHECK_FAILS(mha_st_info_at(f, 2, &info), MHA_ERR_NOT_FOUND, "outside 0..1");
    mha_st_close(f);
    free(buf);
}

static void test_file_errors(const char *dir)
{
    mha_st_file *f = NULL;
    char path[512];
    snprintf(path, sizeof path, "%s/absent.safetensors", dir);
    CHECK_FAILS(mha_st_open(path, &f), MHA_ERR_IO, "cannot open");
    CHECK_FAILS(mha_st_open(dir, &f), MHA_ERR_IO, "not a regular file");
    /* A valid file cut short: the reader names the file and the fault. */
    size_t len;
    unsigned char *buf = image("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, 0, &len);
    snprintf(path, sizeof path, "%s/truncated.safetensors", dir);
    FILE *fp = fopen(path, "wb");
    fwrite(buf, 1, len - 5, fp);
    fclose(fp);
    CHECK_FAILS(mha_st_open(path, &f), MHA_ERR_CORRUPT, "truncated.safetensors: tensors cover 16 bytes");
    unlink(path);
    free(buf);
    CHECK_FAILS(mha_st_open(NULL, &f), MHA_ERR_MISUSE, "NULL");
}

static int count_files(const char *dir)
{
    int n = 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static void test_round_trip(const char *dir)
{
    double f64[3] = {1.0 / 3.0, -2.5e300, 0};
    float f32[3] = {1.5f, -0.0f, INFINITY};
    /* F16: 1.0, the smallest subnormal, -infinity, a NaN, 65504 (max). */
    uint16_t f16[5] = {0x3c00, 0x0001, 0xfc00, 0x7e00, 0x7bff};
    uint16_t bf16[3] = {0x3f80, 0xc2f7, 0x0001}; /* 1, -123.5, a subnormal */
    uint8_t b[4] = {0, 1, 1, 0}, u8[2] = {7, 255};
    int32_t i32[2] = {-7, 2147483647};
    int64_t i64[2] = {-3, INT64_C(1) << 40};
    const int64_t s3[1] = {3}, s5[1] = {5}, s22[2] = {2, 2}, s2[1] = {2};
    mha_st_writer *w = NULL;
    CHECK_OK(mha_st_writer_create(&w));
    CHECK_OK(mha_st_writer_add(w, "f64", MHA_DTYPE_F64, 1, s3, f64));
    CHECK_OK(mha_st_writer_add(w, "f32", MHA_DTYPE_F32, 1, s3, f32));
    CHECK_OK(mha_st_writer_add(w, "f16", MHA_DTYPE_F16, 1, s5, f16));
    CHECK_OK(mha_st_writer_add(w, "bf16", MHA_DTYPE_BF16, 1, s3, bf16));
    CHECK_OK(mha_st_writer_add(w, "bool \"quoted\"\n", MHA_DTYPE_BOOL, 2, s22, b));
    CHECK_OK(mha_st_writer_add(w, "u8", MHA_DTYPE_U8, 1, s2, u8));
    CHECK_OK(mha_st_writer_add(w, "i32", MHA_DTYPE_I32, 1, s2, i32));
    CHECK_OK(mha_st_writer_add(w, "i64", MHA_DTYPE_I64, 1, s2, i64));
    CHECK_OK(mha_st_writer_add(w, "scalar", MHA_DTYPE_F32, 0, NULL, f32));
    CHECK_OK(mha_st_writer_set_metadata(w, "note", "round \"trip\""));
    CHECK_FAILS(mha_st_writer_add(w, "f32", MHA_DTYPE_F32, 1, s3, f32), MHA_ERR_INVALID_ARG, "added twice");
    CHECK_FAILS(mha_st_writer_add(w, "", MHA_DTYPE_F32, 1, s3, f32), MHA_ERR_INVALID_ARG, "must not be empty");
    CHECK_FAILS(mha_st_writer_add(w, "x", MHA_DTYPE_F32, 9, s3, f32), MHA_ERR_INVALID_ARG, "rank 9");
    CHECK_FAILS(mha_st_writer_add(w, "x", MHA_DTYPE_COUNT, 1, s3, f32), MHA_ERR_INVALID_ARG, "not a safetensors dtype");
    const int64_t neg[1] = {-1};
    CHECK_FAILS(mha_st_writer_add(w, "x", MHA_DTYPE_F32, 1, neg, f32), MHA_ERR_INVALID_ARG, "negative");
    char path[512];
    snprintf(path, sizeof path, "%s/no/such/dir/out.safetensors", dir);
    CHECK_FAILS(mha_st_writer_save(w, path), MHA_ERR_IO, "cannot create");
    snprintf(path, sizeof path, "%s/rt.safetensors", dir);
    CHECK_OK(mha_st_writer_save(w, path));
    mha_st_writer_free(w);
    CHECK(count_files(dir) == 1, "temporary files left behind in %s", dir);

    mha_st_file *f = NULL;
    CHECK_OK(mha_st_open(path, &f));
    if (!f) return;
    CHECK(mha_st_count(f) == 9, "count %lld", (long long)mha_st_count(f));
    CHECK(strcmp(mha_st_metadata(f, "note"), "round \"trip\"") == 0, "metadata escaping lost");
    double f64_back[3];
    CHECK_OK(mha_st_read_raw(f, "f64", f64_back, sizeof f64_back));
    CHECK(memcmp(f64, f64_back, sizeof f64) == 0, "F64 bytes changed");
    float v[5];
    CHECK_OK(mha_st_read_f32(f, "f64", v, 5));
    CHECK(v[0] == (float)(1.0 / 3.0) && isinf(v[1]) && v[1] < 0, "F64 -> F32 conversion");
    CHECK_OK(mha_st_read_f32(f, "f32", v, 5));
    CHECK(v[0] == 1.5f && signbit(v[1]) && isinf(v[2]), "F32 values");
    CHECK_OK(mha_st_read_f32(f, "f16", v, 5));
    CHECK(v[0] == 1.0f && v[1] == 0x1p-24f && isinf(v[2]) && v[2] < 0 && isnan(v[3]) && v[4] == 65504.0f,
          "F16 conversion: %g %g %g %g %g", v[0], v[1], v[2], v[3], v[4]);
    CHECK_OK(mha_st_read_f32(f, "bf16", v, 5));
    CHECK(v[0] == 1.0f && v[1] == -123.5f && v[2] == 0x1p-133f, "BF16 conversion");
    CHECK_OK(mha_st_read_f32(f, "bool \"quoted\"\n", v, 5));
    CHECK(v[0] == 0 && v[1] == 1 && v[2] == 1 && v[3] == 0, "BOOL conversion");
    CHECK_OK(mha_st_read_f32(f, "i32", v, 5));
    CHECK(v[0] == -7.0f && v[1] == 2147483648.0f, "I32 conversion");
    CHECK_OK(mha_st_read_f32(f, "i64", v, 5));
    CHECK(v[0] == -3.0f && v[1] == 0x1p40f, "I64 conversion");
    /* A range of a tensor, converted: the middle of the f16 one. */
    float part[3] = {7, 7, 7};
    CHECK_OK(mha_st_read_f32_range(f, "f16", 1, 2, part));
    CHECK(part[0] == 0x1p-24f && isinf(part[1]) && part[1] < 0 && part[2] == 7, "F16 range: %g %g %g", (double)part[0],
          (double)part[1], (double)part[2]);
    CHECK_OK(mha_st_read_f32_range(f, "f32", 3, 0, part));
    CHECK_FAILS(mha_st_read_f32_range(f, "f16", 4, 2, part), MHA_ERR_INVALID_ARG, "elements 4 + 2 are outside");
    CHECK_FAILS(mha_st_read_f32_range(f, "f16", -1, 1, part), MHA_ERR_INVALID_ARG, "outside tensor");
    CHECK_FAILS(mha_st_read_f32_range(f, "nope", 0, 1, part), MHA_ERR_NOT_FOUND, "no tensor named");
    mha_st_info info;
    CHECK_OK(mha_st_find(f, "scalar", &info));
    CHECK(info.rank == 0 && info.numel == 1, "rank-0 tensor");
    mha_st_close(f);
    unlink(path);
}

int main(void)
{
    char dir[] = "/tmp/mha_st_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    test_malformed();
    test_valid_images();
    test_file_errors(dir);
    test_round_trip(dir);
    rmdir(dir);
    return harness_finish("test_safetensors");
}
