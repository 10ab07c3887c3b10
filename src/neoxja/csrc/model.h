/* One decoding step of GPT-NeoX-Japanese over a model's arrays (the computation of _decode; its
 * Python interface, which builds Models from checked arrays, is _decode.c).
 *
 * For a batch of rows that each feed one token at cache position t:
 *
 *     x = embed_in[token]
 *     for each layer:
 *         h = input_layernorm(x); qkv = W_qkv h                  (per head laid out [q | k | v])
 *         rotate the first rot dims of q and k (RoPE at the row's position), store k, v at t
 *         a = softmax(q . K[0..t] / sqrt(head_dim), masked) V[0..t]
 *         x = (W_dense a [+ dense_bias]) + x
 *         x = W_fc2 act(W_fc1 post_attention_layernorm(x)) + x
 *     logits = W_out final_layer_norm(x);  argmax (first maximum, NaN counts as the maximum)
 *
 * The matrices are Weights (weights.h): float32, bfloat16, int8 or 4-bit, each with its arithmetic;
 * an input that a weight's kernel reads in another form (int8 blocks, bfloat16) is prepared once per
 * step, shared between the threads. Everything else is float32. Every kernel computes a row's
 * values the same way whatever the other rows, so each row's logits are those of a batch of one.
 *
 * Several tokens of one sequence in one step (verifying draft tokens) are several rows on the same
 * cache row at consecutive positions: each row stores its k, v at its own position and attends to
 * the positions up to it (causal), and the rows' keys are all stored before any row reads them.
 */
#ifndef NEOXJA_MODEL_H
#define NEOXJA_MODEL_H

#include <Python.h>
#include <stdint.h>

#include "weights.h"

enum { ACT_GELU_ERF = 0, ACT_GELU_TANH = 1, ACT_RELU = 2, ACT_SILU = 3 };

typedef struct {
    const float *ln1_w, *ln1_b, *dense_bias, *ln2_w, *ln2_b;
    Weight qkv, dense, fc1, fc2;
    float *k, *v; /* cache [batch, heads, capacity, head_dim] */
} Layer;

typedef struct {
    int layers, hidden, heads, head_dim, rot, inter, act, batch;
    int64_t vocab, capacity, table_len;
    float eps;
    const float *embed_in, *lnf_w, *lnf_b, *cos, *sin; /* cos/sin [table_len, rot / 2] */
    Weight head;
    Layer *layer;
    /* scratch for up to max_rows rows (at least batch; grown for steps of more rows): x, h, attn
     * [max_rows, hidden]; qkv [max_rows, 3 hidden]; mid [max_rows, inter] */
    int max_rows;
    float *x, *h, *qkv, *attn, *mid;
    void *inputs;          /* the inputs of the matrices as their kernels read them (64-byte aligned) */
    float *thread_scratch; /* [threads, capacity]: attention scores */
    int scratch_threads;
    float *best_value; /* [MAX_THREADS, max_rows] */
    int64_t *best_index;
    Py_buffer *views; /* every array the model reads (weights, tables) or writes (caches), held */
    int n_views;
    /* this step (see Call); shared_rows: some rows use the same cache row */
    int rows, shared_rows;
    const int64_t *token, *row, *at, *pos, *mask;
    int64_t mask_stride, argmax_stride;
    float *logits;
    int64_t *argmax;
} Model;

/* Floats of the row scratch (x, h, attn, qkv, mid) per row: what model_grow_rows allocates per row,
 * and what its callers check for overflow. */
static inline int64_t model_row_floats(int hidden, int inter) { return 6 * (int64_t)hidden + inter; }

/* The scratch buffers of m sized for `rows` rows (x, h, attn, qkv, mid, best_value, best_index,
 * inputs), replacing smaller ones: 0, or -1 when memory runs out (m keeps its old buffers). The
 * caller checked the sizes for overflow; no GIL needed (plain allocation), but no step may run. */
int model_grow_rows(Model *m, int rows);

/* The step of the rows set into m (rows, token, row, at, pos, mask, logits, argmax), as a pool task. */
void model_step(void *model, int ith, int nth);

#endif
