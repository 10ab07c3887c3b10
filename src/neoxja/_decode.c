/* One decoding step of GPT-NeoX-Japanese in C: CPU, float32, one new token per batch row.
 *
 * Why C: a decoding step of a small model is a few dozen PyTorch ops on vectors, and each op costs
 * several microseconds of dispatch however little it computes. For the tiny benchmark model that
 * overhead is most of the step; here the whole step (embedding, every layer, the output head and
 * the greedy pick) is one call, and PyTorch is only the owner of the memory.
 *
 * The computation is the model's (see neoxja/modeling.py), for a batch of rows that each feed one
 * token at cache position t:
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
 * Sums run in another order than PyTorch's kernels, so results agree within float32 rounding,
 * not bit for bit. The RoPE tables (cos and sin per position) come from PyTorch, computed once.
 *
 * Threads: a small pool of our own (pthreads), woken once per step; inside a step the threads
 * meet at spin barriers between stages. Matrix products split output rows between threads,
 * attention splits (row, head) pairs. Layers too small to gain from threads run on the calling
 * thread alone, and then only the output head is shared. Idle workers spin briefly (the next
 * step usually follows within microseconds), then sleep on a condition variable.
 *
 * Safety: the entry points take arrays (the buffer protocol), never addresses, and check each one's
 * type, layout and size against the model's dimensions; the indices a step follows (token ids,
 * cache rows and positions) are copied out of the caller's arrays and checked on the copy, so
 * nothing the caller passes or changes meanwhile makes a step read or write outside an array.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

/* Below this many weight elements per layer (times batch rows) the layers run on one thread. */
#define PARALLEL_MIN_ELEMENTS (1 << 18)
#define SPIN_NS 2000000L /* how long an idle worker spins before it sleeps */
#define THREAD_BITS 9
#define MAX_THREADS 256 /* < 1 << THREAD_BITS */

enum { ACT_GELU_ERF = 0, ACT_GELU_TANH = 1, ACT_RELU = 2, ACT_SILU = 3 };

static inline void cpu_relax(void) {
#if HAVE_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* ----- matrix times a few vectors -------------------------------------------------------------
 * Y[b * ldy + r] = sum_i W[r * ldw + i] * X[b * ldx + i] for rows r0 <= r < r1, 0 <= b < nb.
 * W is row-major [out, in] (nn.Linear's layout), so every row is one contiguous stream. */

typedef void (*matmul_fn)(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, int nb,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1);

static void matmul_scalar(const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, int nb,
                          float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *w = W + r * ldw;
        for (int b = 0; b < nb; b++) {
            const float *x = X + b * ldx;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            int64_t i = 0;
            for (; i + 4 <= in; i += 4) {
                s0 += w[i] * x[i];
                s1 += w[i + 1] * x[i + 1];
                s2 += w[i + 2] * x[i + 2];
                s3 += w[i + 3] * x[i + 3];
            }
            float s = (s0 + s1) + (s2 + s3);
            for (; i < in; i++) s += w[i] * x[i];
            Y[b * ldy + r] = s;
        }
    }
}

#if HAVE_X86
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* An NR-rows x NB-vectors tile: NR * NB accumulators, each weight load feeds NB FMAs. */
#define DEFINE_TILE(NR, NB)                                                                          \
    __attribute__((target("avx2,fma"))) static void tile_##NR##x##NB(                               \
        const float *W, int64_t ldw, int64_t in, const float *X, int64_t ldx, float *Y, int64_t ldy) { \
        __m256 acc[NR][NB];                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++)                                         \
            _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();    \
        int64_t i = 0;                                                                               \
        for (; i + 8 <= in; i += 8) {                                                                \
            __m256 xv[NB];                                                                           \
            _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) xv[b] = _mm256_loadu_ps(X + b * ldx + i); \
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) {                                   \
                __m256 w = _mm256_loadu_ps(W + r * ldw + i);                                         \
                _Pragma("GCC unroll 4") for (int b = 0; b < NB; b++) acc[r][b] =                     \
                    _mm256_fmadd_ps(w, xv[b], acc[r][b]);                                            \
            }                                                                                        \
        }                                                                                            \
        for (int r = 0; r < NR; r++)                                                                 \
            for (int b = 0; b < NB; b++) {                                                           \
                float s = hsum8(acc[r][b]);                                                          \
                for (int64_t j = i; j < in; j++) s += W[r * ldw + j] * X[b * ldx + j];               \
                Y[b * ldy + r] = s;                                                                  \
            }                                                                                        \
    }

DEFINE_TILE(8, 1)
DEFINE_TILE(4, 2)
DEFINE_TILE(4, 1)
DEFINE_TILE(1, 2)
DEFINE_TILE(1, 1)

/* Blocks of 8 rows. One vector: a tile of all 8 rows (8 row streams in flight). More vectors:
 * tiles of 4 rows by 2 vectors, every pair of vectors in turn, so a block is read from memory
 * once and from the L1/L2 cache for the other pairs. */
__attribute__((target("avx2,fma"))) static void matmul_avx2(const float *W, int64_t ldw, int64_t in,
                                                             const float *X, int64_t ldx, int nb, float *Y,
                                                             int64_t ldy, int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + 8 <= r1; r += 8) {
        if (nb == 1) {
            tile_8x1(W + r * ldw, ldw, in, X, ldx, Y + r, ldy);
            continue;
        }
        for (int64_t rr = r; rr < r + 8; rr += 4) {
            int b0 = 0;
            for (; b0 + 2 <= nb; b0 += 2) tile_4x2(W + rr * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + rr, ldy);
            if (b0 < nb) tile_4x1(W + rr * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + rr, ldy);
        }
    }
    for (; r < r1; r++) {
        int b0 = 0;
        for (; b0 + 2 <= nb; b0 += 2) tile_1x2(W + r * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + r, ldy);
        if (b0 < nb) tile_1x1(W + r * ldw, ldw, in, X + b0 * ldx, ldx, Y + b0 * ldy + r, ldy);
    }
}
#endif

static matmul_fn matmul = matmul_scalar;

static float dot(const float *a, const float *b, int64_t n) {
    float out;
    matmul(a, n, n, b, n, 1, &out, 1, 0, 1);
    return out;
}

/* ----- thread pool ----------------------------------------------------------------------------- */

typedef void (*task_fn)(void *ctx, int ith, int nth);

static struct {
    pthread_mutex_t run_lock; /* one step at a time */
    pthread_mutex_t mutex;    /* with cond: sleeping workers */
    pthread_cond_t cond;
    int workers; /* started worker threads (the caller is thread 0) */
    /* Bumped once per task; the low THREAD_BITS bits carry the task's thread count, so a worker
     * that sits a task out never reads a later task's fields. */
    atomic_uint generation;
    atomic_int sleepers;
    task_fn fn;
    void *ctx;
    atomic_int arrived;
    atomic_uint phase;
} pool = {.run_lock = PTHREAD_MUTEX_INITIALIZER, .mutex = PTHREAD_MUTEX_INITIALIZER,
          .cond = PTHREAD_COND_INITIALIZER};

/* Every one of nth threads calls it; none returns before all have arrived. */
static void barrier(int nth) {
    if (nth <= 1) return;
    unsigned phase = atomic_load(&pool.phase);
    if (atomic_fetch_add(&pool.arrived, 1) == nth - 1) {
        atomic_store(&pool.arrived, 0);
        atomic_fetch_add(&pool.phase, 1);
        return;
    }
    for (unsigned spins = 1; atomic_load(&pool.phase) == phase; spins++) {
        cpu_relax();
        if ((spins & 1023) == 0) sched_yield(); /* more threads than cores: let the others run */
    }
}

/* arg: the thread's index in the low 16 bits, above them the generation when it was created (a
 * task posted between its creation and its start must not be missed). */
static void *worker_main(void *arg) {
    int ith = (int)((uintptr_t)arg & 0xffff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 16);
    for (;;) {
        long deadline = now_ns() + SPIN_NS;
        unsigned spins = 0;
        while (atomic_load(&pool.generation) == seen) {
            cpu_relax();
            if ((++spins & 255) != 0) continue;
            if (now_ns() < deadline) {
                if ((spins & 4095) == 0) sched_yield();
                continue;
            }
            pthread_mutex_lock(&pool.mutex);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.cond, &pool.mutex);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mutex);
        }
        seen = atomic_load(&pool.generation);
        int nth = (int)(seen & ((1u << THREAD_BITS) - 1));
        if (ith < nth) pool.fn(pool.ctx, ith, nth);
    }
    return NULL;
}

static void forget_workers_after_fork(void) {
    /* A forked child has only the thread that forked: start afresh. */
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.mutex, NULL);
    pthread_cond_init(&pool.cond, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.arrived, 0);
}

/* Run fn(ctx, i, nth) on nth threads (this one is i = 0; fewer if threads cannot be started);
 * returns when all are done. Called with run_lock held. */
static void run_parallel(task_fn fn, void *ctx, int nth) {
    while (pool.workers < nth - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.generation) << 16) | (uintptr_t)(pool.workers + 1);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) {
            nth = pool.workers + 1;
            break;
        }
        pool.workers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    if (nth > 1) {
        unsigned count = (atomic_load(&pool.generation) >> THREAD_BITS) + 1;
        atomic_store(&pool.generation, (count << THREAD_BITS) | (unsigned)nth);
        if (atomic_load(&pool.sleepers) > 0) {
            pthread_mutex_lock(&pool.mutex);
            pthread_cond_broadcast(&pool.cond);
            pthread_mutex_unlock(&pool.mutex);
        }
    }
    fn(ctx, 0, nth);
}

/* ----- the model ------------------------------------------------------------------------------- */

typedef struct {
    const float *ln1_w, *ln1_b, *qkv, *dense, *dense_bias, *ln2_w, *ln2_b, *fc1, *fc2;
    float *k, *v; /* cache [batch, heads, capacity, head_dim] */
} Layer;

typedef struct {
    int layers, hidden, heads, head_dim, rot, inter, act, batch;
    int64_t vocab, capacity, table_len;
    float eps;
    const float *embed_in, *embed_out, *lnf_w, *lnf_b, *cos, *sin; /* cos/sin [table_len, rot / 2] */
    Layer *layer;
    /* scratch: x, h, attn [batch, hidden]; qkv [batch, 3 hidden]; mid [batch, inter] */
    float *x, *h, *qkv, *attn, *mid;
    float *thread_scratch; /* [threads, head_dim + capacity] */
    int scratch_threads;
    float *best_value; /* [MAX_THREADS, batch] */
    int64_t *best_index;
    Py_buffer *views; /* every array the model reads (weights, tables) or writes (caches), held */
    int n_views;
    /* this step (see Call) */
    int rows;
    const int64_t *token, *row, *at, *pos, *mask;
    int64_t mask_stride, argmax_stride;
    float *logits;
    int64_t *argmax;
} Model;

/* One step's rows, set into the model under run_lock. token, row, at and pos are the caller's
 * private copies, checked before the step (another thread may change the caller's arrays while the
 * step runs without the GIL): row b feeds token[b] into cache row row[b] at cache position at[b]
 * (it attends to positions 0..at[b]) and RoPE position pos[b]. mask (optional) [rows, > at] with
 * unit stride along positions: 0 marks a key row b must not see. */
typedef struct {
    int rows;
    const int64_t *token, *row, *at, *pos, *mask;
    int64_t mask_stride, argmax_stride;
    float *logits;
    int64_t *argmax; /* NULL: no argmax */
} Call;

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

/* RoPE, cache write and attention for the (row, head) pairs of this thread. */
static void attention(Model *m, Layer *L, int ith, int nth) {
    const int H = m->hidden, hd = m->head_dim, half = m->rot / 2;
    const int64_t cap = m->capacity;
    const float scale = 1.0f / sqrtf((float)hd);
    float *q = m->thread_scratch + (int64_t)ith * (hd + cap), *scores = q + hd;
    int64_t u0, u1;
    split((int64_t)m->rows * m->heads, ith, nth, 1, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        int b = (int)(u / m->heads), head = (int)(u % m->heads);
        const int64_t t = m->at[b], row = m->row[b];
        const float *src = m->qkv + (int64_t)b * 3 * H + (int64_t)head * 3 * hd;
        const float *ks = src + hd, *vs = src + 2 * hd;
        int64_t pos = m->pos[b];
        const float *c = m->cos + pos * half, *s = m->sin + pos * half;
        int64_t slot = (row * m->heads + head) * cap;
        float *K = L->k + slot * hd, *V = L->v + slot * hd, *k = K + t * hd;
        for (int i = 0; i < half; i++) {
            q[i] = src[i] * c[i] - src[i + half] * s[i];
            q[i + half] = src[i + half] * c[i] + src[i] * s[i];
            k[i] = ks[i] * c[i] - ks[i + half] * s[i];
            k[i + half] = ks[i + half] * c[i] + ks[i] * s[i];
        }
        for (int i = 2 * half; i < hd; i++) {
            q[i] = src[i];
            k[i] = ks[i];
        }
        memcpy(V + t * hd, vs, sizeof(float) * hd);

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
    barrier(nth);
    split(3 * H, ith, nth, 8, &r0, &r1);
    matmul(L->qkv, H, H, m->h, H, B, m->qkv, 3 * H, r0, r1);
    barrier(nth);
    attention(m, L, ith, nth);
    barrier(nth);
    split(H, ith, nth, 8, &r0, &r1);
    matmul(L->dense, H, H, m->attn, H, B, m->h, H, r0, r1);
    for (int b = 0; b < B; b++) /* each thread adds the residual on its own rows */
        for (int64_t r = r0; r < r1; r++) {
            float v = m->h[b * H + r];
            if (L->dense_bias) v += L->dense_bias[r];
            m->x[b * H + r] = v + m->x[b * H + r];
        }
    barrier(nth);
    if (ith == 0)
        for (int b = 0; b < B; b++) layer_norm(m->x + b * H, L->ln2_w, L->ln2_b, m->h + b * H, H, m->eps);
    barrier(nth);
    split(I, ith, nth, 8, &r0, &r1);
    matmul(L->fc1, H, H, m->h, H, B, m->mid, I, r0, r1);
    for (int b = 0; b < B; b++)
        for (int64_t r = r0; r < r1; r++) m->mid[(int64_t)b * I + r] = activation(m->mid[(int64_t)b * I + r], m->act);
    barrier(nth);
    split(H, ith, nth, 8, &r0, &r1);
    matmul(L->fc2, I, I, m->mid, I, B, m->h, H, r0, r1);
    for (int b = 0; b < B; b++)
        for (int64_t r = r0; r < r1; r++) m->x[b * H + r] = m->h[b * H + r] + m->x[b * H + r];
    barrier(nth);
}

/* The argmax rule of torch.argmax: the first maximum wins, and NaN counts as the maximum. Scanning
 * in index order, does value (later) replace best (earlier)? */
static inline int replaces(float value, float best) {
    return !isnan(best) && (value > best || isnan(value));
}

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

static void step_task(void *ctx, int ith, int nth) {
    Model *m = ctx;
    const int H = m->hidden, B = m->rows;
    const int64_t per_layer = (int64_t)H * (4 * H + 2 * m->inter) * B;
    const int layer_threads = per_layer >= PARALLEL_MIN_ELEMENTS ? nth : 1;
    if (ith == 0)
        for (int b = 0; b < B; b++)
            memcpy(m->x + b * H, m->embed_in + m->token[b] * H, sizeof(float) * H);
    if (ith < layer_threads)
        for (int l = 0; l < m->layers; l++) run_layer(m, &m->layer[l], ith, layer_threads);
    if (ith == 0)
        for (int b = 0; b < B; b++) layer_norm(m->x + b * H, m->lnf_w, m->lnf_b, m->h + b * H, H, m->eps);
    barrier(nth);
    int64_t r0, r1;
    split(m->vocab, ith, nth, 8, &r0, &r1);
    matmul(m->embed_out, H, H, m->h, H, B, m->logits, m->vocab, r0, r1);
    if (m->argmax)
        for (int b = 0; b < B; b++) {
            float *value = &m->best_value[(int64_t)ith * B + b];
            int64_t *index = &m->best_index[(int64_t)ith * B + b];
            if (r0 < r1)
                argmax_range(m->logits + b * m->vocab, r0, r1, value, index);
            else
                *index = -1;
        }
    barrier(nth);
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

/* ----- arguments ------------------------------------------------------------------------------
 * Every array comes as an object with the buffer protocol (neoxja passes numpy views of its
 * tensors), never as an address. Before a step touches memory: each array has the item type, the
 * alignment, the layout (C-contiguous, or 1-d with a stride where noted) and the size the model's
 * dimensions imply, outputs are writable, and every index a step will follow (token ids, cache rows,
 * cache and RoPE positions) is copied out of the caller's arrays and checked on that copy. A failure
 * is a ValueError or TypeError naming the function and the argument. */

#define MAX_ARGS 6

typedef struct {
    const char *fn;
    Py_buffer views[MAX_ARGS];
    int held;
} Args;

static void release(Args *a) {
    while (a->held > 0) PyBuffer_Release(&a->views[--a->held]);
}

/* Does v's struct-module format describe one native item of kind 'f' (float) or 'i' (signed int)? */
static int format_kind(const Py_buffer *v, char kind) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    return f[0] != '\0' && f[1] == '\0' && strchr(kind == 'f' ? "fde" : "bhilq", f[0]) != NULL;
}

/* obj's buffer into *v: C-contiguous (or, if strided, any strides), `itemsize`-byte items of kind
 * 'f' or 'i', aligned, writable if asked. 0, or -1 with a ValueError/TypeError naming fn and name. */
static int take(const char *fn, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
                int strided, Py_buffer *v) {
    if (obj == Py_None || !PyObject_CheckBuffer(obj)) {
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
    if (problem) {
        PyErr_Format(PyExc_ValueError, "%s: %s %s (%zd-byte %s values expected, got format '%s')", fn, name, problem,
                     itemsize, kind == 'f' ? "float" : "integer", v->format ? v->format : "B");
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* take() into a's list (released by release()); NULL on error. */
static Py_buffer *arg(Args *a, const char *name, PyObject *obj, char kind, Py_ssize_t itemsize, int writable,
                      int strided) {
    Py_buffer *v = &a->views[a->held];
    if (take(a->fn, name, obj, kind, itemsize, writable, strided, v) < 0) return NULL;
    a->held++;
    return v;
}

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

/* *out = x * y, or a ValueError naming `what` if it overflows a Py_ssize_t. */
static int product(const char *fn, const char *what, int64_t x, int64_t y, int64_t *out) {
    if (__builtin_mul_overflow(x, y, out) || *out > PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %s (%lld * %lld) overflows", fn, what, (long long)x, (long long)y);
        return -1;
    }
    return 0;
}

static int clamp_threads(long long threads) {
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (int)threads;
}

/* An int argument (anything with __index__) within [lo, hi]; else a TypeError or ValueError naming it. */
static int whole(const char *fn, const char *name, PyObject *obj, long long lo, long long hi, long long *out) {
    *out = PyLong_AsLongLong(obj);
    if (*out == -1 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError, overflow ? "%s: %s is out of range" :
                     "%s: %s must be an int, got %.100s", fn, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (*out < lo || *out > hi) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be in [%lld, %lld], got %lld", fn, name, lo, hi, *out);
        return -1;
    }
    return 0;
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
    split(task->rows, ith, nth, 8, &r0, &r1);
    matmul(task->w, task->cols, task->cols, task->x, task->cols, task->vectors, task->y, task->rows, r0, r1);
    barrier(nth);
}

/* matmul(w, x, y, threads): y [vectors, rows] = x [vectors, cols] @ w [rows, cols]^T, C-contiguous
 * float32 arrays, with the step's kernel and threads (for benchmarks and tests of the kernel alone). */
static PyObject *matmul_py(PyObject *self, PyObject *args) {
    PyObject *o_w, *o_x, *o_y, *o_threads;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOO:matmul", &o_w, &o_x, &o_y, &o_threads)) return NULL;
    if (whole("matmul", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads)) return NULL;
    Args a = {"matmul"};
    Py_buffer *w, *x, *y;
    if (!(w = arg(&a, "w", o_w, 'f', 4, 0, 0)) || !(x = arg(&a, "x", o_x, 'f', 4, 0, 0)) ||
        !(y = arg(&a, "y", o_y, 'f', 4, 1, 0)))
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
    pthread_mutex_lock(&pool.run_lock);
    run_parallel(matmul_task, &task, clamp_threads(threads));
    pthread_mutex_unlock(&pool.run_lock);
    Py_END_ALLOW_THREADS
    release(&a);
    Py_RETURN_NONE;
fail:
    release(&a);
    return NULL;
}

static void free_model(Model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_views; i++) PyBuffer_Release(&m->views[i]);
    free(m->views);
    free(m->layer);
    free(m->x);
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
    if (take("new_model", label, obj, 'f', 4, writable, 0, v) < 0) return NULL;
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
        if (whole("new_model", DIM_NAMES[i], PyTuple_GET_ITEM(o_dims, i), 0, i < 7 ? INT32_MAX : LLONG_MAX, &dim[i]))
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
    int64_t hh, qkv, mlp, cache, embed, table, scratch, row_scratch;
    if (product(fn, "hidden * hidden", hidden, hidden, &hh) || product(fn, "3 hidden * hidden", 3 * (int64_t)hidden, hidden, &qkv) ||
        product(fn, "intermediate * hidden", inter, hidden, &mlp) ||
        product(fn, "batch * capacity", batch, capacity, &cache) || product(fn, "cache * hidden", cache, hidden, &cache) ||
        product(fn, "vocab * hidden", vocab, hidden, &embed) || product(fn, "table * rotary / 2", table_len, rot / 2, &table) ||
        product(fn, "batch * scratch", batch, 6 * (int64_t)hidden + inter, &scratch) ||
        product(fn, "threads * batch", MAX_THREADS, batch, &row_scratch) ||
        product(fn, "threads * (head_dim + capacity)", MAX_THREADS, hidden / heads + capacity, &row_scratch))
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
    m->views = calloc((size_t)layers * 11 + 6, sizeof(Py_buffer));
    m->x = malloc(sizeof(float) * scratch);
    m->best_value = malloc(sizeof(float) * MAX_THREADS * batch);
    m->best_index = malloc(sizeof(int64_t) * MAX_THREADS * batch);
    if (!m->layer || !m->views || !m->x || !m->best_value || !m->best_index) {
        free_model(m);
        return PyErr_NoMemory();
    }
    m->h = m->x + (int64_t)batch * hidden;
    m->attn = m->h + (int64_t)batch * hidden;
    m->qkv = m->attn + (int64_t)batch * hidden;
    m->mid = m->qkv + (int64_t)batch * 3 * hidden;
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
        const float **slots[9] = {&L->ln1_w, &L->ln1_b, &L->qkv, &L->dense, &L->dense_bias,
                                  &L->ln2_w, &L->ln2_b, &L->fc1, &L->fc2};
        const int64_t counts[11] = {hidden, hidden, qkv, hh, hidden, hidden, hidden, mlp, mlp, cache, cache};
        for (int i = 0; i < 11; i++) {
            PyObject *item = PyTuple_GET_ITEM(p, i);
            if (i == 4 && item == Py_None) continue; /* no dense bias */
            float *v = model_array(m, l, LAYER_NAMES[i], item, counts[i], 0, i >= 9);
            if (!v) goto fail;
            if (i < 9) *slots[i] = v;
            else if (i == 9) L->k = v;
            else L->v = v;
        }
    }
    const float **globals_slots[6] = {&m->embed_in, &m->embed_out, &m->lnf_w, &m->lnf_b, &m->cos, &m->sin};
    const int64_t global_counts[6] = {embed, embed, hidden, hidden, table, table};
    for (int i = 0; i < 6; i++) {
        *globals_slots[i] = model_array(m, -1, GLOBAL_NAMES[i], PyTuple_GET_ITEM(globals, i), global_counts[i], i >= 4, 0);
        if (!*globals_slots[i]) goto fail;
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
    pthread_mutex_lock(&pool.run_lock);
    m->rows = call->rows, m->token = call->token, m->row = call->row, m->at = call->at, m->pos = call->pos;
    m->mask = call->mask, m->mask_stride = call->mask_stride, m->logits = call->logits;
    m->argmax = call->argmax, m->argmax_stride = call->argmax_stride;
    int64_t per_thread = m->head_dim + m->capacity;
    if (m->scratch_threads < threads) {
        float *grown = realloc(m->thread_scratch, sizeof(float) * per_thread * threads);
        if (grown) {
            m->thread_scratch = grown;
            m->scratch_threads = threads;
        }
    }
    if (m->scratch_threads < threads) threads = m->scratch_threads; /* out of memory: fewer threads */
    if (threads >= 1) run_parallel(step_task, m, threads);
    pthread_mutex_unlock(&pool.run_lock);
    Py_END_ALLOW_THREADS
    if (threads < 1) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The model of a capsule, and the output arrays every step writes: logits (C-contiguous float32,
 * at least rows x vocab) and argmax (None, or int64 1-d of `rows`, any stride). */
static Model *step_outputs(Args *a, PyObject *capsule, PyObject *o_rows, PyObject *o_logits, PyObject *o_argmax,
                           Call *call) {
    if (!PyCapsule_IsValid(capsule, "neoxja._decode.Model")) {
        PyErr_Format(PyExc_TypeError, "%s: model must be a decoder made by new_model, got %.100s", a->fn,
                     Py_TYPE(capsule)->tp_name);
        return NULL;
    }
    Model *m = PyCapsule_GetPointer(capsule, "neoxja._decode.Model");
    long long rows;
    if (whole(a->fn, "rows", o_rows, LLONG_MIN, LLONG_MAX, &rows)) return NULL;
    if (rows <= 0 || rows > m->batch) {
        PyErr_Format(PyExc_ValueError, "%s: rows: %lld rows, but the decoder was built for 1..%d", a->fn, rows, m->batch);
        return NULL;
    }
    Py_buffer *logits = arg(a, "logits", o_logits, 'f', 4, 1, 0);
    if (!logits) return NULL;
    if (items(logits) < rows * m->vocab) {
        PyErr_Format(PyExc_ValueError, "%s: logits holds %lld values, %lld rows need %lld", a->fn,
                     (long long)items(logits), rows, (long long)(rows * m->vocab));
        return NULL;
    }
    call->rows = (int)rows;
    call->logits = logits->buf;
    if (o_argmax != Py_None) {
        Py_buffer *argmax = arg(a, "argmax", o_argmax, 'i', 8, 1, 1);
        if (!argmax || rows_of(a, "argmax", argmax, rows, &call->argmax_stride) < 0) return NULL;
        call->argmax = argmax->buf;
    }
    return m;
}

/* step(model, rows, t, tokens, positions, position_delta, mask, logits, argmax, threads). */
static PyObject *step(PyObject *self, PyObject *args) {
    PyObject *capsule, *o_rows, *o_t, *o_tokens, *o_positions, *o_delta, *o_mask, *o_logits, *o_argmax, *o_threads;
    long long t, position_delta, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO:step", &capsule, &o_rows, &o_t, &o_tokens, &o_positions, &o_delta, &o_mask,
                          &o_logits, &o_argmax, &o_threads))
        return NULL;
    if (whole("step", "t", o_t, LLONG_MIN, LLONG_MAX, &t) ||
        whole("step", "position_delta", o_delta, LLONG_MIN, LLONG_MAX, &position_delta) ||
        whole("step", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads))
        return NULL;
    Args a = {"step"};
    Call call = {0};
    int64_t *copy = NULL, token_stride, position_stride = 0;
    Py_buffer *tokens, *positions = NULL;
    PyObject *result = NULL;
    Model *m = step_outputs(&a, capsule, o_rows, o_logits, o_argmax, &call);
    if (!m) goto done;
    int rows = call.rows;
    if (t < 0 || t >= m->capacity) {
        PyErr_Format(PyExc_ValueError, "step: t: cache position %lld outside the cache's capacity %lld", t,
                     (long long)m->capacity);
        goto done;
    }
    if (!(tokens = arg(&a, "tokens", o_tokens, 'i', 8, 0, 1)) || rows_of(&a, "tokens", tokens, rows, &token_stride) < 0)
        goto done;
    if (o_positions != Py_None && (!(positions = arg(&a, "positions", o_positions, 'i', 8, 0, 1)) ||
                                   rows_of(&a, "positions", positions, rows, &position_stride) < 0))
        goto done;
    if (o_mask != Py_None) {
        Py_buffer *mask = arg(&a, "mask", o_mask, 'i', 8, 0, 1);
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
    release(&a);
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
    if (whole("step_slots", "threads", o_threads, LLONG_MIN, LLONG_MAX, &threads)) return NULL;
    Args a = {"step_slots"};
    Call call = {0};
    int64_t *copy = NULL, strides[3];
    Py_buffer *in[3];
    PyObject *result = NULL;
    Model *m = step_outputs(&a, capsule, o_rows, o_logits, o_argmax, &call);
    if (!m) goto done;
    int rows = call.rows;
    const char *names[3] = {"tokens", "slots", "lengths"};
    PyObject *objs[3] = {o_tokens, o_slots, o_lengths};
    for (int i = 0; i < 3; i++)
        if (!(in[i] = arg(&a, names[i], objs[i], 'i', 8, 0, 1)) || rows_of(&a, names[i], in[i], rows, &strides[i]) < 0)
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
    release(&a);
    return result;
}

static PyObject *kernel(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(matmul == matmul_scalar ? "scalar" : "avx2");
}

static PyMethodDef methods[] = {
    {"new_model", new_model, METH_VARARGS,
     "new_model(dims, layers, globals) -> capsule: a model over arrays it holds until it is freed.\n\n"
     "dims = (layers, hidden, heads, rotary_ndims, intermediate, activation, max_batch, vocab,\n"
     "        cache_capacity, rope_table_length, layer_norm_eps); layers = one tuple of C-contiguous float32\n"
     "arrays (buffer protocol) per layer (ln1 w, ln1 b, qkv, dense, dense_bias or None, ln2 w, ln2 b, fc1,\n"
     "fc2, k cache, v cache; the caches writable [max_batch, heads, capacity, head_dim]); globals =\n"
     "(embed_in, embed_out, final ln w, final ln b, cos table, sin table). Every size is checked."},
    {"step", step, METH_VARARGS,
     "step(model, rows, t, tokens, positions, position_delta, mask, logits, argmax, threads): one token per\n"
     "row at cache position t; tokens, positions (or None) and argmax (or None) int64 [rows], any stride;\n"
     "mask (or None) int64 [rows, > t] with unit stride along positions; writes logits (float32, at least\n"
     "rows x vocab) and the first maximum of each row into argmax."},
    {"step_slots", step_slots, METH_VARARGS,
     "step_slots(model, rows, tokens, slots, lengths, logits, argmax, threads): one token per row, row b\n"
     "in cache row slots[b] at position lengths[b] (int64 [rows] arrays); writes logits and, if argmax is\n"
     "not None, each row's first maximum. The cache lengths are the caller's to advance."},
    {"matmul", matmul_py, METH_VARARGS,
     "matmul(w, x, y, threads): y [vectors, rows] = x [vectors, cols] @ w [rows, cols]^T (C-contiguous\n"
     "float32 arrays) with the step's kernel, on `threads` threads."},
    {"kernel", kernel, METH_NOARGS, "Which matrix kernel this CPU runs: 'avx2' or 'scalar'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef decode_module = {
    PyModuleDef_HEAD_INIT, "neoxja._decode", "One decoding step of GPT-NeoX-Japanese in C (CPU, float32).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__decode(void) {
#if HAVE_X86
    /* NEOXJA_DECODE_KERNEL=scalar: the portable kernel, as CPUs without AVX2 run it (for tests). */
    const char *forced = getenv("NEOXJA_DECODE_KERNEL");
    __builtin_cpu_init();
    if (!(forced && strcmp(forced, "scalar") == 0) && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        matmul = matmul_avx2;
#endif
    pthread_atfork(NULL, NULL, forget_workers_after_fork);
    return PyModule_Create(&decode_module);
}
