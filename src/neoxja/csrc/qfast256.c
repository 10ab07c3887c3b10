/* The fast integer kernels with 256-bit vectors: AVX-VNNI's vpdpbusd (as qfast512.c, half the
 * width), or AVX2's vpmaddubsw + vpmaddwd (see weights.h for the arithmetic).
 *
 * vpmaddubsw multiplies unsigned by signed bytes and adds pairs into saturating 16-bit sums; with
 * the weight's magnitude as the unsigned side and the activation carrying the weight's sign
 * (vpsignb), each pair is at most 2 * 127 * 127 < 2^15, so nothing saturates, and vpmaddwd by ones
 * adds pairs of pairs into the same 32-bit lanes as vpdpbusd. Without the +128 bias, the AVX2
 * kernels need no correction. A group of 128 4-bit weights (64 packed bytes) is two halves of 32
 * bytes; lane L of half h meets elements 64h + 8L .. 64h + 8L + 7, as lane 8h + L of the 512-bit
 * kernels, so the activation's layout is the same for every width.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if HAVE_X86

#define ROWS 8
#define CHUNK_GROUPS 32

/* Each kernel twice: the same source, compiled for AVX2 alone and for AVX2 + AVX-VNNI (a function
 * may only run on CPUs with every feature of its target, and the compiler inlines only within one). */
#define Q256_TARGET "avx2,fma"
#define Q256_VNNI 0
#define NAME(x) x##_avx2
#include "q256_body.h"
#undef Q256_TARGET
#undef Q256_VNNI
#undef NAME

#define Q256_TARGET "avx2,fma,avxvnni"
#define Q256_VNNI 1
#define NAME(x) x##_vnni
#include "q256_body.h"
#undef Q256_TARGET
#undef Q256_VNNI
#undef NAME

void q4_fast_avx2(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int vnni) {
    if (vnni) q4_vnni(w, a, y, ldy, o0, o1);
    else q4_avx2(w, a, y, ldy, o0, o1);
}

void i8_fast_avx2(const Weight *w, const Act *a, float *y, int64_t ldy, int64_t o0, int64_t o1, int vnni) {
    if (vnni) i8_vnni(w, a, y, ldy, o0, o1);
    else i8_avx2(w, a, y, ldy, o0, o1);
}

#endif
