/* Dropout in place with a counter-based mask, for neoxja/dropout_attention.py.
 *
 * Element i of a block is kept when bits 8..31 of hash(hash(i ^ k1) ^ k2) reach `threshold`
 * (= round(p * 2**24)), and then scaled by 1 / (1 - p); otherwise it becomes 0. The hash is a
 * 32-bit integer finalizer (xor-shift, multiply, twice). A mask is a pure function of (k1, k2, i), so
 * backward regenerates forward's mask without storing it, and neoxja/dropout_attention.py computes
 * the same mask with PyTorch integer ops where this extension is not built.
 *
 * PyTorch's own dropout draws from one Mersenne-Twister stream, serially: at 2,048 tokens drawing
 * the masks cost more than the attention's matrix products. This loop vectorises (one clone per
 * instruction set, chosen at load) and runs on as many threads as asked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

typedef struct {
    void *data;
    int is_double;
    uint32_t begin, end, k1, k2, threshold;
    double scale;
} Part;

__attribute__((target_clones("avx512f", "avx2", "default")))
static void drop_float(float *x, uint32_t begin, uint32_t end, uint32_t k1, uint32_t k2, uint32_t threshold,
                       float scale) {
    for (uint32_t i = begin; i < end; i++) {
        uint32_t h = mix(mix(i ^ k1) ^ k2) >> 8;
        x[i] = h >= threshold ? x[i] * scale : 0.0f;
    }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void drop_double(double *x, uint32_t begin, uint32_t end, uint32_t k1, uint32_t k2, uint32_t threshold,
                        double scale) {
    for (uint32_t i = begin; i < end; i++) {
        uint32_t h = mix(mix(i ^ k1) ^ k2) >> 8;
        x[i] = h >= threshold ? x[i] * scale : 0.0;
    }
}

static void *run_part(void *arg) {
    Part *p = (Part *)arg;
    if (p->is_double)
        drop_double((double *)p->data, p->begin, p->end, p->k1, p->k2, p->threshold, p->scale);
    else
        drop_float((float *)p->data, p->begin, p->end, p->k1, p->k2, p->threshold, (float)p->scale);
    return NULL;
}

#define MAX_THREADS 64

/* *out = the int obj, which must lie in 0..limit; else a ValueError or TypeError naming it. */
static int bounded(PyObject *obj, const char *name, unsigned long long limit, uint32_t *out) {
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        PyErr_Format(PyExc_TypeError, "drop: %s must be an int, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if ((value == (unsigned long long)-1 && PyErr_Occurred()) || value > limit) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "drop: %s must be in 0..%llu", name, limit);
        return -1;
    }
    *out = (uint32_t)value;
    return 0;
}

/* drop(x, k1, k2, threshold, scale, threads): x is a writable C-contiguous float32 or float64 array
 * (buffer protocol) of at most 2**32 - 1 elements, checked before it is touched. */
static PyObject *drop(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_k1, *o_k2, *o_threshold, *o_scale, *o_threads;
    uint32_t k1, k2, threshold;
    if (!PyArg_ParseTuple(args, "OOOOOO:drop", &o_x, &o_k1, &o_k2, &o_threshold, &o_scale, &o_threads)) return NULL;
    if (bounded(o_k1, "k1", UINT32_MAX, &k1) || bounded(o_k2, "k2", UINT32_MAX, &k2) ||
        bounded(o_threshold, "threshold", 1UL << 24, &threshold))
        return NULL;
    double scale = PyFloat_AsDouble(o_scale);
    if (scale == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "drop: scale must be a float, got %.100s", Py_TYPE(o_scale)->tp_name);
    }
    long long threads = PyLong_AsLongLong(o_threads);
    if (threads == -1 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        return PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError,
                            overflow ? "drop: threads is out of range" : "drop: threads must be an int, got %.100s",
                            Py_TYPE(o_threads)->tp_name);
    }
    if (!PyObject_CheckBuffer(o_x))
        return PyErr_Format(PyExc_TypeError, "drop: x must be an array with the buffer protocol, got %.100s",
                            Py_TYPE(o_x)->tp_name);
    Py_buffer view;
    if (PyObject_GetBuffer(o_x, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "drop: x must be a C-contiguous writable array");
    }
    const char *f = view.format ? view.format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    int is_double = strcmp(f, "d") == 0 && view.itemsize == 8;
    if (!is_double && !(strcmp(f, "f") == 0 && view.itemsize == 4)) {
        PyErr_Format(PyExc_ValueError, "drop: x must hold float32 or float64 values, got format '%s'",
                     view.format ? view.format : "B");
        PyBuffer_Release(&view);
        return NULL;
    }
    if (view.len && (uintptr_t)view.buf % (uintptr_t)view.itemsize) {
        PyErr_SetString(PyExc_ValueError, "drop: x is not aligned to its items");
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t n = view.len / view.itemsize;
    if ((unsigned long long)n > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "drop: x holds %zd elements; a dropout block holds at most 2**32 - 1", n);
        PyBuffer_Release(&view);
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((Py_ssize_t)threads * 65536 > n) threads = (int)(n / 65536) + 1; /* small blocks: one thread */
    Part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        parts[t] = (Part){view.buf, is_double, (uint32_t)(n * t / threads), (uint32_t)(n * (t + 1) / threads), k1, k2,
                          threshold, scale};
        if (t > 0) started[t] = pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (t == 0 || !started[t]) run_part(&parts[t]); /* this thread, and any that failed to start */
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"drop", drop, METH_VARARGS,
     "drop(x, k1, k2, threshold, scale, threads): dropout in place of x, a writable C-contiguous float32\n"
     "or float64 array (buffer protocol); element i is kept, times scale, when\n"
     "mix(mix(i ^ k1) ^ k2) >> 8 >= threshold, else set to 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dropout", "Counter-based dropout masks.", -1, methods};

PyMODINIT_FUNC PyInit__dropout(void) { return PyModule_Create(&module); }
