/*
 * picture.c -- one head's attention map as a PNG that explains itself:
 * a title (layer, head, role), the query position down the left and the
 * key position along the bottom with ticks, the colour scale, and where
 * the repeated span starts.  A small RGB raster, a 5x7 bitmap font of our
 * own (lowercase, digits and a little punctuation), and a PNG writer over
 * zlib.
 */
#include "lab.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ---- raster -------------------------------------------------------- */

typedef struct raster {
    int64_t w, h;
    unsigned char *rgb; /* w * h * 3, row-major */
} raster;

static const unsigned char INK[3] = {40, 40, 40}, GREY[3] = {150, 150, 150}, MARK[3] = {230, 120, 0};

static void fill(raster *r, int64_t x, int64_t y, int64_t w, int64_t h, const unsigned char *c)
{
    for (int64_t j = y < 0 ? 0 : y; j < y + h && j < r->h; j++)
        for (int64_t i = x < 0 ? 0 : x; i < x + w && i < r->w; i++) memcpy(r->rgb + 3 * (j * r->w + i), c, 3);
}

const double lab_scale_ticks[LAB_SCALE_TICKS] = {0, 0.05, 0.25, 0.5, 1};

void lab_weight_colour(float w, unsigned char rgb[3])
{
    float t = w < 0 ? 0 : w > 1 ? 1 : sqrtf(w);
    rgb[0] = (unsigned char)(255 - 230 * t), rgb[1] = (unsigned char)(255 - 200 * t),
    rgb[2] = (unsigned char)(255 - 90 * t);
}

/* ---- text ---------------------------------------------------------- */

/* Each glyph: 7 rows of 5 pixels, bit 4 the leftmost.  Uppercase is drawn
 * as lowercase; a character without a glyph as '?'. */
static const struct glyph {
    char c;
    unsigned char rows[7];
} GLYPHS[] = {{' ', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}}, {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
              {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}}, {',', {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}},
              {'-', {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}}, {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}},
              {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}}, {'0', {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}},
              {'1', {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}}, {'2', {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}},
              {'3', {0x1e, 0x01, 0x01, 0x0e, 0x01, 0x01, 0x1e}}, {'4', {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}},
              {'5', {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}}, {'6', {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}},
              {'7', {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}}, {'8', {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}},
              {'9', {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}}, {':', {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}},
              {'<', {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}}, {'=', {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}},
              {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}}, {'?', {0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04}},
              {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f}}, {'a', {0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f}},
              {'b', {0x10, 0x10, 0x1e, 0x11, 0x11, 0x11, 0x1e}}, {'c', {0x00, 0x00, 0x0f, 0x10, 0x10, 0x10, 0x0f}},
              {'d', {0x01, 0x01, 0x0f, 0x11, 0x11, 0x11, 0x0f}}, {'e', {0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e}},
              {'f', {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08}}, {'g', {0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e}},
              {'h', {0x10, 0x10, 0x1e, 0x11, 0x11, 0x11, 0x11}}, {'i', {0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e}},
              {'j', {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c}}, {'k', {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12}},
              {'l', {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}}, {'m', {0x00, 0x00, 0x1a, 0x15, 0x15, 0x15, 0x15}},
              {'n', {0x00, 0x00, 0x1e, 0x11, 0x11, 0x11, 0x11}}, {'o', {0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e}},
              {'p', {0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10}}, {'q', {0x00, 0x00, 0x0f, 0x11, 0x0f, 0x01, 0x01}},
              {'r', {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}}, {'s', {0x00, 0x00, 0x0f, 0x10, 0x0e, 0x01, 0x1e}},
              {'t', {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06}}, {'u', {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d}},
              {'v', {0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04}}, {'w', {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a}},
              {'x', {0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11}}, {'y', {0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e}},
              {'z', {0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f}}};

static const unsigned char *glyph(char c)
{
    c = (char)tolower((unsigned char)c);
    for (size_t i = 0; i < sizeof GLYPHS / sizeof GLYPHS[0]; i++)
        if (GLYPHS[i].c == c) return GLYPHS[i].rows;
    return glyph('?');
}

enum { GLYPH_W = 5, GLYPH_H = 7, ADVANCE = 6 };

static int64_t text_width(const char *s, int scale) { return (int64_t)strlen(s) * ADVANCE * scale - scale; }

/* Text with its top-left corner at (x, y), each font pixel scale x scale;
 * `up` turns it a quarter to read bottom to top, (x, y) then its
 * bottom-left corner. */
static void text(raster *r, int64_t x, int64_t y, int scale, int up, const char *s)
{
    for (int64_t k = 0; s[k]; k++) {
        const unsigned char *g = glyph(s[k]);
        for (int row = 0; row < GLYPH_H; row++)
            for (int col = 0; col < GLYPH_W; col++) {
                if (!(g[row] >> (GLYPH_W - 1 - col) & 1)) continue;
                int64_t along = (k * ADVANCE + col) * scale, across = row * scale;
                if (up) fill(r, x + across, y - along - scale, scale, scale, INK);
                else fill(r, x + along, y + across, scale, scale, INK);
            }
    }
}

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

/* 8-bit RGB, each row with filter byte 0, deflated at level 9. */
static int save_png(const raster *r, const char *path)
{
    int64_t stride = 1 + 3 * r->w;
    unsigned char *raw = malloc((size_t)(stride * r->h));
    if (!raw) return -1;
    for (int64_t y = 0; y < r->h; y++) {
        raw[y * stride] = 0;
        memcpy(raw + y * stride + 1, r->rgb + 3 * y * r->w, (size_t)(3 * r->w));
    }
    uLongf zn = compressBound((uLong)(stride * r->h));
    unsigned char *z = malloc(zn), hdr[13];
    FILE *f = z ? fopen(path, "wb") : NULL;
    int ok = f && compress2(z, &zn, raw, (uLong)(stride * r->h), 9) == Z_OK;
    if (ok) {
        static const unsigned char sig[8] = {137, 'P', 'N', 'G', 13, 10, 26, 10};
        fwrite(sig, 1, 8, f);
        put32(hdr, (uint32_t)r->w), put32(hdr + 4, (uint32_t)r->h);
        hdr[8] = 8, hdr[9] = 2, hdr[10] = 0, hdr[11] = 0, hdr[12] = 0;
        chunk(f, "IHDR", hdr, 13);
        chunk(f, "IDAT", z, (uint32_t)zn);
        chunk(f, "IEND", NULL, 0);
    }
    if (f && fclose(f) != 0) ok = 0;
    free(raw);
    free(z);
    return ok ? 0 : -1;
}

/* ---- the map ------------------------------------------------------- */

/* Where the parts go: margins around the cells, in pixels. */
enum { LEFT = 58, TOP = 40, BOTTOM = 40, GAP = 18, BAR = 14, RIGHT = 54 };

/* Tick every `step` positions: about eight of them, at 1, 2, 4, 5 or a
 * multiple of 10. */
static int64_t tick_step(int64_t n)
{
    static const int64_t steps[] = {1, 2, 4, 5, 10, 20, 50, 100, 200, 500, 1000};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++)
        if (n / steps[i] <= 8) return steps[i];
    return n / 8;
}

static void draw_axes(raster *r, const lab_map_picture *p, int64_t cell)
{
    int64_t step = tick_step(p->cols > p->rows ? p->cols : p->rows), x0 = LEFT, y0 = TOP;
    for (int64_t t = 0; t < p->cols; t += step) { /* key positions, below the cells */
        char num[24];
        snprintf(num, sizeof num, "%lld", (long long)t);
        int64_t cx = x0 + t * cell + cell / 2;
        fill(r, cx, y0 + p->rows * cell, 1, 4, INK);
        text(r, cx - text_width(num, 1) / 2, y0 + p->rows * cell + 6, 1, 0, num);
    }
    for (int64_t t = 0; t < p->rows; t += step) { /* query positions, left of them */
        char num[24];
        snprintf(num, sizeof num, "%lld", (long long)t);
        int64_t cy = y0 + t * cell + cell / 2;
        fill(r, x0 - 4, cy, 4, 1, INK);
        text(r, x0 - 6 - text_width(num, 1), cy - GLYPH_H / 2, 1, 0, num);
    }
    const char *xt = "key position", *yt = "query position";
    text(r, x0 + (p->cols * cell - text_width(xt, 2)) / 2, y0 + p->rows * cell + 20, 2, 0, xt);
    text(r, 6, y0 + (p->rows * cell + text_width(yt, 2)) / 2, 2, 1, yt);
    text(r, 6, 8, 2, 0, p->title);
}

/* The colour scale right of the cells: weight 0 at the bottom, 1 at the
 * top, on the same square-root scale as the cells. */
static void draw_scale(raster *r, const lab_map_picture *p, int64_t cell)
{
    int64_t x = LEFT + p->cols * cell + GAP, y = TOP, h = p->rows * cell;
    for (int64_t j = 0; j < h; j++) {
        double t = 1 - (double)j / (double)(h - 1);
        unsigned char c[3];
        lab_weight_colour((float)(t * t), c);
        fill(r, x, y + j, BAR, 1, c);
    }
    for (int i = 0; i < LAB_SCALE_TICKS; i++) {
        char num[16];
        snprintf(num, sizeof num, "%g", lab_scale_ticks[i]);
        int64_t ty = y + (int64_t)llround((1 - sqrt(lab_scale_ticks[i])) * (double)(h - 1));
        fill(r, x + BAR, ty, 3, 1, INK);
        text(r, x + BAR + 5, ty - GLYPH_H / 2, 1, 0, num);
    }
    text(r, x - 2, y - 12, 1, 0, "weight");
}

int lab_map_png(const char *path, const lab_map_picture *p, int64_t cell)
{
    raster r = {LEFT + p->cols * cell + GAP + BAR + RIGHT, TOP + p->rows * cell + BOTTOM, NULL};
    int64_t need = text_width(p->title, 2) + 12;
    if (r.w < need) r.w = need;
    r.rgb = malloc((size_t)(r.w * r.h * 3));
    if (!r.rgb) return -1;
    memset(r.rgb, 255, (size_t)(r.w * r.h * 3));
    for (int64_t i = 0; i < p->rows; i++)
        for (int64_t j = 0; j < p->cols; j++) {
            unsigned char c[3];
            lab_weight_colour(p->map[i * p->cols + j], c);
            fill(&r, LEFT + j * cell, TOP + i * cell, cell, cell, c);
        }
    fill(&r, LEFT - 1, TOP - 1, p->cols * cell + 2, 1, GREY),
        fill(&r, LEFT - 1, TOP + p->rows * cell, p->cols * cell + 2, 1, GREY);
    fill(&r, LEFT - 1, TOP, 1, p->rows * cell, GREY), fill(&r, LEFT + p->cols * cell, TOP, 1, p->rows * cell, GREY);
    if (p->repeat_start > 0 && p->repeat_start < p->rows) { /* dashed: the repeat starts here */
        for (int64_t d = 0; d < p->cols * cell; d += 6) fill(&r, LEFT + d, TOP + p->repeat_start * cell, 3, 1, MARK);
        for (int64_t d = 0; d < p->rows * cell; d += 6) fill(&r, LEFT + p->repeat_start * cell, TOP + d, 1, 3, MARK);
    }
    draw_axes(&r, p, cell);
    draw_scale(&r, p, cell);
    int rc = save_png(&r, path);
    free(r.rgb);
    return rc;
}
