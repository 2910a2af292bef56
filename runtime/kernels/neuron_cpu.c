#define BLOCK 64

#include <stdint.h>

/* Neurons [row0, row1) of `rows` rows of `width` neurons; step t of x and out at offset t * rows * width.
   theta_row / bias_row: one row's thresholds and biases (per channel, laid out as the row is), or only its first
   `period` values where they repeat with that period (channels-last: one pixel's channels, read from L1 instead of
   a row of the map's size from L2: measured 2-6% faster).
   code (optional): the spikes again as the uint8 integers an int8 layer reads, u = s (+1 if signed), in
   groups of `group` neurons; `interleave` writes each group as [code_base * u, u] (2 * group bytes).
   out NULL: the spikes only as code (no reader of the float spikes), their values left in a block scratch.
   r (optional): a residual, laid out as x, added to x first ((x + r) + bias: the order of the add it replaces).
   rcode (optional, instead of r): the residual is another neuron's spikes, read from the code that neuron wrote
   (groups rgroup, rinterleave) as (u - rshift) * rtheta_row: the very floats it would have written.
   v0_row (optional): the call's first steps: every row starts from this membrane (laid out as theta_row) and a
   zero count, v and count are not read. store 0: the call's last steps: v and count are not written back. */
void neuron_steps(const float *restrict x, float *restrict v, void *restrict count_p, float *restrict out,
                  const float *restrict theta_row, const float *restrict bias_row, int64_t rows, int64_t width,
                  int64_t row0, int64_t row1,
                  int64_t steps, int static_input, int leak, float decay, int soft, float v_reset, int is_signed,
                  uint8_t *restrict code, int64_t group, int interleave, int code_base,
                  const float *restrict v0_row, int store, const float *restrict r, int64_t period,
                  const uint8_t *restrict rcode, int64_t rgroup, int rinterleave, const float *restrict rtheta_row,
                  int rshift)
{
    const int64_t per_step = rows * width;
    const int64_t code_step = interleave ? 2 * per_step : per_step;
    const uint8_t shift = is_signed ? 1 : 0;
    /* the net count (signed spikes): float (is_signed 1), or uint8 (2: a call of at most 255 steps; the count is
       0..steps, as a negative spike needs a positive count), a quarter of the state traffic (measured: ResNet-18
       CIFAR 1.6-2.3% faster on 2 threads) */
    float *restrict count = is_signed == 1 ? (float *)count_p : 0;
    uint8_t *restrict count8 = is_signed == 2 ? (uint8_t *)count_p : 0;
    float vb[BLOCK], cb[BLOCK], sb[BLOCK], unread[BLOCK], rb[BLOCK];
#define STEP(IN)                                                                                             \
    for (int64_t j = 0; j < len; j++) {                                                                      \
        float h = (leak ? vb[j] * decay : vb[j]) + (IN);                                                      \
        float s = h >= th[j] ? 1.0f : 0.0f;                                                                   \
        s -= (is_signed && h < 0.0f && cb[j] > 0.0f) ? 1.0f : 0.0f;                                           \
        cb[j] += s;                                                                                           \
        float o = s * th[j]; /* exact: s is -1, 0 or 1 */                                                     \
        vb[j] = soft ? h - o : (s > 0.0f ? v_reset : h);                                                      \
        ot[j] = o;                                                                                            \
        sb[j] = s;                                                                                            \
    }
    for (int64_t n = row0; n < row1; n++) {
        int64_t len;
        for (int64_t c0 = 0; c0 < width; c0 += len) {
            const int64_t base = n * width + c0;
            len = width - c0 < BLOCK ? width - c0 : BLOCK;
            if (code && group - base % group < len) /* a block never straddles two groups */
                len = group - base % group;
            if (period - c0 % period < len) /* nor two periods of the rows */
                len = period - c0 % period;
            if (rcode && rgroup - base % rgroup < len) /* nor two groups of the residual's code */
                len = rgroup - base % rgroup;
            const int64_t p0 = c0 % period;
            /* where the block's code goes in each step (divisions once per block, not per step) */
            const int64_t code_at = interleave ? (base / group) * 2 * group + base % group : base;
            const int64_t rcode_at = rinterleave ? (base / rgroup) * 2 * rgroup + base % rgroup + rgroup : base;
            const float *restrict th = theta_row + p0;
            const float *restrict bias = bias_row ? bias_row + p0 : 0;
            for (int64_t j = 0; j < len; j++) {
                vb[j] = v0_row ? v0_row[p0 + j] : v[base + j];
                cb[j] = v0_row ? 0.0f : count8 ? (float)count8[base + j] : count ? count[base + j] : 0.0f;
            }
            for (int64_t t = 0; t < steps; t++) {
                const float *restrict xt = x + base + (static_input ? 0 : t * per_step);
                if (rcode) { /* the residual's spikes, as the floats its neuron did not write */
                    const uint8_t *restrict ru = rcode + t * (rinterleave ? 2 * per_step : per_step) + rcode_at;
                    /* 4 blocks ahead: the hardware prefetchers miss this half-used stride (measured 1.9x slower
                       without, on the layer-1 shape) */
                    __builtin_prefetch(ru + 8 * BLOCK);
                    __builtin_prefetch(ru + 9 * BLOCK);
                    for (int64_t j = 0; j < len; j++)
                        rb[j] = (float)((int)ru[j] - rshift) * rtheta_row[p0 + j];
                }
                const float *restrict rt = rcode ? rb : r ? r + base + t * per_step : xt;
                float *restrict ot = out ? out + base + t * per_step : unread;
                /* no conditional stores in the vector loops (masked stores are slow on some CPUs): the bias
                   is a separate copy of the loop, the net count is kept (and ignored) without signed spikes */
                if (bias && (r || rcode))
                    STEP((xt[j] + rt[j]) + bias[j]) /* x + bias, then v += x, as the torch path adds */
                else if (bias)
                    STEP(xt[j] + bias[j])
                else if (r || rcode)
                    STEP(xt[j] + rt[j])
                else
                    STEP(xt[j])
                if (code) {
                    uint8_t *restrict at = code + t * code_step + code_at;
                    uint8_t *restrict u = at + (interleave ? group : 0);
                    for (int64_t j = 0; j < len; j++)
                        u[j] = (uint8_t)((int)sb[j] + shift);
                    if (interleave) /* [code_base * u, u]: the scaled copy first */
                        for (int64_t j = 0; j < len; j++)
                            at[j] = (uint8_t)(((int)sb[j] + shift) * code_base);
                }
            }
            if (store)
                for (int64_t j = 0; j < len; j++) {
                    v[base + j] = vb[j];
                    if (count8)
                        count8[base + j] = (uint8_t)cb[j];
                    else if (count)
                        count[base + j] = cb[j];
                }
        }
    }
}

/* Spiking max pool (modules.SpikeMaxPool) over non-overlapping kh x kw windows of a channels-last map, all steps
   in one pass: acc (the running sum of x, [n, h, w, c]) += x[t]; out[t] = max over each window of acc, less
   `last` (that max at the step before), which then becomes it. acc and last carry over the call's time chunks
   (zero at its start). Output rows [row0, row1) of the n * ho rows; rows and columns past ho * kh, wo * kw
   are never pooled and left out. Float32 adds in the torch path's order; the max propagates NaN like
   torch.maximum. */
void pool_steps(const float *restrict x, float *restrict acc, float *restrict last, float *restrict out,
                int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t row0, int64_t row1,
                int64_t steps)
{
    const int64_t ho = h / kh, wo = w / kw, span = wo * kw * c; /* the pooled part of one input row */
    for (int64_t r = row0; r < row1; r++) {
        const int64_t b = r / ho, i0 = (r % ho) * kh;
        float *restrict l = last + r * wo * c;
        for (int64_t t = 0; t < steps; t++) {
            for (int64_t i = 0; i < kh; i++) {
                const int64_t at = ((b * h) + i0 + i) * w * c;
                const float *restrict xt = x + t * n * h * w * c + at;
                float *restrict a = acc + at;
                for (int64_t j = 0; j < span; j++)
                    a[j] += xt[j];
            }
            float *restrict o = out + t * n * ho * wo * c + r * wo * c;
            for (int64_t q = 0; q < wo; q++)
                for (int64_t c0 = 0; c0 < c; c0 += BLOCK) { /* a block of channels' maxima in registers */
                    const int64_t len = c - c0 < BLOCK ? c - c0 : BLOCK;
                    const float *restrict corner = acc + ((b * h) + i0) * w * c + q * kw * c + c0;
                    float m[BLOCK];
                    for (int64_t ch = 0; ch < len; ch++)
                        m[ch] = corner[ch];
                    for (int64_t i = 0; i < kh; i++)
                        for (int64_t j = 0; j < kw; j++) {
                            const float *restrict e = corner + (i * w + j) * c;
                            for (int64_t ch = 0; ch < len; ch++)
                                m[ch] = (m[ch] != m[ch] || m[ch] >= e[ch]) ? m[ch] : e[ch];
                        }
                    float *restrict lq = l + q * c + c0, *restrict oq = o + q * c + c0;
                    for (int64_t ch = 0; ch < len; ch++) {
                        oq[ch] = m[ch] - lq[ch];
                        lq[ch] = m[ch];
                    }
                }
        }
    }
}

void pool_steps_par(const float *x, float *acc, float *last, float *out, int64_t n, int64_t h, int64_t w, int64_t c,
                    int64_t kh, int64_t kw, int64_t rows, int64_t parts, int64_t steps)
{
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; i++)
        pool_steps(x, acc, last, out, n, h, w, c, kh, kw, rows * i / parts, rows * (i + 1) / parts, steps);
}

/* The rows split into `parts` ranges, run as one OpenMP parallel loop (built with -fopenmp: on torch's own
   threads; without it, one after another) */
void neuron_steps_par(const float *x, float *v, void *count, float *out, const float *theta_row, const float *bias_row,
                      int64_t rows, int64_t width, int64_t n, int64_t parts, int64_t steps, int static_input, int leak,
                      float decay, int soft, float v_reset, int is_signed, uint8_t *code, int64_t group, int interleave,
                      int code_base, const float *v0_row, int store, const float *r, int64_t period,
                      const uint8_t *rcode, int64_t rgroup, int rinterleave, const float *rtheta_row, int rshift)
{ /* n: the rows to split, all of them */
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; i++)
        neuron_steps(x, v, count, out, theta_row, bias_row, rows, width, n * i / parts, n * (i + 1) / parts, steps,
                     static_input, leak, decay, soft, v_reset, is_signed, code, group, interleave, code_base, v0_row,
                     store, r, period, rcode, rgroup, rinterleave, rtheta_row, rshift);
}
