/*
 * fuzz_tokenizer.c -- libFuzzer target: the lab's BERT tokenizer
 * (lab/wordpiece.c) on any bytes as text, with a small vocabulary of its
 * own (special tokens, letters, pieces, a few multi-byte tokens): every
 * input must give [CLS] .. [SEP] within the capacity the first byte picks,
 * ids inside the vocabulary, word indices in order and words that end in
 * a NUL.  Text from users is untrusted: malformed UTF-8, overlong words,
 * control and format characters, marks without a base.
 */
#define _POSIX_C_SOURCE 200809L

#include "lab.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const TOKENS[] = {
    "[PAD]", "[UNK]",        "[CLS]",    "[SEP]",      "a",  "b",    "c",     "e",           "t", "##a",
    "##b",   "##c",          "##e",      "##t",        "ab", "##bc", "token", "##ization",   ".", ",",
    "!",     "\xe6\x9d\xb1", "\xce\xb1", "##\xce\xb1", "0",  "##0",  "cafe",  "\xe2\x80\x94"};

static lab_vocab *vocab_once(void)
{
    static lab_vocab *v;
    if (v) return v;
    char path[] = "/tmp/mha_fuzz_vocab_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) abort();
    FILE *f = fdopen(fd, "w");
    for (size_t i = 0; i < sizeof TOKENS / sizeof TOKENS[0]; i++) fprintf(f, "%s\n", TOKENS[i]);
    fclose(f);
    if (lab_vocab_load(path, &v) != MHA_OK) abort();
    unlink(path);
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { MAX = 64 };
    lab_vocab *v = vocab_once();
    int64_t capacity = size ? 2 + data[0] % (MAX - 1) : MAX;
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    int32_t ids[MAX], word_of[MAX];
    char words[MAX][LAB_WORD_BYTES];
    int64_t n_words = -1, n = lab_tokenize(v, size ? text + 1 : text, capacity, ids, word_of, words, &n_words);
    free(text);
    if (n < 2 || n > capacity || ids[0] != lab_vocab_id(v, "[CLS]") || ids[n - 1] != lab_vocab_id(v, "[SEP]"))
        __builtin_trap();
    if (n_words < 0 || n_words > n - 2 || word_of[0] != -1 || word_of[n - 1] != -1) __builtin_trap();
    for (int64_t i = 1; i < n - 1; i++) {
        if (ids[i] < 0 || ids[i] >= lab_vocab_size(v)) __builtin_trap();
        if (word_of[i] < 0 || word_of[i] >= n_words || (i > 1 && word_of[i] < word_of[i - 1])) __builtin_trap();
    }
    for (int64_t w = 0; w < n_words; w++)
        if (!memchr(words[w], '\0', LAB_WORD_BYTES)) __builtin_trap();
    return 0;
}
