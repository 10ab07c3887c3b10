/* float32 matrix kernels (see f32.h): portable C, AVX2 + FMA tiles, AVX-512 tiles. */
#include "f32.h"

#include "isa.h"

static void matmul_scalar(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, int nb, float *Y,
                          int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *w = W + r * ldw;
        for (int b = 0; b < nb; b++) {
            const float *x = X + b * ldx;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            int64_t i = 0;
            for (; i + 4 <= in; i += 4) {
                s0 += w[i] * x[i];
                s1 += w[i + 1] * x[i + 1];
                s2 += w[i + 2] * x[i + 2];
                s3 += w[i + 3] * x[i + 3];
            }
            float s = (s0 + s1) + (s2 + s3);
            for (; i < in; i++) s += w[i] * x[i];
            Y[b * ldy + r] = s;
        }
    }
}

#if HAVE_X86

/* An NR-rows x NB-vectors tile: NR * NB accumulators, each weight load feeds NB FMAs. */
#define DEFINE_TILE(NR, NB)                                                                               \
    __attribute__((target("avx2,fma"))) static void tile_##NR##x##NB(                                    \
        const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, float *Y, int64_t ldy) {   \
        __m256 acc[NR][NB];                                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++)                                              \
            _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();         \
        int64_t i = 0;                                                                                    \
        for (; i + 8 <= in; i += 8) {                                                                     \
            __m256 xv[NB];                                                                                \
            _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) xv[b] = _mm256_loadu_ps(X + b * ldx + i); \
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) {                                        \
                __m256 w = _mm256_loadu_ps(W + r * ldw + i);                                              \
                _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) acc[r][b] =                          \
                    _mm256_fmadd_ps(w, xv[b], acc[r][b]);                                                 \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < NR; r++)                                                                      \
            for (int b = 0; b < NB; b++) {                                                                \
                float s = hsum8(acc[r][b]);                                                               \
                for (int64_t j = i; j < in; j++) s += W[r * ldw + j] * X[b * ldx + j];                    \
                Y[b * ldy + r] = s;                                                                       \
            }                                                                                             \
    }

DEFINE_TILE(8, 1)
DEFINE_TILE(4, 2)
DEFINE_TILE(4, 1)
DEFINE_TILE(1, 2)
DEFINE_TILE(1, 1)

/* Blocks of 8 rows. One vector: a tile of all 8 rows (8 row streams in flight). More vectors:
 * tiles of 4 rows by 2 vectors, every pair of vectors in turn, so a block is read from memory
 * once and from the L1/L2 cache for the other pairs. */
__attribute__((target("avx2,fma"))) static void matmul_avx2(const float *W, int64_t ldw, int64_t in, const float *X,
                                                             int64_t ldx, int nb, float *Y, int64_t ldy, int64_t r0,
                                                             int64_t r1) {
    int64_t r = r0;
    for (; r + 8 <= r1; r += 8) {
        if (nb == 1) {
            tile_8x1(W + r * ldw, ldw, in, X, ldx, Y + r, ldy);
            continue;
        }
        for (int64_t rr = r; rr < r + 8; rr += 4) {
            int b0 = 0;
            for (; b0 + 2 <= nb; b0 += 2) tile_4x2(W + rr * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + rr, ldy);
            if (b0 < nb) tile_4x1(W + rr * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + rr, ldy);
        }
    }
    for (; r < r1; r++) {
        int b0 = 0;
        for (; b0 + 2 <= nb; b0 += 2) tile_1x2(W + r * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + r, ldy);
        if (b0 < nb) tile_1x1(W + r * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + r, ldy);
    }
}

/* AVX-512: each (row, vector) sum is one 16-lane accumulator over i in steps of 16, the last
 * partial step with masked loads (zeros), then _mm512_reduce_add_ps; a tile of NR rows by NB
 * vectors keeps NR * NB accumulators, reading each weight vector once for NB FMAs and each x vector
 * once for NR. The same sequence for every tile shape. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) static inline void
tile512(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, float *Y, int64_t ldy, const int NR,
        const int NB) {
    __m512 acc[8][4];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        __m512 xv[4];
        for (int b = 0; b < NB; b++) xv[b] = _mm512_loadu_ps(X + b * ldx + i);
        for (int r = 0; r < NR; r++) {
            __m512 w = _mm512_loadu_ps(W + r * ldw + i);
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(w, xv[b], acc[r][b]);
        }
    }
    if (i < in) {
        __mmask16 tail = (__mmask16)((1u << (in - i)) - 1);
        __m512 xv[4];
        for (int b = 0; b < NB; b++) xv[b] = _mm512_maskz_loadu_ps(tail, X + b * ldx + i);
        for (int r = 0; r < NR; r++) {
            __m512 w = _mm512_maskz_loadu_ps(tail, W + r * ldw + i);
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(w, xv[b], acc[r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) Y[b * ldy + r] = _mm512_reduce_add_ps(acc[r][b]);
}

#define TILE512(NR, NB)                                                                                     \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static void t512_##NR##x##NB(             \
        const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, float *Y, int64_t ldy) {     \
        tile512(W, ldw, in, X, ldx, Y, ldy, NR, NB);                                                        \
    }
TILE512(8, 1)
TILE512(4, 1)
TILE512(4, 2)
TILE512(4, 3)
TILE512(4, 4)
TILE512(1, 1)
TILE512(1, 2)
TILE512(1, 3)
TILE512(1, 4)

typedef void (*tile_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *, int64_t);
static const tile_fn TILES4[5] = {NULL, t512_4x1, t512_4x2, t512_4x3, t512_4x4};
static const tile_fn TILES1[5] = {NULL, t512_1x1, t512_1x2, t512_1x3, t512_1x4};

/* One vector: tiles of 8 rows. More: blocks of 4 rows, each multiplied by every group of up to 4
 * vectors in turn (the block's weights stay in the L1/L2 cache between groups). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static void
matmul_avx512(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, int nb, float *Y, int64_t ldy,
              int64_t r0, int64_t r1) {
    int64_t r = r0;
    if (nb == 1)
        for (; r + 8 <= r1; r += 8) t512_8x1(W + r * ldw, ldw, in, X, ldx, Y + r, ldy);
    for (; r + 4 <= r1; r += 4)
        for (int b = 0; b < nb; b += 4) {
            int n = nb - b < 4 ? nb - b : 4;
            TILES4[n](W + r * ldw, ldw, in, X + b * ldx, ldx, Y + b * ldy + r, ldy);
        }
    for (; r < r1; r++)
        for (int b = 0; b < nb; b += 4) {
            int n = nb - b < 4 ? nb - b : 4;
            TILES1[n](W + r * ldw, ldw, in, X + b * ldx, ldx, Y + b * ldy + r, ldy);
        }
}
#endif

f32_fn f32_kernel(int level) {
#if HAVE_X86
    if (level >= LEVEL_AVX512) return matmul_avx512;
    if (level >= LEVEL_AVX2) return matmul_avx2;
#else
    (void)level;
#endif
    return matmul_scalar;
}

const char *f32_kernel_name(int level) {
#if HAVE_X86
    if (level >= LEVEL_AVX512) return "avx512";
    if (level >= LEVEL_AVX2) return "avx2";
#else
    (void)level;
#endif
    return "scalar";
}
