/*
 * report.c -- the lab's report: one self-contained HTML file (inline CSS,
 * SVG and a small script; nothing fetched), heatmaps as PNG files, and the
 * plain-text summary.
 */
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ---- PNG ----------------------------------------------------------- */

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16), p[2] = (unsigned char)(v >> 8),
    p[3] = (unsigned char)v;
}

static void chunk(FILE *f, const char *type, const unsigned char *data, uint32_t n)
{
    unsigned char len[4], crc[4];
    put32(len, n);
    fwrite(len, 1, 4, f);
    fwrite(type, 1, 4, f);
    if (n) fwrite(data, 1, n, f);
    uLong c = crc32(crc32(0L, Z_NULL, 0), (const Bytef *)type, 4);
    if (n) c = crc32(c, data, n);
    put32(crc, (uint32_t)c);
    fwrite(crc, 1, 4, f);
}

/* The colour of attention weight w in [0, 1]: white to dark blue. */
static void colour(float w, unsigned char *rgb)
{
    float t = w < 0 ? 0 : w > 1 ? 1 : sqrtf(w); /* sqrt: small weights stay visible */
    rgb[0] = (unsigned char)(255 - 230 * t), rgb[1] = (unsigned char)(255 - 200 * t),
    rgb[2] = (unsigned char)(255 - 90 * t);
}

int lab_png_heatmap(const char *path, const float *a, int64_t rows, int64_t cols, int scale)
{
    int64_t W = cols * scale, Hh = rows * scale, stride = 1 + 3 * W;
    unsigned char *raw = malloc((size_t)(stride * Hh));
    if (!raw) return -1;
    for (int64_t y = 0; y < Hh; y++) {
        raw[y * stride] = 0; /* filter: none */
        for (int64_t x = 0; x < W; x++) colour(a[(y / scale) * cols + x / scale], raw + y * stride + 1 + 3 * x);
    }
    uLongf zn = compressBound((uLong)(stride * Hh));
    unsigned char *z = malloc(zn), hdr[13];
    FILE *f = z ? fopen(path, "wb") : NULL;
    int ok = f && compress2(z, &zn, raw, (uLong)(stride * Hh), 9) == Z_OK;
    if (ok) {
        static const unsigned char sig[8] = {137, 'P', 'N', 'G', 13, 10, 26, 10};
        fwrite(sig, 1, 8, f);
        put32(hdr, (uint32_t)W), put32(hdr + 4, (uint32_t)Hh);
        hdr[8] = 8, hdr[9] = 2, hdr[10] = 0, hdr[11] = 0, hdr[12] = 0; /* 8-bit RGB */
        chunk(f, "IHDR", hdr, 13);
        chunk(f, "IDAT", z, (uint32_t)zn);
        chunk(f, "IEND", NULL, 0);
    }
    if (f && fclose(f) != 0) ok = 0;
    free(raw);
    free(z);
    return ok ? 0 : -1;
}

/* ---- HTML ---------------------------------------------------------- */

/* An SVG line chart of one or two series over x = 0 .. n-1. */
static void svg_chart(FILE *f, const double *a, const double *b, int64_t n, const char *label_a, const char *label_b,
                      const char *xlabel)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        lo = fmin(lo, a[i]), hi = fmax(hi, a[i]);
        if (b) lo = fmin(lo, b[i]), hi = fmax(hi, b[i]);
    }
    if (!(hi > lo)) hi = lo + 1;
    const double W = 560, H = 220, L = 50, B = 30;
    fprintf(f,
            "<svg width=\"%g\" height=\"%g\" class=\"chart\"><rect x=\"%g\" y=\"0\" width=\"%g\" height=\"%g\" "
            "fill=\"#fafafa\" stroke=\"#ccc\"/>",
            W, H, L, W - L, H - B);
    fprintf(f, "<text x=\"4\" y=\"12\">%.2f</text><text x=\"4\" y=\"%g\">%.2f</text>", hi, H - B, lo);
    fprintf(f, "<text x=\"%g\" y=\"%g\">%s</text>", L + 4, H - 8, xlabel);
    for (int s = 0; s < (b ? 2 : 1); s++) {
        const double *y = s ? b : a;
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", s ? "#c0392b" : "#1f4e9c");
        for (int64_t i = 0; i < n; i++)
            fprintf(f, "%.1f,%.1f ", L + (W - L) * (n > 1 ? (double)i / (double)(n - 1) : 0.5),
                    (H - B) * (1 - (y[i] - lo) / (hi - lo)));
        fprintf(f, "\"/>");
    }
    fprintf(f, "<text x=\"%g\" y=\"16\" fill=\"#1f4e9c\">%s</text>", W - 230, label_a);
    if (b) fprintf(f, "<text x=\"%g\" y=\"32\" fill=\"#c0392b\">%s</text>", W - 230, label_b);
    fprintf(f, "</svg>\n");
}

static const char *STYLE =
    "body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}h1{font-size:22px}h2{font-size:18px;"
    "margin-top:28px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;"
    "text-align:right}th{background:#f0f0f0}.role-induction{background:#d6f5d6}.role-previous-token{background:#d6e6ff}"
    ".role-duplicate-token{background:#fff0c2}.role-first-token{background:#f5d6f0}.role-positional{background:#e8e8e8}"
    ".grid{display:flex;flex-wrap:wrap;"
    "gap:10px}.map{text-align:center;font-size:12px}canvas{border:1px solid #ccc;image-rendering:pixelated}"
    "pre{background:#f6f6f6;padding:10px}.tok{display:inline-block;min-width:22px;text-align:center;font-size:11px;"
    "border:1px solid #eee;margin:1px}";

/* The page's head, the model described, the summary and the loss curve. */
static void write_intro(FILE *f, const lab_report *r)
{
    const lab_config *c = &r->config;
    int64_t L = c->layers, H = c->heads;
    fprintf(f,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>libmha head lab</title><style>%s</style>"
            "</head><body>\n",
            STYLE);
    fprintf(f,
            "<h1>What the heads learned</h1><p>A%s transformer: %lld layers x %lld heads (%lld kv heads), width "
            "%lld, context %lld, vocabulary %lld%s, trained on %s with libmha's own gradients.</p>\n",
            c->mlp ? " pre-norm" : "n attention-only", (long long)L, (long long)H,
            (long long)(c->kv_heads ? c->kv_heads : H), (long long)c->embed_dim, (long long)c->context,
            (long long)c->vocab, c->tied ? ", tied unembedding" : "",
            r->text ? "character-level text" : "repeated random spans");
    fprintf(f, "<h2>Summary</h2><pre>%s</pre>\n", r->summary);
    fprintf(f, "<h2>Training</h2>");
    svg_chart(f, r->curve, NULL, r->curve_len, "training loss", NULL, "step");
}

/* The table of every head's scores and role. */
static void write_table(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads;
    fprintf(f, "<h2>Every head</h2><table><tr><th>layer</th><th>head</th><th>previous-token</th><th>induction</th>"
               "<th>duplicate</th><th>first-token</th><th>distance</th><th>entropy</th><th>importance</th>"
               "<th>role</th></tr>\n");
    for (int64_t i = 0; i < L * H; i++) {
        const lab_head_scores *s = &r->scores[i];
        const char *role = lab_head_role(s);
        char css[32];
        snprintf(css, sizeof css, "%.*s", (int)strcspn(role, " "), role); /* "positional (local)" -> "positional" */
        fprintf(f,
                "<tr class=\"role-%s\"><td>%lld</td><td>%lld</td><td>%.3f</td><td>%.3f</td><td>%.3f</td>"
                "<td>%.3f</td><td>%.2f</td><td>%.3f</td><td>%.4f</td><td>%s</td></tr>\n",
                css, (long long)(i / H), (long long)(i % H), s->previous_token, s->induction, s->duplicate,
                s->first_token, s->distance, s->entropy, r->importance ? r->importance[i] : 0.0, role);
    }
    fprintf(f, "</table>\n");
}

/* A canvas per head for the sample's maps, and the position picker. */
static void write_maps(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads, T = r->sample_len;
    fprintf(f, "<h2>Attention on a sample sequence</h2><p>Row i is where the token at position i looks "
               "(darker: more weight). Hover a map for the tokens; pick a position below to see where every head "
               "looks from it.</p><div id=\"tokens\"></div>\n");
    for (int64_t l = 0; l < L; l++) {
        fprintf(f, "<h3>Layer %lld</h3><div class=\"grid\">", (long long)l);
        for (int64_t h = 0; h < H; h++)
            fprintf(f,
                    "<div class=\"map\"><canvas id=\"m%lld_%lld\" width=\"%lld\" height=\"%lld\"></canvas><br>head "
                    "%lld: %s</div>",
                    (long long)l, (long long)h, (long long)(T * 9 + 14), (long long)(T * 9 + 14), (long long)h,
                    lab_head_role(&r->scores[l * H + h]));
        fprintf(f, "</div>\n");
    }
    fprintf(f,
            "<h3>From one position</h3><label>position <input id=\"pos\" type=\"range\" min=\"0\" max=\"%lld\" "
            "value=\"%lld\"></label> <span id=\"posval\"></span><div id=\"rows\"></div>\n",
            (long long)(T - 1), (long long)(T - 1));
}

/* The pruning curves and the GQA table, where the run has them. */
static void write_pruning(FILE *f, const lab_report *r)
{
    if (r->prune_len) {
        fprintf(f, "<h2>Pruning</h2><p>Held-out loss as heads are removed, least important first (by the gradient "
                   "of the loss with respect to a gate on each head, Michel et al. 2019) and in a random order.</p>");
        svg_chart(f, r->prune_important, r->prune_random, r->prune_len, "least important first", "random order",
                  "heads removed");
    }
    if (r->gqa_len) {
        fprintf(f, "<h2>Grouped-query attention</h2><table><tr><th>kv heads</th><th>held-out loss</th><th>KV cache "
                   "bytes per token</th></tr>");
        for (int64_t i = 0; i < r->gqa_len; i++)
            fprintf(f, "<tr><td>%lld</td><td>%.4f</td><td>%lld</td></tr>", (long long)r->gqa_kv_heads[i],
                    r->gqa_loss[i], (long long)r->gqa_kv_bytes[i]);
        fprintf(f, "</table>\n");
    }
}

/* The script that draws the maps from the data it carries. */
static void write_script(FILE *f, const lab_report *r)
{
    int64_t L = r->config.layers, H = r->config.heads, T = r->sample_len;
    /* The data the script draws from. */
    fprintf(f, "<script>\nconst T=%lld,L=%lld,H=%lld;\nconst ids=[", (long long)T, (long long)L, (long long)H);
    for (int64_t t = 0; t < T; t++) fprintf(f, "%s%d", t ? "," : "", r->sample[t]);
    fprintf(f,
            "];\nconst esc=s=>String(s).replace(/[&<>\"']/g,c=>'&#'+c.charCodeAt(0)+';');\n"
            "const labels=ids.map(c=>%s);\nconst tokens=labels.map(esc);\nconst maps=[",
            r->text ? "c===32?'\\u2423':c===10?'\\u21b5':c<32||c>126?'?':String.fromCharCode(c)" : "c");
    for (int64_t i = 0; i < L * H * T * T; i++) fprintf(f, "%s%.3f", i ? "," : "", r->maps[i]);
    fprintf(f,
            "];\n"
            "function at(l,h,i,j){return maps[((l*H+h)*T+i)*T+j];}\n"
            "function shade(w){const t=Math.sqrt(Math.max(0,Math.min(1,w)));return "
            "`rgb(${255-230*t},${255-200*t},${255-90*t})`;}\n"
            "for(let l=0;l<L;l++)for(let h=0;h<H;h++){const cv=document.getElementById(`m${l}_${h}`);const "
            "g=cv.getContext('2d');\n"
            " const C=9,M=14;g.font='8px sans-serif';g.textAlign='center';g.fillStyle='#555';\n"
            " for(let t=0;t<T;t++){g.fillText(labels[t],M+t*C+C/2,10);g.fillText(labels[t],M/2,M+t*C+C-1);}\n"
            " for(let i=0;i<T;i++)for(let j=0;j<T;j++){g.fillStyle=shade(at(l,h,i,j));g.fillRect(M+j*C,M+i*C,C,C);}\n"
            " cv.addEventListener('mousemove',e=>{const i=Math.floor((e.offsetY-M)/C),j=Math.floor((e.offsetX-M)/C);\n"
            "  if(i>=0&&j>=0&&i<T&&j<T)cv.title=`from ${i} (token ${tokens[i]}) to ${j} (token ${tokens[j]}): "
            "${at(l,h,i,j).toFixed(3)}`;});}\n"
            "document.getElementById('tokens').innerHTML='tokens: '+tokens.map((t,i)=>`<span class=\"tok\" "
            "title=\"position ${i}\">${t}</span>`).join('');\n"
            "function showRow(){const "
            "i=+document.getElementById('pos').value;document.getElementById('posval').textContent=`position ${i}, "
            "token ${tokens[i]}`;\n"
            " let html='';for(let l=0;l<L;l++)for(let h=0;h<H;h++){html+=`<div>layer ${l} head ${h}: `;\n"
            "  for(let j=0;j<=i;j++)html+=`<span class=\"tok\" "
            "style=\"background:${shade(at(l,h,i,j))}\">${tokens[j]}</span>`;html+='</div>';}\n"
            " document.getElementById('rows').innerHTML=html;}\n"
            "document.getElementById('pos').addEventListener('input',showRow);showRow();\n"
            "const "
            "done=document.createElement('div');done.id='rendered';done.hidden=true;document.body.appendChild(done);\n"
            "</script></body></html>\n");
}

int lab_report_write(const char *path, const lab_report *r)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    write_intro(f, r);
    write_table(f, r);
    write_maps(f, r);
    write_pruning(f, r);
    write_script(f, r);
    return fclose(f) == 0 ? 0 : -1;
}
