/* One decoding step (see model.h). Threads: matrix products split output rows between threads,
 * attention splits (row, head) pairs; the threads meet at barriers between stages. Layers too small
 * to gain from threads run on the calling thread alone, and then only the output head is shared. */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "args.h" /* MAX_THREADS */
#include "f32.h"
#include "pool.h"

/* Below this many weight elements per layer (times batch rows) the layers run on one thread. */
#define PARALLEL_MIN_ELEMENTS (1 << 18)

/* Bytes of the buffer of the matrices' inputs (as their kernels read them) for steps of `rows` rows. */
static size_t inputs_bytes(const Model *m, int rows) {
    size_t bytes = act_bytes(&m->head, rows);
    for (int l = 0; l < m->layers; l++) {
        const Weight *each[4] = {&m->layer[l].qkv, &m->layer[l].dense, &m->layer[l].fc1, &m->layer[l].fc2};
        for (int i = 0; i < 4; i++)
            if (act_bytes(each[i], rows) > bytes) bytes = act_bytes(each[i], rows);
    }
    return bytes;
}

int model_grow_rows(Model *m, int rows) {
    size_t inputs = inputs_bytes(m, rows);
    float *x = malloc(sizeof(float) * model_row_floats(m->hidden, m->inter) * rows);
    float *best_value = malloc(sizeof(float) * MAX_THREADS * rows);
    int64_t *best_index = malloc(sizeof(int64_t) * MAX_THREADS * rows);
    void *in = inputs ? aligned_alloc(64, (inputs + 63) / 64 * 64) : NULL;
    if (!x || !best_value || !best_index || (inputs && !in)) {
        free(x), free(best_value), free(best_index), free(in);
        return -1;
    }
    free(m->x), free(m->best_value), free(m->best_index), free(m->inputs);
    m->x = x, m->best_value = best_value, m->best_index = best_index, m->inputs = in;
    m->max_rows = rows;
    m->h = m->x + (int64_t)rows * m->hidden;
    m->attn = m->h + (int64_t)rows * m->hidden;
    m->qkv = m->attn + (int64_t)rows * m->hidden;
    m->mid = m->qkv + (int64_t)rows * 3 * m->hidden;
    return 0;
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int n, float eps) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += x[i];
    double mean = sum / n, var = 0.0;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float m = (float)mean, rstd = (float)(1.0 / sqrt(var / n + eps));
    for (int i = 0; i < n; i++) y[i] = (x[i] - m) * rstd * w[i] + b[i];
}

static inline float activation(float v, int act) {
    switch (act) {
    case ACT_GELU_ERF:
        return 0.5f * v * (1.0f + erff(v * (float)M_SQRT1_2));
    case ACT_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case ACT_RELU:
        return v > 0.f ? v : 0.f;
    default: /* ACT_SILU */
        return v / (1.0f + expf(-v));
    }
}

static inline void split(int64_t n, int ith, int nth, int64_t align, int64_t *start, int64_t *end) {
    int64_t chunk = (n + nth - 1) / nth;
    chunk = (chunk + align - 1) / align * align;
    *start = chunk * ith < n ? chunk * ith : n;
    *end = *start + chunk < n ? *start + chunk : n;
}

static float dot(const float *a, const float *b, int64_t n) {
    float out;
    f32_kernel(weight_isa.f32)(a, n, n, b, n, 1, &out, 1, 0, 1);
    return out;
}

/* y[r * ldy + o] = W x_r for this thread's share [*r0, *r1) of the output rows; x [rows, w->in] is
 * first prepared for w's kernel by all the threads (then a barrier), if it needs to be. */
static void product(Model *m, const Weight *w, const float *x, float *y, int64_t ldy, int ith, int nth, int64_t *r0,
                    int64_t *r1) {
    Act a;
    act_bind(w, m->rows, x, m->inputs, &a);
    if (act_needed(w)) {
        act_prepare(w, &a, ith, nth);
        pool_barrier(nth);
    }
    split(w->out, ith, nth, 8, r0, r1);
    weight_product(w, &a, y, ldy, *r0, *r1);
}

/* RoPE and cache write for the (row, head) pairs [u0, u1): q is rotated in place in m->qkv, k and v
 * are stored at the row's cache position. */
static void rotate_and_store(Model *m, Layer *L, int64_t u0, int64_t u1) {
    const int H = m->hidden, hd = m->head_dim, half = m->rot / 2;
    const int64_t cap = m->capacity;
    for (int64_t u = u0; u < u1; u++) {
        int b = (int)(u / m->heads), head = (int)(u % m->heads);
        const int64_t t = m->at[b];
        float *q = m->qkv + (int64_t)b * 3 * H + (int64_t)head * 3 * hd;
        const float *ks = q + hd, *vs = q + 2 * hd;
        const float *c = m->cos + m->pos[b] * half, *s = m->sin + m->pos[b] * half;
        const int64_t slot = (m->row[b] * m->heads + head) * cap;
        float *k = L->k + (slot + t) * hd;
        for (int i = 0; i < half; i++) {
            float q0 = q[i], q1 = q[i + half];
            q[i] = q0 * c[i] - q1 * s[i];
            q[i + half] = q1 * c[i] + q0 * s[i];
            k[i] = ks[i] * c[i] - ks[i + half] * s[i];
            k[i + half] = ks[i + half] * c[i] + ks[i] * s[i];
        }
        for (int i = 2 * half; i < hd; i++) k[i] = ks[i];
        memcpy(L->v + (slot + t) * hd, vs, sizeof(float) * hd);
    }
}

/* Attention of the (row, head) pairs of this thread over their cache positions 0..at[b] (causal:
 * rows that share a cache row see only the positions up to their own). When rows share a cache
 * row, every row's keys and values are stored first and the threads meet at a barrier, so that no
 * row reads a position another thread has yet to write; otherwise each pair reads only what this
 * thread itself stored. */
static void attention(Model *m, Layer *L, int ith, int nth) {
    const int H = m->hidden, hd = m->head_dim;
    const int64_t cap = m->capacity;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = m->thread_scratch + (int64_t)ith * cap;
    int64_t u0, u1;
    split((int64_t)m->rows * m->heads, ith, nth, 1, &u0, &u1);
    rotate_and_store(m, L, u0, u1);
    if (m->shared_rows) pool_barrier(nth);
    for (int64_t u = u0; u < u1; u++) {
        int b = (int)(u / m->heads), head = (int)(u % m->heads);
        const int64_t t = m->at[b];
        const float *q = m->qkv + (int64_t)b * 3 * H + (int64_t)head * 3 * hd;
        const int64_t slot = (m->row[b] * m->heads + head) * cap;
        const float *K = L->k + slot * hd, *V = L->v + slot * hd;
        const int64_t *mask = m->mask ? m->mask + b * m->mask_stride : NULL;
        float best = -INFINITY;
        for (int64_t j = 0; j <= t; j++) {
            if (mask && j != t && mask[j] == 0) {
                scores[j] = -INFINITY;
                continue;
            }
            scores[j] = dot(q, K + j * hd, hd) * scale;
            if (scores[j] > best) best = scores[j];
        }
        double total = 0.0;
        for (int64_t j = 0; j <= t; j++) {
            scores[j] = scores[j] == -INFINITY ? 0.f : expf(scores[j] - best);
            total += scores[j];
        }
        float *out = m->attn + (int64_t)b * H + (int64_t)head * hd;
        float inv = (float)(1.0 / total);
        for (int i = 0; i < hd; i++) out[i] = 0.f;
        for (int64_t j = 0; j <= t; j++) {
            float p = scores[j] * inv;
            if (p == 0.f) continue;
            const float *vj = V + j * hd;
            for (int i = 0; i < hd; i++) out[i] += p * vj[i];
        }
    }
}

static void run_layer(Model *m, Layer *L, int ith, int nth) {
    const int H = m->hidden, I = m->inter, B = m->rows;
    int64_t r0, r1;
    if (ith == 0)
        for (int b = 0; b < B; b++) layer_norm(m->x + b * H, L->ln1_w, L->ln1_b, m->h + b * H, H, m->eps);
    pool_barrier(nth);
    product(m, &L->qkv, m->h, m->qkv, 3 * H, ith, nth, &r0, &r1);
    pool_barrier(nth);
    attention(m, L, ith, nth);
    pool_barrier(nth);
    product(m, &L->dense, m->attn, m->h, H, ith, nth, &r0, &r1);
    for (int b = 0; b < B; b++) /* each thread adds the residual on its own rows */
        for (int64_t r = r0; r < r1; r++) {
            float v = m->h[b * H + r];
            if (L->dense_bias) v += L->dense_bias[r];
            m->x[b * H + r] = v + m->x[b * H + r];
        }
    pool_barrier(nth);
    if (ith == 0)
        for (int b = 0; b < B; b++) layer_norm(m->x + b * H, L->ln2_w, L->ln2_b, m->h + b * H, H, m->eps);
    pool_barrier(nth);
    product(m, &L->fc1, m->h, m->mid, I, ith, nth, &r0, &r1);
    for (int b = 0; b < B; b++)
        for (int64_t r = r0; r < r1; r++) m->mid[(int64_t)b * I + r] = activation(m->mid[(int64_t)b * I + r], m->act);
    pool_barrier(nth);
    product(m, &L->fc2, m->mid, m->h, H, ith, nth, &r0, &r1);
    for (int b = 0; b < B; b++)
        for (int64_t r = r0; r < r1; r++) m->x[b * H + r] = m->h[b * H + r] + m->x[b * H + r];
    pool_barrier(nth);
}

/* The argmax rule of torch.argmax: the first maximum wins, and NaN counts as the maximum. Scanning
 * in index order, does value (later) replace best (earlier)? */
static inline int replaces(float value, float best) { return !isnan(best) && (value > best || isnan(value)); }

/* First maximum of v[r0..r1) under that rule; r0 < r1. */
static void argmax_range(const float *v, int64_t r0, int64_t r1, float *value, int64_t *index) {
    float best = v[r0];
    int64_t at = r0;
    for (int64_t r = r0 + 1; r < r1; r++)
        if (replaces(v[r], best)) {
            best = v[r];
            at = r;
        }
    *value = best;
    *index = at;
}

void model_step(void *ctx, int ith, int nth) {
    Model *m = ctx;
    const int H = m->hidden, B = m->rows;
    const int64_t per_layer = (int64_t)H * (4 * H + 2 * m->inter) * B;
    const int layer_threads = per_layer >= PARALLEL_MIN_ELEMENTS ? nth : 1;
    if (ith == 0)
        for (int b = 0; b < B; b++) memcpy(m->x + b * H, m->embed_in + m->token[b] * H, sizeof(float) * H);
    if (ith < layer_threads)
        for (int l = 0; l < m->layers; l++) run_layer(m, &m->layer[l], ith, layer_threads);
    if (ith == 0)
        for (int b = 0; b < B; b++) layer_norm(m->x + b * H, m->lnf_w, m->lnf_b, m->h + b * H, H, m->eps);
    pool_barrier(nth);
    int64_t r0, r1;
    product(m, &m->head, m->h, m->logits, m->vocab, ith, nth, &r0, &r1);
    if (m->argmax)
        for (int b = 0; b < B; b++) {
            float *value = &m->best_value[(int64_t)ith * B + b];
            int64_t *index = &m->best_index[(int64_t)ith * B + b];
            if (r0 < r1) argmax_range(m->logits + b * m->vocab, r0, r1, value, index);
            else *index = -1;
        }
    pool_barrier(nth);
    if (ith == 0 && m->argmax)
        for (int b = 0; b < B; b++) {
            float best = NAN;
            int64_t at = -1;
            for (int i = 0; i < nth; i++) {
                int64_t index = m->best_index[(int64_t)i * B + b];
                float value = m->best_value[(int64_t)i * B + b];
                if (index < 0) continue;
                if (at < 0 || replaces(value, best)) { /* threads hold ascending ranges */
                    best = value;
                    at = index;
                }
            }
            m->argmax[b * m->argmax_stride] = at;
        }
}
