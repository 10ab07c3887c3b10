/* The fast kernels with AVX-512: VNNI's vpdpbusd for 4-bit and int8 weights times int8 activations,
 * AVX512_BF16's vdpbf16ps for bfloat16 weights (see weights.h for the arithmetic).
 *
 * vpdpbusd multiplies unsigned bytes by signed bytes, four products per 32-bit lane. The weights
 * are the unsigned side: a 4-bit code is looked up (vpshufb, 16 entries) as round(127 * code) + 128,
 * an int8 weight has its sign bit flipped (w + 128); each lane's accumulator starts from the
 * activation's correction, -128 times the sum of the four activation bytes it meets, computed
 * once when the activation was quantized, which takes the 128s back out exactly.
 *
 * 4-bit: 64 packed bytes are 128 weights; their low nibbles (odd elements) and high nibbles (even
 * elements) are looked up separately, and the activation is laid out per group of 128 as its 64
 * even elements then its 64 odd ones (act_q4_avx512), so lane L of both products meets elements
 * 8L..8L+7: both go into one accumulator, whose lanes 0-7 and 8-15 hold whole blocks. Per group,
 * one conversion to float and one multiply-add by (weight block scale * activation block scale),
 * the weight scales of a row decoded a chunk at a time into a small table (double quantization's
 * lookups included) and spread over the lanes by one vpermps.
 *
 * Rows of x are taken up to ROWS at a time: the weights of a group are loaded and decoded once for
 * all of them; each row keeps its own accumulators and runs the same operations whatever the
 * number of rows beside it.
 */
#include <float.h>
#include <string.h>

#include "kernels.h"

#if HAVE_X86

#define ROWS 8
#define CHUNK_GROUPS 32 /* groups whose weight scales are decoded at once */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline)) static inline

/* ----- activations ----------------------------------------------------------------------------- */

/* The largest |x| of 4 vectors, or NaN when one holds an infinity or NaN. */
T512_INLINE float block_amax(const __m512 *v) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 finite = 0xFFFF;
    for (int k = 0; k < 4; k++) {
        __m512 a = _mm512_abs_ps(v[k]);
        finite &= _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ);
        m = _mm512_max_ps(m, a);
    }
    return finite == 0xFFFF ? _mm512_reduce_max_ps(m) : __builtin_nanf("");
}

/* 16 floats times id, rounded to int8 (the values lie in [-127, 127]). */
T512_INLINE __m128i to_int8(__m512 v, float id) {
    return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(id))));
}

T512_INLINE void block_scales(float amax, float *d, float *id) {
    if (amax != amax) *d = amax, *id = 0.f; /* NaN: the row's results are NaN, its bytes 0 */
    else if (amax == 0.f) *d = 0.f, *id = 0.f;
    else *d = amax / 127.f, *id = 127.f / amax;
}

/* 128 elements of x from x[0] (fewer: zeros after n) as 8 vectors. */
T512_INLINE void load_group(const float *x, int64_t n, __m512 *v) {
    for (int k = 0; k < 8; k++) {
        int64_t left = n - 16 * k;
        __mmask16 m = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        v[k] = _mm512_maskz_loadu_ps(m, x + 16 * k);
    }
}

/* -128 times the sum of each 4 bytes of a and of b, lane by lane. */
T512_INLINE __m512i correction(__m512i a, __m512i b) {
    __m512i ones = _mm512_set1_epi8(1), sum = _mm512_setzero_si512();
    sum = _mm512_dpbusd_epi32(sum, ones, a);
    sum = _mm512_dpbusd_epi32(sum, ones, b);
    return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7));
}

T512 void act_q4_avx512(const Act *a, int r, int64_t i0, int64_t i1) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    int8_t *q = a->q + r * a->ld;
    for (int64_t g = i0; g < i1; g += Q4_GROUP) {
        __m512 v[8];
        load_group(a->x + r * a->in + g, a->in - g, v);
        float d[2], id[2];
        block_scales(block_amax(v), &d[0], &id[0]);
        block_scales(block_amax(v + 4), &d[1], &id[1]);
        __m128i e[4], o[4];
        for (int k = 0; k < 4; k++) { /* elements 32k..32k+31: their 16 evens and 16 odds */
            e[k] = to_int8(_mm512_permutex2var_ps(v[2 * k], even, v[2 * k + 1]), id[k / 2]);
            o[k] = to_int8(_mm512_permutex2var_ps(v[2 * k], odd, v[2 * k + 1]), id[k / 2]);
            if (d[k / 2] != d[k / 2]) e[k] = o[k] = _mm_setzero_si128(); /* (an infinity or NaN) */
        }
        __m512i ev = _mm512_inserti32x4(_mm512_castsi128_si512(e[0]), e[1], 1);
        ev = _mm512_inserti32x4(_mm512_inserti32x4(ev, e[2], 2), e[3], 3);
        __m512i ov = _mm512_inserti32x4(_mm512_castsi128_si512(o[0]), o[1], 1);
        ov = _mm512_inserti32x4(_mm512_inserti32x4(ov, o[2], 2), o[3], 3);
        _mm512_storeu_si512(q + g, ev);
        _mm512_storeu_si512(q + g + Q4_GROUP / 2, ov);
        _mm512_storeu_si512(a->corr + r * (a->ld / 8) + g / 8, correction(ev, ov));
        /* the scale of lane L is that of the activation's block times 1/127, the step of the codes */
        __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[0] / 127.f), _mm512_set1_ps(d[1] / 127.f));
        _mm512_storeu_ps(a->qscale + r * (a->ld / 8) + g / 8, s);
    }
}

T512 void act_i8_avx512(const Act *a, int r, int64_t i0, int64_t i1) {
    int8_t *q = a->q + r * a->ld;
    for (int64_t i = i0; i < i1; i += ACT_BLOCK) {
        __m512 v[8];
        load_group(a->x + r * a->in + i, a->in - i < ACT_BLOCK ? a->in - i : ACT_BLOCK, v);
        float d, id;
        block_scales(block_amax(v), &d, &id);
        __m512i qv = _mm512_castsi128_si512(to_int8(v[0], id));
        qv = _mm512_inserti32x4(qv, to_int8(v[1], id), 1);
        qv = _mm512_inserti32x4(qv, to_int8(v[2], id), 2);
        qv = _mm512_inserti32x4(qv, to_int8(v[3], id), 3);
        if (d != d) qv = _mm512_setzero_si512(); /* (an infinity or NaN) */
        _mm512_storeu_si512(q + i, qv);
        _mm512_storeu_si512(a->corr + r * (a->ld / 4) + i / 4, correction(qv, _mm512_setzero_si512()));
        a->qscale[r * (a->ld / ACT_BLOCK) + i / ACT_BLOCK] = d;
    }
}

/* ----- 4-bit ----------------------------------------------------------------------------------- */

/* Double quantization's block scales, nested_code[q] * nested_absmax + offset, of blocks [b0, b1) into
 * s (then at least 48 more floats of room). The same float operations as q4_block_scale. Two ways
 * to look the 256-entry code up: with AVX512_VBMI, 64 blocks at a time from the code's four byte
 * planes (each 256 bytes, two vpermi2b and a blend by the index's top bit), the bytes then
 * interleaved back into floats; without it, one gather per 16 blocks. 16 consecutive blocks share
 * at most two nested scales (one per 256 blocks). */
T512_INLINE __m512 nested_outer(const Weight *w, int64_t b, int64_t n) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i next = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(b & 255)), lane), 8);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(next, next), _mm512_set1_ps(w->nested_absmax[b >> 8]),
                                _mm512_set1_ps(w->nested_absmax[(b + n - 1) >> 8]));
}

T512_INLINE void nested_store(const Weight *w, int64_t b, int64_t n, __m512 code, float *s) {
    _mm512_storeu_ps(s, _mm512_add_ps(_mm512_mul_ps(code, nested_outer(w, b, n)), _mm512_set1_ps(w->offset)));
}

T512 static void nested_scales_gather(const Weight *w, int64_t b0, int64_t b1, float *s) {
    for (int64_t b = b0; b < b1; b += 16) {
        int64_t n = b1 - b < 16 ? b1 - b : 16;
        __mmask16 m = (__mmask16)((1u << n) - 1);
        __m512i index = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w->qabsmax + b));
        __m512 code = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, index, w->nested_code, 4);
        nested_store(w, b, n, code, s + (b - b0));
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi"))) static void
nested_scales_vbmi(const Weight *w, int64_t b0, int64_t b1, float *s) {
    for (int64_t b = b0; b < b1; b += 64) {
        int64_t n = b1 - b < 64 ? b1 - b : 64;
        __m512i index = _mm512_maskz_loadu_epi8(n == 64 ? ~0ULL : (1ULL << n) - 1, w->qabsmax + b);
        __mmask64 top = _mm512_movepi8_mask(index);
        __m512i plane[4];
        for (int p = 0; p < 4; p++) {
            const uint8_t *t = w->code_planes[p];
            __m512i low = _mm512_permutex2var_epi8(_mm512_loadu_si512(t), index, _mm512_loadu_si512(t + 64));
            __m512i high = _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), index, _mm512_loadu_si512(t + 192));
            plane[p] = _mm512_mask_blend_epi8(top, low, high);
        }
        /* bytes back into floats: per 128-bit lane j, f[k] holds elements 16j + 4k .. 16j + 4k + 3 */
        __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
        __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
        __m512i f0 = _mm512_unpacklo_epi16(lo01, lo23), f1 = _mm512_unpackhi_epi16(lo01, lo23);
        __m512i f2 = _mm512_unpacklo_epi16(hi01, hi23), f3 = _mm512_unpackhi_epi16(hi01, hi23);
        __m512i a = _mm512_shuffle_i32x4(f0, f1, 0x44), c = _mm512_shuffle_i32x4(f2, f3, 0x44);
        __m512i d = _mm512_shuffle_i32x4(f0, f1, 0xEE), e = _mm512_shuffle_i32x4(f2, f3, 0xEE);
        __m512i out[4] = {_mm512_shuffle_i32x4(a, c, 0x88), _mm512_shuffle_i32x4(a, c, 0xDD),
                          _mm512_shuffle_i32x4(d, e, 0x88), _mm512_shuffle_i32x4(d, e, 0xDD)};
        for (int k = 0; k < 4 && 16 * k < n; k++) {
            int64_t m = n - 16 * k < 16 ? n - 16 * k : 16;
            nested_store(w, b + 16 * k, m, _mm512_castsi512_ps(out[k]), s + (b - b0) + 16 * k);
        }
    }
}

T512 static void nested_scales(const Weight *w, int64_t b0, int64_t b1, float *s) {
    if (weight_isa.vbmi) nested_scales_vbmi(w, b0, b1, s);
    else nested_scales_gather(w, b0, b1, s);
}

/* One group g (128 weights) of output row o into the accumulators of R rows. */
T512_INLINE void q4_group(const uint8_t *bytes, int64_t g, int64_t left, __m512 wscale, __m512i lut, const int8_t **q,
                          const int32_t **corr, const float **qs, __m512 *acc, const int R) {
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512i v = left >= Q4_GROUP ? _mm512_loadu_si512(bytes + g * 64)
                                 : _mm512_maskz_loadu_epi8((1ULL << (left / 2)) - 1, bytes + g * 64);
    __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibble));
    __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    for (int r = 0; r < R; r++) {
        __m512i s = _mm512_loadu_si512(corr[r] + g * 16);
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(q[r] + g * Q4_GROUP));
        s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(q[r] + g * Q4_GROUP + 64));
        __m512 scale = _mm512_mul_ps(wscale, _mm512_loadu_ps(qs[r] + g * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
    }
}

/* The block scales of output row o's chunk from group c0 (CHUNK_GROUPS groups, or to the row's end)
 * decoded into table: its first block's at table[0]. */
T512_INLINE void chunk_scales(const Weight *w, int64_t o, int64_t c0, int64_t groups, int shift, float *table) {
    const int64_t in = w->in, end = c0 + CHUNK_GROUPS < groups ? (c0 + CHUNK_GROUPS) * Q4_GROUP : in;
    nested_scales(w, (o * in + c0 * Q4_GROUP) >> shift, ((o * in + end - 1) >> shift) + 1, table);
}

/* Output rows [o0, o1) chunk by chunk (CHUNK_GROUPS groups of a row). The block scales are read
 * straight from absmax; with double quantization, each chunk's are decoded into one of two tables
 * one chunk ahead, so a table is never read right after it is written. */
T512_INLINE void q4_rows(const Weight *w, const Act *a, int r0, float *y, int64_t ldy, int64_t o0, int64_t o1,
                         const int R) {
    const int64_t in = w->in, groups = (in + Q4_GROUP - 1) / Q4_GROUP;
    const int shift = __builtin_ctzll((unsigned long long)w->blocksize); /* a power of two (weight_check) */
    const int64_t total = (w->out * in) >> shift; /* blocks of the weight */
    uint8_t table[16];
    for (int k = 0; k < 16; k++) table[k] = (uint8_t)(w->lut[k] + 128);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table));
    int32_t lanes[16];
    for (int k = 0; k < 16; k++) lanes[k] = w->blocksize < Q4_GROUP ? (int32_t)((8 * k) >> shift) : 0;
    const __m512i spread = _mm512_loadu_si512(lanes);
    const int8_t *q[ROWS];
    const int32_t *corr[ROWS];
    const float *qs[ROWS];
    for (int r = 0; r < R; r++) {
        q[r] = a->q + (r0 + r) * a->ld;
        corr[r] = a->corr + (r0 + r) * (a->ld / 8);
        qs[r] = a->qscale + (r0 + r) * (a->ld / 8);
    }
    float tables[2][CHUNK_GROUPS * Q4_GROUP / 32 + 64];
    const int nested = w->qabsmax != NULL;
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    int64_t o = o0, c0 = 0, chunk = 0;
    if (nested && o < o1) chunk_scales(w, o, 0, groups, shift, tables[0]);
    while (o < o1) {
        const int64_t c1 = c0 + CHUNK_GROUPS < groups ? c0 + CHUNK_GROUPS : groups;
        const int64_t next_o = c1 < groups ? o : o + 1, next_c0 = c1 < groups ? c1 : 0;
        if (nested && next_o < o1) chunk_scales(w, next_o, next_c0, groups, shift, tables[(chunk + 1) & 1]);
        const float *source = nested ? tables[chunk & 1] : w->absmax;
        const int64_t base = nested ? (o * in + c0 * Q4_GROUP) >> shift : 0, limit = nested ? INT64_MAX : total;
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        for (int64_t g = c0; g < c1; g++) {
            int64_t b = ((o * in + g * Q4_GROUP) >> shift) - base; /* the group's first block */
            __m512 ws = limit - b >= 16 ? _mm512_loadu_ps(source + b)
                                        : _mm512_maskz_loadu_ps((__mmask16)((1u << (limit - b)) - 1), source + b);
            q4_group(bytes, g, in - g * Q4_GROUP, _mm512_permutexvar_ps(spread, ws), lut, q, corr, qs, acc, R);
        }
        if (next_o != o)
            for (int r = 0; r < R; r++) {
                y[(r0 + r) * ldy + o] = _mm512_reduce_add_ps(acc[r]);
                acc[r] = _mm512_setzero_ps();
            }
        o = next_o, c0 = next_c0, chunk++;
    }
}

#define SWITCH_R(call, R)                                                                                   \
    switch (R) {                                                                                            \
    case 1: call(1); break;                                                                                 \
    case 2: call(2); break;                                                                                 \
    case 3: call(3); break;                                                                                 \
    case 4: call(4); break;                                                                                 \
    case 5: call(5); break;                                                                                 \
    case 6: call(6); break;                                                                                 \
    case 7: call(7); break;                                                                                 \
    default: call(8); break;                                                                                \
    }

T512 void q4_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int r0 = 0; r0 < a->rows; r0 += ROWS) {
        int R = a->rows - r0 < ROWS ? a->rows - r0 : ROWS;
#define Q4_CALL(n) q4_rows(w, a, r0, y, ldy, o0, o1, n)
        SWITCH_R(Q4_CALL, R)
#undef Q4_CALL
    }
}

/* ----- int8 ------------------------------------------------------------------------------------ */

/* One block of ACT_BLOCK weights (wv, biased) into the accumulators of R rows. */
T512_INLINE void i8_block(const Act *a, int r0, int64_t k, __m512i wv, __m512 *acc, const int R) {
    for (int r = 0; r < R; r++) {
        const int64_t row = r0 + r;
        __m512i s = _mm512_loadu_si512(a->corr + row * (a->ld / 4) + k * 16);
        s = _mm512_dpbusd_epi32(s, wv, _mm512_loadu_si512(a->q + row * a->ld + k * ACT_BLOCK));
        __m512 scale = _mm512_set1_ps(a->qscale[row * (a->ld / ACT_BLOCK) + k]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
    }
}

/* Two accumulators per row (even and odd blocks), for two independent chains. */
T512_INLINE void i8_rows(const Weight *w, const Act *a, int r0, float *y, int64_t ldy, int64_t o0, int64_t o1,
                         const int R) {
    const int64_t in = w->in, blocks = (in + ACT_BLOCK - 1) / ACT_BLOCK;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *v = (const int8_t *)w->w + o * in;
        __m512 even[ROWS], odd[ROWS];
        for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 2 <= in / ACT_BLOCK; k += 2) {
            i8_block(a, r0, k, _mm512_xor_si512(_mm512_loadu_si512(v + k * ACT_BLOCK), flip), even, R);
            i8_block(a, r0, k + 1, _mm512_xor_si512(_mm512_loadu_si512(v + (k + 1) * ACT_BLOCK), flip), odd, R);
        }
        for (; k < blocks; k++) { /* a last whole block (even), then a partial one */
            int64_t left = in - k * ACT_BLOCK;
            __m512i wv = left >= ACT_BLOCK ? _mm512_loadu_si512(v + k * ACT_BLOCK)
                                           : _mm512_maskz_loadu_epi8((1ULL << left) - 1, v + k * ACT_BLOCK);
            wv = _mm512_xor_si512(wv, flip);
            if (k & 1) i8_block(a, r0, k, wv, odd, R);
            else i8_block(a, r0, k, wv, even, R);
        }
        for (int r = 0; r < R; r++)
            y[(r0 + r) * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) * w->scale[o];
    }
}

T512 void i8_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int r0 = 0; r0 < a->rows; r0 += ROWS) {
        int R = a->rows - r0 < ROWS ? a->rows - r0 : ROWS;
#define I8_CALL(n) i8_rows(w, a, r0, y, ldy, o0, o1, n)
        SWITCH_R(I8_CALL, R)
#undef I8_CALL
    }
}

/* ----- bfloat16 -------------------------------------------------------------------------------- */

#define TBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

TBF16 void act_bf16_part(const Act *a, int r, int64_t i0, int64_t i1) {
    uint16_t *b = a->b + r * a->ld;
    for (int64_t i = i0; i < i1; i += 16) {
        int64_t left = a->in - i;
        __mmask16 m = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, a->x + r * a->in + i));
        _mm256_storeu_si256((__m256i *)(b + i), (__m256i)h);
    }
}

#define TBF16_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) static inline

/* 32 weights (wv) into the accumulators of R rows. */
TBF16_INLINE void bf16_step(const Act *a, int r0, int64_t k, __m512i wv, __m512 *acc, const int R) {
    for (int r = 0; r < R; r++) {
        __m512i xv = _mm512_loadu_si512(a->b + (r0 + r) * a->ld + 32 * k);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)xv);
    }
}

/* Per row two accumulators (alternate 32-element steps); x's bfloat16 row is zero-padded. */
TBF16_INLINE void bf16_rows(const Weight *w, const Act *a, int r0, float *y, int64_t ldy, int64_t o0, int64_t o1,
                            const int R) {
    const int64_t in = w->in, steps = (in + 31) / 32;
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *v = (const uint16_t *)w->w + o * in;
        __m512 even[ROWS], odd[ROWS];
        for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 2 <= in / 32; k += 2) {
            bf16_step(a, r0, k, _mm512_loadu_si512(v + 32 * k), even, R);
            bf16_step(a, r0, k + 1, _mm512_loadu_si512(v + 32 * (k + 1)), odd, R);
        }
        for (; k < steps; k++) { /* a last whole step (even), then a partial one */
            int64_t left = in - 32 * k;
            __m512i wv = left >= 32 ? _mm512_loadu_si512(v + 32 * k)
                                    : _mm512_maskz_loadu_epi16((__mmask32)((1ULL << left) - 1), v + 32 * k);
            if (k & 1) bf16_step(a, r0, k, wv, odd, R);
            else bf16_step(a, r0, k, wv, even, R);
        }
        for (int r = 0; r < R; r++) y[(r0 + r) * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
    }
}

TBF16 void bf16_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int r0 = 0; r0 < a->rows; r0 += ROWS) {
        int R = a->rows - r0 < ROWS ? a->rows - r0 : ROWS;
#define BF16_CALL(n) bf16_rows(w, a, r0, y, ldy, o0, o1, n)
        SWITCH_R(BF16_CALL, R)
#undef BF16_CALL
    }
}

#endif
