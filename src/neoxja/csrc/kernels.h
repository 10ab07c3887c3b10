/* The kernels behind weights.c's dispatch (internal to csrc/). Each computes output rows [o0, o1)
 * for every row of the Act, y[r * ldy + o], and trusts its Weight and Act (see weights.h). */
#ifndef NEOXJA_KERNELS_H
#define NEOXJA_KERNELS_H

#include "weights.h"

#define EXACT_ROWS 8 /* rows of x the exact kernels keep in registers at once */

/* qexact.c: float32 arithmetic on the dequantized values. */
float q4_block_scale(const Weight *w, int64_t b);
int q4_exact_wide(const Weight *w, int level); /* the AVX-512 layout of x (in % 128 == 0) */
void q4_exact_layout(const Weight *w, const float *x, float *f, int level);
void q4_exact(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int level);
void dense_exact(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int level);
/* float32 rows [o0, o1) of a 4-bit weight into y [o1 - o0, in]; or as bfloat16 (rounded to nearest
 * even, as PyTorch converts), through `row` (room for one row of floats) */
void q4_dequantize(const Weight *w, float *y, int64_t o0, int64_t o1, int level);
void q4_dequantize_bf16(const Weight *w, uint16_t *y, float *row, int64_t o0, int64_t o1, int level);

/* qact.c: activations for the fast kernels, one row's elements [i0, i1) (multiples of Q4_GROUP or
 * ACT_BLOCK) at a time; and the portable integer kernels. */
void act_q4_part(const Act *a, int r, int64_t i0, int64_t i1, int level);
void act_i8_part(const Act *a, int r, int64_t i0, int64_t i1, int level);
void act_bf16_part(const Act *a, int r, int64_t i0, int64_t i1);
/* The block scales (absmax) of blocks [b0, b0 + n) into s[0, n), then 16 zeros. */
void q4_fast_scales(const Weight *w, int64_t b0, int64_t n, float *s);
void q4_fast_scalar(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);
void i8_fast_scalar(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);

/* qfast512.c: AVX-512 VNNI and AVX512_BF16. */
void q4_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);
void i8_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);
void bf16_fast_avx512(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);
void act_q4_avx512(const Act *a, int r, int64_t i0, int64_t i1);
void act_i8_avx512(const Act *a, int r, int64_t i0, int64_t i1);

/* qfast256.c: AVX-VNNI (vnni = 1) or AVX2's vpmaddubsw (vnni = 0). */
void q4_fast_avx2(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int vnni);
void i8_fast_avx2(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int vnni);

#endif
