/* Argument checking for the C extensions' entry points (see args.h). */
#include "args.h"

#include <string.h>

void args_release(Args *a) {
    while (a->held > 0) PyBuffer_Release(&a->views[--a->held]);
}

/* Does v's struct-module format describe one native item of `kind`? */
static int format_kind(const Py_buffer *v, char kind) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++; /* native or little-endian: the machines we build for */
    if (f[0] == '\0' || f[1] != '\0') return 0;
    const char *kinds = kind == 'f' ? "fde" : kind == 'i' ? "bhilq" : kind == 'u' ? "BHILQ" : "bhilqBHILQ";
    return strchr(kinds, f[0]) != NULL;
}

static const char *kind_name(char kind) {
    return kind == 'f' ? "float" : kind == 'i' ? "signed integer" : kind == 'u' ? "unsigned integer" : "integer";
}

int args_take(const char *fn, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
              int strided, Py_buffer *v) {
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: %s is required (got None)", fn, name);
        return -1;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be an array with the buffer protocol, got %.100s", fn, name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int flags = (strided ? PyBUF_STRIDES : PyBUF_C_CONTIGUOUS) | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, v, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %s must be a %s%s array", fn, name, strided ? "strided" : "C-contiguous",
                     writable ? " writable" : "");
        return -1;
    }
    const char *problem = NULL;
    if (v->itemsize != itemsize || !format_kind(v, kind)) problem = "has the wrong item type";
    else if (v->len && (uintptr_t)v->buf % (uintptr_t)itemsize) problem = "is not aligned to its items";
    else if (v->suboffsets != NULL) problem = "is an indirect array";
    else if (strided && v->strides != NULL)
        for (int d = 0; d < v->ndim; d++)
            if (v->strides[d] % itemsize) problem = "has a stride that is not a whole number of items";
    if (problem) { /* (an empty array's address is never read, so it need not be aligned) */
        PyErr_Format(PyExc_ValueError, "%s: %s %s (%zd-byte %s values expected, got format '%s', %zd bytes)", fn,
                     name, problem, itemsize, kind_name(kind), v->format ? v->format : "B", v->itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

Py_buffer *args_view(Args *a, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
                     int strided) {
    if (a->held >= MAX_VIEWS) {
        PyErr_Format(PyExc_SystemError, "%s: too many arrays", a->fn);
        return NULL;
    }
    Py_buffer *v = &a->views[a->held];
    if (args_take(a->fn, name, obj, kind, itemsize, writable, strided, v) < 0) return NULL;
    a->held++;
    return v;
}

void *args_array(Args *a, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int64_t count,
                 int writable) {
    Py_buffer *v = args_view(a, name, obj, kind, itemsize, writable, 0);
    if (!v) return NULL;
    if (v->len / itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd values, the dimensions given need %lld", a->fn, name,
                     v->len / itemsize, (long long)count);
        return NULL;
    }
    return v->buf;
}

int args_output_apart(Args *a, const char *name) {
    const Py_buffer *out = &a->views[a->held - 1];
    for (int i = 0; i < a->held - 1; i++) {
        const Py_buffer *in = &a->views[i];
        const char *o = out->buf, *p = in->buf;
        if (out->len && in->len && o < p + in->len && p < o + out->len) {
            PyErr_Format(PyExc_ValueError, "%s: %s overlaps an input array", a->fn, name);
            return -1;
        }
    }
    return 0;
}

int args_product(const char *fn, const char *what, int64_t x, int64_t y, int64_t *out) {
    if (__builtin_mul_overflow(x, y, out) || *out > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %s (%lld * %lld) overflows", fn, what, (long long)x, (long long)y);
        return -1;
    }
    return 0;
}

int args_positive(const char *fn, const char *name, long long value) {
    if (value > 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: %s must be positive, got %lld", fn, name, value);
    return -1;
}

int args_whole(const char *fn, const char *name, PyObject *obj, long long lo, long long hi, long long *out) {
    *out = PyLong_AsLongLong(obj);
    if (*out == -1 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError,
                     overflow ? "%s: %s is out of range" : "%s: %s must be an int, got %.100s", fn, name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (*out < lo || *out > hi) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be in [%lld, %lld], got %lld", fn, name, lo, hi, *out);
        return -1;
    }
    return 0;
}

int args_real(const char *fn, const char *name, PyObject *obj, float *out) {
    double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be a float, got %.100s", fn, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = (float)value;
    return 0;
}

int args_arithmetic(const char *fn, const char *name, PyObject *obj, int *fast) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be 'fast' or 'exact', got %.100s", fn, name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(obj, "fast") == 0) *fast = 1;
    else if (PyUnicode_CompareWithASCIIString(obj, "exact") == 0) *fast = 0;
    else {
        PyErr_Format(PyExc_ValueError, "%s: %s must be 'fast' or 'exact', got %R", fn, name, obj);
        return -1;
    }
    return 0;
}
