/* Weights from Python: the checks every entry point applies before a Weight reaches a kernel, and
 * the descriptor tuples _decode.new_model takes (see weight_from_python). */
#ifndef NEOXJA_WPARSE_H
#define NEOXJA_WPARSE_H

#include "args.h"
#include "weights.h"

/* Refuse (ValueError naming fn, label and the argument) what the kernels cannot take: a 4-bit
 * blocksize that is not a multiple of 32 dividing in_features (for the fast arithmetic, a power of
 * two), a fast 4-bit code outside [-1, 1]; then fill what weight_init derives. 0 or -1. */
int weight_check(const char *fn, const char *label, Weight *w);

/* The first part of weight_check, for a 4-bit weight whose arrays are not taken yet (format, fast,
 * in and blocksize set). */
int blocksize_check(const char *fn, const char *label, const Weight *w);

/* A matrix [out, in] of new_model: a C-contiguous float32 array (float32 weights), or a tuple
 *     ("bfloat16", w, arithmetic)                          w: 2-byte integers [out * in]
 *     ("int8", w, scale, arithmetic)                       w: int8 [out * in], scale: float32 [out]
 *     ("4bit", w, code, absmax, qabsmax, nested_absmax, nested_code, offset, blocksize, arithmetic)
 * (4-bit: w uint8 [out * in / 2], code float32 [16], and either absmax float32 [blocks] or qabsmax
 * uint8 [blocks] with nested_absmax float32 [ceil(blocks / 256)] and nested_code float32 [256]; the
 * other None), arithmetic "fast" or "exact". Each array's view goes to views[*held] (the caller
 * releases them); every size is checked against out and in. 0, or -1 with an error naming fn, label
 * and the argument. */
int weight_from_python(const char *fn, const char *label, PyObject *obj, int64_t out, int64_t in, Weight *w,
                       Py_buffer *views, int *held);

/* How many views a matrix of weight_from_python may hold at most. */
#define WEIGHT_VIEWS 6

#endif
