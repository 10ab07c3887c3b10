/* Matrix products with quantized weights, for neoxja/quantization/kernels.py (CPU).
 *
 * y [rows, out] = x [rows, in] @ W.T for a weight held as 4-bit (bitsandbytes' nf4/fp4 blocks,
 * optionally double-quantized), int8 rows with a float scale each, or bfloat16, in either
 * arithmetic of csrc/weights.h: "exact" (float32 on the values the format stands for, within float32
 * rounding of the dequantized product) or "fast" (int8 activations and integer dot products for
 * 4-bit and int8; bfloat16-rounded activations with AVX512_BF16 for bfloat16). Each weight is read
 * once for all rows of x. And the dequantization of a range of 4-bit rows into float32 (prompts
 * multiply tile by tile through BLAS in Python).
 *
 * Kernels (csrc/): AVX-512 (VNNI, BF16), AVX-VNNI, AVX2 or portable C, chosen at import
 * (NEOXJA_QUANT_KERNEL=avx512|avxvnni|avx2|scalar caps them, for tests). Threads: OpenMP over
 * output rows.
 *
 * The entry points take numpy-style arrays, never raw addresses, and check every array against the
 * dimensions before a kernel runs (csrc/args.h, csrc/wparse.h); the kernels trust them.
 */
#include <stdlib.h>

#include "csrc/args.h"
#include "csrc/kernels.h"
#include "csrc/wparse.h"

/* One product's parts, split between threads by output rows. */
typedef struct {
    const Weight *w;
    const Act *act;
    float *y;      /* (dequantization to bfloat16: uint16_t) */
    int64_t first; /* dequantization: the first row of the range */
    int bf16;      /* dequantization to bfloat16 */
    int failed;    /* out of memory in a thread */
} Task;

static void split_rows(int64_t out, int threads, void (*fn)(Task *, int64_t, int64_t), Task *task) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t o0 = out * t / threads, o1 = out * (t + 1) / threads;
        if (o1 > o0) fn(task, o0, o1);
    }
}

static void product_task(Task *t, int64_t o0, int64_t o1) {
    weight_product(t->w, t->act, t->y, t->w->out, o0, o1);
}

static void dequantize_task(Task *t, int64_t o0, int64_t o1) {
    if (!t->bf16) {
        q4_dequantize(t->w, t->y + o0 * t->w->in, t->first + o0, t->first + o1, weight_isa.f32);
        return;
    }
    float *row = malloc(sizeof(float) * (size_t)t->w->in); /* (one row at a time, then rounded) */
    if (row) q4_dequantize_bf16(t->w, (uint16_t *)t->y + o0 * t->w->in, row, t->first + o0, t->first + o1,
                                weight_isa.f32);
    else t->failed = 1;
    free(row);
}

/* y = x @ W.T for a checked weight, on `threads` threads; x is prepared once, on this thread. */
static PyObject *multiply(Weight *w, const float *x, int rows, float *y, long long threads, Args *a) {
    size_t bytes = act_bytes(w, rows);
    void *scratch = bytes ? aligned_alloc(64, (bytes + 63) / 64 * 64) : NULL;
    if (bytes && !scratch) {
        args_release(a);
        return PyErr_NoMemory();
    }
    Act act;
    Task task = {w, &act, y, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    act_bind(w, rows, x, scratch, &act);
    act_prepare(w, &act, 0, 1);
    split_rows(w->out, clamp_threads(threads), product_task, &task);
    Py_END_ALLOW_THREADS
    free(scratch);
    args_release(a);
    Py_RETURN_NONE;
}

/* The 4-bit weight's scale tables of `blocks` blocks into w: a float32 absmax, or (double
 * quantization) a uint8 qabsmax with its float32 nested absmax (one per 256 blocks) and 256-entry
 * nested code. */
static int scale_tables(Args *a, Weight *w, int64_t blocks, PyObject *absmax, PyObject *qabsmax, PyObject *nabs,
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
        return (w->absmax = args_array(a, "absmax", absmax, 'f', 4, blocks, 0)) ? 0 : -1;
    }
    if (!(w->qabsmax = args_array(a, "qabsmax", qabsmax, 'u', 1, blocks, 0)) ||
        !(w->nested_absmax = args_array(a, "nested_absmax", nabs, 'f', 4, (blocks + 255) / 256, 0)) ||
        !(w->nested_code = args_array(a, "nested_code", ncode, 'f', 4, 256, 0)))
        return -1;
    return 0;
}

static int arithmetic_arg(const char *fn, PyObject *obj, int *fast) {
    *fast = 0;
    return obj ? args_arithmetic(fn, "arithmetic", obj, fast) : 0;
}

/* linear_4bit(x, rows, in, out, w, code, absmax, qabsmax, nested_absmax, nested_code, offset,
 *             blocksize, y, threads, arithmetic="exact"): y [rows, out] = x [rows, in] @ W.T. */
static PyObject *linear_4bit(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_w, *o_code, *o_absmax, *o_qabsmax, *o_nabs, *o_ncode, *o_y, *o_arith = NULL;
    PyObject *o_rows, *o_in, *o_out, *o_offset, *o_blocksize, *o_threads;
    long long rows, in, out, blocksize, threads;
    const char *fn = "linear_4bit";
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOO|O:linear_4bit", &o_x, &o_rows, &o_in, &o_out, &o_w, &o_code,
                          &o_absmax, &o_qabsmax, &o_nabs, &o_ncode, &o_offset, &o_blocksize, &o_y, &o_threads, &o_arith))
        return NULL;
    Weight w = {.format = W_4BIT};
    if (args_whole(fn, "rows", o_rows, 1, INT32_MAX, &rows) || args_whole(fn, "in_features", o_in, 1, LLONG_MAX, &in) ||
        args_whole(fn, "out_features", o_out, 1, LLONG_MAX, &out) || args_real(fn, "offset", o_offset, &w.offset) ||
        args_whole(fn, "blocksize", o_blocksize, 1, LLONG_MAX, &blocksize) ||
        args_whole(fn, "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads) || arithmetic_arg(fn, o_arith, &w.fast))
        return NULL;
    w.in = in, w.out = out, w.blocksize = blocksize;
    int64_t x_count, y_count, weights;
    if (args_product(fn, "rows * in_features", rows, in, &x_count) ||
        args_product(fn, "rows * out_features", rows, out, &y_count) ||
        args_product(fn, "out_features * in_features", out, in, &weights))
        return NULL;
    if (blocksize_check(fn, "", &w) < 0) return NULL;
    Args a = {fn};
    const float *x;
    float *y;
    if (!(x = args_array(&a, "x", o_x, 'f', 4, x_count, 0)) || !(w.w = args_array(&a, "w", o_w, 'u', 1, weights / 2, 0)) ||
        !(w.code = args_array(&a, "code", o_code, 'f', 4, 16, 0)) ||
        scale_tables(&a, &w, weights / blocksize, o_absmax, o_qabsmax, o_nabs, o_ncode) ||
        !(y = args_array(&a, "y", o_y, 'f', 4, y_count, 1)) || args_output_apart(&a, "y") || weight_check(fn, "", &w)) {
        args_release(&a);
        return NULL;
    }
    return multiply(&w, x, (int)rows, y, threads, &a);
}

/* dequantize_4bit(first_row, count, out, in, w, code, absmax, qabsmax, nested_absmax, nested_code,
 *                 offset, blocksize, y, threads, dtype="float32"): rows [first_row, first_row + count)
 * of a weight [out, in] into y [count, in], float32 or ("bfloat16") 2-byte bfloat16 bits. */
static PyObject *dequantize_4bit(PyObject *self, PyObject *args) {
    PyObject *o_w, *o_code, *o_absmax, *o_qabsmax, *o_nabs, *o_ncode, *o_y, *o_dtype = NULL;
    PyObject *o_first, *o_count, *o_out, *o_in, *o_offset, *o_blocksize, *o_threads;
    long long first, count, out, in, blocksize, threads;
    const char *fn = "dequantize_4bit";
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOO|O:dequantize_4bit", &o_first, &o_count, &o_out, &o_in, &o_w, &o_code,
                          &o_absmax, &o_qabsmax, &o_nabs, &o_ncode, &o_offset, &o_blocksize, &o_y, &o_threads, &o_dtype))
        return NULL;
    int bf16 = 0;
    if (o_dtype) {
        if (PyUnicode_Check(o_dtype) && PyUnicode_CompareWithASCIIString(o_dtype, "bfloat16") == 0) bf16 = 1;
        else if (!PyUnicode_Check(o_dtype) || PyUnicode_CompareWithASCIIString(o_dtype, "float32") != 0) {
            PyErr_Format(PyExc_ValueError, "%s: dtype must be 'float32' or 'bfloat16', got %R", fn, o_dtype);
            return NULL;
        }
    }
    Weight w = {.format = W_4BIT};
    if (args_whole(fn, "first_row", o_first, LLONG_MIN, LLONG_MAX, &first) ||
        args_whole(fn, "count", o_count, LLONG_MIN, LLONG_MAX, &count) ||
        args_whole(fn, "out_features", o_out, 1, LLONG_MAX, &out) || args_whole(fn, "in_features", o_in, 1, LLONG_MAX, &in) ||
        args_real(fn, "offset", o_offset, &w.offset) || args_whole(fn, "blocksize", o_blocksize, LLONG_MIN, LLONG_MAX, &blocksize) ||
        args_whole(fn, "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads))
        return NULL;
    if (first < 0 || count < 0 || first > out - count) {
        PyErr_Format(PyExc_ValueError, "%s: rows [%lld, %lld + %lld) are not rows of the weight's %lld", fn, first, first,
                     count, out);
        return NULL;
    }
    if (blocksize < 2 || blocksize % 2 || in % blocksize) {
        PyErr_Format(PyExc_ValueError, "%s: blocksize must be an even divisor of in_features (%lld), got %lld", fn, in,
                     blocksize);
        return NULL;
    }
    int64_t weights, y_count;
    if (args_product(fn, "out_features * in_features", out, in, &weights) ||
        args_product(fn, "count * in_features", count, in, &y_count))
        return NULL;
    w.in = in, w.out = out, w.blocksize = blocksize;
    Args a = {fn};
    Task task = {&w, NULL, NULL, first, bf16, 0};
    if (!(w.w = args_array(&a, "w", o_w, 'u', 1, weights / 2, 0)) || !(w.code = args_array(&a, "code", o_code, 'f', 4, 16, 0)) ||
        scale_tables(&a, &w, weights / blocksize, o_absmax, o_qabsmax, o_nabs, o_ncode) ||
        !(task.y = bf16 ? args_array(&a, "y", o_y, 'x', 2, y_count, 1) : args_array(&a, "y", o_y, 'f', 4, y_count, 1)) ||
        args_output_apart(&a, "y")) {
        args_release(&a);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    split_rows(count, clamp_threads(threads), dequantize_task, &task);
    Py_END_ALLOW_THREADS
    args_release(&a);
    if (task.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* linear_dense(x, rows, in, out, w, scale, y, threads, arithmetic="exact"): y [rows, out] = x [rows, in]
 * @ W.T for int8 rows W times a float32 scale per row, or (scale None) bfloat16 W given as 16-bit
 * integers. */
static PyObject *linear_dense(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_w, *o_scale, *o_y, *o_rows, *o_in, *o_out, *o_threads, *o_arith = NULL;
    long long rows, in, out, threads;
    const char *fn = "linear_dense";
    if (!PyArg_ParseTuple(args, "OOOOOOOO|O:linear_dense", &o_x, &o_rows, &o_in, &o_out, &o_w, &o_scale, &o_y,
                          &o_threads, &o_arith))
        return NULL;
    Weight w = {.format = o_scale != Py_None ? W_INT8 : W_BF16};
    if (args_whole(fn, "rows", o_rows, 1, INT32_MAX, &rows) || args_whole(fn, "in_features", o_in, 1, LLONG_MAX, &in) ||
        args_whole(fn, "out_features", o_out, 1, LLONG_MAX, &out) ||
        args_whole(fn, "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads) || arithmetic_arg(fn, o_arith, &w.fast))
        return NULL;
    int64_t x_count, y_count, weights;
    if (args_product(fn, "rows * in_features", rows, in, &x_count) ||
        args_product(fn, "rows * out_features", rows, out, &y_count) ||
        args_product(fn, "out_features * in_features", out, in, &weights))
        return NULL;
    w.in = in, w.out = out;
    Args a = {fn};
    const float *x;
    float *y;
    if (!(x = args_array(&a, "x", o_x, 'f', 4, x_count, 0)) ||
        !(w.w = w.format == W_INT8 ? args_array(&a, "w", o_w, 'i', 1, weights, 0) : args_array(&a, "w", o_w, 'x', 2, weights, 0)) ||
        (w.format == W_INT8 && !(w.scale = args_array(&a, "scale", o_scale, 'f', 4, out, 0))) ||
        !(y = args_array(&a, "y", o_y, 'f', 4, y_count, 1)) || args_output_apart(&a, "y") || weight_check(fn, "", &w)) {
        args_release(&a);
        return NULL;
    }
    return multiply(&w, x, (int)rows, y, threads, &a);
}

/* The kernels of each arithmetic: {"exact": ..., "int8": ..., "bfloat16": ...}. */
static PyObject *kernels(PyObject *self, PyObject *noargs) {
    Weight q4 = {.format = W_4BIT, .fast = 1, .in = 128, .blocksize = 64};
    Weight bf16 = {.format = W_BF16, .fast = 1, .in = 128};
    Weight exact = {.format = W_4BIT, .in = 128, .blocksize = 64};
    return Py_BuildValue("{s:s,s:s,s:s}", "exact", weight_kernel(&exact), "int8", weight_kernel(&q4), "bfloat16",
                         weight_kernel(&bf16));
}

static PyObject *kernel_name(PyObject *self, PyObject *noargs) {
    Weight exact = {.format = W_4BIT, .in = 128, .blocksize = 64};
    return PyUnicode_FromString(weight_kernel(&exact));
}

static PyMethodDef methods[] = {
    {"linear_4bit", linear_4bit, METH_VARARGS,
     "linear_4bit(x, rows, in, out, w, code, absmax, qabsmax, nested_absmax, nested_code, offset, blocksize,\n"
     "            y, threads, arithmetic='exact'): y [rows, out] = x [rows, in] @ W.T for a 4-bit weight (arrays\n"
     "with the buffer protocol, C-contiguous; float32 absmax, or uint8 qabsmax with its nested tables; the other\n"
     "None). arithmetic 'exact' (float32) or 'fast' (int8 activations in blocks of 64, integer dot products)."},
    {"dequantize_4bit", dequantize_4bit, METH_VARARGS,
     "dequantize_4bit(first_row, count, out, in, w, code, absmax, qabsmax, nested_absmax, nested_code, offset,\n"
     "                blocksize, y, threads, dtype='float32'): rows [first_row, first_row + count) of a 4-bit\n"
     "weight, float32 or (dtype 'bfloat16', y of 2-byte items) rounded to bfloat16 as PyTorch rounds."},
    {"linear_dense", linear_dense, METH_VARARGS,
     "linear_dense(x, rows, in, out, w, scale, y, threads, arithmetic='exact'): y = x @ W.T for int8 rows W\n"
     "with a float32 scale per row, or (scale None) bfloat16 W passed as 16-bit integers. arithmetic 'fast':\n"
     "int8 activations (int8 W), bfloat16-rounded activations with AVX512_BF16 (bfloat16 W)."},
    {"kernel", kernel_name, METH_NOARGS, "the instruction set of the exact (float32) kernels"},
    {"kernels", kernels, METH_NOARGS,
     "{'exact': ..., 'int8': ..., 'bfloat16': ...}: the kernels each arithmetic runs on ('int8': the fast\n"
     "4-bit and int8 products)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef quant_module = {PyModuleDef_HEAD_INIT, "neoxja._quant",
                                          "Matrix products with quantized weights (CPU).", -1, methods};

PyMODINIT_FUNC PyInit__quant(void) {
    weight_isa = isa_detect("NEOXJA_QUANT_KERNEL");
    return PyModule_Create(&quant_module);
}
