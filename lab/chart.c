/*
 * chart.c -- what the lab's two reports draw alike: line charts as inline
 * SVG, the colour scale of the attention maps, and the page's style.
 */
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

const char *const lab_report_style =
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

/* ---- charts -------------------------------------------------------- */

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

static scale y_scale(const lab_chart *c)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int s = 0; s < 2 && c->y[s]; s++)
        for (int64_t i = 0; i < c->n; i++) lo = fmin(lo, c->y[s][i]), hi = fmax(hi, c->y[s][i]);
    if (!(hi > lo)) lo -= 0.5, hi += 0.5;
    double step = tick_step(hi - lo, 5);
    return (scale){floor(lo / step) * step, ceil(hi / step) * step, step};
}

static scale x_scale(const lab_chart *c)
{
    double lo = c->x0, hi = c->x0 + (double)(c->n > 1 ? c->n - 1 : 1), step = fmax(1, tick_step(hi - lo, 8));
    return (scale){lo, hi, step};
}

/* Grid lines, tick labels and the axis titles. */
static void chart_axes(FILE *f, const lab_chart *c, const scale *xs, const scale *ys)
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
static void chart_lines(FILE *f, const lab_chart *c, const scale *xs, const scale *ys)
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

void lab_svg_chart(FILE *f, const lab_chart *c)
{
    scale xs = x_scale(c), ys = y_scale(c);
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" class=\"chart\" role=\"img\" aria-label=\"%s\">", CW, CH, c->label);
    chart_axes(f, c, &xs, &ys);
    chart_lines(f, c, &xs, &ys);
    fprintf(f, "</svg>\n");
}

/* The colour scale the maps share: weight 0 .. 1 on the square-root
 * scale the maps use, with ticks. */
void lab_colour_scale_svg(FILE *f)
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
