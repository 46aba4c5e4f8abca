/*
 * wordpiece.c -- BERT's uncased tokenizer: the vocabulary of a model's
 * vocab.txt, the basic split into words (lower case, accents stripped,
 * punctuation apart) and WordPiece's greedy longest-match pieces.
 *
 * What the basic split does to a character, as Hugging Face's
 * BertTokenizer(do_lower_case=True) does it, from the Unicode facts in
 * unicode_tables.h (scripts/gen_unicode_tables.py):
 *   - NUL, U+FFFD, control, format and private-use characters are dropped;
 *     whitespace (Zs, tab, newline, return) separates;
 *   - a CJK ideograph becomes a word of its own;
 *   - letters are lower-cased and accents stripped (NFD without marks) for
 *     Latin, Greek and Cyrillic; combining marks (Mn) are dropped
 *     everywhere; letters of other scripts pass through, so scripts whose
 *     NFD changes letters themselves (Hangul syllables into jamo, some
 *     Indic letters) differ from the reference, as do code points Unicode
 *     had not assigned (the reference drops them);
 *   - punctuation (ASCII's and Unicode's P categories) is a word of its
 *     own.
 * A word of more than 100 characters, or one WordPiece cannot cover, is
 * [UNK].
 */
#include "lab.h"
#include "unicode_tables.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_TOKEN_BYTES = 256, MAX_VOCAB = 1 << 20, MAX_WORD_CHARS = 100 };

struct lab_vocab {
    char **tokens; /* by id */
    int64_t n;
    int32_t *slots; /* open addressing: id + 1, 0 = empty */
    int64_t mask;
    int32_t cls, sep, unk, pad;
};

/* FNV-1a over len bytes. */
static uint64_t hash(const char *s, size_t len)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static int32_t find(const lab_vocab *v, const char *s, size_t len)
{
    for (uint64_t at = hash(s, len) & (uint64_t)v->mask;; at = (at + 1) & (uint64_t)v->mask) {
        int32_t slot = v->slots[at];
        if (!slot) return -1;
        const char *t = v->tokens[slot - 1];
        if (strlen(t) == len && memcmp(t, s, len) == 0) return slot - 1;
    }
}

int32_t lab_vocab_id(const lab_vocab *v, const char *token) { return find(v, token, strlen(token)); }

const char *lab_vocab_token(const lab_vocab *v, int32_t id) { return id >= 0 && id < v->n ? v->tokens[id] : "?"; }

int64_t lab_vocab_size(const lab_vocab *v) { return v->n; }

void lab_vocab_free(lab_vocab *v)
{
    if (!v) return;
    for (int64_t i = 0; i < v->n; i++) free(v->tokens[i]);
    free(v->tokens);
    free(v->slots);
    free(v);
}

/* One line per token, its id the line's number; the first of duplicates
 * keeps its id, as the reference's dictionary does for lookups. */
static mha_status read_lines(FILE *f, const char *path, lab_vocab *v)
{
    char line[MAX_TOKEN_BYTES + 2];
    int64_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        size_t len = strcspn(line, "\r\n");
        if (len == strlen(line) && !feof(f))
            return lab_fail(MHA_ERR_INVALID_ARG, "%s: line %lld is longer than %d bytes", path, (long long)v->n + 1,
                            MAX_TOKEN_BYTES);
        if (v->n == MAX_VOCAB) return lab_fail(MHA_ERR_INVALID_ARG, "%s: more than %d tokens", path, MAX_VOCAB);
        if (v->n == cap) {
            cap = cap ? 2 * cap : 32768;
            char **grown = realloc(v->tokens, (size_t)cap * sizeof *grown);
            if (!grown) return MHA_ERR_NOMEM;
            v->tokens = grown;
        }
        if (!(v->tokens[v->n] = malloc(len + 1))) return MHA_ERR_NOMEM;
        memcpy(v->tokens[v->n], line, len);
        v->tokens[v->n][len] = '\0';
        v->n++;
    }
    if (ferror(f)) return lab_fail(MHA_ERR_IO, "%s: %s", path, strerror(errno));
    return MHA_OK;
}

static mha_status index_tokens(lab_vocab *v, const char *path)
{
    int64_t size = 1;
    while (size < 2 * v->n) size *= 2;
    v->mask = size - 1;
    if (!(v->slots = calloc((size_t)size, sizeof *v->slots))) return MHA_ERR_NOMEM;
    for (int64_t id = 0; id < v->n; id++) {
        const char *t = v->tokens[id];
        uint64_t at = hash(t, strlen(t)) & (uint64_t)v->mask;
        while (v->slots[at] && strcmp(v->tokens[v->slots[at] - 1], t) != 0) at = (at + 1) & (uint64_t)v->mask;
        if (!v->slots[at]) v->slots[at] = (int32_t)(id + 1);
    }
    v->cls = lab_vocab_id(v, "[CLS]"), v->sep = lab_vocab_id(v, "[SEP]");
    v->unk = lab_vocab_id(v, "[UNK]"), v->pad = lab_vocab_id(v, "[PAD]");
    if (v->cls < 0 || v->sep < 0 || v->unk < 0 || v->pad < 0)
        return lab_fail(MHA_ERR_INVALID_ARG,
                        "%s: a BERT vocabulary has [CLS], [SEP], [UNK] and [PAD]; this one lacks %s", path,
                        v->cls < 0   ? "[CLS]"
                        : v->sep < 0 ? "[SEP]"
                        : v->unk < 0 ? "[UNK]"
                                     : "[PAD]");
    return MHA_OK;
}

mha_status lab_vocab_load(const char *path, lab_vocab **out)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f) return lab_fail(MHA_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    lab_vocab *v = calloc(1, sizeof *v);
    mha_status st = v ? read_lines(f, path, v) : MHA_ERR_NOMEM;
    fclose(f);
    if (st == MHA_OK) st = index_tokens(v, path);
    if (st != MHA_OK) {
        lab_vocab_free(v);
        return st;
    }
    *out = v;
    return MHA_OK;
}

/* ---- characters ---------------------------------------------------- */

/* The next code point of UTF-8 text at *s (advanced past it); U+FFFD for
 * a malformed sequence (one byte consumed). */
static uint32_t next_char(const char **s)
{
    const unsigned char *p = (const unsigned char *)*s;
    int n = p[0] < 0x80 ? 1 : (p[0] & 0xe0) == 0xc0 ? 2 : (p[0] & 0xf0) == 0xe0 ? 3 : (p[0] & 0xf8) == 0xf0 ? 4 : 0;
    uint32_t c = n == 1 ? p[0] : n == 2 ? p[0] & 0x1fu : n == 3 ? p[0] & 0x0fu : p[0] & 0x07u;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) n = 0;
        if (n) c = (c << 6) | (p[i] & 0x3fu);
    }
    if (n == 0 || (n == 2 && c < 0x80) || (n == 3 && c < 0x800) || (n == 4 && (c < 0x10000 || c > 0x10ffff))) {
        *s += 1;
        return 0xfffd;
    }
    *s += n;
    return c;
}

static int put_utf8(uint32_t c, char *out)
{
    if (c < 0x80) return out[0] = (char)c, 1;
    if (c < 0x800) return out[0] = (char)(0xc0 | c >> 6), out[1] = (char)(0x80 | (c & 0x3f)), 2;
    if (c < 0x10000) {
        out[0] = (char)(0xe0 | c >> 12), out[1] = (char)(0x80 | ((c >> 6) & 0x3f)), out[2] = (char)(0x80 | (c & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | c >> 18), out[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3f)), out[3] = (char)(0x80 | (c & 0x3f));
    return 4;
}

/* Is c in one of n sorted inclusive ranges? */
static bool in_ranges(uint32_t c, const uint16_t (*r)[2], size_t n)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c > r[mid][1]) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && c >= r[lo][0];
}

#define IN(table, c) in_ranges(c, table, sizeof table / sizeof table[0])

static bool is_space(uint32_t c) { return c == '\t' || c == '\n' || c == '\r' || (c < 0x10000 && IN(SPACE, c)); }

/* Dropped: control and format characters, private use (not tab, newline,
 * return). */
static bool is_control(uint32_t c) { return c < 0x10000 && IN(CONTROL, c); }

static bool is_cjk(uint32_t c)
{
    return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x20000 && c <= 0x2a6df) ||
           (c >= 0x2a700 && c <= 0x2b81f) || (c >= 0x2b820 && c <= 0x2ceaf) || (c >= 0xf900 && c <= 0xfaff) ||
           (c >= 0x2f800 && c <= 0x2fa1f);
}

/* ASCII's non-alphanumeric printables are punctuation for BERT, as are
 * Unicode's P categories. */
static bool is_punct(uint32_t c)
{
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
    return c < 0x10000 && IN(PUNCT, c);
}

/* Lower case without accents; 0 for a mark (dropped with the accents). */
static uint32_t fold(uint32_t c)
{
    if (c >= 'A' && c <= 'Z') return c + 32;
    for (size_t i = 0; i < sizeof FOLD_BLOCKS / sizeof FOLD_BLOCKS[0]; i++)
        if (c >= FOLD_BLOCKS[i].lo && c <= FOLD_BLOCKS[i].hi) return FOLD_BLOCKS[i].to[c - FOLD_BLOCKS[i].lo];
    if (c < 0x10000 && IN(MARK, c)) return 0;
    return c;
}

/* ---- words and pieces ---------------------------------------------- */

/* The tokenizer's state over one text. */
typedef struct split {
    const lab_vocab *v;
    int64_t capacity, n, words; /* tokens allowed (the last kept for [SEP]), written; words seen */
    int32_t *ids, *word_of;
    char (*word_text)[LAB_WORD_BYTES];
    char word[4 * MAX_WORD_CHARS + 4]; /* the word being gathered, folded UTF-8 */
    size_t len;
    int chars;
} split;

static void emit(split *s, int32_t id)
{
    if (s->n >= s->capacity - 1) return; /* cut: [SEP] still ends the sequence */
    s->ids[s->n] = id;
    s->word_of[s->n] = (int32_t)s->words;
    s->n++;
}

/* WordPiece: the longest vocabulary entry that starts the rest of the
 * word ("##" before all but the first), repeatedly; [UNK] for the whole
 * word if some rest has none, or if the word is too long. */
static void pieces(split *s)
{
    int32_t found[MAX_WORD_CHARS];
    int n = 0;
    bool ok = s->chars <= MAX_WORD_CHARS;
    char piece[sizeof s->word + 2] = "##";
    for (size_t start = 0; ok && start < s->len;) {
        size_t end = s->len;
        int32_t id = -1;
        while (end > start) {
            size_t len = end - start;
            if (start) memcpy(piece + 2, s->word + start, len);
            if ((id = start ? find(s->v, piece, 2 + len) : find(s->v, s->word, len)) >= 0) break;
            do end--; /* back one character */
            while (end > start && ((unsigned char)s->word[end] & 0xc0) == 0x80);
        }
        ok = id >= 0;
        if (ok) found[n++] = id, start = end;
    }
    if (!ok) n = 0, found[n++] = s->v->unk;
    for (int i = 0; i < n; i++) emit(s, found[i]);
}

/* A word cut off entirely (the text ran past capacity) is not counted. */
static void end_word(split *s)
{
    int64_t before = s->n;
    if (s->len > 0) pieces(s);
    if (s->n == before) {
        s->len = 0, s->chars = 0;
        return;
    }
    if (s->word_text) {
        size_t keep = s->len < LAB_WORD_BYTES - 1 ? s->len : LAB_WORD_BYTES - 1;
        memcpy(s->word_text[s->words], s->word, keep);
        s->word_text[s->words][keep] = '\0';
    }
    s->words++;
    s->len = 0, s->chars = 0;
}

static void add_char(split *s, uint32_t c)
{
    if (s->chars < MAX_WORD_CHARS + 1) s->len += (size_t)put_utf8(c, s->word + s->len);
    s->chars++;
}

int64_t lab_tokenize(const lab_vocab *v, const char *text, int64_t capacity, int32_t *ids, int32_t *word_of,
                     char (*word_text)[LAB_WORD_BYTES], int64_t *words)
{
    if (capacity < 2) return -1;
    split s = {.v = v, .capacity = capacity, .ids = ids, .word_of = word_of, .word_text = word_text};
    ids[0] = v->cls, word_of[0] = -1, s.n = 1;
    for (const char *p = text; *p && s.n < capacity - 1;) {
        uint32_t c = next_char(&p);
        if (c == 0xfffd || is_control(c)) continue;
        if (is_space(c)) {
            end_word(&s);
            continue;
        }
        uint32_t f = fold(c);
        if (f == 0) continue; /* a combining mark, stripped with the accents */
        if (is_punct(f) || is_cjk(f)) {
            end_word(&s);
            add_char(&s, f);
            end_word(&s);
            continue;
        }
        add_char(&s, f);
    }
    end_word(&s);
    ids[s.n] = v->sep, word_of[s.n] = -1;
    if (words) *words = s.words;
    return s.n + 1;
}
