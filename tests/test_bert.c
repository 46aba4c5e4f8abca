/*
 * test_bert.c -- the head lab's pretrained encoder (lab/wordpiece.c,
 * lab/encoder.c) against the package's own reference implementation:
 * tests/data/bert/reference.safetensors holds what sentence-transformers
 * computed for all-MiniLM-L6-v2 on sentences written for this project
 * (tests/gen_bert_golden.py).  The model itself is the one
 * scripts/get_model.sh fetched into models/.
 *
 *   test_bert MODEL_DIR REFERENCE
 *
 * Tolerances, ten times what was measured (float32 against float32, the
 * order of every sum differing; 2026-12-01: 3.5e-7, 6e-6 and 2e-6):
 * sentence embeddings (unit vectors) within 4e-6 per component, the last
 * hidden states (values up to about 10) within 6e-5, the attention
 * probabilities of every block within 2e-5.
 */
#define _DEFAULT_SOURCE /* mkdtemp, symlink */
#include "harness.h"
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { T_MAX = 256 };
static const double EMBEDDING_TOL = 4e-6, STATE_TOL = 6e-5, ATTENTION_TOL = 2e-5;

typedef struct reference {
    mha_st_file *file;
    int64_t n;         /* sentences */
    const char **text; /* into bytes */
    char *bytes;
    int32_t *ids; /* [n, T_MAX], -1 after the end */
    int64_t *lengths;
} reference;

static void *read_all(mha_st_file *f, const char *name, size_t elem, int64_t *count)
{
    mha_st_info info;
    CHECK_OK(mha_st_find(f, name, &info));
    void *p = malloc((size_t)info.numel * elem + 1);
    CHECK_OK(mha_st_read_raw(f, name, p, (size_t)info.numel * elem));
    if (count) *count = info.numel;
    return p;
}

static float *read_floats(mha_st_file *f, const char *name, int64_t *count)
{
    mha_st_info info;
    CHECK_OK(mha_st_find(f, name, &info));
    float *p = malloc((size_t)info.numel * sizeof(float));
    CHECK_OK(mha_st_read_f32(f, name, p, info.numel));
    if (count) *count = info.numel;
    return p;
}

static void reference_open(const char *path, reference *r)
{
    CHECK_OK(mha_st_open(path, &r->file));
    int64_t nbytes;
    r->bytes = read_all(r->file, "sentences", 1, &nbytes);
    r->lengths = read_all(r->file, "lengths", sizeof(int64_t), &r->n);
    r->ids = read_all(r->file, "ids", sizeof(int32_t), NULL);
    r->text = malloc((size_t)r->n * sizeof *r->text);
    int64_t at = 0;
    for (int64_t i = 0; i < r->n; i++) {
        r->text[i] = r->bytes + at;
        at += (int64_t)strlen(r->bytes + at) + 1;
    }
    CHECK(at == nbytes, "sentences: %lld bytes for %lld sentences", (long long)nbytes, (long long)r->n);
}

static void reference_close(reference *r)
{
    mha_st_close(r->file);
    free(r->bytes), free(r->lengths), free(r->ids), free(r->text);
}

/* Every sentence's ids as the reference tokenizer gave them. */
static void test_tokenizer(const lab_vocab *v, const reference *r)
{
    int32_t ids[T_MAX], word_of[T_MAX];
    char words[T_MAX][LAB_WORD_BYTES];
    for (int64_t i = 0; i < r->n; i++) {
        int64_t n_words = 0, n = lab_tokenize(v, r->text[i], T_MAX, ids, word_of, words, &n_words);
        bool same = n == r->lengths[i];
        for (int64_t t = 0; same && t < n; t++) same = ids[t] == r->ids[i * T_MAX + t];
        CHECK(same, "sentence %lld (\"%.40s\"): %lld tokens, the reference %lld, or different ids", (long long)i,
              r->text[i], (long long)n, (long long)r->lengths[i]);
        bool words_ok = word_of[0] == -1 && word_of[n - 1] == -1;
        for (int64_t t = 2; t < n - 1; t++) words_ok = words_ok && word_of[t] >= word_of[t - 1];
        CHECK(words_ok && n_words >= 1 && word_of[n - 2] == n_words - 1, "sentence %lld: word indices out of order",
              (long long)i);
    }
    /* A word of pieces, and [UNK] for one the vocabulary cannot cover. */
    int64_t n = lab_tokenize(v, "Tokenization \xe2\x98\x83", T_MAX, ids, word_of, words, NULL);
    CHECK(n == 5 && strcmp(lab_vocab_token(v, ids[1]), "token") == 0 &&
              strcmp(lab_vocab_token(v, ids[2]), "##ization") == 0 && ids[3] == lab_vocab_id(v, "[UNK]") &&
              word_of[2] == 0 && word_of[3] == 1 && strcmp(words[0], "tokenization") == 0,
          "pieces of \"Tokenization \xe2\x98\x83\"");
    CHECK(lab_tokenize(v, "x", 1, ids, word_of, NULL, NULL) == -1, "capacity 1 accepted");
}

static double max_diff(const float *a, const float *b, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

/* All sentences in one padded batch: the pooled embeddings, and the
 * reference's token states for the sentences it kept them for. */
static void test_batch(mha_ctx *ctx, lab_encoder *e, const reference *r)
{
    int64_t E = lab_encoder_config_of(e)->embed_dim, T = 0, B = r->n;
    for (int64_t i = 0; i < B; i++) T = r->lengths[i] > T ? r->lengths[i] : T;
    int32_t *ids = calloc((size_t)(B * T), sizeof *ids);
    for (int64_t i = 0; i < B; i++)
        for (int64_t t = 0; t < r->lengths[i]; t++) ids[i * T + t] = r->ids[i * T_MAX + t];
    float *hidden = malloc((size_t)(B * T * E) * sizeof(float)), *emb = malloc((size_t)(B * E) * sizeof(float));
    CHECK_OK(lab_encoder_forward(ctx, e, ids, r->lengths, B, T, hidden, NULL));
    lab_encoder_pool(hidden, r->lengths, B, T, E, emb);
    float *want = read_floats(r->file, "embeddings", NULL);
    double worst_emb = 0;
    for (int64_t i = 0; i < B; i++) {
        double d = max_diff(emb + i * E, want + i * E, E);
        worst_emb = fmax(worst_emb, d);
        CHECK(d <= EMBEDDING_TOL, "sentence %lld's embedding is %.3g from the reference's", (long long)i, d);
    }
    int64_t kept = atoll(mha_st_metadata(r->file, "token_embeddings_sentences")), at = 0;
    float *states = read_floats(r->file, "token_embeddings", NULL);
    double worst = 0;
    for (int64_t i = 0; i < kept; i++) {
        for (int64_t t = 0; t < r->lengths[i]; t++, at++)
            worst = fmax(worst, max_diff(hidden + (i * T + t) * E, states + at * E, E));
    }
    CHECK(worst <= STATE_TOL, "the last hidden states are up to %.3g from the reference's", worst);
    printf("test_bert: %lld sentences: embeddings within %.2g of the reference's, hidden states within %.2g\n",
           (long long)B, worst_emb, worst);
    free(ids), free(hidden), free(emb), free(want), free(states);
}

/* Each block's attention probabilities for a sentence alone. */
static void test_attention(mha_ctx *ctx, lab_encoder *e, const reference *r)
{
    const lab_encoder_config *c = lab_encoder_config_of(e);
    const char *list = mha_st_metadata(r->file, "attention_sentences");
    for (const char *p = list; p && *p;) {
        char *end;
        int64_t i = strtoll(p, &end, 10), T = r->lengths[i], n = c->layers * c->heads * T * T;
        p = *end ? end + 1 : end;
        char name[32];
        snprintf(name, sizeof name, "attention.%lld", (long long)i);
        float *want = read_floats(r->file, name, NULL), *got = malloc((size_t)n * sizeof(float));
        CHECK_OK(lab_encoder_forward(ctx, e, r->ids + i * T_MAX, &r->lengths[i], 1, T, NULL, got));
        double d = max_diff(got, want, n);
        CHECK(d <= ATTENTION_TOL, "sentence %lld's attention maps are up to %.3g from the reference's", (long long)i,
              d);
        printf("test_bert: sentence %lld's %lld attention maps within %.2g of the reference's\n", (long long)i,
               (long long)(c->layers * c->heads), d);
        free(want), free(got);
    }
}

/* The same bits on 1 and 2 threads. */
static void test_threads(lab_encoder *e, const reference *r)
{
    int64_t B = 4, T = 0, E = lab_encoder_config_of(e)->embed_dim;
    for (int64_t i = 0; i < B; i++) T = r->lengths[i] > T ? r->lengths[i] : T;
    int32_t *ids = calloc((size_t)(B * T), sizeof *ids);
    for (int64_t i = 0; i < B; i++)
        for (int64_t t = 0; t < r->lengths[i]; t++) ids[i * T + t] = r->ids[i * T_MAX + t];
    float *h[2];
    for (int k = 0; k < 2; k++) {
        mha_ctx *ctx = NULL;
        CHECK_OK(mha_ctx_create(k + 1, &ctx));
        h[k] = malloc((size_t)(B * T * E) * sizeof(float));
        CHECK_OK(lab_encoder_forward(ctx, e, ids, r->lengths, B, T, h[k], NULL));
        mha_ctx_free(ctx);
    }
    CHECK(memcmp(h[0], h[1], (size_t)(B * T * E) * sizeof(float)) == 0, "1 and 2 threads give different bits");
    free(ids), free(h[0]), free(h[1]);
}

/* Bad input: a clear sentence and a status, nothing half-loaded. */
static void test_errors(mha_ctx *ctx, lab_encoder *e, const char *model_dir)
{
    lab_encoder *none = (lab_encoder *)1;
    CHECK(lab_encoder_load("/nonexistent", &none) == MHA_ERR_IO && none == NULL, "a missing model loaded");
    CHECK(strstr(lab_last_error(), "/nonexistent/model.safetensors") != NULL, "error: %s", lab_last_error());
    char dir[] = "/tmp/test_bert_XXXXXX", path[4096], target[4096];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(target, sizeof target, "%s/model.safetensors", model_dir);
    if (target[0] != '/') {
        char cwd[2048];
        CHECK(getcwd(cwd, sizeof cwd) != NULL, "getcwd");
        snprintf(target, sizeof target, "%s/%s/model.safetensors", cwd, model_dir);
    }
    CHECK(symlink(target, path) == 0, "symlink");
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"num_attention_heads\": 7, \"layer_norm_eps\": 1e-12, \"hidden_act\": \"gelu\"}", f);
    fclose(f);
    CHECK(lab_encoder_load(dir, &none) == MHA_ERR_INVALID_ARG, "7 heads over a width of 384 loaded");
    CHECK(strstr(lab_last_error(), "not a multiple of its 7 heads") != NULL, "error: %s", lab_last_error());
    f = fopen(path, "w");
    fputs("{\"layer_norm_eps\": 1e-12}", f);
    fclose(f);
    CHECK(lab_encoder_load(dir, &none) == MHA_ERR_INVALID_ARG, "a config without heads loaded");
    CHECK(strstr(lab_last_error(), "num_attention_heads") != NULL, "error: %s", lab_last_error());
    unlink(path);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    rmdir(dir);
    int32_t ids[3] = {101, 999999, 102};
    int64_t len = 3;
    CHECK(lab_encoder_forward(ctx, e, ids, &len, 1, 3, NULL, NULL) == MHA_ERR_INVALID_ARG &&
              strstr(lab_last_error(), "999999") != NULL,
          "a token id outside the vocabulary: %s", lab_last_error());
    len = 4;
    CHECK(lab_encoder_forward(ctx, e, ids, &len, 1, 3, NULL, NULL) == MHA_ERR_INVALID_ARG,
          "a length past the batch's width");
}

/* ---- the analyses, on hand-built attention ---------------------------- */

/* Row i of head h's map for sentence b, in a [1][B][H][T][T] tensor. */
static float *row_of(float *attn, int64_t B, int64_t H, int64_t T, int64_t b, int64_t h, int64_t i)
{
    (void)B;
    return attn + ((b * H + h) * T + i) * T;
}

/* Head 0 looks at the previous token; head 1 from a determiner's tokens to
 * its noun's (elsewhere at [CLS]); head 2 at [SEP]; head 3 evenly. */
static void build_patterns(const lab_corpus *c, int64_t T, float *attn)
{
    int64_t B = c->n, H = 4;
    for (int64_t b = 0; b < B; b++) {
        const lab_sentence *s = &c->sentences[b];
        int64_t n = s->length;
        for (int64_t i = 0; i < n; i++) {
            row_of(attn, B, H, T, b, 0, i)[i > 0 ? i - 1 : 0] = 1;
            row_of(attn, B, H, T, b, 2, i)[n - 1] = 1;
            for (int64_t j = 0; j < n; j++) row_of(attn, B, H, T, b, 3, i)[j] = 1.0f / (float)n;
            int64_t target = -1;
            for (int64_t p = 0; p < c->n_pairs; p++)
                if (c->pairs[p].kind == 0 && c->pairs[p].sentence == b && c->pairs[p].from == s->word_of[i])
                    target = c->pairs[p].to;
            int64_t pieces = 0;
            for (int64_t j = 0; j < n; j++) pieces += target >= 0 && s->word_of[j] == target;
            for (int64_t j = 0; j < n; j++)
                if (target >= 0 && s->word_of[j] == target) row_of(attn, B, H, T, b, 1, i)[j] = 1.0f / (float)pieces;
            if (target < 0) row_of(attn, B, H, T, b, 1, i)[0] = 1;
        }
    }
}

static void test_text_heads(const lab_vocab *v)
{
    static const char *const text[2][2] = {
        {"The dog chased the cat.", "det the>dog; det the#2>cat; subj dog>chased; obj chased>cat"},
        {"A small robot explored the surface of the planet.",
         "det a>robot; det the>surface; det the#2>planet; subj robot>explored; obj explored>surface; pobj of>planet"},
    };
    lab_sentence sentences[2];
    lab_pair pairs[2 * LAB_MAX_PAIRS];
    int64_t n_pairs = 0, got, T = 0, rows = 0;
    for (int b = 0; b < 2; b++) {
        CHECK_OK(lab_sentence_make(v, text[b][0], text[b][1], b, &sentences[b], pairs + n_pairs, LAB_MAX_PAIRS, &got));
        n_pairs += got;
        T = sentences[b].length > T ? sentences[b].length : T;
        rows += sentences[b].length;
    }
    lab_corpus c = {sentences, 2, pairs, n_pairs};
    float *attn = calloc((size_t)(2 * 4 * T * T), sizeof(float));
    build_patterns(&c, T, attn);
    lab_attention a = {attn, 1, 2, 4, T};
    lab_text_scores s[4];
    for (int h = 0; h < 4; h++) lab_text_scores_head(&a, sentences, 0, h, &s[h]);
    CHECK(fabs(s[0].previous - (double)(rows - 2) / (double)rows) < 1e-12 &&
              !strcmp(lab_text_role(&s[0]), "previous token"),
          "previous-token head: %.4f, %s", s[0].previous, lab_text_role(&s[0]));
    CHECK(s[2].sep == 1 && !strcmp(lab_text_role(&s[2]), "[SEP] sink"), "[SEP] head: %.4f", s[2].sep);
    CHECK(fabs(s[3].entropy - 1) < 1e-6 && !strcmp(lab_text_role(&s[3]), "broad"), "even head: entropy %.4f",
          s[3].entropy);
    double acc[LAB_RELATIONS * 4];
    lab_relation_accuracy(&a, &c, acc);
    CHECK(acc[0 * 4 + 1] == 1.0, "the determiner head's accuracy %.3f", acc[1]);
    CHECK(acc[0 * 4 + 0] == 0.0 && acc[3 * 4 + 0] == 0.0, "the previous-token head finds nouns or objects");
    double base;
    int offset;
    lab_relation_baseline(&c, 0, &base, &offset); /* the > dog, the > cat, the > surface, the > planet, a > robot */
    CHECK(fabs(base - 0.8) < 1e-12 && offset == 1, "determiner baseline %.3f at %+d, want 0.8 at +1", base, offset);
    CHECK(lab_relation_pairs(&c, 0) == 5 && lab_relation_pairs(&c, 2) == 2, "pairs counted wrong");
    free(attn);
    /* Labels that do not fit the sentence are named. */
    CHECK(lab_sentence_make(v, text[0][0], "det the>giraffe", 0, &sentences[0], pairs, 4, &got) ==
                  MHA_ERR_INVALID_ARG &&
              strstr(lab_last_error(), "giraffe"),
          "an unknown word: %s", lab_last_error());
    CHECK(lab_sentence_make(v, text[0][0], "verb the>dog", 0, &sentences[0], pairs, 4, &got) == MHA_ERR_INVALID_ARG &&
              strstr(lab_last_error(), "verb"),
          "an unknown kind: %s", lab_last_error());
    lab_corpus all;
    CHECK_OK(lab_corpus_load(v, &all));
    CHECK(all.n == lab_corpus_size() && all.n_pairs > 150, "the corpus: %lld sentences, %lld pairs", (long long)all.n,
          (long long)all.n_pairs);
    lab_corpus_free(&all);
}

/* Pruning's curve, computed block by block, equals whole forwards; the
 * encoder is whole afterwards. */
static void test_pruning(mha_ctx *ctx, lab_encoder *e, const lab_vocab *v)
{
    lab_corpus all;
    CHECK_OK(lab_corpus_load(v, &all));
    all.n = 5;
    lab_batch b;
    CHECK_OK(lab_batch_make(&all, &b));
    const lab_encoder_config *c = lab_encoder_config_of(e);
    int64_t n = c->layers * c->heads, E = c->embed_dim, pairs = b.B * (b.B - 1) / 2, k = 17;
    lab_text_pruning p = {malloc(8 * (size_t)n),
                          malloc(8 * (size_t)(n + 1)),
                          malloc(8 * (size_t)(n + 1)),
                          malloc(8 * (size_t)n),
                          0,
                          NULL,
                          NULL};
    float *hidden = malloc((size_t)(b.B * b.T * E) * sizeof(float)), *before = malloc((size_t)(b.B * b.T * E) * 4);
    float *emb = malloc((size_t)(b.B * E) * sizeof(float));
    double *ref = malloc((size_t)pairs * sizeof(double)), *sim = malloc((size_t)pairs * sizeof(double));
    CHECK_OK(lab_encoder_forward(ctx, e, b.ids, b.lengths, b.B, b.T, before, NULL));
    CHECK_OK(lab_text_prune(ctx, e, &b, &p));
    CHECK_OK(lab_encoder_forward(ctx, e, b.ids, b.lengths, b.B, b.T, hidden, NULL));
    CHECK(memcmp(hidden, before, (size_t)(b.B * b.T * E) * 4) == 0, "pruning left the encoder changed");
    lab_encoder_pool(before, b.lengths, b.B, b.T, E, emb);
    lab_similarities(emb, b.B, E, ref);
    uint8_t *keep = malloc((size_t)n);
    memset(keep, 1, (size_t)n);
    for (int64_t i = 0; i < k; i++) keep[p.order[i]] = 0;
    CHECK_OK(lab_encoder_keep_heads(e, keep));
    CHECK_OK(lab_encoder_forward(ctx, e, b.ids, b.lengths, b.B, b.T, hidden, NULL));
    lab_encoder_pool(hidden, b.lengths, b.B, b.T, E, emb);
    lab_similarities(emb, b.B, E, sim);
    CHECK(lab_pearson(ref, sim, pairs) == p.by_importance[k],
          "quality with %lld heads removed: %.17g by whole "
          "forwards, %.17g block by block",
          (long long)k, lab_pearson(ref, sim, pairs), p.by_importance[k]);
    CHECK(p.by_importance[0] == 1 && fabs(p.by_importance[n] - p.by_random[n]) < 1e-12, "the curves' ends");
    bool sorted = true;
    for (int64_t i = 1; i < n; i++) sorted = sorted && p.importance[p.order[i - 1]] <= p.importance[p.order[i]];
    CHECK(sorted && p.removable >= 0 && p.removable <= n, "the importance order");
    memset(keep, 1, (size_t)n);
    CHECK_OK(lab_encoder_keep_heads(e, keep));
    free(keep), free(hidden), free(before), free(emb), free(ref), free(sim);
    free(p.importance), free(p.by_importance), free(p.by_random), free(p.order);
    lab_batch_free(&b);
    lab_corpus_free(&all);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: test_bert MODEL_DIR REFERENCE\n");
        return 2;
    }
    char vocab_path[4096];
    snprintf(vocab_path, sizeof vocab_path, "%s/vocab.txt", argv[1]);
    if (access(vocab_path, R_OK) != 0) {
        fprintf(stderr, "test_bert: %s is missing (scripts/setup.sh fetches the model)\n", vocab_path);
        return 1;
    }
    reference r;
    reference_open(argv[2], &r);
    lab_vocab *v = NULL;
    CHECK_OK(lab_vocab_load(vocab_path, &v));
    test_tokenizer(v, &r);
    test_text_heads(v);
    lab_encoder *e = NULL;
    if (lab_encoder_load(argv[1], &e) != MHA_OK) {
        fprintf(stderr, "test_bert: %s\n", lab_last_error());
        return 1;
    }
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    test_batch(ctx, e, &r);
    test_attention(ctx, e, &r);
    test_threads(e, &r);
    test_pruning(ctx, e, v);
    test_errors(ctx, e, argv[1]);
    mha_ctx_free(ctx);
    lab_encoder_free(e);
    lab_vocab_free(v);
    reference_close(&r);
    return harness_finish("test_bert");
}
