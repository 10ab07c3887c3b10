/* Matrix products with quantized weights, for neoxja/quantization/kernels.py (CPU).
 *
 * y[r, o] = sum_i x[r, i] * W[o, i] for up to MAX_ROWS rows of x (decoding), reading each weight
 * once for all rows, with W stored as
 *   - 4-bit (bitsandbytes' nf4/fp4): byte j/2 of the flattened weight holds element j, even j in
 *     the high nibble; value = code[nibble] * scale[j / blocksize]; the scale is a float32 absmax
 *     or, with double quantization, nested_code[qabsmax[b]] * nested_absmax[b / 256] + offset;
 *   - int8 rows with one float32 scale (SCB / 127) per output row;
 *   - bfloat16 (the upper half of a float32).
 * and the dequantization of a range of output rows into float32 (prompts multiply tile by tile
 * through BLAS in Python). Arithmetic is float32; sums run in another order than PyTorch's, so
 * results agree with F.linear on the dequantized weight within float32 rounding.
 *
 * 4-bit is compute-heavy (a table lookup per weight): with AVX-512 one vpermps looks up 16
 * nibbles in the 16-entry code, straight from the packed bytes (see q4_body_avx512). x is first
 * laid out to match the order in which the kernel meets the nibbles (AVX-512: spread_128; AVX2:
 * per group of 16, the even elements then the odd ones), so the weights are never shuffled.
 *
 * Kernels: AVX-512F, AVX2+FMA or portable C, chosen at import (NEOXJA_QUANT_KERNEL=avx2|scalar
 * forces a lower one, for tests). Threads: OpenMP over output rows.
 *
 * The entry points (bottom of the file) take numpy-style arrays, never raw addresses, and check
 * every array against the dimensions before a kernel runs (see "arguments"); the kernels trust them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
#define TILE_ROWS 4 /* output rows a kernel reads at once, for one row of x */
#define TILE_FOR(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1)

enum { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
static int kernel = SCALAR;

typedef struct {
    const float *x; /* [rows, in] (deinterleaved per group for the SIMD 4-bit kernels) */
    int rows;
    int64_t in, out;
    const uint8_t *w;
    const float *code;   /* 16 */
    const float *absmax; /* float32 [blocks] when not nested */
    const uint8_t *qabsmax;
    const float *nested_absmax, *nested_code;
    float offset;
    int64_t blocksize;
    float *y; /* [rows, out] */
    int wide; /* the AVX-512 kernel's layout of x (spread_128; in_features % 128 == 0) */
    int64_t first; /* dequantization: the first row of the range */
} Q4;

static inline float block_scale(const Q4 *q, int64_t b) {
    if (q->qabsmax) return q->nested_code[q->qabsmax[b]] * q->nested_absmax[b >> 8] + q->offset;
    return q->absmax[b];
}

static void q4_rows_scalar(const Q4 *q, int64_t o0, int64_t o1) {
    int64_t per_row = q->in / q->blocksize;
    for (int64_t o = o0; o < o1; o++) {
        float acc[MAX_ROWS] = {0};
        const uint8_t *w = q->w + o * q->in / 2;
        for (int64_t b = 0; b < per_row; b++) {
            float scale = block_scale(q, o * per_row + b);
            float part[MAX_ROWS] = {0};
            for (int64_t i = b * q->blocksize; i < (b + 1) * q->blocksize; i += 2) {
                uint8_t byte = w[i / 2];
                float hi = q->code[byte >> 4], lo = q->code[byte & 15];
                for (int r = 0; r < q->rows; r++) part[r] += hi * q->x[r * q->in + i] + lo * q->x[r * q->in + i + 1];
            }
            for (int r = 0; r < q->rows; r++) acc[r] += part[r] * scale;
        }
        for (int r = 0; r < q->rows; r++) q->y[r * q->out + o] = acc[r];
    }
}

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The SIMD bodies take the row count R as a constant (the wrappers below switch on it), so their
 * per-row accumulators live in registers; even and odd elements accumulate separately, two
 * independent FMA chains per row. */
#define SWITCH_ROWS(body, ...)                                                                        \
    switch (rows) {                                                                                   \
    case 1: body(__VA_ARGS__, 1); break;                                                              \
    case 2: body(__VA_ARGS__, 2); break;                                                              \
    case 3: body(__VA_ARGS__, 3); break;                                                              \
    case 4: body(__VA_ARGS__, 4); break;                                                              \
    case 5: body(__VA_ARGS__, 5); break;                                                              \
    case 6: body(__VA_ARGS__, 6); break;                                                              \
    case 7: body(__VA_ARGS__, 7); break;                                                              \
    default: body(__VA_ARGS__, 8); break;                                                             \
    }

__attribute__((target("avx2,fma"), always_inline)) static inline void q4_body_avx2(const Q4 *q, int64_t o0,
                                                                                    int64_t o1, const int R) {
    int64_t per_row = q->in / q->blocksize;
    __m256 low_table = _mm256_loadu_ps(q->code), high_table = _mm256_loadu_ps(q->code + 8);
    __m256i fifteen = _mm256_set1_epi32(15);
    for (int64_t o = o0; o < o1; o++) {
        __m256 acc[MAX_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *w = q->w + o * q->in / 2;
        for (int64_t b = 0; b < per_row; b++) {
            __m256 scale = _mm256_set1_ps(block_scale(q, o * per_row + b));
            __m256 even[MAX_ROWS], odd[MAX_ROWS];
            for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
            for (int64_t i = b * q->blocksize; i < (b + 1) * q->blocksize; i += 16) {
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + i / 2)));
                __m256i hi = _mm256_srli_epi32(bytes, 4), lo = _mm256_and_si256(bytes, fifteen);
                __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, hi),
                                             _mm256_permutevar8x32_ps(high_table, hi),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28)));
                __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, lo),
                                             _mm256_permutevar8x32_ps(high_table, lo),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28)));
                for (int r = 0; r < R; r++) {
                    const float *x = q->x + r * q->in + i; /* 8 evens, then 8 odds */
                    even[r] = _mm256_fmadd_ps(vh, _mm256_loadu_ps(x), even[r]);
                    odd[r] = _mm256_fmadd_ps(vl, _mm256_loadu_ps(x + 8), odd[r]);
                }
            }
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), scale, acc[r]);
        }
        for (int r = 0; r < R; r++) q->y[r * q->out + o] = hsum256(acc[r]);
    }
}

__attribute__((target("avx2,fma"))) static void q4_rows_avx2(const Q4 *q, int64_t o0, int64_t o1) {
    int rows = q->rows;
    SWITCH_ROWS(q4_body_avx2, q, o0, o1)
}

/* AVX-512 reads 64 bytes (128 weights) at a time as 16 dwords of 8 nibbles each: vpermps looks up
 * the low 4 bits of each dword index, so shifting the whole register right by 4 * t bits selects
 * nibble t of every dword, with no widening of the bytes. Nibble t of dword L is element
 * 8 * L + (t ^ 1) of the group (the even element sits in the high nibble), so x is laid out per
 * group of 128 as x[8 * L + (t ^ 1)] at 16 * t + L (spread_128). A lane's 8 elements lie in one
 * block (blocksize >= 32), so the block scales form one vector per group. */
__attribute__((target("avx512f"))) static inline __m512 group_scales(const Q4 *q, int64_t first) {
    int64_t b = first / q->blocksize;
    if (q->blocksize >= 128) return _mm512_set1_ps(block_scale(q, b));
    if (q->blocksize == 64)
        return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(block_scale(q, b)), _mm512_set1_ps(block_scale(q, b + 1)));
    __m128 s0 = _mm_set1_ps(block_scale(q, b)), s1 = _mm_set1_ps(block_scale(q, b + 1));
    __m128 s2 = _mm_set1_ps(block_scale(q, b + 2)), s3 = _mm_set1_ps(block_scale(q, b + 3));
    __m512 v = _mm512_castps128_ps512(s0);
    v = _mm512_insertf32x4(v, s1, 1);
    v = _mm512_insertf32x4(v, s2, 2);
    return _mm512_insertf32x4(v, s3, 3);
}

__attribute__((target("avx512f"), always_inline)) static inline void q4_body_avx512(const Q4 *q, int64_t o0,
                                                                                          int64_t o1, const int R) {
    __m512 table = _mm512_loadu_ps(q->code);
    for (int64_t o = o0; o < o1; o++) {
        __m512 acc[MAX_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        const uint8_t *w = q->w + o * q->in / 2;
        for (int64_t g = 0; g < q->in; g += 128) {
            __m512i bytes = _mm512_loadu_si512((const void *)(w + g / 2));
            __m512 even[MAX_ROWS], odd[MAX_ROWS];
            for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
            for (int t = 0; t < 8; t += 2) {
                __m512 v0 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4 * t), table);
                __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4 * t + 4), table);
                for (int r = 0; r < R; r++) {
                    const float *x = q->x + r * q->in + g + 16 * t;
                    even[r] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x), even[r]);
                    odd[r] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + 16), odd[r]);
                }
            }
            __m512 scale = group_scales(q, o * q->in + g);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(even[r], odd[r]), scale, acc[r]);
        }
        for (int r = 0; r < R; r++) q->y[r * q->out + o] = _mm512_reduce_add_ps(acc[r]);
    }
}

__attribute__((target("avx512f"))) static void q4_rows_avx512(const Q4 *q, int64_t o0, int64_t o1) {
    int rows = q->rows;
    SWITCH_ROWS(q4_body_avx512, q, o0, o1)
}

/* x's elements, per group of 128, in the order of the AVX-512 kernel's nibbles (see above). */
static void spread_128(const float *x, float *out, int64_t n) {
    for (int64_t g = 0; g < n; g += 128)
        for (int t = 0; t < 8; t++)
            for (int lane = 0; lane < 16; lane++) out[g + 16 * t + lane] = x[g + 8 * lane + (t ^ 1)];
}

/* x's elements, per group of 16 (the AVX2 kernel): the 8 even ones, then the 8 odd ones. */
static void deinterleave(const float *x, float *out, int64_t n) {
    for (int64_t g = 0; g < n; g += 16)
        for (int k = 0; k < 8; k++) {
            out[g + k] = x[g + 2 * k];
            out[g + 8 + k] = x[g + 2 * k + 1];
        }
}

static void split_rows(int64_t out, int threads, void (*fn)(const void *, int64_t, int64_t), const void *ctx) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t o0 = out * t / threads, o1 = out * (t + 1) / threads;
        if (o1 > o0) fn(ctx, o0, o1);
    }
}

static void q4_task(const void *ctx, int64_t o0, int64_t o1) {
    const Q4 *q = ctx;
    if (q->wide) q4_rows_avx512(q, o0, o1);
    else if (kernel >= AVX2) q4_rows_avx2(q, o0, o1);
    else q4_rows_scalar(q, o0, o1);
}

/* One row of a 4-bit weight as float32, in element order (the two permutes interleave the high
 * nibbles' values, even elements, with the low nibbles', odd elements). */
__attribute__((target("avx512f"))) static void dequant_row_avx512(const Q4 *q, int64_t row, float *y) {
    int64_t per_row = q->in / q->blocksize;
    const uint8_t *w = q->w + row * q->in / 2;
    __m512 table = _mm512_loadu_ps(q->code);
    __m512i fifteen = _mm512_set1_epi32(15);
    __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t b = 0; b < per_row; b++) {
        __m512 scale = _mm512_set1_ps(block_scale(q, row * per_row + b));
        for (int64_t i = b * q->blocksize; i < (b + 1) * q->blocksize; i += 32) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + i / 2)));
            __m512 vh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
            __m512 vl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, fifteen), table), scale);
            _mm512_storeu_ps(y + i, _mm512_permutex2var_ps(vh, first, vl));
            _mm512_storeu_ps(y + i + 16, _mm512_permutex2var_ps(vh, second, vl));
        }
    }
}

static void dequant_task(const void *ctx, int64_t o0, int64_t o1) {
    const Q4 *q = ctx; /* rows [o0, o1) of this call's range; y is [range, in] */
    int64_t per_row = q->in / q->blocksize;
    for (int64_t o = o0; o < o1; o++) {
        int64_t row = o + q->first;
        const uint8_t *w = q->w + row * q->in / 2;
        float *y = q->y + o * q->in;
        if (kernel == AVX512 && q->blocksize % 32 == 0) {
            dequant_row_avx512(q, row, y);
            continue;
        }
        for (int64_t b = 0; b < per_row; b++) {
            float scale = block_scale(q, row * per_row + b);
            for (int64_t i = b * q->blocksize; i < (b + 1) * q->blocksize; i += 2) {
                y[i] = q->code[w[i / 2] >> 4] * scale;
                y[i + 1] = q->code[w[i / 2] & 15] * scale;
            }
        }
    }
}

/* ----- int8 and bfloat16 rows ------------------------------------------------------------------ */

typedef struct {
    const float *x;
    int rows;
    int64_t in, out;
    const void *w;
    const float *scale; /* int8: per output row; NULL for bfloat16 */
    float *y;
} Dense;

static inline float load_weight(const Dense *d, int64_t o, int64_t i) {
    if (d->scale) return (float)((const int8_t *)d->w)[o * d->in + i];
    uint32_t bits = (uint32_t)((const uint16_t *)d->w)[o * d->in + i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static void dense_rows_scalar(const Dense *d, int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
        float acc[MAX_ROWS] = {0};
        for (int64_t i = 0; i < d->in; i++) {
            float w = load_weight(d, o, i);
            for (int r = 0; r < d->rows; r++) acc[r] += w * d->x[r * d->in + i];
        }
        for (int r = 0; r < d->rows; r++) d->y[r * d->out + o] = acc[r] * (d->scale ? d->scale[o] : 1.0f);
    }
}

/* Two accumulators per row (alternate chunks), for two independent FMA chains. */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 dense_load8(const Dense *d, int64_t o,
                                                                                    int64_t i) {
    if (d->scale) {
        const int8_t *w = (const int8_t *)d->w + o * d->in + i;
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
    }
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)d->w + o * d->in + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"), always_inline)) static inline void dense_body_avx2(const Dense *d, int64_t o0,
                                                                                      int64_t o1, const int R) {
    for (int64_t o = o0; o < o1; o++) {
        __m256 a[MAX_ROWS], c[MAX_ROWS];
        for (int r = 0; r < R; r++) a[r] = c[r] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= d->in; i += 16) {
            __m256 w0 = dense_load8(d, o, i), w1 = dense_load8(d, o, i + 8);
            for (int r = 0; r < R; r++) {
                a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(d->x + r * d->in + i), a[r]);
                c[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(d->x + r * d->in + i + 8), c[r]);
            }
        }
        for (; i < d->in; i += 8) {
            __m256 w0 = dense_load8(d, o, i);
            for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(d->x + r * d->in + i), a[r]);
        }
        float scale = d->scale ? d->scale[o] : 1.0f;
        for (int r = 0; r < R; r++) d->y[r * d->out + o] = hsum256(_mm256_add_ps(a[r], c[r])) * scale;
    }
}

__attribute__((target("avx2,fma"))) static void dense_rows_avx2(const Dense *d, int64_t o0, int64_t o1) {
    int rows = d->rows;
    SWITCH_ROWS(dense_body_avx2, d, o0, o1)
}

__attribute__((target("avx512f"), always_inline)) static inline __m512 dense_load16(const Dense *d, int64_t o,
                                                                                    int64_t i) {
    if (d->scale) {
        const int8_t *w = (const int8_t *)d->w + o * d->in + i;
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    }
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)d->w + o * d->in + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* NR output rows at a time (a tile): NR weight rows stream from memory together, which a single
 * row stream per thread cannot saturate; NR * R pairs of accumulators stay in registers. */
__attribute__((target("avx512f"), always_inline)) static inline void dense_tile_avx512(const Dense *d, int64_t o,
                                                                                       const int R, const int NR) {
    __m512 a[TILE_ROWS][MAX_ROWS], c[TILE_ROWS][MAX_ROWS];
    for (int n = 0; n < NR; n++)
        for (int r = 0; r < R; r++) a[n][r] = c[n][r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d->in; i += 32)
        for (int n = 0; n < NR; n++) {
            __m512 w0 = dense_load16(d, o + n, i), w1 = dense_load16(d, o + n, i + 16);
            for (int r = 0; r < R; r++) {
                a[n][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(d->x + r * d->in + i), a[n][r]);
                c[n][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(d->x + r * d->in + i + 16), c[n][r]);
            }
        }
    for (; i < d->in; i += 16)
        for (int n = 0; n < NR; n++) {
            __m512 w0 = dense_load16(d, o + n, i);
            for (int r = 0; r < R; r++) a[n][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(d->x + r * d->in + i), a[n][r]);
        }
    for (int n = 0; n < NR; n++) {
        float scale = d->scale ? d->scale[o + n] : 1.0f;
        for (int r = 0; r < R; r++)
            d->y[r * d->out + o + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[n][r], c[n][r])) * scale;
    }
}

__attribute__((target("avx512f"), always_inline)) static inline void dense_body_avx512(const Dense *d, int64_t o0,
                                                                                       int64_t o1, const int R) {
    const int NR = TILE_FOR(R);
    int64_t o = o0;
    for (; o + NR <= o1; o += NR) dense_tile_avx512(d, o, R, NR);
    for (; o < o1; o++) dense_tile_avx512(d, o, R, 1);
}

__attribute__((target("avx512f"))) static void dense_rows_avx512(const Dense *d, int64_t o0, int64_t o1) {
    int rows = d->rows;
    SWITCH_ROWS(dense_body_avx512, d, o0, o1)
}

static void dense_task(const void *ctx, int64_t o0, int64_t o1) {
    const Dense *d = ctx;
    if (kernel == AVX512 && d->in % 16 == 0) dense_rows_avx512(d, o0, o1);
    else if (kernel >= AVX2 && d->in % 8 == 0) dense_rows_avx2(d, o0, o1);
    else dense_rows_scalar(d, o0, o1);
}

/* ----- arguments ------------------------------------------------------------------------------
 * The kernels above trust their Q4 / Dense structs; these entry points fill them only from arrays
 * they have checked. Every array is an object with the buffer protocol (neoxja passes numpy views of
 * its tensors; a bfloat16 weight as int16), exported C-contiguous, and must have the item type, the
 * alignment and exactly the element count that the dimensions given imply (their products checked
 * for overflow); outputs must be writable and share no memory with an input. Any failure is a
 * ValueError or TypeError that names the function and the argument, raised before any arithmetic. */

#define MAX_ARRAYS 8
#define MAX_THREADS 256

typedef struct {
    const char *fn;
    Py_buffer views[MAX_ARRAYS];
    int held;
} Args;

static void release(Args *a) {
    while (a->held > 0) PyBuffer_Release(&a->views[--a->held]);
}

/* Does the struct-module format of v describe one item of kind 'f' (float), 'i' (signed integer),
 * 'u' (unsigned integer) or 'x' (any integer) in native byte order? */
static int format_kind(const Py_buffer *v, char kind) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++; /* native or little-endian: the machines we build for */
    if (f[0] == '\0' || f[1] != '\0') return 0;
    const char *kinds = kind == 'f' ? "fde" : kind == 'i' ? "bhilq" : kind == 'u' ? "BHILQ" : "bhilqBHILQ";
    return strchr(kinds, f[0]) != NULL;
}

static const char *kind_name(char kind) {
    return kind == 'f' ? "float" : kind == 'i' ? "signed integer" : kind == 'u' ? "unsigned integer" : "integer";
}

/* The buffer of obj as `count` items of `itemsize` bytes of `kind`; NULL with an exception set. */
static void *array(Args *a, PyObject *obj, const char *name, char kind, Py_ssize_t itemsize, int64_t count,
                   int writable) {
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: %s is required (got None)", a->fn, name);
        return NULL;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be an array with the buffer protocol, got %.100s", a->fn, name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Py_buffer *v = &a->views[a->held];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %s must be a C-contiguous%s array", a->fn, name,
                     writable ? " writable" : "");
        return NULL;
    }
    a->held++;
    if (v->itemsize != itemsize || !format_kind(v, kind)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must hold %zd-byte %s values, got format '%s' (%zd bytes)", a->fn,
                     name, itemsize, kind_name(kind), v->format ? v->format : "B", v->itemsize);
        return NULL;
    }
    if (v->len && (uintptr_t)v->buf % (uintptr_t)itemsize) { /* (an empty array is never read) */
        PyErr_Format(PyExc_ValueError, "%s: %s is not aligned to its %zd-byte items", a->fn, name, itemsize);
        return NULL;
    }
    if (v->len / itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd values, the dimensions given need %lld", a->fn, name,
                     v->len / itemsize, (long long)count);
        return NULL;
    }
    return v->buf;
}

/* The output (the last array taken) shares no byte with any array taken before it. */
static int output_apart(Args *a, const char *name) {
    const Py_buffer *out = &a->views[a->held - 1];
    for (int i = 0; i < a->held - 1; i++) {
        const Py_buffer *in = &a->views[i];
        const char *o = out->buf, *p = in->buf;
        if (out->len && in->len && o < p + in->len && p < o + out->len) {
            PyErr_Format(PyExc_ValueError, "%s: %s overlaps an input array", a->fn, name);
            return -1;
        }
    }
    return 0;
}

/* *out = x * y, a positive element count that fits a Py_ssize_t, or a ValueError naming `what`. */
static int product(Args *a, const char *what, int64_t x, int64_t y, int64_t *out) {
    if (__builtin_mul_overflow(x, y, out) || *out > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %s (%lld * %lld) overflows", a->fn, what, (long long)x, (long long)y);
        return -1;
    }
    return 0;
}

static int positive(Args *a, const char *name, long long value) {
    if (value > 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: %s must be positive, got %lld", a->fn, name, value);
    return -1;
}

static int clamp_threads(long long threads) {
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
}

/* An int argument (anything with __index__); else a TypeError or ValueError naming it. */
static int whole(Args *a, const char *name, PyObject *obj, long long *out) {
    *out = PyLong_AsLongLong(obj);
    if (*out == -1 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError, overflow ? "%s: %s is out of range" :
                     "%s: %s must be an int, got %.100s", a->fn, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* A float argument (a float, or anything with __float__ or __index__); else a TypeError naming it. */
static int real(Args *a, const char *name, PyObject *obj, float *out) {
    double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be a float, got %.100s", a->fn, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = (float)value;
    return 0;
}

/* The scale tables of a 4-bit weight of `blocks` blocks into q: a float32 absmax, or (double
 * quantization) a uint8 qabsmax with its float32 nested absmax (one per 256 blocks) and 256-entry
 * nested code. */
static int scale_tables(Args *a, Q4 *q, int64_t blocks, PyObject *absmax, PyObject *qabsmax, PyObject *nabs,
                        PyObject *ncode) {
    if ((absmax == Py_None) == (qabsmax == Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s: give exactly one of absmax (float32) and qabsmax (uint8)", a->fn);
        return -1;
    }
    if (absmax != Py_None) {
        if (nabs != Py_None || ncode != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: nested_absmax and nested_code belong with a qabsmax, not absmax", a->fn);
            return -1;
        }
        q->absmax = array(a, absmax, "absmax", 'f', 4, blocks, 0);
        return q->absmax ? 0 : -1;
    }
    if (!(q->qabsmax = array(a, qabsmax, "qabsmax", 'u', 1, blocks, 0))) return -1;
    if (!(q->nested_absmax = array(a, nabs, "nested_absmax", 'f', 4, (blocks + 255) / 256, 0))) return -1;
    if (!(q->nested_code = array(a, ncode, "nested_code", 'f', 4, 256, 0))) return -1;
    return 0;
}

/* linear_4bit(x, rows, in, out, w, code, absmax, qabsmax, nested_absmax, nested_code, offset,
 *             blocksize, y, threads): y [rows, out] = x [rows, in] @ W.T; absmax or qabsmax is None. */
static PyObject *linear_4bit(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_w, *o_code, *o_absmax, *o_qabsmax, *o_nabs, *o_ncode, *o_y;
    PyObject *o_rows, *o_in, *o_out, *o_offset, *o_blocksize, *o_threads;
    long long rows, in, out, blocksize, threads;
    float offset;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOO:linear_4bit", &o_x, &o_rows, &o_in, &o_out, &o_w, &o_code, &o_absmax,
                          &o_qabsmax, &o_nabs, &o_ncode, &o_offset, &o_blocksize, &o_y, &o_threads))
        return NULL;
    Args a = {"linear_4bit"};
    if (whole(&a, "rows", o_rows, &rows) || whole(&a, "in_features", o_in, &in) ||
        whole(&a, "out_features", o_out, &out) || real(&a, "offset", o_offset, &offset) ||
        whole(&a, "blocksize", o_blocksize, &blocksize) || whole(&a, "threads", o_threads, &threads))
        return NULL;
    if (rows < 1 || rows > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "linear_4bit: rows must be 1..%d, got %lld", MAX_ROWS, rows);
        return NULL;
    }
    Q4 q = {.rows = (int)rows, .in = in, .out = out, .offset = offset, .blocksize = blocksize};
    int64_t x_count, y_count, weights;
    if (positive(&a, "in_features", in) || positive(&a, "out_features", out)) return NULL;
    if (blocksize < 32 || blocksize % 32 || in % blocksize) {
        PyErr_Format(PyExc_ValueError,
                     "linear_4bit: blocksize must be a multiple of 32 dividing in_features (%lld), got %lld", in,
                     blocksize);
        return NULL;
    }
    if (product(&a, "rows * in_features", rows, in, &x_count) || product(&a, "rows * out_features", rows, out, &y_count) ||
        product(&a, "out_features * in_features", out, in, &weights))
        return NULL;
    if (!(q.x = array(&a, o_x, "x", 'f', 4, x_count, 0)) || !(q.w = array(&a, o_w, "w", 'u', 1, weights / 2, 0)) ||
        !(q.code = array(&a, o_code, "code", 'f', 4, 16, 0)) ||
        scale_tables(&a, &q, weights / blocksize, o_absmax, o_qabsmax, o_nabs, o_ncode) ||
        !(q.y = array(&a, o_y, "y", 'f', 4, y_count, 1)) || output_apart(&a, "y")) {
        release(&a);
        return NULL;
    }
    int nth = clamp_threads(threads);
    q.wide = kernel == AVX512 && in % 128 == 0;
    float *split = NULL;
    if (kernel >= AVX2) {
        split = malloc(sizeof(float) * (size_t)x_count);
        if (!split) {
            release(&a);
            return PyErr_NoMemory();
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (split) {
        for (int r = 0; r < rows; r++) {
            if (q.wide) spread_128(q.x + r * in, split + r * in, in);
            else deinterleave(q.x + r * in, split + r * in, in);
        }
        q.x = split;
    }
    split_rows(out, nth, q4_task, &q);
    Py_END_ALLOW_THREADS
    free(split);
    release(&a);
    Py_RETURN_NONE;
}

/* dequantize_4bit(first_row, count, out, in, w, code, absmax, qabsmax, nested_absmax, nested_code,
 *                 offset, blocksize, y, threads): rows [first_row, first_row + count) of a weight
 * [out, in] into y [count, in]. */
static PyObject *dequantize_4bit(PyObject *self, PyObject *args) {
    PyObject *o_w, *o_code, *o_absmax, *o_qabsmax, *o_nabs, *o_ncode, *o_y;
    PyObject *o_first, *o_count, *o_out, *o_in, *o_offset, *o_blocksize, *o_threads;
    long long first, count, out, in, blocksize, threads;
    float offset;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOO:dequantize_4bit", &o_first, &o_count, &o_out, &o_in, &o_w, &o_code,
                          &o_absmax, &o_qabsmax, &o_nabs, &o_ncode, &o_offset, &o_blocksize, &o_y, &o_threads))
        return NULL;
    Args a = {"dequantize_4bit"};
    if (whole(&a, "first_row", o_first, &first) || whole(&a, "count", o_count, &count) ||
        whole(&a, "out_features", o_out, &out) || whole(&a, "in_features", o_in, &in) ||
        real(&a, "offset", o_offset, &offset) || whole(&a, "blocksize", o_blocksize, &blocksize) ||
        whole(&a, "threads", o_threads, &threads))
        return NULL;
    int64_t weights, y_count;
    if (positive(&a, "in_features", in) || positive(&a, "out_features", out)) return NULL;
    if (first < 0 || count < 0 || first > out - count) {
        PyErr_Format(PyExc_ValueError, "dequantize_4bit: rows [%lld, %lld + %lld) are not rows of the weight's %lld",
                     first, first, count, out);
        return NULL;
    }
    if (blocksize < 2 || blocksize % 2 || in % blocksize) {
        PyErr_Format(PyExc_ValueError,
                     "dequantize_4bit: blocksize must be an even divisor of in_features (%lld), got %lld", in,
                     blocksize);
        return NULL;
    }
    if (product(&a, "out_features * in_features", out, in, &weights) || product(&a, "count * in_features", count, in, &y_count))
        return NULL;
    Q4 q = {.in = in, .out = count, .offset = offset, .blocksize = blocksize, .first = first};
    if (!(q.w = array(&a, o_w, "w", 'u', 1, weights / 2, 0)) || !(q.code = array(&a, o_code, "code", 'f', 4, 16, 0)) ||
        scale_tables(&a, &q, weights / blocksize, o_absmax, o_qabsmax, o_nabs, o_ncode) ||
        !(q.y = array(&a, o_y, "y", 'f', 4, y_count, 1)) || output_apart(&a, "y")) {
        release(&a);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    split_rows(count, clamp_threads(threads), dequant_task, &q);
    Py_END_ALLOW_THREADS
    release(&a);
    Py_RETURN_NONE;
}

/* linear_dense(x, rows, in, out, w, scale, y, threads): y [rows, out] = x [rows, in] @ W.T for int8
 * rows W times a float32 scale per row, or (scale None) bfloat16 W given as 16-bit integers. */
static PyObject *linear_dense(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_w, *o_scale, *o_y, *o_rows, *o_in, *o_out, *o_threads;
    long long rows, in, out, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOO:linear_dense", &o_x, &o_rows, &o_in, &o_out, &o_w, &o_scale, &o_y,
                          &o_threads))
        return NULL;
    Args a = {"linear_dense"};
    if (whole(&a, "rows", o_rows, &rows) || whole(&a, "in_features", o_in, &in) ||
        whole(&a, "out_features", o_out, &out) || whole(&a, "threads", o_threads, &threads))
        return NULL;
    int64_t x_count, y_count, weights;
    if (rows < 1 || rows > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "linear_dense: rows must be 1..%d, got %lld", MAX_ROWS, rows);
        return NULL;
    }
    if (positive(&a, "in_features", in) || positive(&a, "out_features", out) ||
        product(&a, "rows * in_features", rows, in, &x_count) || product(&a, "rows * out_features", rows, out, &y_count) ||
        product(&a, "out_features * in_features", out, in, &weights))
        return NULL;
    int int8 = o_scale != Py_None; /* else bfloat16 */
    Dense d = {.rows = (int)rows, .in = in, .out = out};
    if (!(d.x = array(&a, o_x, "x", 'f', 4, x_count, 0)) ||
        !(d.w = int8 ? array(&a, o_w, "w", 'i', 1, weights, 0) : array(&a, o_w, "w", 'x', 2, weights, 0)) ||
        (int8 && !(d.scale = array(&a, o_scale, "scale", 'f', 4, out, 0))) ||
        !(d.y = array(&a, o_y, "y", 'f', 4, y_count, 1)) || output_apart(&a, "y")) {
        release(&a);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    split_rows(out, clamp_threads(threads), dense_task, &d);
    Py_END_ALLOW_THREADS
    release(&a);
    Py_RETURN_NONE;
}

static PyObject *kernel_name(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(kernel == AVX512 ? "avx512" : kernel == AVX2 ? "avx2" : "scalar");
}

static PyMethodDef methods[] = {
    {"linear_4bit", linear_4bit, METH_VARARGS,
     "linear_4bit(x, rows, in, out, w, code, absmax, qabsmax, nested_absmax, nested_code, offset, blocksize,\n"
     "            y, threads): y [rows, out] = x [rows, in] @ W.T for a 4-bit weight (arrays with the buffer\n"
     "protocol, C-contiguous; float32 absmax, or uint8 qabsmax with its nested tables; the other None)."},
    {"dequantize_4bit", dequantize_4bit, METH_VARARGS,
     "dequantize_4bit(first_row, count, out, in, w, code, absmax, qabsmax, nested_absmax, nested_code, offset,\n"
     "                blocksize, y, threads): float32 rows [first_row, first_row + count) of a 4-bit weight."},
    {"linear_dense", linear_dense, METH_VARARGS,
     "linear_dense(x, rows, in, out, w, scale, y, threads): y = x @ W.T for int8 rows W with a float32 scale\n"
     "per row, or (scale None) bfloat16 W passed as 16-bit integers."},
    {"kernel", kernel_name, METH_NOARGS, "the instruction set in use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef quant_module = {PyModuleDef_HEAD_INIT, "neoxja._quant",
                                          "Matrix products with quantized weights (CPU).", -1, methods};

PyMODINIT_FUNC PyInit__quant(void) {
    const char *forced = getenv("NEOXJA_QUANT_KERNEL");
    int limit = !forced ? AVX512 : strcmp(forced, "scalar") == 0 ? SCALAR : strcmp(forced, "avx2") == 0 ? AVX2 : AVX512;
    __builtin_cpu_init();
    if (limit >= AVX512 && __builtin_cpu_supports("avx512f")) kernel = AVX512;
    else if (limit >= AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernel = AVX2;
    return PyModule_Create(&quant_module);
}
