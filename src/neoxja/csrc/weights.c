/* The dispatch from a Weight to its kernels (see weights.h). */
#include "weights.h"

#include <math.h>
#include <string.h>

#include "f32.h"
#include "kernels.h"

Isa weight_isa = {LEVEL_SCALAR, LEVEL_SCALAR, 0, 0};

#define ALIGN(n) (((n) + 63) & ~(size_t)63)
#define PREP_CHUNK 2048 /* elements of a row one thread prepares at a time (a multiple of Q4_GROUP) */

int weight_init(Weight *w) {
    memset(w->lut, 0, sizeof w->lut);
    if (w->format != W_4BIT || !w->fast) return 0;
    for (int k = 0; k < 16; k++) {
        float c = w->code[k];
        if (!(c >= -1.f && c <= 1.f)) return -1;
        w->lut[k] = (int8_t)nearbyintf(127.f * c);
    }
    if (w->qabsmax)
        for (int i = 0; i < 256; i++) {
            uint8_t bytes[4];
            memcpy(bytes, &w->nested_code[i], 4);
            for (int p = 0; p < 4; p++) w->code_planes[p][i] = bytes[p];
        }
    return 0;
}

/* What the weight's kernel reads: x as it is, reordered floats, int8 blocks, or bfloat16. */
enum { ACT_AS_IS, ACT_Q4_FLOAT, ACT_Q4_INT, ACT_I8_INT, ACT_BF16 };

static int act_kind(const Weight *w) {
    switch (w->format) {
    case W_4BIT:
        return w->fast ? ACT_Q4_INT : ACT_Q4_FLOAT;
    case W_INT8:
        return w->fast ? ACT_I8_INT : ACT_AS_IS;
    case W_BF16:
        return w->fast && weight_isa.bf16 ? ACT_BF16 : ACT_AS_IS;
    default:
        return ACT_AS_IS;
    }
}

int act_needed(const Weight *w) { return act_kind(w) != ACT_AS_IS; }

/* Padded row length of the prepared values. */
static int64_t act_ld(const Weight *w) {
    switch (act_kind(w)) {
    case ACT_Q4_INT:
        return (w->in + Q4_GROUP - 1) / Q4_GROUP * Q4_GROUP;
    case ACT_I8_INT:
        return (w->in + ACT_BLOCK - 1) / ACT_BLOCK * ACT_BLOCK;
    case ACT_BF16:
        return (w->in + 31) / 32 * 32;
    default:
        return w->in;
    }
}

/* Bytes of each buffer per row: values, corrections, scales. */
static void act_sizes(const Weight *w, size_t *values, size_t *corr, size_t *scales) {
    int64_t ld = act_ld(w);
    *values = *corr = *scales = 0;
    switch (act_kind(w)) {
    case ACT_Q4_FLOAT:
        *values = sizeof(float) * ld;
        break;
    case ACT_Q4_INT:
        *values = ld, *corr = sizeof(int32_t) * (ld / 8), *scales = sizeof(float) * (ld / 8);
        break;
    case ACT_I8_INT:
        *values = ld, *corr = sizeof(int32_t) * (ld / 4), *scales = sizeof(float) * (ld / ACT_BLOCK);
        break;
    case ACT_BF16:
        *values = sizeof(uint16_t) * ld;
        break;
    }
}

size_t act_bytes(const Weight *w, int rows) {
    size_t values, corr, scales;
    act_sizes(w, &values, &corr, &scales);
    return ALIGN(values * rows) + ALIGN(corr * rows) + ALIGN(scales * rows);
}

void act_bind(const Weight *w, int rows, const float *x, void *scratch, Act *a) {
    size_t values, corr, scales;
    act_sizes(w, &values, &corr, &scales);
    char *p = scratch;
    memset(a, 0, sizeof *a);
    a->rows = rows, a->in = w->in, a->x = x, a->ld = act_ld(w);
    switch (act_kind(w)) {
    case ACT_Q4_FLOAT:
        a->f = (float *)p;
        break;
    case ACT_Q4_INT:
    case ACT_I8_INT:
        a->q = (int8_t *)p;
        a->corr = (int32_t *)(p + ALIGN(values * rows));
        a->qscale = (float *)(p + ALIGN(values * rows) + ALIGN(corr * rows));
        break;
    case ACT_BF16:
        a->b = (uint16_t *)p;
        break;
    }
}

void act_prepare(const Weight *w, Act *a, int ith, int nth) {
    const int kind = act_kind(w);
    if (kind == ACT_AS_IS) return;
    if (kind == ACT_Q4_FLOAT) { /* a row at a time: the layout moves elements across groups */
        for (int r = ith; r < a->rows; r += nth) q4_exact_layout(w, a->x + r * a->in, a->f + r * a->in, weight_isa.f32);
        return;
    }
    /* units of PREP_CHUNK elements of a row, split evenly between the threads */
    const int64_t per_row = (a->ld + PREP_CHUNK - 1) / PREP_CHUNK, units = per_row * a->rows;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        int r = (int)(u / per_row);
        int64_t i0 = u % per_row * PREP_CHUNK, i1 = i0 + PREP_CHUNK < a->ld ? i0 + PREP_CHUNK : a->ld;
        if (kind == ACT_Q4_INT) act_q4_part(a, r, i0, i1, weight_isa.ints);
        else if (kind == ACT_I8_INT) act_i8_part(a, r, i0, i1, weight_isa.ints);
#if HAVE_X86
        else act_bf16_part(a, r, i0, i1);
#endif
    }
}

void weight_product(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    if (o0 >= o1) return;
    const int ints = weight_isa.ints;
    switch (act_kind(w)) {
    case ACT_AS_IS:
        if (w->format == W_F32)
            f32_kernel(weight_isa.f32)((const float *)w->w, w->in, w->in, a->x, a->in, a->rows, y, ldy, o0, o1);
        else
            dense_exact(w, a, y, ldy, o0, o1, weight_isa.f32);
        return;
    case ACT_Q4_FLOAT:
        q4_exact(w, a, y, ldy, o0, o1, weight_isa.f32);
        return;
#if HAVE_X86
    case ACT_BF16:
        bf16_fast_avx512(w, a, y, ldy, o0, o1);
        return;
#endif
    case ACT_Q4_INT:
#if HAVE_X86
        if (ints >= LEVEL_AVX512) q4_fast_avx512(w, a, y, ldy, o0, o1);
        else if (ints >= LEVEL_AVX2) q4_fast_avx2(w, a, y, ldy, o0, o1, ints >= LEVEL_AVXVNNI);
        else
#endif
            q4_fast_scalar(w, a, y, ldy, o0, o1);
        return;
    default: /* ACT_I8_INT */
#if HAVE_X86
        if (ints >= LEVEL_AVX512) i8_fast_avx512(w, a, y, ldy, o0, o1);
        else if (ints >= LEVEL_AVX2) i8_fast_avx2(w, a, y, ldy, o0, o1, ints >= LEVEL_AVXVNNI);
        else
#endif
            i8_fast_scalar(w, a, y, ldy, o0, o1);
        return;
    }
}

const char *weight_kernel(const Weight *w) {
    static const char *const INTS[4] = {"scalar", "avx2", "avx-vnni", "avx512-vnni"};
    switch (act_kind(w)) {
    case ACT_Q4_INT:
    case ACT_I8_INT:
        return INTS[weight_isa.ints];
    case ACT_BF16:
        return "avx512-bf16";
    case ACT_Q4_FLOAT:
        return q4_exact_wide(w, weight_isa.f32) ? "avx512" : f32_kernel_name(weight_isa.f32 ? LEVEL_AVX2 : 0);
    default:
        if (w->format == W_F32) return f32_kernel_name(weight_isa.f32);
        return f32_kernel_name(weight_isa.f32 >= LEVEL_AVX512 && w->in % 16 == 0 ? LEVEL_AVX512
                               : weight_isa.f32 >= LEVEL_AVX2 && w->in % 8 == 0 ? LEVEL_AVX2
                                                                                 : LEVEL_SCALAR);
    }
}
