/* Argument checking shared by the C extensions' entry points.
 *
 * No entry point takes a raw address: every array comes as an object with the buffer protocol
 * (neoxja passes numpy views of its tensors; bfloat16 as 16-bit integers) and is checked before
 * any kernel reads it: item type and size, alignment to its items, layout (C-contiguous, or any
 * whole-item strides where a caller allows it), element count against the dimensions given
 * (products checked for overflow), writability of outputs, and no overlap between an output and
 * the inputs. Ints and floats are converted here too. Every refusal is a ValueError or TypeError
 * whose message starts with the function and names the argument. */
#ifndef NEOXJA_ARGS_H
#define NEOXJA_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_VIEWS 16
#define MAX_THREADS 256

typedef struct {
    const char *fn;
    Py_buffer views[MAX_VIEWS];
    int held;
} Args;

/* Release every view a holds. */
void args_release(Args *a);

/* obj's buffer into *v: C-contiguous (or, if strided, any whole-item strides), `itemsize`-byte items
 * of kind 'f' (float), 'i' (signed integer), 'u' (unsigned integer) or 'x' (any integer), aligned,
 * writable if asked. 0, or -1 with a ValueError/TypeError naming fn and name (v not held). */
int args_take(const char *fn, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
              int strided, Py_buffer *v);

/* args_take into a's list (released by args_release); NULL on error. */
Py_buffer *args_view(Args *a, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
                     int strided);

/* A C-contiguous array of exactly `count` items (None: a TypeError "is required"); its data or NULL. */
void *args_array(Args *a, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int64_t count,
                 int writable);

/* The last view taken (an output) shares no byte with any view taken before it; else -1. */
int args_output_apart(Args *a, const char *name);

/* *out = x * y, a count that fits a Py_ssize_t, or a ValueError naming `what`. */
int args_product(const char *fn, const char *what, int64_t x, int64_t y, int64_t *out);

int args_positive(const char *fn, const char *name, long long value);

/* An int argument (anything with __index__) within [lo, hi]; else a TypeError or ValueError naming it. */
int args_whole(const char *fn, const char *name, PyObject *obj, long long lo, long long hi, long long *out);

/* A float argument (a float, or anything with __float__ or __index__); else a TypeError naming it. */
int args_real(const char *fn, const char *name, PyObject *obj, float *out);

/* "exact" -> 0, "fast" -> 1; else a TypeError or ValueError naming `name`. */
int args_arithmetic(const char *fn, const char *name, PyObject *obj, int *fast);

static inline int clamp_threads(long long threads) {
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
}

#endif
