/* A small thread pool of our own (pthreads), woken once per task; inside a task the threads meet at
 * spin barriers. Idle workers spin briefly (the next decoding step usually follows within
 * microseconds), then sleep on a condition variable. One task runs at a time (pool_lock). */
#ifndef NEOXJA_POOL_H
#define NEOXJA_POOL_H

#define THREAD_BITS 9 /* MAX_THREADS (args.h) < 1 << THREAD_BITS */

typedef void (*task_fn)(void *ctx, int ith, int nth);

/* Run fn(ctx, i, nth) on nth threads (the caller is i = 0; fewer if threads cannot be started).
 * fn must end with pool_barrier(nth), so that every thread is done when pool_run returns. Call
 * between pool_lock() and pool_unlock(), without the GIL. */
void pool_run(task_fn fn, void *ctx, int nth);

/* Every one of the task's nth threads calls it; none returns before all have arrived. */
void pool_barrier(int nth);

void pool_lock(void);
void pool_unlock(void);

/* Call once at import: a forked child starts with no workers. */
void pool_init(void);

#endif
