/*
 * report_text.c -- the report of the pretrained model's heads: one
 * self-contained HTML file (inline CSS, SVG and script; nothing fetched),
 * as the toy lab's report is, and the plain-text summary printed on the
 * terminal.  The layer x head grid coloured by role, the relation table,
 * every head's map on sample sentences with the tokens as labels, and the
 * pruning curves.
 */
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The CSS class and colour of each role lab_text_role names. */
static const struct {
    const char *role, *css, *colour;
} ROLES[] = {
    {"previous token", "prev", "#d6e6ff"}, {"next token", "next", "#d6f5d6"},   {"[SEP] sink", "sep", "#f5d6f0"},
    {"[CLS] sink", "cls", "#fff0c2"},      {"punctuation", "punct", "#ffd9c2"}, {"self", "self", "#e0d6ff"},
    {"same word", "word", "#c2f0f0"},      {"broad", "broad", "#e8e8e8"},       {"local", "local", "#d9ecc4"},
    {"mixed", "mixed", "#ffffff"},
};

static const char *role_css(const char *role)
{
    for (size_t i = 0; i < sizeof ROLES / sizeof ROLES[0]; i++)
        if (strcmp(ROLES[i].role, role) == 0) return ROLES[i].css;
    return "mixed";
}

/* HTML-escaped text (tokens may hold <, > or &). */
static void put_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

/* The same inside a JavaScript string literal in a <script>. */
static void put_js_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if (*s == '<') fputs("\\u003c", f);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void write_intro(FILE *f, const lab_text_report *r)
{
    fprintf(
        f,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
        "content=\"width=device-width, initial-scale=1\"><title>What a pretrained model's heads do</title><style>%s",
        lab_report_style);
    for (size_t i = 0; i < sizeof ROLES / sizeof ROLES[0]; i++)
        fprintf(f, ".r-%s{background:%s}", ROLES[i].css, ROLES[i].colour);
    fprintf(f, "</style></head><body><h1>What a pretrained model's heads do</h1>");
    fprintf(f,
            "<p class=\"note\">%s: %lld layers of %lld heads (width %lld, head width %lld), its attention computed "
            "by libmha's layers, on %lld sentences written for this project (%lld labelled word pairs). Every "
            "figure below comes from this run.</p><pre>",
            r->model_name, (long long)r->config.layers, (long long)r->config.heads, (long long)r->config.embed_dim,
            (long long)(r->config.embed_dim / r->config.heads), (long long)r->corpus->n, (long long)r->corpus->n_pairs);
    put_escaped(f, r->summary);
    fprintf(f, "</pre>\n");
}

static const char *const DEFINITIONS[][2] = {
    {"previous token", "attention from each token to the one before it, averaged over every token of every sentence"},
    {"next token", "the same to the token after it"},
    {"[CLS] sink / [SEP] sink", "attention to the sentence's first ([CLS]) or last ([SEP]) token"},
    {"punctuation", "attention to the punctuation marks"},
    {"self", "attention from a token to itself"},
    {"same word", "from a piece of a word split by WordPiece to its other pieces (tokens of one-piece words left out)"},
    {"broad", "the entropy of a row over log(length): 1 is even attention to every token"},
    {"local", "the mean distance |i - j| weighted by attention is at most 1.5 tokens"},
    {"role",
     "the first of previous, next, [SEP], [CLS], punctuation, self, same word at 0.5 or more; else broad (0.7); "
     "else local; else mixed"},
};

static void write_grid(FILE *f, const lab_text_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads;
    fprintf(f, "<h2>What each head does</h2><div class=\"side\"><div class=\"scroll\"><table><tr><th>layer</th>");
    for (int64_t h = 0; h < H; h++) fprintf(f, "<th>head %lld</th>", (long long)h);
    fprintf(f, "</tr>");
    for (int64_t l = 0; l < L; l++) {
        fprintf(f, "<tr><th>%lld</th>", (long long)l);
        for (int64_t h = 0; h < H; h++) {
            const lab_text_scores *s = &r->scores[l * H + h];
            const char *role = lab_text_role(s);
            fprintf(f,
                    "<td class=\"r-%s\" title=\"prev %.2f, next %.2f, self %.2f, [CLS] %.2f, [SEP] %.2f, punct %.2f, "
                    "same word %.2f, entropy %.2f, distance %.1f, importance %.4f\">%s</td>",
                    role_css(role), s->previous, s->next, s->self, s->cls, s->sep, s->punct, s->same_word, s->entropy,
                    s->distance, r->pruning->importance[l * H + h], role);
        }
        fprintf(f, "</tr>");
    }
    fprintf(f, "</table></div><dl class=\"defs\">");
    for (size_t i = 0; i < sizeof DEFINITIONS / sizeof DEFINITIONS[0]; i++)
        fprintf(f, "<dt>%s</dt><dd>%s</dd>", DEFINITIONS[i][0], DEFINITIONS[i][1]);
    fprintf(f, "</dl></div><p class=\"note\">Hover a cell for the head's scores and its importance (the quality lost "
               "when it alone is removed).</p>\n");
}

static void write_relations(FILE *f, const lab_text_report *r)
{
    int64_t LH = r->config.layers * r->config.heads, H = r->config.heads;
    fprintf(f, "<h2>Heads that follow grammar</h2><p class=\"note\">For each labelled pair, the word a head attends "
               "to most from the pair's first word (attention from a word: the mean over its tokens; to a word: the "
               "sum over its tokens; [CLS], [SEP] and the word itself left out). A head's accuracy is how often that "
               "word is the pair's second. The baseline knows only positions: the best fixed offset for the "
               "relation (the word k places on).</p><div class=\"scroll\"><table><tr><th>relation</th><th>pairs</th>"
               "<th>best head</th><th>its accuracy</th><th>baseline (offset)</th><th>next best heads</th></tr>");
    for (int rel = 0; rel < LAB_RELATIONS; rel++) {
        const double *acc = r->relation_accuracy + rel * LH;
        int64_t top[3] = {-1, -1, -1};
        for (int64_t k = 0; k < LH; k++)
            for (int t = 0; t < 3; t++)
                if (top[t] < 0 || acc[k] > acc[top[t]]) {
                    for (int u = 2; u > t; u--) top[u] = top[u - 1];
                    top[t] = k;
                    break;
                }
        fprintf(f,
                "<tr><td>%s</td><td>%lld</td><td>%lld-%lld</td><td>%.2f</td><td>%.2f (%+d)</td><td>%lld-%lld "
                "(%.2f), %lld-%lld (%.2f)</td></tr>",
                lab_relation_name(rel), (long long)lab_relation_pairs(r->corpus, rel), (long long)(top[0] / H),
                (long long)(top[0] % H), acc[top[0]], r->baseline[rel], r->baseline_offset[rel],
                (long long)(top[1] / H), (long long)(top[1] % H), acc[top[1]], (long long)(top[2] / H),
                (long long)(top[2] % H), acc[top[2]]);
    }
    fprintf(f, "</table></div><p class=\"note\">Heads are named layer-head.</p>\n");
}

static void write_maps(FILE *f, const lab_text_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads;
    fprintf(f, "<h2>Attention on sample sentences</h2><p class=\"note\">Row i is where token i looks, column j the "
               "token it looks at; darker is more weight (each row sums to 1). Hover a cell for its weight.</p>");
    lab_colour_scale_svg(f);
    for (int64_t s = 0; s < r->n_samples; s++) {
        fprintf(f, "<h3>\"");
        put_escaped(f, r->corpus->sentences[r->samples[s]].text);
        fprintf(f, "\"</h3><div class=\"grid\">");
        for (int64_t lh = 0; lh < L * H; lh++)
            fprintf(f, "<div class=\"map\"><b>%lld-%lld</b> %s<canvas id=\"s%lld_%lld\"></canvas></div>",
                    (long long)(lh / H), (long long)(lh % H), lab_text_role(&r->scores[lh]), (long long)s,
                    (long long)lh);
        fprintf(f, "</div>\n");
    }
}

static void write_pruning(FILE *f, const lab_text_report *r)
{
    int64_t n = r->config.layers * r->config.heads;
    fprintf(f,
            "<h2>Which heads can go</h2><p class=\"note\">Quality: the Pearson correlation between the pruned "
            "model's cosine similarities of every pair of the %lld sentences and the whole model's (1 with nothing "
            "removed). Heads are removed (their output projection's columns set to zero) least important first, "
            "importance being the quality lost when the head alone is removed, and in %d random orders "
            "(their mean). %lld of %lld heads (%.0f%%) go before quality falls below %.2f.</p>",
            (long long)r->corpus->n, LAB_RANDOM_ORDERS, (long long)r->pruning->removable, (long long)n,
            100.0 * (double)r->pruning->removable / (double)n, 1 - LAB_QUALITY_LOSS);
    lab_svg_chart(f, &(lab_chart){{r->pruning->by_importance, r->pruning->by_random},
                                  {"least important first", "random order"},
                                  n + 1,
                                  0,
                                  "heads removed",
                                  "quality (similarity correlation)",
                                  "quality against heads removed"});
}

/* The maps, tokens and sizes the script draws from. */
static void write_data(FILE *f, const lab_text_report *r)
{
    fprintf(f, "<script>const L=%lld,H=%lld,samples=[", (long long)r->config.layers, (long long)r->config.heads);
    for (int64_t s = 0; s < r->n_samples; s++) {
        const lab_sentence *sen = &r->corpus->sentences[r->samples[s]];
        int64_t T = sen->length;
        fprintf(f, "{T:%lld,tokens:[", (long long)T);
        for (int64_t t = 0; t < T; t++) {
            put_js_string(f, lab_vocab_token(r->vocab, sen->ids[t]));
            fputc(t + 1 < T ? ',' : ']', f);
        }
        fprintf(f, ",maps:[");
        const lab_attention *a = r->attn;
        for (int64_t lh = 0; lh < a->L * a->H; lh++) {
            const float *m = a->attn + ((lh / a->H * a->B + r->samples[s]) * a->H + lh % a->H) * a->T * a->T;
            for (int64_t i = 0; i < T; i++)
                for (int64_t j = 0; j < T; j++) fprintf(f, "%s%.3g", lh || i || j ? "," : "", m[i * a->T + j]);
        }
        fprintf(f, "]}%s", s + 1 < r->n_samples ? "," : "");
    }
    fprintf(f, "];\n");
}

static const char *SCRIPT =
    "function shade(w){const t=Math.sqrt(Math.max(0,Math.min(1,w)));"
    "return `rgb(${255-230*t},${255-200*t},${255-90*t})`;}\n"
    "function draw(s,lh){const S=samples[s],T=S.T,C=14,M=64,cv=document.getElementById(`s${s}_${lh}`),"
    "g=cv.getContext('2d');\n"
    " cv.width=M+T*C+4;cv.height=M+T*C+4;g.fillStyle='#fff';g.fillRect(0,0,cv.width,cv.height);\n"
    " g.font='9px sans-serif';g.fillStyle='#444';\n"
    " for(let t=0;t<T;t++){g.save();g.translate(M+t*C+C/2+3,M-3);g.rotate(-Math.PI/2);g.textAlign='left';"
    "g.fillText(S.tokens[t],0,0);g.restore();g.textAlign='right';g.fillText(S.tokens[t],M-3,M+t*C+C/2+3);}\n"
    " const at=(i,j)=>S.maps[(lh*T+i)*T+j];\n"
    " for(let i=0;i<T;i++)for(let j=0;j<T;j++){g.fillStyle=shade(at(i,j));g.fillRect(M+j*C,M+i*C,C,C);}\n"
    " g.strokeStyle='#bbb';g.strokeRect(M-0.5,M-0.5,T*C+1,T*C+1);\n"
    " cv.addEventListener('mousemove',e=>{const k=cv.width/cv.clientWidth,i=Math.floor((e.offsetY*k-M)/C),"
    "j=Math.floor((e.offsetX*k-M)/C);\n"
    "  if(i>=0&&j>=0&&i<T&&j<T)cv.title=`from ${S.tokens[i]} to ${S.tokens[j]}: ${at(i,j).toFixed(3)}`;});}\n"
    "for(let s=0;s<samples.length;s++)for(let lh=0;lh<L*H;lh++)draw(s,lh);\n"
    "const done=document.createElement('div');done.id='rendered';done.hidden=true;document.body.appendChild(done);\n"
    "</script></body></html>\n";

int lab_text_report_write(const char *path, const lab_text_report *r)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    write_intro(f, r);
    write_grid(f, r);
    write_relations(f, r);
    write_maps(f, r);
    write_pruning(f, r);
    write_data(f, r);
    fputs(SCRIPT, f);
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- the summary --------------------------------------------------- */

static int role_counts(char *out, size_t size, const lab_text_report *r)
{
    int64_t LH = r->config.layers * r->config.heads;
    int n = snprintf(out, size, "roles:");
    for (size_t k = 0; k < sizeof ROLES / sizeof ROLES[0]; k++) {
        int64_t c = 0;
        for (int64_t lh = 0; lh < LH; lh++) c += strcmp(lab_text_role(&r->scores[lh]), ROLES[k].role) == 0;
        if (c)
            n += snprintf(out + n, size > (size_t)n ? size - (size_t)n : 0, " %s %lld,", ROLES[k].role, (long long)c);
    }
    if (n > 0 && (size_t)n < size && out[n - 1] == ',') out[--n] = '\0';
    return n;
}

int lab_text_summary(char *out, size_t size, const lab_text_report *r)
{
    int64_t LH = r->config.layers * r->config.heads, H = r->config.heads;
    int n = snprintf(out, size, "%s: %lld layers x %lld heads on %lld sentences (%lld labelled pairs)\n", r->model_name,
                     (long long)r->config.layers, (long long)H, (long long)r->corpus->n, (long long)r->corpus->n_pairs);
    n += role_counts(out + n, size > (size_t)n ? size - (size_t)n : 0, r);
    n += snprintf(out + n, size > (size_t)n ? size - (size_t)n : 0,
                  "\nrelations (best head: accuracy vs the "
                  "position-only baseline):\n");
    for (int rel = 0; rel < LAB_RELATIONS; rel++) {
        const double *acc = r->relation_accuracy + rel * LH;
        int64_t best = 0;
        for (int64_t k = 1; k < LH; k++) best = acc[k] > acc[best] ? k : best;
        n += snprintf(out + n, size > (size_t)n ? size - (size_t)n : 0,
                      "  %-22s head %lld-%-2lld %.2f   baseline %.2f (offset %+d)   %+.2f\n", lab_relation_name(rel),
                      (long long)(best / H), (long long)(best % H), acc[best], r->baseline[rel],
                      r->baseline_offset[rel], acc[best] - r->baseline[rel]);
    }
    const lab_text_pruning *p = r->pruning;
    int64_t half = LH / 2;
    n += snprintf(out + n, size > (size_t)n ? size - (size_t)n : 0,
                  "pruning: %lld of %lld heads (%.0f%%) go at %.0f%% loss of quality; with %lld removed, quality "
                  "%.3f least important first, %.3f in random orders\n",
                  (long long)p->removable, (long long)LH, 100.0 * (double)p->removable / (double)LH,
                  100 * LAB_QUALITY_LOSS, (long long)half, p->by_importance[half], p->by_random[half]);
    return n;
}
