/*
 * corpus.c -- the sentences the pretrained model's heads are studied on,
 * written for this project, with their labelled word pairs.
 *
 * Each sentence carries pairs "kind from>to" separated by ';': the words
 * as the tokenizer yields them (lower case, punctuation apart), "word#2"
 * for a word's second occurrence.  The kinds:
 *   det    a determiner and its noun          (the > dog)
 *   subj   a subject and its verb             (dog > chased)
 *   obj    a verb and its direct object       (chased > cat)
 *   pobj   a preposition and its object       (across > garden)
 *   coref  a pronoun and what it refers to    (his > farmer)
 * Sentences come in topics with near-paraphrases, so the similarities
 * between their embeddings have structure for pruning to disturb.
 */
#include "lab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *text, *pairs;
} SENTENCES[] = {
    {"The dog chased the cat across the garden.",
     "det the>dog; det the#2>cat; det the#3>garden; subj dog>chased; obj chased>cat; pobj across>garden"},
    {"A cat was chased by the dog in the garden.",
     "det a>cat; det the>dog; det the#2>garden; subj cat>chased; pobj by>dog; pobj in>garden"},
    {"The farmer fed his hungry horses before sunrise.",
     "det the>farmer; subj farmer>fed; obj fed>horses; pobj before>sunrise; coref his>farmer"},
    {"The old horse ate the apples that the girl gave it.",
     "det the>horse; det the#2>apples; det the#3>girl; subj horse>ate; obj ate>apples; subj girl>gave; coref it>horse"},
    {"Heavy rain flooded the streets of the small town.",
     "subj rain>flooded; obj flooded>streets; det the>streets; det the#2>town; pobj of>town"},
    {"The storm knocked down trees across the city.",
     "det the>storm; subj storm>knocked; obj knocked>trees; pobj across>city; det the#2>city"},
    {"After the storm, the river rose above its banks.",
     "pobj after>storm; det the>storm; det the#2>river; subj river>rose; pobj above>banks; coref its>river"},
    {"My grandmother baked a cake for the children.",
     "subj grandmother>baked; obj baked>cake; det a>cake; pobj for>children; det the>children"},
    {"The children ate the cake that their grandmother made.",
     "det the>children; subj children>ate; obj ate>cake; det the#2>cake; coref their>children; subj grandmother>made"},
    {"She cut the bread with a sharp knife.",
     "subj she>cut; obj cut>bread; det the>bread; pobj with>knife; det a>knife"},
    {"The engineer fixed the server before the meeting.", "det the>engineer; subj engineer>fixed; obj fixed>server; "
                                                          "det the#2>server; pobj before>meeting; det the#3>meeting"},
    {"The manager said that she would review the report on Monday.",
     "det the>manager; subj manager>said; subj she>review; obj review>report; det the#2>report; pobj on>monday; "
     "coref she>manager"},
    {"When the program crashed, the developer read the logs.",
     "det the>program; subj program>crashed; det the#2>developer; subj developer>read; obj read>logs; det the#3>logs"},
    {"The students asked their teacher about the exam.",
     "det the>students; subj students>asked; obj asked>teacher; coref their>students; pobj about>exam; det the#2>exam"},
    {"The teacher gave the students a difficult exam.",
     "det the>teacher; subj teacher>gave; obj gave>exam; det the#2>students; det a>exam"},
    {"We took the train from Paris to Berlin.",
     "subj we>took; obj took>train; det the>train; pobj from>paris; pobj to>berlin"},
    {"The pilot landed the plane safely in the fog.",
     "det the>pilot; subj pilot>landed; obj landed>plane; det the#2>plane; pobj in>fog; det the#3>fog"},
    {"The tourists lost their passports at the airport.", "det the>tourists; subj tourists>lost; obj lost>passports; "
                                                          "coref their>tourists; pobj at>airport; det the#2>airport"},
    {"John missed his flight because he overslept.",
     "subj john>missed; obj missed>flight; coref his>john; coref he>john; subj he>overslept"},
    {"Mary told her brother that he should call their mother.",
     "subj mary>told; obj told>brother; coref her>mary; coref he>brother; subj he>call; obj call>mother"},
    {"The goalkeeper caught the ball with both hands.",
     "det the>goalkeeper; subj goalkeeper>caught; obj caught>ball; det the#2>ball; pobj with>hands"},
    {"Our team won the final match of the season.",
     "subj team>won; obj won>match; det the>match; pobj of>season; det the#2>season"},
    {"The runner crossed the line and raised her arms.",
     "det the>runner; subj runner>crossed; obj crossed>line; det the#2>line; obj raised>arms; coref her>runner"},
    {"A man is playing a guitar on the stage.",
     "det a>man; subj man>playing; obj playing>guitar; det a#2>guitar; pobj on>stage; det the>stage"},
    {"Someone plays the guitar in front of a crowd.",
     "subj someone>plays; obj plays>guitar; det the>guitar; det a>crowd; pobj of>crowd"},
    {"The orchestra performed a new symphony last night.",
     "det the>orchestra; subj orchestra>performed; obj performed>symphony; det a>symphony"},
    {"The singer thanked the audience after her last song.",
     "det the>singer; subj singer>thanked; obj thanked>audience; det the#2>audience; pobj after>song; "
     "coref her>singer"},
    {"The scientists measured the temperature of the water.",
     "det the>scientists; subj scientists>measured; obj measured>temperature; det the#2>temperature; pobj of>water; "
     "det the#3>water"},
    {"A small robot explored the surface of the planet.",
     "det a>robot; subj robot>explored; obj explored>surface; det the>surface; pobj of>planet; det the#2>planet"},
    {"The doctor examined the patient and wrote a prescription.",
     "det the>doctor; subj doctor>examined; obj examined>patient; det the#2>patient; obj wrote>prescription; "
     "det a>prescription"},
    {"The nurse helped the patient because he could not walk.",
     "det the>nurse; subj nurse>helped; obj helped>patient; det the#2>patient; coref he>patient; subj he>walk"},
    {"The city council approved the new budget yesterday.",
     "det the>council; subj council>approved; obj approved>budget; det the#2>budget"},
    {"The mayor criticised the council for its decision.",
     "det the>mayor; subj mayor>criticised; obj criticised>council; det the#2>council; pobj for>decision; "
     "coref its>council"},
    {"Anna lent Peter her bicycle, but he never returned it.",
     "subj anna>lent; coref her>anna; coref he>peter; subj he>returned; obj returned>it; coref it>bicycle"},
    {"The company hired three engineers from the university.",
     "det the>company; subj company>hired; obj hired>engineers; pobj from>university; det the#2>university"},
    {"The book on the table belongs to my sister.",
     "det the>book; pobj on>table; det the#2>table; subj book>belongs; pobj to>sister"},
};

static const char *const KIND_NAMES[LAB_PAIR_KINDS] = {"det", "subj", "obj", "pobj", "coref"};

int64_t lab_corpus_size(void) { return (int64_t)(sizeof SENTENCES / sizeof SENTENCES[0]); }

const char *lab_corpus_text(int64_t i) { return SENTENCES[i].text; }

const char *lab_pair_kind_name(int kind) { return kind >= 0 && kind < LAB_PAIR_KINDS ? KIND_NAMES[kind] : "?"; }

/* The index of the occurrence-th (1-based) word equal to `word`, or -1. */
static int64_t word_index(const lab_sentence *s, const char *word, int occurrence)
{
    for (int64_t w = 0; w < s->n_words; w++)
        if (strcmp(s->words[w], word) == 0 && --occurrence == 0) return w;
    return -1;
}

/* "word" or "word#k" into its word index. */
static mha_status resolve(const lab_sentence *s, const char *spec, int64_t *index, int64_t sentence)
{
    char word[LAB_WORD_BYTES];
    int occurrence = 1;
    const char *hash = strchr(spec, '#');
    size_t len = hash ? (size_t)(hash - spec) : strlen(spec);
    if (hash) occurrence = atoi(hash + 1);
    if (len == 0 || len >= sizeof word || occurrence < 1)
        return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: \"%s\" is not word or word#k", (long long)sentence, spec);
    memcpy(word, spec, len);
    word[len] = '\0';
    *index = word_index(s, word, occurrence);
    if (*index < 0)
        return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld (\"%s\") has no word \"%s\"", (long long)sentence, s->text,
                        spec);
    return MHA_OK;
}

/* One "kind from>to" item. */
static mha_status parse_pair(const lab_sentence *s, char *item, int64_t sentence, lab_pair *p)
{
    char kind[16], from[LAB_WORD_BYTES], to[LAB_WORD_BYTES];
    if (sscanf(item, " %15s %47[^>]>%47s", kind, from, to) != 3)
        return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: \"%s\" is not \"kind from>to\"", (long long)sentence,
                        item);
    p->kind = -1;
    for (int k = 0; k < LAB_PAIR_KINDS; k++)
        if (strcmp(kind, KIND_NAMES[k]) == 0) p->kind = k;
    if (p->kind < 0)
        return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: unknown kind \"%s\"", (long long)sentence, kind);
    p->sentence = sentence;
    mha_status st = resolve(s, from, &p->from, sentence);
    return st == MHA_OK ? resolve(s, to, &p->to, sentence) : st;
}

mha_status lab_sentence_make(const lab_vocab *vocab, const char *text, const char *pairs, int64_t index,
                             lab_sentence *s, lab_pair *out, int64_t capacity, int64_t *n_pairs)
{
    memset(s, 0, sizeof *s);
    s->text = text;
    s->length = lab_tokenize(vocab, text, LAB_MAX_TOKENS, s->ids, s->word_of, s->words, &s->n_words);
    if (s->length < 0) return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: cannot tokenize", (long long)index);
    *n_pairs = 0;
    if (!pairs) return MHA_OK;
    char item[160];
    for (const char *at = pairs; *at;) {
        size_t len = strcspn(at, ";");
        if (len >= sizeof item)
            return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: a pair of %zu bytes", (long long)index, len);
        if (*n_pairs == capacity)
            return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld: more than %lld labelled pairs", (long long)index,
                            (long long)capacity);
        memcpy(item, at, len);
        item[len] = '\0';
        mha_status st = parse_pair(s, item, index, &out[*n_pairs]);
        if (st != MHA_OK) return st;
        (*n_pairs)++;
        at += len + (at[len] == ';');
    }
    return MHA_OK;
}

mha_status lab_corpus_load(const lab_vocab *vocab, lab_corpus *c)
{
    int64_t n = lab_corpus_size();
    c->n = n;
    c->sentences = calloc((size_t)n, sizeof *c->sentences);
    c->pairs = calloc((size_t)(n * LAB_MAX_PAIRS), sizeof *c->pairs);
    c->n_pairs = 0;
    if (!c->sentences || !c->pairs) return MHA_ERR_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        int64_t got = 0;
        mha_status st = lab_sentence_make(vocab, SENTENCES[i].text, SENTENCES[i].pairs, i, &c->sentences[i],
                                          c->pairs + c->n_pairs, LAB_MAX_PAIRS, &got);
        if (st != MHA_OK) return st;
        c->n_pairs += got;
    }
    return MHA_OK;
}

void lab_corpus_free(lab_corpus *c)
{
    free(c->sentences);
    free(c->pairs);
    c->sentences = NULL, c->pairs = NULL;
}
