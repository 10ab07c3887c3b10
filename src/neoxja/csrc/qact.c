/* Activations for the fast integer kernels, and those kernels in portable C (see weights.h).
 *
 * A block of ACT_BLOCK elements of a row of x is quantized as q = round(x * 127 / amax), amax its
 * largest |x|, with the scale d = amax / 127 (a block of zeros: q = 0, d = 0; a block holding an
 * infinity or NaN: q = 0, d = NaN, so the row's results are NaN as float arithmetic would give).
 * Rounding is to nearest, ties to even, as the SIMD conversions round.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "kernels.h"

/* Quantize x[0, n) (n <= ACT_BLOCK) into q[0, n); returns the block's scale. */
static float quantize_block(const float *x, int64_t n, int8_t *q) {
    float amax = 0.f;
    int finite = 1;
    for (int64_t i = 0; i < n; i++) {
        float v = fabsf(x[i]);
        if (!(v <= FLT_MAX)) finite = 0; /* (NaN fails the test too) */
        else if (v > amax) amax = v;
    }
    for (int64_t i = 0; i < n; i++) q[i] = 0;
    if (!finite) return NAN;
    if (amax == 0.f) return 0.f;
    float id = 127.f / amax;
    for (int64_t i = 0; i < n; i++) q[i] = (int8_t)nearbyintf(x[i] * id);
    return amax / 127.f;
}

/* Row r's int8 blocks [i0, i1) (multiples of ACT_BLOCK; elements beyond in are zeros). */
static void quantize_range(const Act *a, int r, int64_t i0, int64_t i1, int8_t *q, float *scales) {
    const float *x = a->x + r * a->in;
    for (int64_t i = i0; i < i1; i += ACT_BLOCK) {
        int64_t n = a->in - i < ACT_BLOCK ? (a->in > i ? a->in - i : 0) : ACT_BLOCK;
        memset(q + i, 0, ACT_BLOCK);
        scales[i / ACT_BLOCK] = n ? quantize_block(x + i, n, q + i) : 0.f;
    }
}

void act_q4_part(const Act *a, int r, int64_t i0, int64_t i1, int level) {
#if HAVE_X86
    if (level >= LEVEL_AVX512) {
        act_q4_avx512(a, r, i0, i1);
        return;
    }
#endif
    (void)level;
    int8_t natural[Q4_GROUP];
    float d[Q4_GROUP / ACT_BLOCK];
    int8_t *q = a->q + r * a->ld;
    int32_t *corr = a->corr + r * (a->ld / 8);
    float *qs = a->qscale + r * (a->ld / 8);
    for (int64_t g = i0; g < i1; g += Q4_GROUP) {
        Act one = *a; /* quantize the group's blocks in natural order, then split even and odd */
        one.x = a->x + r * a->in + g;
        one.in = a->in - g;
        quantize_range(&one, 0, 0, Q4_GROUP, natural, d);
        for (int j = 0; j < Q4_GROUP / 2; j++) {
            q[g + j] = natural[2 * j];
            q[g + Q4_GROUP / 2 + j] = natural[2 * j + 1];
        }
        for (int lane = 0; lane < 16; lane++) {
            int32_t sum = 0;
            for (int k = 0; k < 4; k++) sum += q[g + 4 * lane + k] + q[g + Q4_GROUP / 2 + 4 * lane + k];
            corr[g / 8 + lane] = -128 * sum;
            qs[g / 8 + lane] = d[8 * lane / ACT_BLOCK] / 127.f; /* (times the codes' step, 1/127) */
        }
    }
}

void act_i8_part(const Act *a, int r, int64_t i0, int64_t i1, int level) {
#if HAVE_X86
    if (level >= LEVEL_AVX512) {
        act_i8_avx512(a, r, i0, i1);
        return;
    }
#endif
    (void)level;
    int8_t *q = a->q + r * a->ld;
    int32_t *corr = a->corr + r * (a->ld / 4);
    quantize_range(a, r, i0, i1, q, a->qscale + r * (a->ld / ACT_BLOCK));
    for (int64_t k = i0 / 4; k < i1 / 4; k++) corr[k] = -128 * (q[4 * k] + q[4 * k + 1] + q[4 * k + 2] + q[4 * k + 3]);
}

void q4_fast_scales(const Weight *w, int64_t b0, int64_t n, float *s) {
    if (w->qabsmax)
        for (int64_t j = 0; j < n; j++) {
            int64_t b = b0 + j;
            s[j] = w->nested_code[w->qabsmax[b]] * w->nested_absmax[b >> 8] + w->offset;
        }
    else
        for (int64_t j = 0; j < n; j++) s[j] = w->absmax[b0 + j];
    memset(s + n, 0, 16 * sizeof(float));
}

/* The portable 4-bit kernel: per group and 8-element lane, the exact integer sum of lut * q, then
 * one float multiply-add by (weight scale * activation scale), lanes in order. */
void q4_fast_scalar(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    const int64_t in = w->in, groups = (in + Q4_GROUP - 1) / Q4_GROUP, bs = w->blocksize;
    float ws[Q4_GROUP / 8 + 16];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        for (int r = 0; r < a->rows; r++) {
            const int8_t *q = a->q + r * a->ld;
            const float *qs = a->qscale + r * (a->ld / 8);
            float acc = 0.f;
            for (int64_t g = 0; g < groups; g++) {
                int64_t n = in - g * Q4_GROUP < Q4_GROUP ? in - g * Q4_GROUP : Q4_GROUP;
                for (int lane = 0; lane < n / 8; lane++) {
                    int64_t first = g * Q4_GROUP + 8 * lane; /* element */
                    q4_fast_scales(w, (o * in + first) / bs, 1, ws);
                    int32_t sum = 0;
                    for (int k = 0; k < 4; k++) {
                        uint8_t byte = bytes[first / 2 + k];
                        sum += w->lut[byte >> 4] * q[g * Q4_GROUP + 4 * lane + k] +
                               w->lut[byte & 15] * q[g * Q4_GROUP + Q4_GROUP / 2 + 4 * lane + k];
                    }
                    acc += (float)sum * (ws[0] * qs[g * 16 + lane]);
                }
            }
            y[r * ldy + o] = acc;
        }
    }
}

/* The portable int8 kernel: per block of ACT_BLOCK, the exact integer sum, one float multiply-add
 * by the activation's scale; the row's scale at the end. */
void i8_fast_scalar(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    const int64_t in = w->in;
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *v = (const int8_t *)w->w + o * in;
        for (int r = 0; r < a->rows; r++) {
            const int8_t *q = a->q + r * a->ld;
            const float *qs = a->qscale + r * (a->ld / ACT_BLOCK);
            float acc = 0.f;
            for (int64_t i = 0; i < in; i += ACT_BLOCK) {
                int32_t sum = 0;
                for (int64_t k = i; k < in && k < i + ACT_BLOCK; k++) sum += v[k] * q[k];
                acc += (float)sum * qs[i / ACT_BLOCK];
            }
            y[r * ldy + o] = acc * w->scale[o];
        }
    }
}
