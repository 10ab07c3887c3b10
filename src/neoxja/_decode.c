/* One decoding step of GPT-NeoX-Japanese in C: CPU, one new token per batch row, or several tokens
 * of each sequence at once to verify drafts (verify) (Python interface).
 *
 * Why C: a decoding step of a small model is a few dozen PyTorch ops on vectors, and each op costs
 * several microseconds of dispatch however little it computes; a large model's step is reading its
 * weights, which one C call does at the memory's speed. Here the whole step (embedding, every layer,
 * the output head and the greedy pick) is one call, and PyTorch is only the owner of the memory.
 * The computation is csrc/model.c's, over matrices in any format of csrc/weights.h (float32,
 * bfloat16, int8, 4-bit; exact or fast arithmetic); threads are csrc/pool.c's, woken once per step.
 *
 * Safety: the entry points take arrays (the buffer protocol), never addresses, and check each one's
 * type, layout and size against the model's dimensions (csrc/args.h, csrc/wparse.h); the indices a
 * step follows (token ids, cache rows and positions) are copied out of the caller's arrays and
 * checked on the copy, so nothing the caller passes or changes meanwhile makes a step read or write
 * outside an array. A failure is a ValueError or TypeError naming the function and the argument.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "csrc/args.h"
#include "csrc/f32.h"
#include "csrc/model.h"
#include "csrc/pool.h"
#include "csrc/wparse.h"

/* One step's rows, set into the model under the pool's lock. token, row, at and pos are the caller's
 * private copies, checked before the step (another thread may change the caller's arrays while the
 * step runs without the GIL): row b feeds token[b] into cache row row[b] at cache position at[b]
 * (it attends to positions 0..at[b]) and RoPE position pos[b]; rows that share a cache row have
 * distinct positions (verify: consecutive ones). mask (optional) [rows, > at] with
 * unit stride along positions: 0 marks a key row b must not see. */
typedef struct {
    int rows, shared_rows; /* shared_rows: some rows use the same cache row (at distinct positions) */
    const int64_t *token, *row, *at, *pos, *mask;
    int64_t mask_stride, argmax_stride;
    float *logits;
    int64_t *argmax; /* NULL: no argmax */
} Call;

/* A 1-d (strided) array of exactly `rows` items: its stride in items through *stride. */
static int rows_of(Args *a, const char *name, const Py_buffer *v, int rows, int64_t *stride) {
    if (v->ndim != 1 || v->shape[0] != rows) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be 1-d with %d values (one per row)", a->fn, name, rows);
        return -1;
    }
    *stride = v->strides ? v->strides[0] / v->itemsize : 1;
    return 0;
}

static int64_t items(const Py_buffer *v) { return v->len / v->itemsize; }

static inline void split(int64_t n, int ith, int nth, int64_t *start, int64_t *end) {
    int64_t chunk = (n + nth - 1) / nth;
    chunk = (chunk + 7) / 8 * 8;
    *start = chunk * ith < n ? chunk * ith : n;
    *end = *start + chunk < n ? *start + chunk : n;
}

/* ----- Python interface ------------------------------------------------------------------------ */

typedef struct {
    const float *w, *x;
    float *y;
    int64_t rows, cols;
    int vectors;
} MatmulTask;

static void matmul_task(void *ctx, int ith, int nth) {
    MatmulTask *task = ctx;
    int64_t r0, r1;
    split(task->rows, ith, nth, &r0, &r1);
    f32_kernel(weight_isa.f32)(task->w, task->cols, task->cols, task->x, task->cols, task->vectors, task->y, task->rows,
                               r0, r1);
    pool_barrier(nth);
}

/* matmul(w, x, y, threads): y [vectors, rows] = x [vectors, cols] @ w [rows, cols]^T, C-contiguous
 * float32 arrays, with the step's kernel and threads (for benchmarks and tests of the kernel alone). */
static PyObject *matmul_py(PyObject *self, PyObject *args) {
    PyObject *o_w, *o_x, *o_y, *o_threads;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOO:matmul", &o_w, &o_x, &o_y, &o_threads)) return NULL;
    if (args_whole("matmul", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads)) return NULL;
    Args a = {"matmul"};
    Py_buffer *w, *x, *y;
    if (!(w = args_view(&a, "w", o_w, 'f', 4, 0, 0)) || !(x = args_view(&a, "x", o_x, 'f', 4, 0, 0)) ||
        !(y = args_view(&a, "y", o_y, 'f', 4, 1, 0)))
        goto fail;
    if (w->ndim != 2 || x->ndim != 2 || y->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1 || x->shape[0] < 1 ||
        x->shape[0] > INT32_MAX || x->shape[1] != w->shape[1] || y->shape[0] != x->shape[0] ||
        y->shape[1] != w->shape[0]) {
        PyErr_SetString(PyExc_ValueError,
                        "matmul: w [rows, cols], x [vectors, cols] and y [vectors, rows] must be 2-d, non-empty "
                        "and agree");
        goto fail;
    }
    const char *yb = y->buf, *wb = w->buf, *xb = x->buf;
    if ((yb < wb + w->len && wb < yb + y->len) || (yb < xb + x->len && xb < yb + y->len)) {
        PyErr_SetString(PyExc_ValueError, "matmul: y overlaps w or x");
        goto fail;
    }
    MatmulTask task = {w->buf, x->buf, y->buf, w->shape[0], w->shape[1], (int)x->shape[0]};
    Py_BEGIN_ALLOW_THREADS
    pool_lock();
    pool_run(matmul_task, &task, clamp_threads(threads));
    pool_unlock();
    Py_END_ALLOW_THREADS
    args_release(&a);
    Py_RETURN_NONE;
fail:
    args_release(&a);
    return NULL;
}

static void free_model(Model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_views; i++) PyBuffer_Release(&m->views[i]);
    free(m->views);
    free(m->layer);
    free(m->x);
    free(m->inputs);
    free(m->thread_scratch);
    free(m->best_value);
    free(m->best_index);
    free(m);
}

static void capsule_destructor(PyObject *capsule) {
    free_model(PyCapsule_GetPointer(capsule, "neoxja._decode.Model"));
}

static const char *const LAYER_NAMES[11] = {
    "input_layernorm.weight", "input_layernorm.bias", "query_key_value.weight", "dense.weight", "dense_bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias", "dense_h_to_4h.weight",
    "dense_4h_to_h.weight", "k cache", "v cache"};
static const char *const GLOBAL_NAMES[6] = {"embed_in", "embed_out", "final_layer_norm.weight",
                                            "final_layer_norm.bias", "cos table", "sin table"};

/* The model's view of array obj (held until the model is freed) with `count` floats (at least
 * that many if at_least), writable if asked; NULL on error. */
static float *model_array(Model *m, int layer, const char *name, PyObject *obj, int64_t count, int at_least,
                          int writable) {
    char label[96];
    if (layer >= 0) snprintf(label, sizeof label, "layer %d %s", layer, name);
    else snprintf(label, sizeof label, "%s", name);
    Py_buffer *v = &m->views[m->n_views];
    if (args_take("new_model", label, obj, 'f', 4, writable, 0, v) < 0) return NULL;
    m->n_views++;
    if (at_least ? items(v) < count : items(v) != count) {
        PyErr_Format(PyExc_ValueError, "new_model: %s holds %lld values, the dimensions need %s%lld", label,
                     (long long)items(v), at_least ? "at least " : "", (long long)count);
        return NULL;
    }
    return v->buf;
}

static PyObject *new_model(PyObject *self, PyObject *args) {
    PyObject *o_dims, *layer_list, *globals;
    if (!PyArg_ParseTuple(args, "O!O!O!:new_model", &PyTuple_Type, &o_dims, &PyList_Type, &layer_list, &PyTuple_Type,
                          &globals))
        return NULL;
    static const char *const DIM_NAMES[10] = {"layers", "hidden", "heads", "rotary_ndims", "intermediate",
                                              "activation", "max_batch", "vocab", "cache_capacity",
                                              "rope_table_length"};
    if (PyTuple_GET_SIZE(o_dims) != 11) {
        PyErr_SetString(PyExc_ValueError, "new_model: dims must hold 10 ints and the layer norm's eps");
        return NULL;
    }
    long long dim[10];
    for (int i = 0; i < 10; i++) /* the first seven are C ints; all are checked against each other below */
        if (args_whole("new_model", DIM_NAMES[i], PyTuple_GET_ITEM(o_dims, i), 0, i < 7 ? INT32_MAX : LLONG_MAX, &dim[i]))
            return NULL;
    double eps_value = PyFloat_AsDouble(PyTuple_GET_ITEM(o_dims, 10));
    if (eps_value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "new_model: layer_norm_eps must be a float");
        return NULL;
    }
    int layers = (int)dim[0], hidden = (int)dim[1], heads = (int)dim[2], rot = (int)dim[3], inter = (int)dim[4];
    int act = (int)dim[5], batch = (int)dim[6];
    long long vocab = dim[7], capacity = dim[8], table_len = dim[9];
    float eps = (float)eps_value;
    if (layers <= 0 || hidden <= 0 || heads <= 0 || hidden % heads || rot < 0 || rot % 2 ||
        rot > hidden / heads || inter <= 0 || batch <= 0 || vocab <= 0 || capacity <= 0 || table_len <= 0 ||
        act < 0 || act > ACT_SILU) {
        PyErr_SetString(PyExc_ValueError, "new_model: dims: inconsistent dimensions");
        return NULL;
    }
    if (PyList_GET_SIZE(layer_list) != layers || PyTuple_GET_SIZE(globals) != 6) {
        PyErr_SetString(PyExc_ValueError, "new_model: layers and globals: expected one tuple of 11 arrays per layer and 6 globals");
        return NULL;
    }
    /* Element counts of every array, and of the scratch buffers, checked for overflow. */
    const char *fn = "new_model";
    int64_t cache, embed, table, scratch, row_scratch;
    if (args_product(fn, "batch * capacity", batch, capacity, &cache) ||
        args_product(fn, "cache * hidden", cache, hidden, &cache) ||
        args_product(fn, "vocab * hidden", vocab, hidden, &embed) ||
        args_product(fn, "table * rotary / 2", table_len, rot / 2, &table) ||
        args_product(fn, "batch * scratch", batch, model_row_floats(hidden, inter), &scratch) ||
        args_product(fn, "threads * batch", MAX_THREADS, batch, &row_scratch) ||
        args_product(fn, "threads * capacity", MAX_THREADS, capacity, &row_scratch))
        return NULL;
    if (3 * (int64_t)hidden > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "new_model: hidden size too large");
        return NULL;
    }
    Model *m = calloc(1, sizeof(Model));
    if (!m) return PyErr_NoMemory();
    m->layers = layers, m->hidden = hidden, m->heads = heads, m->head_dim = hidden / heads, m->rot = rot;
    m->inter = inter, m->act = act, m->batch = batch, m->vocab = vocab, m->capacity = capacity;
    m->table_len = table_len, m->eps = eps;
    m->layer = calloc(layers, sizeof(Layer));
    m->views = calloc((size_t)layers * (7 + 4 * WEIGHT_VIEWS) + 5 + WEIGHT_VIEWS, sizeof(Py_buffer));
    if (!m->layer || !m->views) {
        free_model(m);
        return PyErr_NoMemory();
    }
    /* The layers as a tuple of their own: nothing run while the arrays are taken can change it. */
    PyObject *layer_tuple = PyList_AsTuple(layer_list);
    if (!layer_tuple) {
        free_model(m);
        return NULL;
    }
    for (int l = 0; l < layers; l++) {
        PyObject *p = PyTuple_GET_ITEM(layer_tuple, l);
        if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 11) {
            PyErr_Format(PyExc_ValueError, "new_model: layer %d needs a tuple of 11 arrays", l);
            goto fail;
        }
        Layer *L = &m->layer[l];
        const float **slots[11] = {&L->ln1_w, &L->ln1_b, NULL, NULL, &L->dense_bias, &L->ln2_w, &L->ln2_b, NULL, NULL,
                                   (const float **)&L->k, (const float **)&L->v};
        Weight *matrices[11] = {NULL, NULL, &L->qkv, &L->dense, NULL, NULL, NULL, &L->fc1, &L->fc2, NULL, NULL};
        const int64_t shapes[11][2] = {{0}, {0}, {3 * (int64_t)hidden, hidden}, {hidden, hidden}, {0}, {0}, {0},
                                       {inter, hidden}, {hidden, inter}, {0}, {0}};
        const int64_t counts[11] = {hidden, hidden, 0, 0, hidden, hidden, hidden, 0, 0, cache, cache};
        for (int i = 0; i < 11; i++) {
            PyObject *item = PyTuple_GET_ITEM(p, i);
            if (i == 4 && item == Py_None) continue; /* no dense bias */
            if (matrices[i]) {
                char label[96];
                snprintf(label, sizeof label, "layer %d %s", l, LAYER_NAMES[i]);
                if (weight_from_python(fn, label, item, shapes[i][0], shapes[i][1], matrices[i], m->views, &m->n_views) < 0)
                    goto fail;
                continue;
            }
            if (!(*slots[i] = model_array(m, l, LAYER_NAMES[i], item, counts[i], 0, i >= 9))) goto fail;
        }
    }
    const float **globals_slots[6] = {&m->embed_in, NULL, &m->lnf_w, &m->lnf_b, &m->cos, &m->sin};
    const int64_t global_counts[6] = {embed, 0, hidden, hidden, table, table};
    for (int i = 0; i < 6; i++) {
        PyObject *item = PyTuple_GET_ITEM(globals, i);
        if (i == 1) {
            if (weight_from_python(fn, GLOBAL_NAMES[1], item, vocab, hidden, &m->head, m->views, &m->n_views) < 0) goto fail;
            continue;
        }
        if (!(*globals_slots[i] = model_array(m, -1, GLOBAL_NAMES[i], item, global_counts[i], i >= 4, 0))) goto fail;
    }
    /* the row scratch, and one buffer for the inputs of the matrices as their kernels read them (one
     * product at a time), for `batch` rows */
    if (model_grow_rows(m, batch) < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(layer_tuple);
    PyObject *capsule = PyCapsule_New(m, "neoxja._decode.Model", capsule_destructor);
    if (!capsule) free_model(m);
    return capsule;
fail:
    Py_DECREF(layer_tuple);
    free_model(m);
    return NULL;
}

/* Runs the step of `call` on up to `threads` threads, without the GIL; the step's fields are set
 * into the model only once this call holds the run lock. */
static PyObject *launch(Model *m, const Call *call, long long nth) {
    int threads = clamp_threads(nth);
    Py_BEGIN_ALLOW_THREADS
    pool_lock();
    m->rows = call->rows, m->shared_rows = call->shared_rows;
    m->token = call->token, m->row = call->row, m->at = call->at, m->pos = call->pos;
    m->mask = call->mask, m->mask_stride = call->mask_stride, m->logits = call->logits;
    m->argmax = call->argmax, m->argmax_stride = call->argmax_stride;
    int64_t per_thread = m->capacity;
    if (m->max_rows < call->rows && model_grow_rows(m, call->rows) < 0) threads = 0; /* out of memory */
    if (threads >= 1 && m->scratch_threads < threads) {
        float *grown = realloc(m->thread_scratch, sizeof(float) * per_thread * threads);
        if (grown) {
            m->thread_scratch = grown;
            m->scratch_threads = threads;
        }
    }
    if (threads > m->scratch_threads) threads = m->scratch_threads; /* out of memory: fewer threads */
    if (threads >= 1) pool_run(model_step, m, threads);
    pool_unlock();
    Py_END_ALLOW_THREADS
    if (threads < 1) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The model of a capsule made by new_model; NULL with a TypeError naming fn. */
static Model *decoder_of(Args *a, PyObject *capsule) {
    if (!PyCapsule_IsValid(capsule, "neoxja._decode.Model")) {
        PyErr_Format(PyExc_TypeError, "%s: model must be a decoder made by new_model, got %.100s", a->fn,
                     Py_TYPE(capsule)->tp_name);
        return NULL;
    }
    return PyCapsule_GetPointer(capsule, "neoxja._decode.Model");
}

/* Does an output's bytes [lo, hi) share a byte with an array the model holds (a weight, table or
 * cache)? -1 with a ValueError naming it if so: a step would overwrite what it reads. */
static int apart_from_model(Args *a, const Model *m, const char *lo, const char *hi, const char *name) {
    for (int i = 0; i < m->n_views; i++) {
        const char *p = m->views[i].buf;
        if (m->views[i].len && lo < p + m->views[i].len && p < hi) {
            PyErr_Format(PyExc_ValueError, "%s: %s overlaps an array of the model (a weight, table or cache)",
                         a->fn, name);
            return -1;
        }
    }
    return 0;
}

/* The output arrays a step of `rows` rows writes: logits (C-contiguous float32, at least rows x
 * vocab) and argmax (None, or int64 1-d of `rows`, any stride), apart from each other and from the
 * model's arrays. */
static int step_outputs(Args *a, Model *m, int rows, PyObject *o_logits, PyObject *o_argmax, Call *call) {
    Py_buffer *logits = args_view(a, "logits", o_logits, 'f', 4, 1, 0);
    if (!logits) return -1;
    if (items(logits) < rows * m->vocab) {
        PyErr_Format(PyExc_ValueError, "%s: logits holds %lld values, %d rows need %lld", a->fn,
                     (long long)items(logits), rows, (long long)(rows * m->vocab));
        return -1;
    }
    const char *l0 = logits->buf, *l1 = l0 + logits->len;
    if (apart_from_model(a, m, l0, l1, "logits") < 0) return -1;
    call->rows = rows;
    call->logits = logits->buf;
    if (o_argmax != Py_None) {
        Py_buffer *argmax = args_view(a, "argmax", o_argmax, 'i', 8, 1, 1);
        if (!argmax || rows_of(a, "argmax", argmax, rows, &call->argmax_stride) < 0) return -1;
        /* its extent from the first to the last item, whatever the sign of its stride */
        const char *first = argmax->buf, *last = first + (rows - 1) * call->argmax_stride * 8;
        const char *lo = first < last ? first : last, *hi = (first < last ? last : first) + 8;
        if (lo < l1 && l0 < hi) {
            PyErr_Format(PyExc_ValueError, "%s: argmax overlaps logits", a->fn);
            return -1;
        }
        if (apart_from_model(a, m, lo, hi, "argmax") < 0) return -1;
        call->argmax = argmax->buf;
    }
    return 0;
}

/* The rows of step and step_slots: 1..the cache's batch. */
static int batch_rows(Args *a, const Model *m, PyObject *o_rows, int *rows) {
    long long value;
    if (args_whole(a->fn, "rows", o_rows, LLONG_MIN, LLONG_MAX, &value)) return -1;
    if (value <= 0 || value > m->batch) {
        PyErr_Format(PyExc_ValueError, "%s: rows: %lld rows, but the decoder was built for 1..%d", a->fn, value,
                     m->batch);
        return -1;
    }
    *rows = (int)value;
    return 0;
}

/* step(model, rows, t, tokens, positions, position_delta, mask, logits, argmax, threads). */
static PyObject *step(PyObject *self, PyObject *args) {
    PyObject *capsule, *o_rows, *o_t, *o_tokens, *o_positions, *o_delta, *o_mask, *o_logits, *o_argmax, *o_threads;
    long long t, position_delta, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO:step", &capsule, &o_rows, &o_t, &o_tokens, &o_positions, &o_delta, &o_mask,
                          &o_logits, &o_argmax, &o_threads))
        return NULL;
    if (args_whole("step", "t", o_t, LLONG_MIN, LLONG_MAX, &t) ||
        args_whole("step", "position_delta", o_delta, LLONG_MIN, LLONG_MAX, &position_delta) ||
        args_whole("step", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads))
        return NULL;
    Args a = {"step"};
    Call call = {0};
    int64_t *copy = NULL, token_stride, position_stride = 0;
    Py_buffer *tokens, *positions = NULL;
    PyObject *result = NULL;
    Model *m = decoder_of(&a, capsule);
    int rows;
    if (!m || batch_rows(&a, m, o_rows, &rows) < 0 || step_outputs(&a, m, rows, o_logits, o_argmax, &call) < 0)
        goto done;
    if (t < 0 || t >= m->capacity) {
        PyErr_Format(PyExc_ValueError, "step: t: cache position %lld outside the cache's capacity %lld", t,
                     (long long)m->capacity);
        goto done;
    }
    if (!(tokens = args_view(&a, "tokens", o_tokens, 'i', 8, 0, 1)) || rows_of(&a, "tokens", tokens, rows, &token_stride) < 0)
        goto done;
    if (o_positions != Py_None && (!(positions = args_view(&a, "positions", o_positions, 'i', 8, 0, 1)) ||
                                   rows_of(&a, "positions", positions, rows, &position_stride) < 0))
        goto done;
    if (o_mask != Py_None) {
        Py_buffer *mask = args_view(&a, "mask", o_mask, 'i', 8, 0, 1);
        if (!mask) goto done;
        if (mask->ndim != 2 || mask->shape[0] != rows || mask->shape[1] <= t || mask->strides[1] != 8) {
            PyErr_Format(PyExc_ValueError, "step: mask must be int64 [%d, > %lld] with unit stride along positions",
                         rows, t);
            goto done;
        }
        call.mask = mask->buf;
        call.mask_stride = mask->strides[0] / 8;
    }
    copy = malloc(sizeof(int64_t) * 4 * rows);
    if (!copy) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *token = copy, *row = copy + rows, *at = copy + 2 * rows, *pos = copy + 3 * rows;
    for (int b = 0; b < rows; b++) {
        token[b] = ((const int64_t *)tokens->buf)[b * token_stride];
        row[b] = b;
        at[b] = t;
        pos[b] = t;
        if (token[b] < 0 || token[b] >= m->vocab) {
            PyErr_Format(PyExc_ValueError, "step: tokens: token id %lld in row %d is outside the vocabulary [0, %lld)",
                         (long long)token[b], b, (long long)m->vocab);
            goto done;
        }
        if (positions && __builtin_add_overflow(((const int64_t *)positions->buf)[b * position_stride],
                                                (int64_t)position_delta, &pos[b])) {
            PyErr_Format(PyExc_ValueError, "step: positions: positions[%d] + position_delta overflows int64", b);
            goto done;
        }
        if (pos[b] < 0 || pos[b] >= m->table_len) {
            PyErr_Format(PyExc_ValueError, "step: positions: position %lld of row %d is outside the RoPE table [0, %lld)",
                         (long long)pos[b], b, (long long)m->table_len);
            goto done;
        }
    }
    call.token = token, call.row = row, call.at = at, call.pos = pos;
    result = launch(m, &call, threads);
done:
    free(copy);
    args_release(&a);
    return result;
}

/* One token per row, each row at its own place: row b reads and writes cache row slots[b], whose
 * first lengths[b] positions are filled, and its token goes at position lengths[b] (also its RoPE
 * position). Rows are independent: each row's numbers are those of a batch of one. */
static PyObject *step_slots(PyObject *self, PyObject *args) {
    PyObject *capsule, *o_rows, *o_tokens, *o_slots, *o_lengths, *o_logits, *o_argmax, *o_threads;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOO:step_slots", &capsule, &o_rows, &o_tokens, &o_slots, &o_lengths, &o_logits,
                          &o_argmax, &o_threads))
        return NULL;
    if (args_whole("step_slots", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads)) return NULL;
    Args a = {"step_slots"};
    Call call = {0};
    int64_t *copy = NULL, strides[3];
    Py_buffer *in[3];
    PyObject *result = NULL;
    Model *m = decoder_of(&a, capsule);
    int rows;
    if (!m || batch_rows(&a, m, o_rows, &rows) < 0 || step_outputs(&a, m, rows, o_logits, o_argmax, &call) < 0)
        goto done;
    const char *names[3] = {"tokens", "slots", "lengths"};
    PyObject *objs[3] = {o_tokens, o_slots, o_lengths};
    for (int i = 0; i < 3; i++)
        if (!(in[i] = args_view(&a, names[i], objs[i], 'i', 8, 0, 1)) || rows_of(&a, names[i], in[i], rows, &strides[i]) < 0)
            goto done;
    copy = malloc(sizeof(int64_t) * 4 * rows);
    if (!copy) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *token = copy, *row = copy + rows, *at = copy + 2 * rows, *pos = copy + 3 * rows;
    for (int b = 0; b < rows; b++) {
        token[b] = ((const int64_t *)in[0]->buf)[b * strides[0]];
        row[b] = ((const int64_t *)in[1]->buf)[b * strides[1]];
        at[b] = pos[b] = ((const int64_t *)in[2]->buf)[b * strides[2]];
        if (token[b] < 0 || token[b] >= m->vocab) {
            PyErr_Format(PyExc_ValueError, "step_slots: tokens: token id %lld in row %d is outside the vocabulary [0, %lld)",
                         (long long)token[b], b, (long long)m->vocab);
            goto done;
        }
        if (row[b] < 0 || row[b] >= m->batch) {
            PyErr_Format(PyExc_ValueError, "step_slots: slots: slot %lld of row %d is outside the cache's %d rows",
                         (long long)row[b], b, m->batch);
            goto done;
        }
        for (int c = 0; c < b; c++)
            if (row[c] == row[b]) {
                PyErr_Format(PyExc_ValueError, "step_slots: slots: rows %d and %d both use slot %lld", c, b,
                             (long long)row[b]);
                goto done;
            }
        if (at[b] < 0 || at[b] >= m->capacity || at[b] >= m->table_len) {
            PyErr_Format(PyExc_ValueError, "step_slots: lengths: length %lld of row %d leaves no room in the cache (%lld)",
                         (long long)at[b], b, (long long)m->capacity);
            goto done;
        }
    }
    call.token = token, call.row = row, call.at = at, call.pos = pos;
    result = launch(m, &call, threads);
done:
    free(copy);
    args_release(&a);
    return result;
}

/* Several tokens per sequence in one step (verifying draft tokens): tokens [n, count] feeds, for each
 * sequence b < n, tokens[b, 0..count) into cache row b at positions t..t + count - 1 (also their RoPE
 * positions), each attending causally to the positions up to its own; no padding. The logits of
 * token (b, i) are row b * count + i. The cache lengths are the caller's to advance. */
static PyObject *verify(PyObject *self, PyObject *args) {
    PyObject *capsule, *o_tokens, *o_t, *o_logits, *o_argmax, *o_threads;
    long long t, threads;
    if (!PyArg_ParseTuple(args, "OOOOOO:verify", &capsule, &o_tokens, &o_t, &o_logits, &o_argmax, &o_threads))
        return NULL;
    if (args_whole("verify", "t", o_t, LLONG_MIN, LLONG_MAX, &t) ||
        args_whole("verify", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads))
        return NULL;
    Args a = {"verify"};
    Call call = {0};
    int64_t *copy = NULL;
    PyObject *result = NULL;
    Model *m = decoder_of(&a, capsule);
    if (!m) goto done;
    Py_buffer *tokens = args_view(&a, "tokens", o_tokens, 'i', 8, 0, 1);
    if (!tokens) goto done;
    if (tokens->ndim != 2 || tokens->shape[0] < 1 || tokens->shape[0] > m->batch || tokens->shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "verify: tokens must be int64 [sequences, count] with 1..%d sequences and "
                     "count >= 1", m->batch);
        goto done;
    }
    const int n = (int)tokens->shape[0];
    const int64_t count = tokens->shape[1], stride0 = tokens->strides[0] / 8, stride1 = tokens->strides[1] / 8;
    /* t + count <= capacity and table_len, written so that no sum can overflow (t may be huge) */
    if (t < 0 || t > m->capacity - count || t > m->table_len - count) {
        PyErr_Format(PyExc_ValueError, "verify: t: %lld tokens at cache position %lld do not fit in the cache's "
                     "%lld positions (RoPE table: %lld)", (long long)count, t, (long long)m->capacity,
                     (long long)m->table_len);
        goto done;
    }
    /* rows = n * count <= batch * capacity; the row scratch for that many, checked for overflow */
    int64_t rows, bytes;
    if (args_product("verify", "sequences * count", n, count, &rows) ||
        args_product("verify", "rows * row scratch", rows, model_row_floats(m->hidden, m->inter), &bytes) ||
        args_product("verify", "threads * rows", MAX_THREADS, rows, &bytes))
        goto done;
    if (rows > INT32_MAX / 8) {
        PyErr_Format(PyExc_ValueError, "verify: tokens: %lld rows are too many", (long long)rows);
        goto done;
    }
    if (step_outputs(&a, m, (int)rows, o_logits, o_argmax, &call) < 0) goto done;
    copy = malloc(sizeof(int64_t) * 4 * rows);
    if (!copy) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *token = copy, *row = copy + rows, *at = copy + 2 * rows, *pos = copy + 3 * rows;
    for (int b = 0; b < n; b++)
        for (int64_t i = 0; i < count; i++) {
            const int64_t r = b * count + i, id = ((const int64_t *)tokens->buf)[b * stride0 + i * stride1];
            if (id < 0 || id >= m->vocab) {
                PyErr_Format(PyExc_ValueError, "verify: tokens: token id %lld at [%d, %lld] is outside the "
                             "vocabulary [0, %lld)", (long long)id, b, (long long)i, (long long)m->vocab);
                goto done;
            }
            token[r] = id;
            row[r] = b;
            at[r] = pos[r] = t + i;
        }
    call.token = token, call.row = row, call.at = at, call.pos = pos;
    call.shared_rows = count > 1;
    result = launch(m, &call, threads);
done:
    free(copy);
    args_release(&a);
    return result;
}

static PyObject *kernel(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(f32_kernel_name(weight_isa.f32));
}

/* The kernels of each kind of product: {"float32", "exact", "int8", "bfloat16"}. */
static PyObject *kernels(PyObject *self, PyObject *noargs) {
    Weight q4 = {.format = W_4BIT, .fast = 1, .in = 128, .blocksize = 64};
    Weight bf16 = {.format = W_BF16, .fast = 1, .in = 128};
    Weight exact = {.format = W_4BIT, .in = 128, .blocksize = 64};
    return Py_BuildValue("{s:s,s:s,s:s,s:s}", "float32", f32_kernel_name(weight_isa.f32), "exact",
                         weight_kernel(&exact), "int8", weight_kernel(&q4), "bfloat16", weight_kernel(&bf16));
}

static PyMethodDef methods[] = {
    {"new_model", new_model, METH_VARARGS,
     "new_model(dims, layers, globals) -> capsule: a model over arrays it holds until it is freed.\n\n"
     "dims = (layers, hidden, heads, rotary_ndims, intermediate, activation, max_batch, vocab,\n"
     "        cache_capacity, rope_table_length, layer_norm_eps); layers = one tuple per layer of (ln1 w, ln1 b,\n"
     "qkv, dense, dense_bias or None, ln2 w, ln2 b, fc1, fc2, k cache, v cache): C-contiguous float32 arrays\n"
     "(buffer protocol; the caches writable [max_batch, heads, capacity, head_dim]), the four matrices each a\n"
     "float32 array or a weight tuple ('bfloat16', w, arithmetic), ('int8', w, scale, arithmetic) or ('4bit',\n"
     "w, code, absmax, qabsmax, nested_absmax, nested_code, offset, blocksize, arithmetic); globals =\n"
     "(embed_in, embed_out (a matrix as above), final ln w, final ln b, cos table, sin table). Every size is\n"
     "checked."},
    {"step", step, METH_VARARGS,
     "step(model, rows, t, tokens, positions, position_delta, mask, logits, argmax, threads): one token per\n"
     "row at cache position t; tokens, positions (or None) and argmax (or None) int64 [rows], any stride;\n"
     "mask (or None) int64 [rows, > t] with unit stride along positions; writes logits (float32, at least\n"
     "rows x vocab) and the first maximum of each row into argmax."},
    {"step_slots", step_slots, METH_VARARGS,
     "step_slots(model, rows, tokens, slots, lengths, logits, argmax, threads): one token per row, row b\n"
     "in cache row slots[b] at position lengths[b] (int64 [rows] arrays); writes logits and, if argmax is\n"
     "not None, each row's first maximum. The cache lengths are the caller's to advance."},
    {"verify", verify, METH_VARARGS,
     "verify(model, tokens, t, logits, argmax, threads): several tokens per sequence in one step; tokens\n"
     "int64 [n, count] (any strides), sequence b in cache row b at positions t..t + count - 1, each token\n"
     "attending to the positions up to its own; writes logits (float32, at least n * count x vocab, row\n"
     "b * count + i for token [b, i]) and, if argmax (int64 [n * count], any stride) is not None, each row's\n"
     "first maximum. The cache lengths are the caller's to advance."},
    {"matmul", matmul_py, METH_VARARGS,
     "matmul(w, x, y, threads): y [vectors, rows] = x [vectors, cols] @ w [rows, cols]^T (C-contiguous\n"
     "float32 arrays) with the step's float32 kernel, on `threads` threads."},
    {"kernel", kernel, METH_NOARGS, "Which float32 matrix kernel this CPU runs: 'avx512', 'avx2' or 'scalar'."},
    {"kernels", kernels, METH_NOARGS,
     "{'float32': ..., 'exact': ..., 'int8': ..., 'bfloat16': ...}: the kernels of float32 weights, of the exact\n"
     "arithmetic of quantized ones, of the fast 4-bit and int8 products and of fast bfloat16."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef decode_module = {
    PyModuleDef_HEAD_INIT, "neoxja._decode", "One decoding step of GPT-NeoX-Japanese in C (CPU).", -1, methods,
};

PyMODINIT_FUNC PyInit__decode(void) {
    /* NEOXJA_DECODE_KERNEL=scalar|avx2|avxvnni caps the kernels (tests run the lower ones). */
    weight_isa = isa_detect("NEOXJA_DECODE_KERNEL");
    pool_init();
    return PyModule_Create(&decode_module);
}
