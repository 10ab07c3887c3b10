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

static PyObject *drop(PyObject *self, PyObject *args) {
    unsigned long long address;
    Py_ssize_t n;
    int is_double, threads;
    unsigned long k1, k2, threshold;
    double scale;
    if (!PyArg_ParseTuple(args, "Knpkkkdi", &address, &n, &is_double, &k1, &k2, &threshold, &scale, &threads))
        return NULL;
    if (n < 0 || (unsigned long long)n > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "a dropout block holds at most 2**32 - 1 elements, got %zd", n);
        return NULL;
    }
    if (threshold > (1UL << 24) || k1 > UINT32_MAX || k2 > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "dropout keys must be 32-bit and the threshold at most 2**24");
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
        parts[t] = (Part){(void *)(uintptr_t)address, is_double, (uint32_t)(n * t / threads),
                          (uint32_t)(n * (t + 1) / threads), (uint32_t)k1, (uint32_t)k2, (uint32_t)threshold,
                          scale};
        if (t > 0) started[t] = pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (t == 0 || !started[t]) run_part(&parts[t]); /* this thread, and any that failed to start */
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"drop", drop, METH_VARARGS,
     "drop(address, n, is_double, k1, k2, threshold, scale, threads): dropout in place of n contiguous\n"
     "float32 (or float64) values at address; element i is kept, times scale, when\n"
     "mix(mix(i ^ k1) ^ k2) >> 8 >= threshold, else set to 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dropout", "Counter-based dropout masks.", -1, methods};

PyMODINIT_FUNC PyInit__dropout(void) { return PyModule_Create(&module); }
