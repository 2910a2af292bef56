
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef int32_t vi __attribute__((vector_size(32)));
typedef int32_t vi_u __attribute__((vector_size(32), aligned(4)));
typedef int16_t vs __attribute__((vector_size(32)));
typedef int16_t vs_u __attribute__((vector_size(32), aligned(2)));
typedef uint16_t vu __attribute__((vector_size(32)));
#define SL 16 /* int16 lanes per vector */
#define VL 8 /* int32 lanes per vector */
#define BLOCK 64 /* output channels per pass: 2 x 4 vectors of 16-bit sums stay in registers */
#define CHUNK 64 /* input channels per list: longer lists amortise each list's gathering (measured: 64, 32, 16) */
#define GROUP_OUTS 256 /* output pixels summed per pass over a block's weights, at least */
typedef uint64_t mask_t; /* a bit per channel of a chunk */

enum { H, W, C, KH, KW, CP, SY, SX, PY, PX, DY, DX, HO, WO, COUT, NGEO };

/* acc[NV * SL int32 lanes] += the rows of w at offsets plus[0..np), -= those at minus[0..nm), np + nm <= 256
   (w: one block's chunk, int16, |w| <= 32512). The sum is w's high bytes (w >> 8, |.| <= 127) times 256 plus
   its low bytes (w & 255, 0..255). Both kept in 16-bit lanes: h, the sum of high bytes, exactly (|h| <= 127 *
   256), and s, the whole sum mod 2^16. The low bytes' sum lies in [-255 nm, 255 np], a window of at most
   65536, so it is (s - 256 h + 255 nm) mod 2^16 - 255 nm. A row of 64 weights is 4 vectors, not 8. */
#define ROWS(NV)                                                                                                \
    static void rows_##NV(int32_t *restrict acc, const int16_t *restrict w,                          \
                          const int32_t *restrict plus, int64_t np, const int32_t *restrict minus, int64_t nm) \
    {                                                                                                           \
        vu s[NV]; vs h[NV];                                                                                      \
        _Pragma("GCC unroll 8")                                                                                      \
        for (int v = 0; v < NV; v++)                                                                                 \
            s[v] = (vu){0}, h[v] = (vs){0};                                             \
        for (int64_t k = 0; k < np; k++) {                                                                      \
            const int16_t *restrict r = w + plus[k];                                                     \
            _Pragma("GCC unroll 8")                                                                                  \
            for (int v = 0; v < NV; v++) {                                                                            \
                const vs x = *(const vs_u *)(r + v * SL);                                                            \
                s[v] += (vu)x, h[v] += x >> 8; }                                                           \
        }                                                                                                       \
        for (int64_t k = 0; k < nm; k++) {                                                                      \
            const int16_t *restrict r = w + minus[k];                                                    \
            _Pragma("GCC unroll 8")                                                                                  \
            for (int v = 0; v < NV; v++) {                                                                            \
                const vs x = *(const vs_u *)(r + v * SL);                                                            \
                s[v] -= (vu)x, h[v] -= x >> 8; }                                                           \
        }                                                                                                       \
        uint16_t lo[NV * SL] __attribute__((aligned(32))); int16_t hi[NV * SL] __attribute__((aligned(32)));     \
        const uint16_t off = (uint16_t)(255u * (uint32_t)nm);                                                  \
        _Pragma("GCC unroll 8")                                                                                      \
        for (int v = 0; v < NV; v++)                                                                                 \
            *(vu *)(lo + v * SL) = s[v] - ((vu)h[v] << 8) + off, *(vs *)(hi + v * SL) = h[v];                \
        const int32_t base = 255 * (int32_t)nm;                                                               \
        for (int i = 0; i < NV * SL; i++)                                                                       \
            acc[i] += hi[i] * 256 + (int32_t)lo[i] - base;                                                     \
    }
ROWS(1) ROWS(2) ROWS(3) ROWS(4)
typedef void (*rows_fn)(int32_t *, const int16_t *, const int32_t *, int64_t, const int32_t *, int64_t);
static const rows_fn ROWS_BY_NV[5] = {0, rows_1, rows_2, rows_3, rows_4};
#define MAXLIST 256 /* entries one rows_ call takes: its 16-bit sums cannot overflow */
/* a longer list (up to KH * KW * CHUNK entries, both signs) in pieces */
static void rows_long(rows_fn rows, int32_t *acc, const int16_t *w, const int32_t *plus, int64_t np,
                      const int32_t *minus, int64_t nm)
{
    for (; np > MAXLIST; plus += MAXLIST, np -= MAXLIST)
        rows(acc, w, plus, MAXLIST, minus, 0);
    for (; np + nm > MAXLIST; minus += MAXLIST - np, nm -= MAXLIST - np, np = 0)
        rows(acc, w, plus, np, minus, MAXLIST - np);
    rows(acc, w, plus, np, minus, nm);
}

/* BITS[m]: the set bits of byte m, ascending, then zeros */
static uint8_t BITS[256][8];
static void init_bits(void)
{
    for (int m = 0; m < 256; m++)
        for (int b = 0, k = 0; b < 8; b++)
            if (m >> b & 1)
                BITS[m][k++] = (uint8_t)b;
}

/* The active channels of chunk j of every tap of output pixel (oy, ox), as offsets of their rows in the
   chunk's weights ((tap * CHUNK + channel) * width), into one list: each input pixel's list (`lists`, CHUNK
   entries a chunk, `counts` of them valid) copied by whole vectors (its first 16 entries always), with the
   tap's offset added. Returns the list's length. */
static int64_t gather(const int64_t *g, const int32_t *restrict lists, const uint8_t *restrict counts, int64_t first,
                      int64_t oy, int64_t ox, int32_t width, int32_t *restrict out)
{
    int64_t k = 0;
    for (int64_t ky = 0; ky < g[KH]; ky++) {
        const int64_t iy = oy * g[SY] - g[PY] + ky * g[DY];
        if (iy < 0 || iy >= g[H])
            continue;
        for (int64_t kx = 0; kx < g[KW]; kx++) {
            const int64_t ix = ox * g[SX] - g[PX] + kx * g[DX];
            if (ix < 0 || ix >= g[W])
                continue;
            const int64_t at = first + iy * g[W] + ix; /* first: the chunk's lists of this sample's pixels */
            const vi tap = (vi){0} + (int32_t)((ky * g[KW] + kx) * CHUNK) * width;
            const vi *restrict from = (const vi *)(lists + at * CHUNK);
            const int c = counts[at];
            *(vi_u *)(out + k) = from[0] + tap; /* three vectors hold most lists: the rest copied when needed */
            *(vi_u *)(out + k + VL) = from[1] + tap;
            *(vi_u *)(out + k + 2 * VL) = from[2] + tap;
            if (__builtin_expect(c > 3 * VL, 0))
                for (int i = 3; i < CHUNK / VL; i++)
                    *(vi_u *)(out + k + i * VL) = from[i] + tap;
            k += c;
        }
    }
    return k;
}

/* An input pixel's active channels per chunk, ascending within the chunk, from its masks, as offsets of their
   rows (channel * width): 8 entries copied per byte of a mask (branch-free), of which its popcount count */
static void expand(const mask_t *restrict masks, int64_t nch, int64_t pixels, int32_t width, int32_t *restrict lists,
                   uint8_t *restrict counts)
{
    for (int64_t j = 0; j < nch; j++, lists += (pixels - 1) * CHUNK, counts += pixels - 1) {
        int n = 0;
        for (int b = 0; b < CHUNK / 8; b++) {
            const unsigned byte = masks[j] >> (8 * b) & 0xff;
            for (int i = 0; i < 8; i++)
                lists[j * CHUNK + n + i] = (BITS[byte][i] + 8 * b) * width;
            n += __builtin_popcount(byte);
        }
        counts[j] = (uint8_t)n;
    }
}

/* Masks of one input pixel's channels, a word per chunk: positive (u > shift) and negative (u < shift) */
static void pixel_masks(const uint8_t *restrict up, int64_t c_in, int shift, mask_t *restrict mp,
                        mask_t *restrict mn)
{
    int64_t c = 0;
#ifdef __SSE2__
    const __m128i at = _mm_set1_epi8((char)shift);
    for (; c + CHUNK <= c_in; c += CHUNK) { /* u <= 2: a signed byte compare is right */
        mask_t p = 0, n = 0;
        for (int h = 0; h < CHUNK / 16; h++) {
            const __m128i x = _mm_loadu_si128((const __m128i *)(up + c + 16 * h));
            p |= (mask_t)(unsigned)_mm_movemask_epi8(_mm_cmpgt_epi8(x, at)) << (16 * h);
            n |= (mask_t)(unsigned)_mm_movemask_epi8(_mm_cmplt_epi8(x, at)) << (16 * h);
        }
        mp[c / CHUNK] = p;
        mn[c / CHUNK] = n;
    }
#endif
    for (; c < c_in; c += CHUNK) {
        mask_t p = 0, n = 0;
        for (int64_t i = 0; i < CHUNK && c + i < c_in; i++) {
            p |= (mask_t)(up[c + i] > shift) << i;
            n |= (mask_t)(up[c + i] < shift) << i;
        }
        mp[c / CHUNK] = p;
        mn[c / CHUNK] = n;
    }
}

/* Samples [n0, n1): u [N, H, W, C] uint8 spikes as integers (u - shift is -1, 0 or 1); w int16
   [CP / block][chunks][KH * KW][CHUNK][block] (see `pack`: CP output channels, the block min(CP, BLOCK) wide);
   out [N, HO, WO, COUT] float32 = float(scale * sum + bias) in double. Returns 0, or -1 where scratch memory
   could not be had. */
int sparse_layer(const uint8_t *restrict u, int shift, const int16_t *restrict w, const int64_t *g,
                 const float *restrict scale, const float *restrict bias, float *restrict out, int64_t n0, int64_t n1)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_bits);
    const int64_t pixels = g[H] * g[W], c_in = g[C], outs = g[HO] * g[WO];
    const int64_t nch = (c_in + CHUNK - 1) / CHUNK, taps = g[KH] * g[KW];
    const int32_t width = (int32_t)(g[CP] < BLOCK ? g[CP] : BLOCK); /* of a block: its rows' length */
    /* samples summed together: each block's weights then serve GROUP_OUTS outputs or more before the next block's
       (small maps re-read every weight per sample otherwise); no more than this part has, its scratch sized so */
    const int64_t want = outs >= GROUP_OUTS ? 1 : (GROUP_OUTS + outs - 1) / outs;
    const int64_t group = want < n1 - n0 ? want : (n1 - n0 > 1 ? n1 - n0 : 1);
    const int64_t gp = group * pixels, go = group * outs;
    mask_t *mp = malloc(sizeof(mask_t) * gp * nch), *mn = malloc(sizeof(mask_t) * gp * nch);
    int32_t *ep = NULL, *en = NULL; /* gather reads them as aligned vectors */
    if (posix_memalign((void **)&ep, 32, sizeof(int32_t) * gp * nch * CHUNK))
        ep = NULL;
    if (posix_memalign((void **)&en, 32, sizeof(int32_t) * gp * nch * CHUNK))
        en = NULL;
    uint8_t *cp = malloc(gp * nch), *cn = malloc(gp * nch);
    /* every (chunk, sample, output pixel)'s list, gathered once for all blocks: where it starts, its +1 and -1
       counts */
    int32_t *lists = malloc(sizeof(int32_t) * (go * nch * 2 * taps * CHUNK + CHUNK));
    int64_t *start = malloc(sizeof(int64_t) * go * nch);
    int32_t *count = malloc(sizeof(int32_t) * go * nch * 2);
    int32_t *acc = NULL; /* 32-byte aligned: whole-vector loads (split unaligned ones stalled, measured) */
    if (posix_memalign((void **)&acc, 32, sizeof(int32_t) * go * BLOCK))
        acc = NULL;
    int failed = !mp || !mn || !ep || !en || !cp || !cn || !lists || !start || !count || !acc;
    for (int64_t n = n0; n < n1 && !failed; n += group) {
        const int64_t gs = n1 - n < group ? n1 - n : group, spx = gs * pixels; /* samples, their pixels */
        for (int64_t p = 0; p < spx; p++) {
            pixel_masks(u + (n * pixels + p) * c_in, c_in, shift, mp + p * nch, mn + p * nch);
            expand(mp + p * nch, nch, spx, width, ep + p * CHUNK, cp + p);
            expand(mn + p * nch, nch, spx, width, en + p * CHUNK, cn + p);
        }
        int64_t k = 0;
        for (int64_t j = 0, i = 0; j < nch; j++) /* chunk-major, as the sums read them (no divisions: measured 1-2%) */
            for (int64_t s = 0; s < gs; s++)
                for (int64_t oy = 0; oy < g[HO]; oy++)
                    for (int64_t ox = 0; ox < g[WO]; ox++, i++) {
                        const int64_t first = j * spx + s * pixels;
                        start[i] = k;
                        count[2 * i] = (int32_t)gather(g, ep, cp, first, oy, ox, width, lists + k);
                        count[2 * i + 1] = (int32_t)gather(g, en, cn, first, oy, ox, width, lists + k + count[2 * i]);
                        k += count[2 * i] + count[2 * i + 1];
                    }
        for (int64_t cb = 0; cb < g[COUT]; cb += BLOCK) {
            const int64_t nv = width / SL;
            const int64_t lanes = g[COUT] - cb < width ? g[COUT] - cb : width;
            const int16_t *restrict wb = w + cb * nch * taps * CHUNK;
            const rows_fn rows = ROWS_BY_NV[nv];
            memset(acc, 0, sizeof(int32_t) * gs * outs * width);
            for (int64_t j = 0, i = 0; j < nch; j++) { /* chunk-major: one chunk's rows serve every output pixel */
                const int16_t *restrict wj = wb + j * taps * CHUNK * width;
                for (int64_t o = 0; o < gs * outs; o++, i++) {
                    const int32_t *restrict l = lists + start[i];
                    if (__builtin_expect(count[2 * i] + count[2 * i + 1] <= MAXLIST, 1))
                        rows(acc + o * width, wj, l, count[2 * i], l + count[2 * i], count[2 * i + 1]);
                    else
                        rows_long(rows, acc + o * width, wj, l, count[2 * i], l + count[2 * i], count[2 * i + 1]);
                }
            }
            for (int64_t o = 0; o < gs * outs; o++) {
                const int32_t *restrict a = acc + o * width;
                float *restrict y = out + (n * outs + o) * g[COUT] + cb;
                for (int64_t i = 0; i < lanes; i++)
                    y[i] = (float)((double)a[i] * (double)scale[cb + i] + (double)bias[cb + i]);
            }
        }
    }
    free(mp), free(mn), free(ep), free(en), free(cp), free(cn), free(lists), free(start), free(count), free(acc);
    return failed ? -1 : 0;
}

/* The samples split into `parts` ranges, run as one OpenMP parallel loop (built with -fopenmp: on torch's own
   threads; without it, one after another). Returns how many parts could not get scratch memory. */
int sparse_layer_par(const uint8_t *u, int shift, const int16_t *w, const int64_t *g, const float *scale,
                     const float *bias, float *out, int64_t n, int64_t parts)
{
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(+ : failed)
    for (int64_t i = 0; i < parts; i++)
        failed += sparse_layer(u, shift, w, g, scale, bias, out, n * i / parts, n * (i + 1) / parts) != 0;
    return failed;
}
