/* The thread pool (see pool.h). */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "isa.h"

#define SPIN_NS 2000000L /* how long an idle worker spins before it sleeps */

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

static struct {
    pthread_mutex_t run_lock; /* one task at a time */
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

void pool_lock(void) { pthread_mutex_lock(&pool.run_lock); }
void pool_unlock(void) { pthread_mutex_unlock(&pool.run_lock); }

void pool_barrier(int nth) {
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

void pool_init(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

void pool_run(task_fn fn, void *ctx, int nth) {
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
