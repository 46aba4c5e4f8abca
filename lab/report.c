/*
 * report.c -- the lab's report: one self-contained HTML file (inline CSS,
 * SVG and a small script; nothing fetched) that reads at a laptop's width
 * and a phone's, and the plain-text summary.  The per-head PNGs are
 * picture.c's.
 */
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- charts -------------------------------------------------------- */

/* A line chart of one or two series; point i is at x0 + i. */
typedef struct chart {
    const double *y[2]; /* y[1] may be NULL */
    const char *name[2];
    int64_t n;
    double x0;
    const char *xtitle, *ytitle, *label; /* label: what the chart shows, for screen readers */
} chart;

static const char *const SERIES_COLOUR[2] = {"#1f4e9c", "#c0392b"};

/* A tick spacing of 1, 2 or 5 times a power of ten giving about `want`
 * ticks over span. */
static double tick_step(double span, int want)
{
    double raw = span / want, p = pow(10, floor(log10(raw))), m = raw / p;
    return p * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
}

/* The plot area inside the chart's 640 x 300 box: room on the left for the
 * y ticks and title, on top for the legend, below for the x ticks and
 * title. */
enum { CW = 640, CH = 300, PL = 70, PR = 16, PT = 34, PB = 52 };

typedef struct scale {
    double lo, hi, step;
} scale;

static double sx(const scale *s, double v) { return PL + (CW - PL - PR) * (v - s->lo) / (s->hi - s->lo); }
static double sy(const scale *s, double v) { return PT + (CH - PT - PB) * (1 - (v - s->lo) / (s->hi - s->lo)); }

static scale y_scale(const chart *c)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int s = 0; s < 2 && c->y[s]; s++)
        for (int64_t i = 0; i < c->n; i++) lo = fmin(lo, c->y[s][i]), hi = fmax(hi, c->y[s][i]);
    if (!(hi > lo)) lo -= 0.5, hi += 0.5;
    double step = tick_step(hi - lo, 5);
    return (scale){floor(lo / step) * step, ceil(hi / step) * step, step};
}

static scale x_scale(const chart *c)
{
    double lo = c->x0, hi = c->x0 + (double)(c->n > 1 ? c->n - 1 : 1), step = fmax(1, tick_step(hi - lo, 8));
    return (scale){lo, hi, step};
}

/* Grid lines, tick labels and the axis titles. */
static void chart_axes(FILE *f, const chart *c, const scale *xs, const scale *ys)
{
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#fcfcfc\" stroke=\"#bbb\"/>", PL, PT,
            CW - PL - PR, CH - PT - PB);
    for (double v = ys->lo; v <= ys->hi + ys->step / 2; v += ys->step)
        fprintf(f,
                "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/><text x=\"%d\" y=\"%.1f\" "
                "text-anchor=\"end\" dominant-baseline=\"middle\">%g</text>",
                PL, CW - PR, sy(ys, v), sy(ys, v), PL - 6, sy(ys, v), fabs(v) < ys->step / 1e6 ? 0 : v);
    double first = ceil(xs->lo / xs->step) * xs->step;
    for (double v = first; v <= xs->hi + xs->step / 1e6; v += xs->step)
        fprintf(f,
                "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#888\"/><text x=\"%.1f\" y=\"%d\" "
                "text-anchor=\"middle\">%g</text>",
                sx(xs, v), sx(xs, v), CH - PB, CH - PB + 5, sx(xs, v), CH - PB + 20, v);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" class=\"axis\">%s</text>", PL + (CW - PL - PR) / 2,
            CH - 8, c->xtitle);
    fprintf(f, "<text transform=\"translate(16 %d) rotate(-90)\" text-anchor=\"middle\" class=\"axis\">%s</text>",
            PT + (CH - PT - PB) / 2, c->ytitle);
}

/* The series, and their legend in the band above the plot (never over a
 * line). */
static void chart_lines(FILE *f, const chart *c, const scale *xs, const scale *ys)
{
    int legend_x = PL;
    for (int s = 0; s < 2 && c->y[s]; s++) {
        fprintf(f, "<polyline class=\"series\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"",
                SERIES_COLOUR[s]);
        for (int64_t i = 0; i < c->n; i++) fprintf(f, "%.1f,%.1f ", sx(xs, c->x0 + (double)i), sy(ys, c->y[s][i]));
        fprintf(f, "\"/>");
        fprintf(f,
                "<line x1=\"%d\" x2=\"%d\" y1=\"14\" y2=\"14\" stroke=\"%s\" stroke-width=\"3\"/><text x=\"%d\" "
                "y=\"14\" dominant-baseline=\"middle\" class=\"legend\">%s</text>",
                legend_x, legend_x + 22, SERIES_COLOUR[s], legend_x + 28, c->name[s]);
        legend_x += 28 + 8 * (int)strlen(c->name[s]) + 24;
    }
}

static void svg_chart(FILE *f, const chart *c)
{
    scale xs = x_scale(c), ys = y_scale(c);
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" class=\"chart\" role=\"img\" aria-label=\"%s\">", CW, CH, c->label);
    chart_axes(f, c, &xs, &ys);
    chart_lines(f, c, &xs, &ys);
    fprintf(f, "</svg>\n");
}

/* ---- the page ------------------------------------------------------ */

static const char *STYLE =
    "body{font-family:sans-serif;margin:16px auto;padding:0 12px;max-width:1200px;color:#222;line-height:1.4}"
    "h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px}"
    ".chart{width:100%;max-width:640px;height:auto;font-size:13px}.chart .axis{font-size:14px;fill:#333}"
    ".chart .legend{font-size:13px}"
    ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f0f0f0}"
    ".role-induction{background:#d6f5d6}.role-previous-token{background:#d6e6ff}"
    ".role-duplicate-token{background:#fff0c2}.role-first-token{background:#f5d6f0}.role-positional{background:#e8e8e8}"
    ".side{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}.side>*{min-width:0}"
    "dl.defs{font-size:13px;flex:1 1 300px;max-width:520px;margin:0}dl.defs dt{font-weight:bold;margin-top:6px}dl.defs "
    "dd{margin:0}"
    ".grid{display:flex;flex-wrap:wrap;gap:14px}.map{font-size:12px;max-width:100%}"
    ".map canvas{display:block;max-width:100%;height:auto;image-rendering:pixelated}"
    "pre{background:#f6f6f6;padding:10px;white-space:pre-wrap;overflow-wrap:anywhere}"
    ".tok{display:inline-block;min-width:18px;text-align:center;font-size:11px;border:1px solid #eee;margin:1px}"
    ".tok.copy{border-color:#e67800}.tok.first{border-color:#e6b870}#rows{overflow-x:auto}"
    ".rowline{white-space:nowrap}.note{font-size:13px;color:#444;max-width:760px}";

/* The page's head, the model described, the summary and the loss curve. */
static void write_intro(FILE *f, const lab_report *r)
{
    const lab_config *c = &r->config;
    int64_t L = c->layers, H = c->heads;
    fprintf(f,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            "content=\"width=device-width, initial-scale=1\"><title>libmha head lab</title><style>%s</style>"
            "</head><body>\n",
            STYLE);
    fprintf(f,
            "<h1>What the heads learned</h1><p>A%s transformer: %lld layers x %lld heads (%lld kv heads), width "
            "%lld, context %lld, vocabulary %lld%s, trained for %lld steps on %s with libmha's own gradients.</p>\n",
            c->mlp ? " pre-norm" : "n attention-only", (long long)L, (long long)H,
            (long long)(c->kv_heads ? c->kv_heads : H), (long long)c->embed_dim, (long long)c->context,
            (long long)c->vocab, c->tied ? ", tied unembedding" : "", (long long)r->steps,
            r->text ? "character-level text" : "repeated random spans");
    fprintf(f, "<h2>Summary</h2><pre>%s</pre>\n", r->summary);
    if (r->curve_len > 0) {
        fprintf(f, "<h2>Training</h2><p class=\"note\">Cross-entropy of the next token on each step's batch.</p>");
        svg_chart(f, &(chart){{r->curve, NULL},
                              {"training loss", NULL},
                              r->curve_len,
                              1,
                              "training step",
                              "loss (nats)",
                              "training loss by step"});
    }
}

/* What each column of the head table means, one line each. */
static void write_definitions(FILE *f)
{
    static const char *const defs[][2] = {
        {"previous-token", "mean attention from each position to the one just before it"},
        {"induction", "in the repeat, attention from a token to the token after its earlier copy"},
        {"duplicate", "in the repeat, attention from a token to its earlier copy itself"},
        {"first-token", "mean attention to position 0 (a \"sink\" a head parks on when it has nothing to do)"},
        {"distance", "mean |query - key| position gap, weighted by attention: small is local, large is far"},
        {"entropy", "mean entropy of a row in nats: 0 looks at one key, ln(i+1) spreads evenly"},
        {"importance", "how much the held-out loss depends on the head: |dL/dgate| on its output (Michel et al. 2019)"},
        {"role", "the score that stands out, by the thresholds in docs/HEADS.md; mixed if none does"},
    };
    fprintf(f, "<dl class=\"defs\">");
    for (size_t i = 0; i < sizeof defs / sizeof defs[0]; i++)
        fprintf(f, "<dt>%s</dt><dd>%s</dd>", defs[i][0], defs[i][1]);
    fprintf(f, "</dl>");
}

/* The table of every head's scores and role, its columns explained
 * beside it. */
static void write_table(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads;
    fprintf(f, "<h2>Every head</h2><div class=\"side\"><div class=\"scroll\"><table><tr><th>layer</th><th>head</th>"
               "<th>previous-token</th><th>induction</th><th>duplicate</th><th>first-token</th><th>distance</th>"
               "<th>entropy</th><th>importance</th><th>role</th></tr>\n");
    for (int64_t i = 0; i < L * H; i++) {
        const lab_head_scores *s = &r->scores[i];
        const char *role = lab_head_role(s);
        char css[32], importance[32] = "-";
        snprintf(css, sizeof css, "%.*s", (int)strcspn(role, " "), role); /* "positional (local)" -> "positional" */
        if (r->importance) snprintf(importance, sizeof importance, "%.4f", r->importance[i]);
        fprintf(f,
                "<tr class=\"role-%s\"><td>%lld</td><td>%lld</td><td>%.3f</td><td>%.3f</td><td>%.3f</td>"
                "<td>%.3f</td><td>%.2f</td><td>%.3f</td><td>%s</td><td>%s</td></tr>\n",
                css, (long long)(i / H), (long long)(i % H), s->previous_token, s->induction, s->duplicate,
                s->first_token, s->distance, s->entropy, importance, role);
    }
    fprintf(f, "</table></div>");
    write_definitions(f);
    fprintf(f, "</div>\n");
}

/* The colour scale the maps share: weight 0 .. 1 on the square-root
 * scale the maps use, with ticks. */
static void write_colour_scale(FILE *f)
{
    fprintf(f, "<svg viewBox=\"0 0 360 44\" class=\"chart\" style=\"max-width:360px\" role=\"img\" "
               "aria-label=\"colour scale\"><defs><linearGradient id=\"cs\">");
    for (int k = 0; k <= 10; k++) {
        double t = k / 10.0; /* position on the bar = sqrt(weight) */
        unsigned char c[3];
        lab_weight_colour((float)(t * t), c);
        fprintf(f, "<stop offset=\"%g\" stop-color=\"rgb(%d,%d,%d)\"/>", t, c[0], c[1], c[2]);
    }
    fprintf(f, "</linearGradient></defs><rect x=\"10\" y=\"4\" width=\"300\" height=\"14\" fill=\"url(#cs)\" "
               "stroke=\"#aaa\"/>");
    for (int i = 0; i < LAB_SCALE_TICKS; i++) {
        double x = 10 + 300 * sqrt(lab_scale_ticks[i]);
        fprintf(f,
                "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"18\" y2=\"23\" stroke=\"#555\"/><text x=\"%.1f\" y=\"36\" "
                "text-anchor=\"middle\">%g</text>",
                x, x, x, lab_scale_ticks[i]);
    }
    fprintf(f, "<text x=\"318\" y=\"15\">weight</text></svg>\n");
}

/* A canvas per head for the sample's maps (the script draws them), and
 * the position picker. */
static void write_maps(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads, T = r->sample_len;
    fprintf(f, "<h2>Attention on a sample sequence</h2><p class=\"note\">Each map is one head on one held-out "
               "sequence: row i is where the token at query position i looks, column j the key position it looks "
               "at; darker is more weight (each row sums to 1). Labels are position:token. Hover a cell for its "
               "weight; pick a position below to see where every head looks from it.</p>");
    if (r->repeat_start > 0)
        fprintf(f,
                "<p class=\"note\">The dashed orange lines mark position %lld, where the repeat starts: positions "
                "%lld..%lld copy %lld..%lld. A previous-token head is the diagonal just below the main one; an "
                "induction head, inside the repeat, is a diagonal %lld positions back: the token after the earlier "
                "copy of the current one.</p>",
                (long long)r->repeat_start, (long long)r->repeat_start,
                (long long)(r->repeat_start + r->repeat_len - 1), (long long)(r->repeat_start - r->repeat_len),
                (long long)(r->repeat_start - 1), (long long)(r->repeat_len - 1));
    write_colour_scale(f);
    fprintf(f, "<div id=\"tokens\"></div>\n");
    for (int64_t l = 0; l < L; l++) {
        fprintf(f, "<h3>Layer %lld</h3><div class=\"grid\">", (long long)l);
        for (int64_t h = 0; h < H; h++)
            fprintf(f, "<div class=\"map\"><b>layer %lld, head %lld</b>: %s<canvas id=\"m%lld_%lld\"></canvas></div>",
                    (long long)l, (long long)h, lab_head_role(&r->scores[l * H + h]), (long long)l, (long long)h);
        fprintf(f, "</div>\n");
    }
    fprintf(f,
            "<h3>From one position</h3><label>position <input id=\"pos\" type=\"range\" min=\"0\" max=\"%lld\" "
            "value=\"%lld\"></label> <span id=\"posval\"></span><div id=\"rows\"></div>\n",
            (long long)(T - 1), (long long)(T - 1));
}

/* The pruning curves. */
static void write_pruning(FILE *f, const lab_report *r)
{
    if (!r->prune_len) return;
    fprintf(f, "<h2>Pruning</h2><p class=\"note\">Held-out loss as heads are removed one by one (their output set "
               "to zero), least important first (importance as in the table) and in a random order. The gap between "
               "the curves is what importance knows.</p>");
    svg_chart(f, &(chart){{r->prune_important, r->prune_random},
                          {"least important first", "random order"},
                          r->prune_len,
                          0,
                          "heads removed",
                          "held-out loss (nats)",
                          "held-out loss against heads removed"});
}

/* The grouped-query comparison: what it compares, and the table. */
static void write_gqa(FILE *f, const lab_report *r)
{
    if (!r->gqa_len) return;
    const lab_config *c = &r->config;
    fprintf(f,
            "<h2>Grouped-query attention</h2><p class=\"note\">The same model (layers, width, data, seed) trained "
            "afresh for %lld steps with fewer key/value heads per layer: with g kv heads, each group of %lld/g query "
            "heads shares one key and one value head, so the KV cache a decoder keeps shrinks by %lld/g. "
            "%lld kv heads is plain multi-head attention%s. Loss on the same %d held-out sequences; KV cache bytes "
            "per token = 2 (K and V) x kv heads x head width %lld x 4 bytes x %lld layers.</p>",
            (long long)r->gqa_steps, (long long)c->heads, (long long)c->heads, (long long)c->heads,
            r->gqa_steps == r->steps ? ": the main model above" : " (a model of its own: its steps differ)", LAB_EVAL_B,
            (long long)(c->embed_dim / c->heads), (long long)c->layers);
    fprintf(f, "<div class=\"scroll\"><table id=\"gqa\"><tr><th>kv heads</th><th>held-out loss</th><th>change</th>"
               "<th>KV cache bytes per token</th></tr>");
    for (int64_t i = 0; i < r->gqa_len; i++)
        fprintf(f, "<tr><td>%lld kv head%s</td><td>%.4f</td><td>%+.4f</td><td>%lld</td></tr>",
                (long long)r->gqa_kv_heads[i], r->gqa_kv_heads[i] == 1 ? "" : "s", r->gqa_loss[i],
                r->gqa_loss[i] - r->gqa_loss[0], (long long)r->gqa_kv_bytes[i]);
    fprintf(f, "</table></div>\n");
}

/* The data the script draws from: sizes, the repeat, tokens and maps. */
static void write_data(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads, T = r->sample_len;
    fprintf(f, "<script>\nconst T=%lld,L=%lld,H=%lld,RS=%lld,RL=%lld;\nconst ids=[", (long long)T, (long long)L,
            (long long)H, (long long)r->repeat_start, (long long)r->repeat_len);
    for (int64_t t = 0; t < T; t++) fprintf(f, "%s%d", t ? "," : "", r->sample[t]);
    fprintf(f,
            "];\nconst esc=s=>String(s).replace(/[&<>\"']/g,c=>'&#'+c.charCodeAt(0)+';');\n"
            "const labels=ids.map(c=>%s);\nconst tokens=labels.map(esc);\nconst maps=[",
            r->text ? "c===32?'\\u2423':c===10?'\\u21b5':c<32||c>126?'?':String.fromCharCode(c)" : "c");
    for (int64_t i = 0; i < L * H * T * T; i++) fprintf(f, "%s%.3f", i ? "," : "", r->maps[i]);
    fprintf(f, "];\n");
}

/* Draws each map on its canvas: position:token labels on both axes
 * (columns turned upright, thinned when cells are small), axis titles,
 * the repeat's dashed lines; and the token strip and position picker. */
static const char *SCRIPT =
    "function at(l,h,i,j){return maps[((l*H+h)*T+i)*T+j];}\n"
    "function shade(w){" /* lab_weight_colour's, in the browser */
    "const t=Math.sqrt(Math.max(0,Math.min(1,w)));"
    "return `rgb(${255-230*t},${255-200*t},${255-90*t})`;}\n"
    "const C=T<=40?12:Math.max(3,Math.floor(480/T)),EVERY=Math.max(1,Math.ceil(11/C)),M=62;\n"
    "function drawMap(l,h){const cv=document.getElementById(`m${l}_${h}`),g=cv.getContext('2d');\n"
    " cv.width=M+T*C+4;cv.height=M+T*C+4;g.fillStyle='#fff';g.fillRect(0,0,cv.width,cv.height);\n"
    " g.fillStyle='#333';g.font='bold 10px sans-serif';g.textAlign='center';\n"
    " g.fillText('key position:token',M+T*C/2,11);\n"
    " g.save();g.translate(11,M+T*C/2);g.rotate(-Math.PI/2);g.fillText('query position:token',0,0);g.restore();\n"
    " g.font='9px sans-serif';g.fillStyle='#555';\n"
    " for(let t=0;t<T;t+=EVERY){const s=`${t}:${labels[t]}`;\n"
    "  g.save();g.translate(M+t*C+C/2+3,M-3);g.rotate(-Math.PI/2);g.textAlign='left';g.fillText(s,0,0);g.restore();\n"
    "  g.textAlign='right';g.fillText(s,M-3,M+t*C+C/2+3);}\n"
    " for(let i=0;i<T;i++)for(let j=0;j<T;j++){g.fillStyle=shade(at(l,h,i,j));g.fillRect(M+j*C,M+i*C,C,C);}\n"
    " g.strokeStyle='#bbb';g.strokeRect(M-0.5,M-0.5,T*C+1,T*C+1);\n"
    " if(RS>0){g.strokeStyle='#e67800';g.setLineDash([3,3]);g.beginPath();\n"
    "  g.moveTo(M+RS*C,M);g.lineTo(M+RS*C,M+T*C);g.moveTo(M,M+RS*C);g.lineTo(M+T*C,M+RS*C);g.stroke();}\n"
    " cv.addEventListener('mousemove',e=>{const k=cv.width/cv.clientWidth;\n"
    "  const i=Math.floor((e.offsetY*k-M)/C),j=Math.floor((e.offsetX*k-M)/C);\n"
    "  if(i>=0&&j>=0&&i<T&&j<T)cv.title=`from ${i} (token ${labels[i]}) to ${j} (token ${labels[j]}): "
    "${at(l,h,i,j).toFixed(3)}`;});}\n"
    "for(let l=0;l<L;l++)for(let h=0;h<H;h++)drawMap(l,h);\n"
    "function cls(t){return RS>0&&t>=RS&&t<RS+RL?' copy':RS>0&&t>=RS-RL&&t<RS?' first':'';}\n"
    "document.getElementById('tokens').innerHTML='tokens (hover one for its position; orange: the span and "
    "its repeat): '+tokens.map((t,i)=>`<span class=\"tok${cls(i)}\" title=\"position ${i}\">${t}</span>`).join('');\n"
    "function showRow(){const i=+document.getElementById('pos').value;\n"
    " document.getElementById('posval').textContent=`position ${i}, token ${labels[i]}`;\n"
    " let html='';for(let l=0;l<L;l++)for(let h=0;h<H;h++){html+=`<div class=\"rowline\">layer ${l} head ${h}: `;\n"
    "  for(let j=0;j<=i;j++)html+=`<span class=\"tok\" style=\"background:${shade(at(l,h,i,j))}\">${tokens[j]}"
    "</span>`;html+='</div>';}\n"
    " document.getElementById('rows').innerHTML=html;}\n"
    "document.getElementById('pos').addEventListener('input',showRow);showRow();\n"
    "const done=document.createElement('div');done.id='rendered';done.hidden=true;document.body.appendChild(done);\n"
    "</script></body></html>\n";

int lab_report_write(const char *path, const lab_report *r)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    write_intro(f, r);
    write_table(f, r);
    write_maps(f, r);
    write_pruning(f, r);
    write_gqa(f, r);
    write_data(f, r);
    fputs(SCRIPT, f);
    return fclose(f) == 0 ? 0 : -1;
}
