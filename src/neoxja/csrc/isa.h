/* Which instruction sets the kernels use on this CPU, chosen once when an extension is imported.
 *
 * Three families of kernels, each with its own ladder:
 *   - float32 products (dense weights, and the exact arithmetic of the quantized formats):
 *     AVX-512F, AVX2 + FMA, portable C;
 *   - integer products (4-bit and int8 weights times int8 activations): AVX-512 VNNI (512-bit
 *     vpdpbusd; needs AVX-512 F/BW/VL too), AVX-VNNI (256-bit vpdpbusd), AVX2 (vpmaddubsw +
 *     vpmaddwd), portable C;
 *   - bfloat16 weights times bfloat16-rounded activations: AVX512_BF16 (vdpbf16ps), or else the
 *     float32 kernel of the ladder above.
 * An environment variable (NEOXJA_DECODE_KERNEL for _decode, NEOXJA_QUANT_KERNEL for _quant) set to
 * "scalar", "avx2", "avxvnni" or "avx512" caps every ladder at that level, so that tests can run
 * the lower kernels on a CPU that has the higher ones.
 */
#ifndef NEOXJA_ISA_H
#define NEOXJA_ISA_H

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#if HAVE_X86
/* The sum of the 8 floats of v (the AVX2 float32 kernels' last step). */
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

enum { LEVEL_SCALAR = 0, LEVEL_AVX2 = 1, LEVEL_AVXVNNI = 2, LEVEL_AVX512 = 3 };

typedef struct {
    int f32;  /* LEVEL_SCALAR, LEVEL_AVX2 or LEVEL_AVX512 */
    int ints; /* LEVEL_SCALAR, LEVEL_AVX2, LEVEL_AVXVNNI or LEVEL_AVX512 (AVX-512 VNNI) */
    int bf16; /* 1: AVX512_BF16's vdpbf16ps (only with f32 == LEVEL_AVX512) */
    int vbmi; /* 1: AVX512_VBMI's byte permutes (only with ints == LEVEL_AVX512) */
} Isa;

/* The kernels this CPU runs, capped by the level named in the environment variable `cap_env`. */
static inline Isa isa_detect(const char *cap_env) {
    Isa isa = {LEVEL_SCALAR, LEVEL_SCALAR, 0, 0};
#if HAVE_X86
    const char *cap_name = getenv(cap_env);
    int cap = LEVEL_AVX512;
    if (cap_name && strcmp(cap_name, "scalar") == 0) cap = LEVEL_SCALAR;
    else if (cap_name && strcmp(cap_name, "avx2") == 0) cap = LEVEL_AVX2;
    else if (cap_name && strcmp(cap_name, "avxvnni") == 0) cap = LEVEL_AVXVNNI;
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap >= LEVEL_AVX2 && avx2) isa.f32 = isa.ints = LEVEL_AVX2;
    if (cap >= LEVEL_AVXVNNI && avx2 && __builtin_cpu_supports("avxvnni")) isa.ints = LEVEL_AVXVNNI;
    if (cap >= LEVEL_AVX512 && avx512) {
        isa.f32 = LEVEL_AVX512;
        if (__builtin_cpu_supports("avx512vnni")) {
            isa.ints = LEVEL_AVX512;
            isa.vbmi = __builtin_cpu_supports("avx512vbmi");
        }
        isa.bf16 = __builtin_cpu_supports("avx512bf16");
    }
#else
    (void)cap_env;
#endif
    return isa;
}

#endif
