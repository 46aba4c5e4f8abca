/*
 * safetensors.c -- reading and writing safetensors files.
 *
 * Layout: 8-byte little-endian header length N, N bytes of JSON, then the
 * data.  Nothing from the file is trusted: N is bounded (100 MB, the
 * format's own limit) and must fit in the file before the header is
 * allocated; every tensor's dtype, shape and offsets are checked, and the
 * tensors must tile the data section exactly (in order, no gap, no
 * overlap, no trailing bytes) before open returns.  Tensor data is read
 * on demand, so a large model file costs only its header.
 */
#define _POSIX_C_SOURCE 200809L

#include "core/convert.h"
#include "core/internal.h"
#include "io/st_json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { MAX_HEADER_BYTES = 100 * 1000 * 1000 };

/* ---------------------------------------------------------------- */
/* Reader                                                            */
/* ---------------------------------------------------------------- */

typedef struct entry {
    char *name;
    mha_dtype dtype;
    int rank;
    int64_t shape[MHA_ST_MAX_RANK];
    int64_t numel;
    int64_t begin, end; /* within the data section */
} entry;

typedef struct meta_pair {
    char *key, *value;
} meta_pair;

/* __metadata__ pairs, as read or as to be written. */
typedef struct meta_list {
    meta_pair *pairs;
    int64_t count, capacity;
} meta_list;

struct mha_st_file {
    FILE *fp; /* NULL when reading from memory */
    const unsigned char *mem;
    int64_t data_start; /* 8 + N */
    int64_t data_len;
    entry *entries; /* sorted by begin offset once validated */
    int64_t count, capacity;
    entry **by_name; /* sorted by name, for lookups */
    meta_list meta;
};

/* Grow *array of *capacity elements so it can hold one more. */
static mha_status reserve_one(void **array, int64_t count, int64_t *capacity, size_t elem)
{
    if (count < *capacity) return MHA_OK;
    int64_t next = *capacity ? *capacity * 2 : 16;
    void *grown = mha__alloc(next, elem);
    if (!grown) return MHA_ERR_NOMEM;
    if (count) memcpy(grown, *array, (size_t)count * elem);
    mha__free(*array);
    *array = grown;
    *capacity = next;
    return MHA_OK;
}

static mha_status on_tensor(void *user, mha__json_tensor *t)
{
    mha_st_file *f = user;
    int dtype = mha__dtype_from_name(t->dtype);
    if (dtype < 0) {
        mha_status st = mha__fail(MHA_ERR_CORRUPT, "tensor \"%s\" has unknown dtype \"%s\"", t->name, t->dtype);
        mha__free(t->name);
        return st;
    }
    mha_status st = reserve_one((void **)&f->entries, f->count, &f->capacity, sizeof(entry));
    if (st != MHA_OK) {
        mha__free(t->name);
        return st;
    }
    entry *e = &f->entries[f->count++];
    e->name = t->name;
    e->dtype = (mha_dtype)dtype;
    e->rank = t->rank;
    memcpy(e->shape, t->shape, sizeof e->shape);
    e->begin = t->offsets[0];
    e->end = t->offsets[1];
    return MHA_OK;
}

static void meta_free(meta_list *m)
{
    for (int64_t i = 0; i < m->count; i++) {
        mha__free(m->pairs[i].key);
        mha__free(m->pairs[i].value);
    }
    mha__free(m->pairs);
}

static mha_status meta_append(meta_list *m, const char *key, const char *value)
{
    mha_status st = reserve_one((void **)&m->pairs, m->count, &m->capacity, sizeof(meta_pair));
    if (st != MHA_OK) return st;
    meta_pair pair = {mha__strdup(key), mha__strdup(value)};
    if (!pair.key || !pair.value) {
        mha__free(pair.key);
        mha__free(pair.value);
        return MHA_ERR_NOMEM;
    }
    m->pairs[m->count++] = pair;
    return MHA_OK;
}

static mha_status on_metadata(void *user, const char *key, const char *value)
{
    return meta_append(&((mha_st_file *)user)->meta, key, value);
}

static int by_begin(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    return (x->begin > y->begin) - (x->begin < y->begin);
}

static int by_name(const void *a, const void *b)
{
    return strcmp((*(const entry *const *)a)->name, (*(const entry *const *)b)->name);
}

/* Sizes, offsets and names: everything the data reads will rely on. */
static mha_status validate_entries(mha_st_file *f)
{
    for (int64_t i = 0; i < f->count; i++) {
        entry *e = &f->entries[i];
        int64_t bytes;
        if (!mha__product(e->shape, e->rank, &e->numel) ||
            !mha__mul(e->numel, (int64_t)mha_dtype_size(e->dtype), &bytes))
            return mha__fail(MHA_ERR_CORRUPT, "tensor \"%s\": shape product overflows 64 bits", e->name);
        if (e->end < e->begin)
            return mha__fail(MHA_ERR_CORRUPT, "tensor \"%s\": data_offsets [%lld, %lld] end before they begin", e->name,
                             (long long)e->begin, (long long)e->end);
        if (e->end - e->begin != bytes)
            return mha__fail(MHA_ERR_CORRUPT,
                             "tensor \"%s\": %s with %lld elements needs %lld bytes but data_offsets span %lld",
                             e->name, mha_dtype_name(e->dtype), (long long)e->numel, (long long)bytes,
                             (long long)(e->end - e->begin));
    }
    if (f->count) qsort(f->entries, (size_t)f->count, sizeof(entry), by_begin);
    int64_t expected = 0;
    for (int64_t i = 0; i < f->count; i++) {
        entry *e = &f->entries[i];
        if (e->begin != expected)
            return mha__fail(
                MHA_ERR_CORRUPT, "tensor \"%s\": data begins at %lld but %s at %lld", e->name, (long long)e->begin,
                e->begin < expected ? "it overlaps the previous tensor, which ends" : "the previous tensor ends",
                (long long)expected);
        expected = e->end;
    }
    if (expected != f->data_len)
        return mha__fail(MHA_ERR_CORRUPT, "tensors cover %lld bytes of data but the file holds %lld after the header",
                         (long long)expected, (long long)f->data_len);
    f->by_name = mha__alloc(f->count, sizeof(entry *));
    if (!f->by_name) return MHA_ERR_NOMEM;
    for (int64_t i = 0; i < f->count; i++) f->by_name[i] = &f->entries[i];
    if (f->count) qsort(f->by_name, (size_t)f->count, sizeof(entry *), by_name);
    for (int64_t i = 1; i < f->count; i++)
        if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0)
            return mha__fail(MHA_ERR_CORRUPT, "tensor name \"%s\" appears twice", f->by_name[i]->name);
    return MHA_OK;
}

/* Read `len` bytes at absolute file position `pos`. */
static mha_status read_at(mha_st_file *f, int64_t pos, void *dst, size_t len)
{
    if (f->mem) {
        memcpy(dst, f->mem + pos, len);
        return MHA_OK;
    }
    if (fseeko(f->fp, (off_t)pos, SEEK_SET) != 0 || fread(dst, 1, len, f->fp) != len)
        return mha__fail(MHA_ERR_IO, "read of %zu bytes at offset %lld failed: %s", len, (long long)pos,
                         ferror(f->fp) ? strerror(errno) : "file shrank");
    return MHA_OK;
}

/* Header length prefix, then header text, then the entries. */
static mha_status parse(mha_st_file *f, int64_t file_size)
{
    unsigned char prefix[9];
    if (file_size < 8)
        return mha__fail(MHA_ERR_CORRUPT, "not a safetensors file: %lld bytes, shorter than the 8-byte header length",
                         (long long)file_size);
    mha_status st = read_at(f, 0, prefix, file_size > 8 ? 9 : 8);
    if (st != MHA_OK) return st;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | prefix[i];
    /* A safetensors file's JSON header opens with '{' right after the
     * length: when the length is impossible and no '{' follows, say first
     * that this is some other kind of file.  (A plausible length goes on
     * to the JSON parser, which names what is wrong with the header.) */
    const char *other = file_size > 8 && prefix[8] == '{' ? "" : "not a safetensors file (no JSON header): ";
    if (n > MAX_HEADER_BYTES)
        return mha__fail(MHA_ERR_CORRUPT, "%sheader length %llu exceeds the 100 MB limit", other,
                         (unsigned long long)n);
    if ((int64_t)n > file_size - 8)
        return mha__fail(MHA_ERR_CORRUPT, "%sheader length %llu runs past the end of the %lld-byte file", other,
                         (unsigned long long)n, (long long)file_size);
    if (n < 2)
        return mha__fail(MHA_ERR_CORRUPT, "header length %llu is too short for a JSON object", (unsigned long long)n);
    f->data_start = 8 + (int64_t)n;
    f->data_len = file_size - f->data_start;
    char *text = mha__alloc((int64_t)n, 1);
    if (!text) return MHA_ERR_NOMEM;
    st = read_at(f, 8, text, (size_t)n);
    if (st == MHA_OK) {
        mha__json_callbacks cb = {f, on_tensor, on_metadata};
        st = mha__json_parse_header(text, (size_t)n, &cb);
    }
    mha__free(text);
    return st == MHA_OK ? validate_entries(f) : st;
}

static mha_status open_common(mha_st_file *f, int64_t size, mha_st_file **out)
{
    mha_status st = parse(f, size);
    if (st != MHA_OK) {
        mha_st_close(f);
        return st;
    }
    *out = f;
    return MHA_OK;
}

mha_status mha_st_open(const char *path, mha_st_file **out_file)
{
    if (!path || !out_file) return mha__fail(MHA_ERR_MISUSE, "mha_st_open: NULL argument");
    *out_file = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return mha__fail(MHA_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(fp);
        return mha__fail(MHA_ERR_IO, "%s is not a regular file", path);
    }
    mha_st_file *f = mha__calloc(1, sizeof *f);
    if (!f) {
        fclose(fp);
        return MHA_ERR_NOMEM;
    }
    f->fp = fp;
    mha_status st = open_common(f, (int64_t)sb.st_size, out_file);
    return st == MHA_OK ? st : mha__wrap(st, "%s", path);
}

mha_status mha_st_open_memory(const void *buf, size_t len, mha_st_file **out_file)
{
    if ((!buf && len) || !out_file) return mha__fail(MHA_ERR_MISUSE, "mha_st_open_memory: NULL argument");
    *out_file = NULL;
    mha_st_file *f = mha__calloc(1, sizeof *f);
    if (!f) return MHA_ERR_NOMEM;
    static const unsigned char empty[1];
    f->mem = buf ? buf : empty;
    return open_common(f, (int64_t)len, out_file);
}

void mha_st_close(mha_st_file *f)
{
    if (!f) return;
    if (f->fp) fclose(f->fp);
    for (int64_t i = 0; i < f->count; i++) mha__free(f->entries[i].name);
    mha__free(f->entries);
    mha__free(f->by_name);
    meta_free(&f->meta);
    mha__free(f);
}

int64_t mha_st_count(const mha_st_file *f) { return f ? f->count : 0; }

static void fill_info(const entry *e, mha_st_info *info)
{
    info->name = e->name;
    info->dtype = e->dtype;
    info->rank = e->rank;
    memcpy(info->shape, e->shape, sizeof info->shape);
    info->numel = e->numel;
}

mha_status mha_st_info_at(const mha_st_file *f, int64_t index, mha_st_info *info)
{
    if (!f || !info) return mha__fail(MHA_ERR_MISUSE, "mha_st_info_at: NULL argument");
    if (index < 0 || index >= f->count)
        return mha__fail(MHA_ERR_NOT_FOUND, "tensor index %lld is outside 0..%lld", (long long)index,
                         (long long)f->count - 1);
    fill_info(&f->entries[index], info);
    return MHA_OK;
}

static const entry *lookup(const mha_st_file *f, const char *name)
{
    int64_t lo = 0, hi = f->count;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->name, name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

mha_status mha_st_find(const mha_st_file *f, const char *name, mha_st_info *info)
{
    if (!f || !name || !info) return mha__fail(MHA_ERR_MISUSE, "mha_st_find: NULL argument");
    const entry *e = lookup(f, name);
    if (!e) return mha__fail(MHA_ERR_NOT_FOUND, "no tensor named \"%s\"", name);
    fill_info(e, info);
    return MHA_OK;
}

const char *mha_st_metadata(const mha_st_file *f, const char *key)
{
    if (!f || !key) return NULL;
    for (int64_t i = 0; i < f->meta.count; i++)
        if (strcmp(f->meta.pairs[i].key, key) == 0) return f->meta.pairs[i].value;
    return NULL;
}

static mha_status find_for_read(const mha_st_file *f, const char *name, const entry **out)
{
    if (!f || !name) return mha__fail(MHA_ERR_MISUSE, "safetensors read: NULL argument");
    *out = lookup(f, name);
    if (!*out) return mha__fail(MHA_ERR_NOT_FOUND, "no tensor named \"%s\"", name);
    return MHA_OK;
}

mha_status mha_st_read_raw(mha_st_file *f, const char *name, void *dst, size_t capacity)
{
    const entry *e;
    mha_status st = find_for_read(f, name, &e);
    if (st != MHA_OK) return st;
    size_t bytes = (size_t)(e->end - e->begin);
    if (capacity < bytes)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" has %zu bytes, more than the %zu given", name, bytes,
                         capacity);
    return read_at(f, f->data_start + e->begin, dst, bytes);
}

/* Elements [first, first + count) of a tensor as float32 into dst. */
static mha_status read_span_f32(mha_st_file *f, const entry *e, int64_t first, int64_t count, float *dst)
{
    size_t size = mha_dtype_size(e->dtype);
    int64_t at = f->data_start + e->begin + first * (int64_t)size;
    if (f->mem) {
        mha__convert_to_f32(e->dtype, f->mem + at, dst, count);
        return MHA_OK;
    }
    if (e->dtype == MHA_DTYPE_F32) return read_at(f, at, dst, (size_t)count * 4);
    /* Other dtypes go through a bounded bounce buffer. */
    unsigned char chunk[16384];
    int64_t per_chunk = (int64_t)(sizeof chunk / size);
    for (int64_t done = 0; done < count; done += per_chunk) {
        int64_t n = count - done < per_chunk ? count - done : per_chunk;
        mha_status st = read_at(f, at + done * (int64_t)size, chunk, (size_t)n * size);
        if (st != MHA_OK) return st;
        mha__convert_to_f32(e->dtype, chunk, dst + done, n);
    }
    return MHA_OK;
}

mha_status mha_st_read_f32(mha_st_file *f, const char *name, float *dst, int64_t capacity)
{
    const entry *e;
    mha_status st = find_for_read(f, name, &e);
    if (st != MHA_OK) return st;
    if (capacity < e->numel)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" has %lld elements, more than the %lld given", name,
                         (long long)e->numel, (long long)capacity);
    return read_span_f32(f, e, 0, e->numel, dst);
}

mha_status mha_st_read_f32_range(mha_st_file *f, const char *name, int64_t first, int64_t count, float *dst)
{
    const entry *e;
    mha_status st = find_for_read(f, name, &e);
    if (st != MHA_OK) return st;
    if (!dst) return mha__fail(MHA_ERR_MISUSE, "mha_st_read_f32_range: NULL argument");
    if (first < 0 || count < 0 || first > e->numel - count)
        return mha__fail(MHA_ERR_INVALID_ARG, "elements %lld + %lld are outside tensor \"%s\" of %lld",
                         (long long)first, (long long)count, name, (long long)e->numel);
    return read_span_f32(f, e, first, count, dst);
}

/* ---------------------------------------------------------------- */
/* Writer                                                            */
/* ---------------------------------------------------------------- */

struct mha_st_writer {
    entry *entries;
    void **data;
    int64_t count, capacity, data_capacity;
    meta_list meta;
};

mha_status mha_st_writer_create(mha_st_writer **out_writer)
{
    if (!out_writer) return mha__fail(MHA_ERR_MISUSE, "mha_st_writer_create: NULL argument");
    *out_writer = mha__calloc(1, sizeof **out_writer);
    return *out_writer ? MHA_OK : MHA_ERR_NOMEM;
}

void mha_st_writer_free(mha_st_writer *w)
{
    if (!w) return;
    for (int64_t i = 0; i < w->count; i++) {
        mha__free(w->entries[i].name);
        mha__free(w->data[i]);
    }
    mha__free(w->entries);
    mha__free(w->data);
    meta_free(&w->meta);
    mha__free(w);
}

mha_status mha_st_writer_add(mha_st_writer *w, const char *name, mha_dtype dtype, int rank, const int64_t *shape,
                             const void *data)
{
    if (!w || !name || (rank > 0 && !shape)) return mha__fail(MHA_ERR_MISUSE, "mha_st_writer_add: NULL argument");
    if (!name[0]) return mha__fail(MHA_ERR_INVALID_ARG, "a tensor name must not be empty");
    if ((unsigned)dtype >= MHA_DTYPE_COUNT)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\": dtype %d is not a safetensors dtype", name, (int)dtype);
    if (rank < 0 || rank > MHA_ST_MAX_RANK)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\": rank %d is outside 0..%d", name, rank, MHA_ST_MAX_RANK);
    for (int64_t i = 0; i < w->count; i++)
        if (strcmp(w->entries[i].name, name) == 0)
            return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" is added twice", name);
    entry e = {.dtype = dtype, .rank = rank};
    int64_t bytes;
    for (int d = 0; d < rank; d++) e.shape[d] = shape[d];
    if (!mha__product(e.shape, rank, &e.numel) || !mha__mul(e.numel, (int64_t)mha_dtype_size(dtype), &bytes))
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\": shape is negative or overflows", name);
    if (bytes && !data) return mha__fail(MHA_ERR_MISUSE, "tensor \"%s\": NULL data", name);
    mha_status st = reserve_one((void **)&w->entries, w->count, &w->capacity, sizeof(entry));
    if (st == MHA_OK) st = reserve_one((void **)&w->data, w->count, &w->data_capacity, sizeof(void *));
    if (st != MHA_OK) return st;
    e.name = mha__strdup(name);
    void *copy = mha__alloc(bytes, 1);
    if (!e.name || !copy) {
        mha__free(e.name);
        mha__free(copy);
        return MHA_ERR_NOMEM;
    }
    if (bytes) memcpy(copy, data, (size_t)bytes);
    e.end = bytes;
    w->entries[w->count] = e;
    w->data[w->count] = copy;
    w->count++;
    return MHA_OK;
}

mha_status mha_st_writer_set_metadata(mha_st_writer *w, const char *key, const char *value)
{
    if (!w || !key || !value) return mha__fail(MHA_ERR_MISUSE, "mha_st_writer_set_metadata: NULL argument");
    return meta_append(&w->meta, key, value);
}

/* A growable text buffer for the header. */
typedef struct text {
    char *buf;
    int64_t len, cap;
    bool failed;
} text;

static void put(text *t, const char *s, size_t n)
{
    if (t->failed) return;
    if (t->len + (int64_t)n + 1 > t->cap) {
        int64_t cap = (t->cap + (int64_t)n + 1) * 2;
        char *grown = mha__alloc(cap, 1);
        if (!grown) {
            t->failed = true;
            return;
        }
        if (t->len) memcpy(grown, t->buf, (size_t)t->len);
        mha__free(t->buf);
        t->buf = grown;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += (int64_t)n;
}

static void put_str(text *t, const char *s) { put(t, s, strlen(s)); }

static void put_json_string(text *t, const char *s)
{
    put_str(t, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char esc[8];
        if (ch == '"' || ch == '\\') {
            esc[0] = '\\';
            esc[1] = (char)ch;
            put(t, esc, 2);
        } else if (ch < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", ch);
            put_str(t, esc);
        } else {
            put(t, s, 1);
        }
    }
    put_str(t, "\"");
}

static void put_int(text *t, int64_t v)
{
    char num[24];
    snprintf(num, sizeof num, "%lld", (long long)v);
    put_str(t, num);
}

static void build_header(const mha_st_writer *w, text *t)
{
    put_str(t, "{");
    if (w->meta.count) {
        put_str(t, "\"__metadata__\":{");
        for (int64_t i = 0; i < w->meta.count; i++) {
            if (i) put_str(t, ",");
            put_json_string(t, w->meta.pairs[i].key);
            put_str(t, ":");
            put_json_string(t, w->meta.pairs[i].value);
        }
        put_str(t, "}");
    }
    int64_t offset = 0;
    for (int64_t i = 0; i < w->count; i++) {
        const entry *e = &w->entries[i];
        if (i || w->meta.count) put_str(t, ",");
        put_json_string(t, e->name);
        put_str(t, ":{\"dtype\":\"");
        put_str(t, mha_dtype_name(e->dtype));
        put_str(t, "\",\"shape\":[");
        for (int d = 0; d < e->rank; d++) {
            if (d) put_str(t, ",");
            put_int(t, e->shape[d]);
        }
        put_str(t, "],\"data_offsets\":[");
        put_int(t, offset);
        put_str(t, ",");
        offset += e->end;
        put_int(t, offset);
        put_str(t, "]}");
    }
    put_str(t, "}");
    /* Pad with spaces so the data starts 8-byte aligned, as the format's
     * own writer does. */
    while (!t->failed && t->len % 8) put_str(t, " ");
}

static mha_status write_all(FILE *fp, const void *data, size_t n, const char *path)
{
    if (n && fwrite(data, 1, n, fp) != n) return mha__fail(MHA_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return MHA_OK;
}

static mha_status write_contents(const mha_st_writer *w, const text *header, FILE *fp, const char *path)
{
    unsigned char prefix[8];
    uint64_t n = (uint64_t)header->len;
    for (int i = 0; i < 8; i++) prefix[i] = (unsigned char)(n >> (8 * i));
    mha_status st = write_all(fp, prefix, 8, path);
    if (st == MHA_OK) st = write_all(fp, header->buf, (size_t)header->len, path);
    for (int64_t i = 0; st == MHA_OK && i < w->count; i++)
        st = write_all(fp, w->data[i], (size_t)w->entries[i].end, path);
    if (st == MHA_OK && (fflush(fp) != 0 || fsync(fileno(fp)) != 0))
        st = mha__fail(MHA_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return st;
}

mha_status mha_st_writer_save(const mha_st_writer *w, const char *path)
{
    if (!w || !path) return mha__fail(MHA_ERR_MISUSE, "mha_st_writer_save: NULL argument");
    text header = {0};
    build_header(w, &header);
    if (header.failed) {
        mha__free(header.buf);
        return MHA_ERR_NOMEM;
    }
    size_t tmp_len = strlen(path) + sizeof ".tmp.XXXXXX";
    char *tmp = mha__alloc((int64_t)tmp_len, 1);
    if (!tmp) {
        mha__free(header.buf);
        return MHA_ERR_NOMEM;
    }
    snprintf(tmp, tmp_len, "%s.tmp.XXXXXX", path);
    mha_status st = MHA_OK;
    int fd = mkstemp(tmp);
    /* mkstemp makes the file private; give it the usual permissions. */
    if (fd >= 0) fchmod(fd, 0644);
    FILE *fp = fd >= 0 ? fdopen(fd, "wb") : NULL;
    if (!fp) {
        st = mha__fail(MHA_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
    } else {
        st = write_contents(w, &header, fp, path);
        if (fclose(fp) != 0 && st == MHA_OK) st = mha__fail(MHA_ERR_IO, "cannot write %s: %s", path, strerror(errno));
        if (st == MHA_OK && rename(tmp, path) != 0)
            st = mha__fail(MHA_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        if (st != MHA_OK) unlink(tmp);
    }
    mha__free(tmp);
    mha__free(header.buf);
    return st;
}
