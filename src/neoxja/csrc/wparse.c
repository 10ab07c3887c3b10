/* Weights from Python (see wparse.h). */
#include "wparse.h"

#include <string.h>

int blocksize_check(const char *fn, const char *label, const Weight *w) {
    const char *sep = label[0] ? " " : "";
    int64_t bs = w->blocksize;
    if (bs < 32 || bs % 32 || w->in % bs) {
        PyErr_Format(PyExc_ValueError, "%s: %s%sblocksize must be a multiple of 32 dividing in_features (%lld), got %lld",
                     fn, label, sep, (long long)w->in, (long long)bs);
        return -1;
    }
    if (w->fast && (bs & (bs - 1))) {
        PyErr_Format(PyExc_ValueError, "%s: %s%sblocksize must be a power of two for the fast arithmetic, got %lld", fn,
                     label, sep, (long long)bs);
        return -1;
    }
    return 0;
}

int weight_check(const char *fn, const char *label, Weight *w) {
    const char *sep = label[0] ? " " : "";
    if (w->format == W_4BIT && blocksize_check(fn, label, w) < 0) return -1;
    if (weight_init(w) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: %s%scode must hold values in [-1, 1] for the fast arithmetic (int8 codes)", fn,
                     label, sep);
        return -1;
    }
    return 0;
}

/* The view of one array of a matrix, `count` items exactly; NULL on error. */
static void *part(const char *fn, const char *label, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize,
                  int64_t count, Py_buffer *views, int *held) {
    char what[160];
    snprintf(what, sizeof what, "%s %s", label, name);
    Py_buffer *v = &views[*held];
    if (args_take(fn, what, obj, kind, itemsize, 0, 0, v) < 0) return NULL;
    (*held)++;
    if (v->len / itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd values, the dimensions need %lld", fn, what, v->len / itemsize,
                     (long long)count);
        return NULL;
    }
    return v->buf;
}

static int arithmetic_of(const char *fn, const char *label, PyObject *obj, Weight *w) {
    char what[160];
    snprintf(what, sizeof what, "%s arithmetic", label);
    return args_arithmetic(fn, what, obj, &w->fast);
}

int weight_from_python(const char *fn, const char *label, PyObject *obj, int64_t out, int64_t in, Weight *w,
                       Py_buffer *views, int *held) {
    memset(w, 0, sizeof *w);
    w->out = out, w->in = in;
    int64_t count;
    if (args_product(fn, label, out, in, &count) < 0) return -1;
    if (!PyTuple_Check(obj)) {
        w->format = W_F32;
        return (w->w = part(fn, label, "(float32)", obj, 'f', 4, count, views, held)) ? 0 : -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    PyObject *kind = n > 0 ? PyTuple_GET_ITEM(obj, 0) : Py_None;
    PyObject **item = &PyTuple_GET_ITEM(obj, 0);
    if (PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "bfloat16") == 0 && n == 3) {
        w->format = W_BF16;
        if (!(w->w = part(fn, label, "w", item[1], 'x', 2, count, views, held))) return -1;
        if (arithmetic_of(fn, label, item[2], w) < 0) return -1;
    } else if (PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "int8") == 0 && n == 4) {
        w->format = W_INT8;
        if (!(w->w = part(fn, label, "w", item[1], 'i', 1, count, views, held)) ||
            !(w->scale = part(fn, label, "scale", item[2], 'f', 4, out, views, held)) ||
            arithmetic_of(fn, label, item[3], w) < 0)
            return -1;
    } else if (PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "4bit") == 0 && n == 10) {
        w->format = W_4BIT;
        char what[160];
        long long blocksize;
        snprintf(what, sizeof what, "%s blocksize", label);
        if (args_whole(fn, what, item[8], 1, LLONG_MAX, &blocksize) < 0) return -1;
        snprintf(what, sizeof what, "%s offset", label);
        if (args_real(fn, what, item[7], &w->offset) < 0 || arithmetic_of(fn, label, item[9], w) < 0) return -1;
        w->blocksize = blocksize;
        if (blocksize_check(fn, label, w) < 0) return -1;
        int64_t blocks = count / blocksize;
        if (!(w->w = part(fn, label, "w", item[1], 'u', 1, count / 2, views, held)) ||
            !(w->code = part(fn, label, "code", item[2], 'f', 4, 16, views, held)))
            return -1;
        if ((item[3] == Py_None) == (item[4] == Py_None)) {
            PyErr_Format(PyExc_ValueError, "%s: %s: give exactly one of absmax (float32) and qabsmax (uint8)", fn, label);
            return -1;
        }
        if (item[3] != Py_None) {
            if (item[5] != Py_None || item[6] != Py_None) {
                PyErr_Format(PyExc_ValueError, "%s: %s nested_absmax and nested_code belong with a qabsmax, not absmax",
                             fn, label);
                return -1;
            }
            if (!(w->absmax = part(fn, label, "absmax", item[3], 'f', 4, blocks, views, held))) return -1;
        } else if (!(w->qabsmax = part(fn, label, "qabsmax", item[4], 'u', 1, blocks, views, held)) ||
                   !(w->nested_absmax = part(fn, label, "nested_absmax", item[5], 'f', 4, (blocks + 255) / 256, views, held)) ||
                   !(w->nested_code = part(fn, label, "nested_code", item[6], 'f', 4, 256, views, held))) {
            return -1;
        }
    } else {
        PyErr_Format(PyExc_ValueError,
                     "%s: %s must be a float32 array or a tuple ('bfloat16', w, arithmetic), ('int8', w, scale, "
                     "arithmetic) or ('4bit', w, code, absmax, qabsmax, nested_absmax, nested_code, offset, blocksize, "
                     "arithmetic)", fn, label);
        return -1;
    }
    return weight_check(fn, label, w);
}
