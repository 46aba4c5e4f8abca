/*
 * st_json.c -- the bounded JSON reader for safetensors headers.
 *
 * It reads exactly the schema safetensors uses:
 *     { "__metadata__": { "key": "value", ... },
 *       "name": { "dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24] },
 *       ... }
 * and skips unknown fields of a tensor entry.  It never recurses deeper than
 * MAX_DEPTH, never reads past the end of the buffer, and reports the byte
 * offset of the first fault.  Validation of the values themselves (dtype
 * names, sizes, offsets) belongs to safetensors.c.
 */
#include "io/st_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_DEPTH = 64 };

typedef struct cursor {
    const char *p, *end, *begin;
    mha__json_callbacks *cb;
} cursor;

static mha_status fault(const cursor *c, const char *what)
{
    return mha__fail(MHA_ERR_CORRUPT, "invalid JSON header at byte %lld: %s", (long long)(c->p - c->begin), what);
}

static void skip_space(cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static bool take(cursor *c, char ch)
{
    skip_space(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return true;
    }
    return false;
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static bool read_hex4(cursor *c, uint32_t *out)
{
    if (c->end - c->p < 4) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(c->p[i]);
        if (h < 0) return false;
        v = v * 16 + (uint32_t)h;
    }
    c->p += 4;
    *out = v;
    return true;
}

static size_t put_utf8(char *dst, uint32_t cp)
{
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xc0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xe0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        dst[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    dst[0] = (char)(0xf0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    dst[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Decode a \u escape (the backslash and 'u' already taken), joining a
 * surrogate pair. */
static mha_status read_unicode_escape(cursor *c, uint32_t *cp)
{
    if (!read_hex4(c, cp)) return fault(c, "bad \\u escape");
    if (*cp >= 0xdc00 && *cp <= 0xdfff) return fault(c, "unpaired low surrogate");
    if (*cp >= 0xd800 && *cp <= 0xdbff) {
        uint32_t low;
        if (c->end - c->p < 2 || c->p[0] != '\\' || c->p[1] != 'u') return fault(c, "unpaired high surrogate");
        c->p += 2;
        if (!read_hex4(c, &low) || low < 0xdc00 || low > 0xdfff) return fault(c, "bad low surrogate");
        *cp = 0x10000 + ((*cp - 0xd800) << 10) + (low - 0xdc00);
    }
    return MHA_OK;
}

/* Read a string into a fresh NUL-terminated buffer (escapes decoded).  The
 * decoded text is never longer than the encoded one, which bounds the
 * allocation by the header size. */
static mha_status read_string(cursor *c, char **out)
{
    if (!take(c, '"')) return fault(c, "expected a string");
    const char *start = c->p;
    while (c->p < c->end && *c->p != '"') {
        if (*c->p == '\\' && c->end - c->p < 2) break;
        c->p += (*c->p == '\\') ? 2 : 1;
    }
    if (c->p >= c->end || *c->p != '"') return fault(c, "unterminated string");
    const char *close = c->p, *outer_end = c->end;
    char *s = mha__alloc(close - start + 1, 1);
    if (!s) return MHA_ERR_NOMEM;
    size_t n = 0;
    /* Decode within the quotes only, so no escape can read past them. */
    c->p = start;
    c->end = close;
    mha_status st = MHA_OK;
    while (st == MHA_OK && c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p++;
        if (ch < 0x20) {
            st = fault(c, "control character in string");
        } else if (ch != '\\') {
            s[n++] = (char)ch;
        } else {
            char e = c->p < c->end ? *c->p++ : '\0';
            const char *simple = strchr("\"\\/bfnrt", e);
            if (e == 'u') {
                uint32_t cp = 0;
                st = read_unicode_escape(c, &cp);
                if (st == MHA_OK) {
                    if (cp == 0) st = fault(c, "NUL character in string");
                    else n += put_utf8(s + n, cp);
                }
            } else if (e != '\0' && simple) {
                s[n++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
            } else {
                st = fault(c, "unknown escape in string");
            }
        }
    }
    c->end = outer_end;
    if (st != MHA_OK) {
        mha__free(s);
        return st;
    }
    c->p = close + 1;
    s[n] = '\0';
    *out = s;
    return MHA_OK;
}

/* A non-negative integer without sign, fraction or exponent. */
static mha_status read_size(cursor *c, int64_t *out)
{
    skip_space(c);
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return fault(c, "expected a non-negative integer");
    if (*c->p == '0' && c->end - c->p > 1 && c->p[1] >= '0' && c->p[1] <= '9')
        return fault(c, "integer with a leading zero");
    int64_t v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        if (!mha__mul(v, 10, &v) || !mha__add(v, *c->p - '0', &v)) return fault(c, "integer too large for 64 bits");
        c->p++;
    }
    if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E'))
        return fault(c, "expected an integer, found a fraction");
    *out = v;
    return MHA_OK;
}

static mha_status skip_value(cursor *c, int depth);

static mha_status skip_number(cursor *c)
{
    const char *start = c->p;
    if (c->p < c->end && *c->p == '-') c->p++;
    const char *digits = c->p;
    while (c->p < c->end && ((*c->p >= '0' && *c->p <= '9') || strchr(".eE+-", *c->p))) c->p++;
    if (c->p == digits || c->p == start) return fault(c, "expected a value");
    return MHA_OK;
}

static mha_status skip_container(cursor *c, int depth, char close)
{
    if (depth >= MAX_DEPTH) return fault(c, "nesting too deep");
    if (take(c, close)) return MHA_OK;
    do {
        if (close == '}') {
            char *key;
            mha_status st = read_string(c, &key);
            if (st != MHA_OK) return st;
            mha__free(key);
            if (!take(c, ':')) return fault(c, "expected ':'");
        }
        mha_status st = skip_value(c, depth + 1);
        if (st != MHA_OK) return st;
    } while (take(c, ','));
    return take(c, close) ? MHA_OK : fault(c, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
}

static bool take_word(cursor *c, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return false;
    c->p += n;
    return true;
}

static mha_status skip_value(cursor *c, int depth)
{
    skip_space(c);
    if (c->p >= c->end) return fault(c, "unexpected end of header");
    switch (*c->p) {
    case '{': c->p++; return skip_container(c, depth, '}');
    case '[': c->p++; return skip_container(c, depth, ']');
    case '"': {
        char *s;
        mha_status st = read_string(c, &s);
        if (st == MHA_OK) mha__free(s);
        return st;
    }
    default:
        if (take_word(c, "true") || take_word(c, "false") || take_word(c, "null")) return MHA_OK;
        return skip_number(c);
    }
}

static mha_status read_size_array(cursor *c, int64_t *dims, int max, int *count)
{
    if (!take(c, '[')) return fault(c, "expected '['");
    *count = 0;
    if (take(c, ']')) return MHA_OK;
    do {
        int64_t v = 0;
        mha_status st = read_size(c, &v);
        if (st != MHA_OK) return st;
        if (*count >= max) return fault(c, "array has too many elements");
        dims[(*count)++] = v;
    } while (take(c, ','));
    return take(c, ']') ? MHA_OK : fault(c, "expected ',' or ']'");
}

static mha_status read_metadata(cursor *c)
{
    if (!take(c, '{')) return fault(c, "__metadata__ must be an object");
    if (take(c, '}')) return MHA_OK;
    do {
        char *key = NULL, *value = NULL;
        mha_status st = read_string(c, &key);
        if (st == MHA_OK && !take(c, ':')) st = fault(c, "expected ':'");
        if (st == MHA_OK) st = read_string(c, &value);
        if (st == MHA_OK) st = c->cb->metadata(c->cb->user, key, value);
        mha__free(key);
        mha__free(value);
        if (st != MHA_OK) return st;
    } while (take(c, ','));
    return take(c, '}') ? MHA_OK : fault(c, "expected ',' or '}'");
}

/* Fields of one tensor entry; every one is required exactly once. */
static mha_status read_tensor_fields(cursor *c, mha__json_tensor *t)
{
    bool have_dtype = false, have_shape = false, have_offsets = false;
    if (!take(c, '{')) return fault(c, "a tensor entry must be an object");
    if (!take(c, '}')) {
        do {
            char *field;
            mha_status st = read_string(c, &field);
            if (st != MHA_OK) return st;
            bool dup = false;
            if (!take(c, ':')) {
                st = fault(c, "expected ':'");
            } else if (strcmp(field, "dtype") == 0) {
                dup = have_dtype;
                have_dtype = true;
                char *dtype;
                st = read_string(c, &dtype);
                if (st == MHA_OK) {
                    /* Too long for any known dtype: keep "?" for the message. */
                    size_t n = strlen(dtype);
                    if (n < sizeof t->dtype) memcpy(t->dtype, dtype, n + 1);
                    else memcpy(t->dtype, "?", 2);
                    mha__free(dtype);
                }
            } else if (strcmp(field, "shape") == 0) {
                dup = have_shape;
                have_shape = true;
                st = read_size_array(c, t->shape, MHA_ST_MAX_RANK, &t->rank);
            } else if (strcmp(field, "data_offsets") == 0) {
                int n = 0;
                dup = have_offsets;
                have_offsets = true;
                st = read_size_array(c, t->offsets, 2, &n);
                if (st == MHA_OK && n != 2) st = fault(c, "data_offsets needs two integers");
            } else {
                st = skip_value(c, 2);
            }
            mha__free(field);
            if (st == MHA_OK && dup) st = fault(c, "a tensor field appears twice");
            if (st != MHA_OK) return st;
        } while (take(c, ','));
        if (!take(c, '}')) return fault(c, "expected ',' or '}'");
    }
    if (!have_dtype) return fault(c, "tensor entry has no \"dtype\"");
    if (!have_shape) return fault(c, "tensor entry has no \"shape\"");
    if (!have_offsets) return fault(c, "tensor entry has no \"data_offsets\"");
    return MHA_OK;
}

mha_status mha__json_parse_header(const char *text, size_t len, mha__json_callbacks *cb)
{
    cursor c = {text, text + len, text, cb};
    bool seen_metadata = false;
    if (!take(&c, '{')) return fault(&c, "the header must be a JSON object");
    if (!take(&c, '}')) {
        do {
            char *name;
            mha_status st = read_string(&c, &name);
            if (st != MHA_OK) return st;
            if (!take(&c, ':')) {
                st = fault(&c, "expected ':'");
            } else if (strcmp(name, "__metadata__") == 0) {
                st = seen_metadata ? fault(&c, "__metadata__ appears twice") : read_metadata(&c);
                seen_metadata = true;
            } else {
                mha__json_tensor t;
                memset(&t, 0, sizeof t);
                st = read_tensor_fields(&c, &t);
                if (st == MHA_OK) {
                    t.name = name;
                    name = NULL; /* ownership passes to the callback */
                    st = cb->tensor(cb->user, &t);
                }
            }
            mha__free(name);
            if (st != MHA_OK) return st;
        } while (take(&c, ','));
        if (!take(&c, '}')) return fault(&c, "expected ',' or '}'");
    }
    skip_space(&c);
    if (c.p != c.end) return fault(&c, "data after the closing '}'");
    return MHA_OK;
}
