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

/* ---- the page ------------------------------------------------------ */

/* The page's head, the model described, the summary and the loss curve. */
static void write_intro(FILE *f, const lab_report *r)
{
    const lab_config *c = &r->config;
    int64_t L = c->layers, H = c->heads;
    fprintf(f,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            "content=\"width=device-width, initial-scale=1\"><title>libmha head lab</title><style>%s</style>"
            "</head><body>\n",
            lab_report_style);
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
        lab_svg_chart(f, &(lab_chart){{r->curve, NULL},
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
    lab_colour_scale_svg(f);
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
    lab_svg_chart(f, &(lab_chart){{r->prune_important, r->prune_random},
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
