/*
 * data.c -- the lab's training data.
 */
#include "lab.h"

#include <stdio.h>
#include <stdlib.h>

static int32_t next_token(uint64_t *s, int64_t vocab)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (int32_t)((*s >> 11) % (uint64_t)vocab);
}

void lab_repeated_spans(int32_t *tokens, int64_t B, int64_t T, int64_t vocab, uint64_t *state)
{
    for (int64_t b = 0; b < B; b++) {
        int32_t *seq = tokens + b * T;
        /* A span of random length p in [T/4, T/2] from a random start, then
         * repeated: the distance to the earlier copy changes from sequence
         * to sequence, so copying needs the content (induction), not a
         * fixed offset a position embedding could learn. */
        int64_t lo = T / 4 > 1 ? T / 4 : 1, p = lo + next_token(state, T / 2 - lo + 1);
        int64_t start = next_token(state, T - 2 * p + 1);
        for (int64_t t = 0; t < T; t++) seq[t] = next_token(state, vocab);
        for (int64_t t = start + p; t < start + 2 * p; t++) seq[t] = seq[t - p];
    }
}

void lab_find_repeat(const int32_t *seq, int64_t T, int64_t *start, int64_t *len)
{
    *start = *len = -1;
    for (int64_t p = T / 2; p >= 2; p--) { /* longest first */
        int64_t run = 0;                   /* matches seq[t] == seq[t - p] ending at t */
        for (int64_t t = p; t < T; t++) {
            run = seq[t] == seq[t - p] ? run + 1 : 0;
            if (run == p) {
                *start = t - p + 1, *len = p;
                return;
            }
        }
    }
}

mha_status lab_text_load(const char *path, int64_t vocab, lab_text *text)
{
    text->chars = NULL;
    text->n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return MHA_ERR_IO;
    int32_t *chars = NULL;
    int64_t n = 0, cap = 0;
    for (int ch; (ch = fgetc(f)) != EOF;) {
        if (n == cap) {
            cap = cap ? 2 * cap : 4096;
            int32_t *grown = realloc(chars, (size_t)cap * sizeof *grown);
            if (!grown) {
                free(chars);
                fclose(f);
                return MHA_ERR_NOMEM;
            }
            chars = grown;
        }
        chars[n++] = ch < vocab ? ch : (int32_t)(vocab - 1);
    }
    fclose(f);
    *text = (lab_text){chars, n};
    return n > 0 ? MHA_OK : MHA_ERR_CORRUPT;
}

void lab_text_free(lab_text *text)
{
    free(text->chars);
    text->chars = NULL;
    text->n = 0;
}

void lab_text_windows(const lab_text *text, int32_t *tokens, int64_t B, int64_t T, uint64_t *state)
{
    for (int64_t b = 0; b < B; b++) {
        int64_t start = text->n > T ? next_token(state, text->n - T) : 0;
        for (int64_t t = 0; t < T; t++) tokens[b * T + t] = text->chars[(start + t) % text->n];
    }
}
