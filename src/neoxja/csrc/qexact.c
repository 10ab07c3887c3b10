/* The exact arithmetic of the quantized formats: float32 products with the values each format
 * stands for, within float32 rounding of x @ dequantize(W).T (see weights.h).
 *
 * 4-bit is compute-heavy (a table lookup per weight): with AVX-512 one vpermps looks up 16 nibbles
 * in the 16-entry code, straight from the packed bytes (see q4_body_avx512). x is first laid out to
 * match the order in which the kernel meets the nibbles (AVX-512: spread_128; AVX2: per group of
 * 16, the even elements then the odd ones), so the weights are never shuffled. int8 rows are
 * widened to float32 and scaled per row at the end; bfloat16 is the upper half of a float32.
 * The kernels take up to EXACT_ROWS rows of x at a time, each with its own accumulators.
 */
#include <string.h>

#include "kernels.h"

#define TILE_FOR(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1) /* output rows at once, for R rows of x */

float q4_block_scale(const Weight *w, int64_t b) {
    if (w->qabsmax) return w->nested_code[w->qabsmax[b]] * w->nested_absmax[b >> 8] + w->offset;
    return w->absmax[b];
}

/* One call's rows: x [R, in] (laid out for the kernel), y[r * ldy + o]. */
typedef struct {
    const Weight *w;
    const float *x;
    float *y;
    int64_t ldy;
} Rows;

static void q4_rows_scalar(const Rows *p, int R, int64_t o0, int64_t o1) {
    const Weight *w = p->w;
    const int64_t in = w->in, per_row = in / w->blocksize;
    for (int64_t o = o0; o < o1; o++) {
        float acc[EXACT_ROWS] = {0};
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        for (int64_t b = 0; b < per_row; b++) {
            float scale = q4_block_scale(w, o * per_row + b);
            float part[EXACT_ROWS] = {0};
            for (int64_t i = b * w->blocksize; i < (b + 1) * w->blocksize; i += 2) {
                uint8_t byte = bytes[i / 2];
                float hi = w->code[byte >> 4], lo = w->code[byte & 15];
                for (int r = 0; r < R; r++) part[r] += hi * p->x[r * in + i] + lo * p->x[r * in + i + 1];
            }
            for (int r = 0; r < R; r++) acc[r] += part[r] * scale;
        }
        for (int r = 0; r < R; r++) p->y[r * p->ldy + o] = acc[r];
    }
}

#if HAVE_X86

/* The SIMD bodies take the row count R as a constant (the wrappers switch on it), so their per-row
 * accumulators live in registers; even and odd elements accumulate separately, two independent FMA
 * chains per row. */
#define SWITCH_ROWS(body, R, ...)                                                                         \
    switch (R) {                                                                                          \
    case 1: body(__VA_ARGS__, 1); break;                                                                  \
    case 2: body(__VA_ARGS__, 2); break;                                                                  \
    case 3: body(__VA_ARGS__, 3); break;                                                                  \
    case 4: body(__VA_ARGS__, 4); break;                                                                  \
    case 5: body(__VA_ARGS__, 5); break;                                                                  \
    case 6: body(__VA_ARGS__, 6); break;                                                                  \
    case 7: body(__VA_ARGS__, 7); break;                                                                  \
    default: body(__VA_ARGS__, 8); break;                                                                 \
    }

__attribute__((target("avx2,fma"), always_inline)) static inline void q4_body_avx2(const Rows *p, int64_t o0,
                                                                                    int64_t o1, const int R) {
    const Weight *w = p->w;
    const int64_t in = w->in, per_row = in / w->blocksize;
    __m256 low_table = _mm256_loadu_ps(w->code), high_table = _mm256_loadu_ps(w->code + 8);
    __m256i fifteen = _mm256_set1_epi32(15);
    for (int64_t o = o0; o < o1; o++) {
        __m256 acc[EXACT_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        for (int64_t b = 0; b < per_row; b++) {
            __m256 scale = _mm256_set1_ps(q4_block_scale(w, o * per_row + b));
            __m256 even[EXACT_ROWS], odd[EXACT_ROWS];
            for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
            for (int64_t i = b * w->blocksize; i < (b + 1) * w->blocksize; i += 16) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + i / 2)));
                __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, fifteen);
                __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, hi),
                                             _mm256_permutevar8x32_ps(high_table, hi),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28)));
                __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, lo),
                                             _mm256_permutevar8x32_ps(high_table, lo),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28)));
                for (int r = 0; r < R; r++) {
                    const float *x = p->x + r * in + i; /* 8 evens, then 8 odds */
                    even[r] = _mm256_fmadd_ps(vh, _mm256_loadu_ps(x), even[r]);
                    odd[r] = _mm256_fmadd_ps(vl, _mm256_loadu_ps(x + 8), odd[r]);
                }
            }
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), scale, acc[r]);
        }
        for (int r = 0; r < R; r++) p->y[r * p->ldy + o] = hsum8(acc[r]);
    }
}

__attribute__((target("avx2,fma"))) static void q4_rows_avx2(const Rows *p, int R, int64_t o0, int64_t o1) {
    SWITCH_ROWS(q4_body_avx2, R, p, o0, o1)
}

/* AVX-512 reads 64 bytes (128 weights) at a time as 16 dwords of 8 nibbles each: vpermps looks up
 * the low 4 bits of each dword index, so shifting the whole register right by 4 * t bits selects
 * nibble t of every dword, with no widening of the bytes. Nibble t of dword L is element
 * 8 * L + (t ^ 1) of the group (the even element sits in the high nibble), so x is laid out per
 * group of 128 as x[8 * L + (t ^ 1)] at 16 * t + L (spread_128). A lane's 8 elements lie in one
 * block (blocksize >= 32), so the block scales form one vector per group. */
__attribute__((target("avx512f"))) static inline __m512 group_scales(const Weight *w, int64_t first) {
    int64_t b = first / w->blocksize;
    if (w->blocksize >= 128) return _mm512_set1_ps(q4_block_scale(w, b));
    if (w->blocksize == 64)
        return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(q4_block_scale(w, b)),
                                    _mm512_set1_ps(q4_block_scale(w, b + 1)));
    __m128 s0 = _mm_set1_ps(q4_block_scale(w, b)), s1 = _mm_set1_ps(q4_block_scale(w, b + 1));
    __m128 s2 = _mm_set1_ps(q4_block_scale(w, b + 2)), s3 = _mm_set1_ps(q4_block_scale(w, b + 3));
    __m512 v = _mm512_castps128_ps512(s0);
    v = _mm512_insertf32x4(v, s1, 1);
    v = _mm512_insertf32x4(v, s2, 2);
    return _mm512_insertf32x4(v, s3, 3);
}

__attribute__((target("avx512f"), always_inline)) static inline void q4_body_avx512(const Rows *p, int64_t o0,
                                                                                    int64_t o1, const int R) {
    const Weight *w = p->w;
    const int64_t in = w->in;
    __m512 table = _mm512_loadu_ps(w->code);
    for (int64_t o = o0; o < o1; o++) {
        __m512 acc[EXACT_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        for (int64_t g = 0; g < in; g += 128) {
            __m512i v = _mm512_loadu_si512((const void *)(bytes + g / 2));
            __m512 even[EXACT_ROWS], odd[EXACT_ROWS];
            for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
            for (int t = 0; t < 8; t += 2) {
                __m512 v0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * t), table);
                __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * t + 4), table);
                for (int r = 0; r < R; r++) {
                    const float *x = p->x + r * in + g + 16 * t;
                    even[r] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x), even[r]);
                    odd[r] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + 16), odd[r]);
                }
            }
            __m512 scale = group_scales(w, o * in + g);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(even[r], odd[r]), scale, acc[r]);
        }
        for (int r = 0; r < R; r++) p->y[r * p->ldy + o] = _mm512_reduce_add_ps(acc[r]);
    }
}

__attribute__((target("avx512f"))) static void q4_rows_avx512(const Rows *p, int R, int64_t o0, int64_t o1) {
    SWITCH_ROWS(q4_body_avx512, R, p, o0, o1)
}
#endif

int q4_exact_wide(const Weight *w, int level) { return HAVE_X86 && level >= LEVEL_AVX512 && w->in % 128 == 0; }

/* x's elements in the order the 4-bit kernel of `level` meets them: per group of 128, those of
 * nibble t of dword L at 16 * t + L (AVX-512, see above); per group of 16, the 8 even ones then the
 * 8 odd ones (AVX2); as they are (portable C). */
void q4_exact_layout(const Weight *w, const float *x, float *f, int level) {
    const int64_t n = w->in;
    if (q4_exact_wide(w, level)) {
        for (int64_t g = 0; g < n; g += 128)
            for (int t = 0; t < 8; t++)
                for (int lane = 0; lane < 16; lane++) f[g + 16 * t + lane] = x[g + 8 * lane + (t ^ 1)];
    } else if (HAVE_X86 && level >= LEVEL_AVX2) {
        for (int64_t g = 0; g < n; g += 16)
            for (int k = 0; k < 8; k++) {
                f[g + k] = x[g + 2 * k];
                f[g + 8 + k] = x[g + 2 * k + 1];
            }
    } else {
        memcpy(f, x, sizeof(float) * n);
    }
}

void q4_exact(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int level) {
    for (int r0 = 0; r0 < a->rows; r0 += EXACT_ROWS) {
        int R = a->rows - r0 < EXACT_ROWS ? a->rows - r0 : EXACT_ROWS;
        Rows p = {w, a->f + r0 * w->in, y + r0 * ldy, ldy};
#if HAVE_X86
        if (q4_exact_wide(w, level)) q4_rows_avx512(&p, R, o0, o1);
        else if (level >= LEVEL_AVX2) q4_rows_avx2(&p, R, o0, o1);
        else
#endif
            q4_rows_scalar(&p, R, o0, o1);
    }
}

/* ----- int8 and bfloat16 rows ------------------------------------------------------------------ */

static inline float dense_weight(const Weight *w, int64_t o, int64_t i) {
    if (w->format == W_INT8) return (float)((const int8_t *)w->w)[o * w->in + i];
    uint32_t bits = (uint32_t)((const uint16_t *)w->w)[o * w->in + i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static void dense_rows_scalar(const Rows *p, int R, int64_t o0, int64_t o1) {
    const Weight *w = p->w;
    for (int64_t o = o0; o < o1; o++) {
        float acc[EXACT_ROWS] = {0};
        for (int64_t i = 0; i < w->in; i++) {
            float v = dense_weight(w, o, i);
            for (int r = 0; r < R; r++) acc[r] += v * p->x[r * w->in + i];
        }
        float scale = w->format == W_INT8 ? w->scale[o] : 1.0f;
        for (int r = 0; r < R; r++) p->y[r * p->ldy + o] = acc[r] * scale;
    }
}

#if HAVE_X86
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 dense_load8(const Weight *w, int64_t o,
                                                                                    int64_t i) {
    if (w->format == W_INT8) {
        const int8_t *v = (const int8_t *)w->w + o * w->in + i;
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)v)));
    }
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w->w + o * w->in + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Two accumulators per row (alternate chunks), for two independent FMA chains. */
__attribute__((target("avx2,fma"), always_inline)) static inline void dense_body_avx2(const Rows *p, int64_t o0,
                                                                                      int64_t o1, const int R) {
    const Weight *w = p->w;
    const int64_t in = w->in;
    for (int64_t o = o0; o < o1; o++) {
        __m256 a[EXACT_ROWS], c[EXACT_ROWS];
        for (int r = 0; r < R; r++) a[r] = c[r] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) {
            __m256 w0 = dense_load8(w, o, i), w1 = dense_load8(w, o, i + 8);
            for (int r = 0; r < R; r++) {
                a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p->x + r * in + i), a[r]);
                c[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p->x + r * in + i + 8), c[r]);
            }
        }
        for (; i < in; i += 8) {
            __m256 w0 = dense_load8(w, o, i);
            for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p->x + r * in + i), a[r]);
        }
        float scale = w->format == W_INT8 ? w->scale[o] : 1.0f;
        for (int r = 0; r < R; r++) p->y[r * p->ldy + o] = hsum8(_mm256_add_ps(a[r], c[r])) * scale;
    }
}

__attribute__((target("avx2,fma"))) static void dense_rows_avx2(const Rows *p, int R, int64_t o0, int64_t o1) {
    SWITCH_ROWS(dense_body_avx2, R, p, o0, o1)
}

__attribute__((target("avx512f"), always_inline)) static inline __m512 dense_load16(const Weight *w, int64_t o,
                                                                                    int64_t i) {
    if (w->format == W_INT8) {
        const int8_t *v = (const int8_t *)w->w + o * w->in + i;
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)v)));
    }
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w->w + o * w->in + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* NR output rows at a time (a tile): NR weight rows stream from memory together, which a single
 * row stream per thread cannot saturate; NR * R pairs of accumulators stay in registers. */
__attribute__((target("avx512f"), always_inline)) static inline void dense_tile_avx512(const Rows *p, int64_t o,
                                                                                       const int R, const int NR) {
    const Weight *w = p->w;
    const int64_t in = w->in;
    __m512 a[4][EXACT_ROWS], c[4][EXACT_ROWS];
    for (int n = 0; n < NR; n++)
        for (int r = 0; r < R; r++) a[n][r] = c[n][r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32)
        for (int n = 0; n < NR; n++) {
            __m512 w0 = dense_load16(w, o + n, i), w1 = dense_load16(w, o + n, i + 16);
            for (int r = 0; r < R; r++) {
                a[n][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p->x + r * in + i), a[n][r]);
                c[n][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p->x + r * in + i + 16), c[n][r]);
            }
        }
    for (; i < in; i += 16)
        for (int n = 0; n < NR; n++) {
            __m512 w0 = dense_load16(w, o + n, i);
            for (int r = 0; r < R; r++) a[n][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p->x + r * in + i), a[n][r]);
        }
    for (int n = 0; n < NR; n++) {
        float scale = w->format == W_INT8 ? w->scale[o + n] : 1.0f;
        for (int r = 0; r < R; r++)
            p->y[r * p->ldy + o + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[n][r], c[n][r])) * scale;
    }
}

__attribute__((target("avx512f"), always_inline)) static inline void dense_body_avx512(const Rows *p, int64_t o0,
                                                                                       int64_t o1, const int R) {
    const int NR = TILE_FOR(R);
    int64_t o = o0;
    for (; o + NR <= o1; o += NR) dense_tile_avx512(p, o, R, NR);
    for (; o < o1; o++) dense_tile_avx512(p, o, R, 1);
}

__attribute__((target("avx512f"))) static void dense_rows_avx512(const Rows *p, int R, int64_t o0, int64_t o1) {
    SWITCH_ROWS(dense_body_avx512, R, p, o0, o1)
}
#endif

void dense_exact(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int level) {
    for (int r0 = 0; r0 < a->rows; r0 += EXACT_ROWS) {
        int R = a->rows - r0 < EXACT_ROWS ? a->rows - r0 : EXACT_ROWS;
        Rows p = {w, a->x + r0 * w->in, y + r0 * ldy, ldy};
#if HAVE_X86
        if (level >= LEVEL_AVX512 && w->in % 16 == 0) dense_rows_avx512(&p, R, o0, o1);
        else if (level >= LEVEL_AVX2 && w->in % 8 == 0) dense_rows_avx2(&p, R, o0, o1);
        else
#endif
            dense_rows_scalar(&p, R, o0, o1);
    }
}

/* ----- dequantization -------------------------------------------------------------------------- */

#if HAVE_X86
/* One row of a 4-bit weight as float32, in element order (the two permutes interleave the high
 * nibbles' values, even elements, with the low nibbles', odd elements). */
__attribute__((target("avx512f"))) static void dequant_row_avx512(const Weight *w, int64_t row, float *y) {
    const int64_t per_row = w->in / w->blocksize;
    const uint8_t *bytes = (const uint8_t *)w->w + row * w->in / 2;
    __m512 table = _mm512_loadu_ps(w->code);
    __m512i fifteen = _mm512_set1_epi32(15);
    __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t b = 0; b < per_row; b++) {
        __m512 scale = _mm512_set1_ps(q4_block_scale(w, row * per_row + b));
        for (int64_t i = b * w->blocksize; i < (b + 1) * w->blocksize; i += 32) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + i / 2)));
            __m512 vh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), scale);
            __m512 vl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, fifteen), table), scale);
            _mm512_storeu_ps(y + i, _mm512_permutex2var_ps(vh, first, vl));
            _mm512_storeu_ps(y + i + 16, _mm512_permutex2var_ps(vh, second, vl));
        }
    }
}
#endif

/* float32 -> bfloat16 bits, rounding to nearest even, NaN -> 0x7FC0: as PyTorch converts. */
static inline uint16_t to_bfloat16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

void q4_dequantize_bf16(const Weight *w, uint16_t *y, float *row, int64_t o0, int64_t o1, int level) {
    for (int64_t o = o0; o < o1; o++, y += w->in) {
        q4_dequantize(w, row, o, o + 1, level);
        for (int64_t i = 0; i < w->in; i++) y[i] = to_bfloat16(row[i]);
    }
}

void q4_dequantize(const Weight *w, float *y, int64_t o0, int64_t o1, int level) {
    const int64_t per_row = w->in / w->blocksize;
    for (int64_t row = o0; row < o1; row++, y += w->in) {
#if HAVE_X86
        if (level >= LEVEL_AVX512 && w->blocksize % 32 == 0) {
            dequant_row_avx512(w, row, y);
            continue;
        }
#endif
        const uint8_t *bytes = (const uint8_t *)w->w + row * w->in / 2;
        for (int64_t b = 0; b < per_row; b++) {
            float scale = q4_block_scale(w, row * per_row + b);
            for (int64_t i = b * w->blocksize; i < (b + 1) * w->blocksize; i += 2) {
                y[i] = w->code[bytes[i / 2] >> 4] * scale;
                y[i + 1] = w->code[bytes[i / 2] & 15] * scale;
            }
        }
    }
}
