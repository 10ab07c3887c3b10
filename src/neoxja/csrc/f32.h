/* float32 matrix times a few vectors: Y[b * ldy + r] = sum_i W[r * ldw + i] * X[b * ldx + i] for
 * output rows r0 <= r < r1 and vectors 0 <= b < nb. W is row-major [out, in] (nn.Linear's layout),
 * so each row is one contiguous stream.
 *
 * Every kernel computes each (r, b) sum in one order that does not depend on nb or on which other
 * rows and vectors share its tile, so a vector's results are the same, bit for bit, whether it is
 * multiplied alone or among others (the server's batched steps rely on it). */
#ifndef NEOXJA_F32_H
#define NEOXJA_F32_H

#include <stdint.h>

typedef void (*f32_fn)(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, int nb, float *Y,
                       int64_t ldy, int64_t r0, int64_t r1);

/* The kernel of an Isa f32 level (LEVEL_SCALAR, LEVEL_AVX2, LEVEL_AVX512). */
f32_fn f32_kernel(int level);
const char *f32_kernel_name(int level);

#endif
