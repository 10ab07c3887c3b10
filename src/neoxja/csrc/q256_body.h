/* The bodies of qfast256.c's kernels, included once per instruction set: Q256_TARGET (the target
 * attribute), Q256_VNNI (1: AVX-VNNI's vpdpbusd; 0: AVX2's vpmaddubsw) and NAME(x) (a name per
 * variant) are defined by the includer. */

#define T256_INLINE __attribute__((target(Q256_TARGET), always_inline)) static inline

/* The 32 bytes at p, or (tail) the `left` bytes there followed by zeros. */
T256_INLINE __m256i NAME(load_bytes)(const void *p, int64_t left) {
    if (left >= 32) return _mm256_loadu_si256((const __m256i *)p);
    uint8_t tmp[32] = {0};
    if (left > 0) memcpy(tmp, p, (size_t)left);
    return _mm256_loadu_si256((const __m256i *)tmp);
}

/* The sum of w * q over each 4 bytes, added to s: with AVX-VNNI w is biased (w + 128, unsigned) and
 * s starts from the correction; with AVX2 w is signed, |w|, |q| <= 127. */
T256_INLINE __m256i NAME(dot)(__m256i s, __m256i w, __m256i q) {
#if Q256_VNNI
    return _mm256_dpbusd_avx_epi32(s, w, q);
#else
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
    return _mm256_add_epi32(s, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

T256_INLINE void NAME(q4_rows)(const Weight *w, const Act *a, int r0, float *y, int64_t ldy, int64_t o0, int64_t o1,
                               const int R) {
    const int64_t in = w->in, bs = w->blocksize, groups = (in + Q4_GROUP - 1) / Q4_GROUP;
    uint8_t table[16];
    for (int k = 0; k < 16; k++) table[k] = (uint8_t)(Q256_VNNI ? w->lut[k] + 128 : w->lut[k]);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i nibble = _mm256_set1_epi8(15);
    int32_t lanes[2][8];
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 8; k++) lanes[h][k] = bs < Q4_GROUP ? (int32_t)(8 * (8 * h + k) / bs) : 0;
    const __m256i spread[2] = {_mm256_loadu_si256((const __m256i *)lanes[0]),
                               _mm256_loadu_si256((const __m256i *)lanes[1])};
    float ws[CHUNK_GROUPS * Q4_GROUP / 32 + 1 + 16];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *bytes = (const uint8_t *)w->w + o * in / 2;
        __m256 acc[ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t c0 = 0; c0 < groups; c0 += CHUNK_GROUPS) {
            int64_t c1 = c0 + CHUNK_GROUPS < groups ? c0 + CHUNK_GROUPS : groups;
            int64_t end = c1 * Q4_GROUP < in ? c1 * Q4_GROUP : in;
            int64_t b0 = (o * in + c0 * Q4_GROUP) / bs, b1 = (o * in + end - 1) / bs + 1;
            q4_fast_scales(w, b0, b1 - b0, ws);
            for (int64_t g = c0; g < c1; g++) {
                const float *gs = ws + (o * in + g * Q4_GROUP) / bs - b0;
                for (int h = 0; h < 2; h++) {
                    int64_t left = (in - g * Q4_GROUP) / 2 - 32 * h; /* packed bytes from here */
                    if (left <= 0) break;
                    __m256i v = NAME(load_bytes)(bytes + g * 64 + 32 * h, left);
                    __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nibble));
                    __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble));
                    __m256 wscale = _mm256_permutevar8x32_ps(_mm256_loadu_ps(gs), spread[h]);
                    for (int r = 0; r < R; r++) {
                        const int64_t row = r0 + r, lane = row * (a->ld / 8) + g * 16 + 8 * h;
                        const int8_t *q = a->q + row * a->ld + g * Q4_GROUP + 32 * h;
                        __m256i s = Q256_VNNI ? _mm256_loadu_si256((const __m256i *)(a->corr + lane))
                                              : _mm256_setzero_si256();
                        s = NAME(dot)(s, hi, _mm256_loadu_si256((const __m256i *)q));
                        s = NAME(dot)(s, lo, _mm256_loadu_si256((const __m256i *)(q + Q4_GROUP / 2)));
                        __m256 scale = _mm256_mul_ps(wscale, _mm256_loadu_ps(a->qscale + lane));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
                    }
                }
            }
        }
        for (int r = 0; r < R; r++) y[(r0 + r) * ldy + o] = hsum8(acc[r]);
    }
}

/* Per block of ACT_BLOCK: both halves into one integer sum (exact), one conversion and one
 * multiply-add by the block's scale; two accumulators per row (even and odd blocks). */
T256_INLINE void NAME(i8_rows)(const Weight *w, const Act *a, int r0, float *y, int64_t ldy, int64_t o0, int64_t o1,
                               const int R) {
    const int64_t in = w->in, blocks = (in + ACT_BLOCK - 1) / ACT_BLOCK;
    const __m256i flip = _mm256_set1_epi8(Q256_VNNI ? (char)0x80 : 0);
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *v = (const int8_t *)w->w + o * in;
        __m256 acc[2][ROWS];
        for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < blocks; k++) {
            int64_t left = in - k * ACT_BLOCK;
            __m256i w0 = _mm256_xor_si256(NAME(load_bytes)(v + k * ACT_BLOCK, left), flip);
            __m256i w1 = _mm256_xor_si256(NAME(load_bytes)(v + k * ACT_BLOCK + 32, left - 32), flip);
            for (int r = 0; r < R; r++) {
                const int64_t row = r0 + r;
                const int8_t *q = a->q + row * a->ld + k * ACT_BLOCK;
                const int32_t *c = a->corr + row * (a->ld / 4) + k * 16;
                __m256i s = Q256_VNNI ? _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)c),
                                                         _mm256_loadu_si256((const __m256i *)(c + 8)))
                                      : _mm256_setzero_si256();
                s = NAME(dot)(s, w0, _mm256_loadu_si256((const __m256i *)q));
                s = NAME(dot)(s, w1, _mm256_loadu_si256((const __m256i *)(q + 32)));
                __m256 scale = _mm256_set1_ps(a->qscale[row * (a->ld / ACT_BLOCK) + k]);
                acc[k & 1][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[k & 1][r]);
            }
        }
        for (int r = 0; r < R; r++)
            y[(r0 + r) * ldy + o] = hsum8(_mm256_add_ps(acc[0][r], acc[1][r])) * w->scale[o];
    }
}

#define Q256_SWITCH(body, R)                                                                                \
    switch (R) {                                                                                            \
    case 1: body(1); break;                                                                                 \
    case 2: body(2); break;                                                                                 \
    case 3: body(3); break;                                                                                 \
    case 4: body(4); break;                                                                                 \
    case 5: body(5); break;                                                                                 \
    case 6: body(6); break;                                                                                 \
    case 7: body(7); break;                                                                                 \
    default: body(8); break;                                                                                \
    }
#define Q4_BODY(n) NAME(q4_rows)(w, a, r0, y, ldy, o0, o1, n)
#define I8_BODY(n) NAME(i8_rows)(w, a, r0, y, ldy, o0, o1, n)

__attribute__((target(Q256_TARGET))) static void NAME(q4)(const Weight *w, const Act *a, float *y, int64_t ldy,
                                                        int64_t o0, int64_t o1) {
    for (int r0 = 0; r0 < a->rows; r0 += ROWS) {
        int R = a->rows - r0 < ROWS ? a->rows - r0 : ROWS;
        Q256_SWITCH(Q4_BODY, R)
    }
}

__attribute__((target(Q256_TARGET))) static void NAME(i8)(const Weight *w, const Act *a, float *y, int64_t ldy,
                                                        int64_t o0, int64_t o1) {
    for (int r0 = 0; r0 < a->rows; r0 += ROWS) {
        int R = a->rows - r0 < ROWS ? a->rows - r0 : ROWS;
        Q256_SWITCH(I8_BODY, R)
    }
}

#undef Q256_SWITCH
#undef Q4_BODY
#undef I8_BODY
#undef T256_INLINE
