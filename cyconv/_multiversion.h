/* Kernels compiled for more than one instruction set, chosen when the module loads.
 *
 * The build targets baseline x86-64 (SSE2), so that the extension runs on any
 * x86-64 CPU.  A function marked CYCONV_MULTIVERSION is compiled three times,
 * for baseline x86-64, x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and
 * GCC's target_clones picks the best one the CPU runs, at load time.
 *
 * CYCONV_MULTIVERSION_EXACT also turns floating-point contraction off: no
 * clone fuses a * b + c into one rounding, so every clone gives the baseline's
 * bits (the sums and affine maps of batch norm: results then do not depend on
 * the CPU).  Plain CYCONV_MULTIVERSION leaves contraction to the compiler (the
 * convolutions' products, whose bits may then differ between CPUs, never
 * between thread counts).
 *
 * A multiversioned function is never inlined into its caller (the row loops
 * rely on it: inlined into a parallel loop, their __restrict pointers stopped
 * telling GCC that the rows do not overlap, and a loop stayed scalar); a helper
 * that it calls is compiled for baseline x86-64 only, unless it is inlined into
 * it: CYCONV_ALWAYS_INLINE.
 *
 * CYCONV_MULTIVERSION_UNROLLED is for the kernels whose blocks of accumulators GCC
 * unrolls completely, into functions of 100-300 kB of code: it also turns off GCC's
 * RTL global common-subexpression passes (-fgcse, -fgcse-after-reload), whose time
 * grows faster than the function's size (minutes per module at -O3) and which do
 * not make these kernels faster: the GIMPLE passes have already shared what there
 * is to share.
 */
#ifndef CYCONV_MULTIVERSION_H
#define CYCONV_MULTIVERSION_H

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define CYCONV_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", \
                                                         "arch=x86-64-v4")))
#elif defined(__GNUC__)   /* one version, a function of its own */
#define CYCONV_MULTIVERSION __attribute__((noinline))
#else
#define CYCONV_MULTIVERSION
#endif

#if defined(__GNUC__) && !defined(__clang__)   /* GCC's per-function options */
#define CYCONV_MULTIVERSION_EXACT CYCONV_MULTIVERSION __attribute__((optimize("fp-contract=off")))
#define CYCONV_MULTIVERSION_UNROLLED \
    CYCONV_MULTIVERSION __attribute__((optimize("no-gcse", "no-gcse-after-reload")))
#else
#define CYCONV_MULTIVERSION_EXACT CYCONV_MULTIVERSION
#define CYCONV_MULTIVERSION_UNROLLED CYCONV_MULTIVERSION
#endif

#if defined(__GNUC__)
#define CYCONV_ALWAYS_INLINE static inline __attribute__((always_inline))
#define CYCONV_MAYBE_UNUSED __attribute__((unused))
#else
#define CYCONV_ALWAYS_INLINE static inline
#define CYCONV_MAYBE_UNUSED
#endif

/* Kernels that keep blocks of accumulators in vector registers (Winograd's, the
 * direct convolution's, the depthwise convolution's) come in two vector widths: 64 bytes for CPUs
 * with AVX-512 (32 registers of 64 bytes) and 32 bytes for the others (AVX2:
 * 16 registers of 32 bytes, where the 64-byte blocks would spill to memory at
 * every multiply-add).  Each element is computed by the same operations in the
 * same order in both: the width changes the speed, not the bits.
 *
 * cyconv_vector_choice (one per extension module): -1 picks by the CPU; 0 (32
 * bytes) and 1 (64 bytes) are set by the tests, through the module's
 * force_vector_width, to check that both widths give the same bits. */
static int cyconv_vector_choice CYCONV_MAYBE_UNUSED = -1;

CYCONV_MAYBE_UNUSED static inline int cyconv_wide_vectors(void)
{
    if (cyconv_vector_choice >= 0)
        return cyconv_vector_choice;
#if defined(__GNUC__) && defined(__x86_64__)
    /* the features of x86-64-v4, whose clone then runs (a CPU with AVX-512F alone,
     * such as Xeon Phi, gets the x86-64-v3 clone: 16 registers) */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

#endif
