/* A weight matrix as the C kernels see it, whatever its format, and the one way to multiply by it.
 *
 * A Weight describes one [out, in] matrix: float32, bfloat16, int8 rows with a float scale each, or
 * 4-bit (bitsandbytes' nf4/fp4 blocks, optionally double-quantized), and the arithmetic to use:
 *   - exact: float32 arithmetic on the values the format stands for (each weight expanded to a
 *     float32 and multiplied by the float32 activation), within float32 rounding of x @ W.T;
 *   - fast: 4-bit and int8 weights multiply activations quantized to int8 in blocks of ACT_BLOCK
 *     (one float scale per block), with integer dot products and one float multiply-add per block;
 *     the 4-bit codes are looked up as round(127 * code); bfloat16 weights multiply the activation
 *     rounded to bfloat16 (AVX512_BF16), accumulating in float32. float32 weights have one
 *     arithmetic.
 * Multiplying is two steps: act_prepare turns the float32 rows x into what the weight's kernel
 * reads (once per input, whatever the number of output rows), then weight_product computes output
 * rows [o0, o1) for every row of x; both can be split between threads.
 *
 * Every kernel computes each (output row, row of x) value with one sequence of operations that
 * does not depend on the number of rows of x, so a row's result is the same, bit for bit, whether
 * it is multiplied alone or among others. Results depend on the instruction set (isa.h).
 *
 * Nothing here checks its arguments: the extensions' entry points fill Weights only from arrays
 * they have checked (weight_check lists what a kernel relies on).
 */
#ifndef NEOXJA_WEIGHTS_H
#define NEOXJA_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "isa.h"

enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2, W_4BIT = 3 };

#define ACT_BLOCK 64 /* activation elements per int8 scale */
#define Q4_GROUP 128 /* 4-bit weights per 64 packed bytes: what the integer 4-bit kernels read at once */

typedef struct {
    int format, fast;
    int64_t out, in;
    const void *w; /* float32 / bfloat16 bits (uint16) / int8 [out, in]; 4-bit: packed bytes [out * in / 2] */
    const float *scale; /* int8: per output row, the value of one step (SCB / 127) */
    /* 4-bit: code [16]; absmax [out * in / blocksize] float32, or qabsmax (uint8) with nested_absmax
     * [one per 256 blocks] and nested_code [256] (block scale = nested_code[q] * nested_absmax + offset) */
    const float *code, *absmax, *nested_absmax, *nested_code;
    const uint8_t *qabsmax;
    float offset;
    int64_t blocksize;
    int8_t lut[16];             /* fast 4-bit: round(127 * code) (weight_init fills it) */
    uint8_t code_planes[4][256]; /* fast 4-bit with double quantization: byte p of nested_code[i] */
} Weight;

/* The rows x [rows, in] of one input as a weight's kernel reads them (act_bind lays them out in
 * a scratch buffer of act_bytes; act_prepare fills them). */
typedef struct {
    int rows;
    int64_t in;
    const float *x; /* [rows, in], row-major */
    float *f;       /* exact 4-bit: x reordered to meet the nibbles' order [rows, in] */
    /* fast 4-bit / int8: int8 values [rows, ld]; -128 times the sum of the values a 32-bit lane of
     * the integer kernels meets (they multiply weight + 128: this undoes the 128); the activation
     * scale of each lane (4-bit) or block (int8). 4-bit: per group of Q4_GROUP elements, its 64 even
     * elements then its 64 odd ones; lane L of the group meets even and odd elements 4L..4L+3, i.e.
     * elements 8L..8L+7 (corr and qscale [rows, ld / 8]). int8: elements in order, lane k meets
     * elements 4k..4k+3 (corr [rows, ld / 4], qscale [rows, ld / ACT_BLOCK]). */
    int8_t *q;
    int32_t *corr;
    float *qscale;
    uint16_t *b; /* fast bfloat16: x rounded to bfloat16 [rows, ld] */
    int64_t ld;  /* padded row length of q / b */
} Act;

/* What a Weight needs before it is used: the fast 4-bit lookup table from its code. Returns 0, or -1
 * when a fast 4-bit code holds a value outside [-1, 1] (or NaN), which int8 cannot hold. */
int weight_init(Weight *w);

/* The kernels weight_product runs with (set at import from isa_detect). */
extern Isa weight_isa;

/* Scratch bytes an Act of `rows` rows needs for w (0 when w reads x as it is). */
size_t act_bytes(const Weight *w, int rows);
/* Lay out a's buffers in scratch (64-byte aligned, act_bytes long) for x [rows, w->in]. */
void act_bind(const Weight *w, int rows, const float *x, void *scratch, Act *a);
/* This thread's share (of nth) of preparing a (every thread of a task calls it; a barrier must
 * follow before weight_product). Nothing to do for weights that read x as it is. */
void act_prepare(const Weight *w, Act *a, int ith, int nth);
/* Whether act_prepare has anything to do for w. */
int act_needed(const Weight *w);

/* y[r * ldy + o] = sum_i W[o, i] * x[r, i] for o0 <= o < o1 and every row r of a. */
void weight_product(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1);

/* The kernel that runs for w: "avx512-vnni", "avx-vnni", "avx2", "avx512-bf16", "avx512", "scalar". */
const char *weight_kernel(const Weight *w);

#endif
