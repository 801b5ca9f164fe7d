/* What the C kernels share: how many channels a vector holds, the vector types, and loading LANES channels of
   fp32 or bf16 as fp32. Included by the kernels, and part of the hash that names their builds (compiled.py). */
#ifndef ISOCONV_VECTORS_H
#define ISOCONV_VECTORS_H
#include <stdint.h>

/* channels per vector (and per block): one register of fp32, 16 with AVX-512, else 8 (wider vectors than the
   registers spill, and an AVX2 build ran 4-5x slower with 16) */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vbf __attribute__((vector_size(LANES * sizeof(uint16_t)), aligned(2)));

/* bf16 is the top half of an fp32 */
static inline vf widen_bf16(vbf b) { return (vf)(__builtin_convertvector(b, vu) << 16); }

/* LANES channels at src (bf16 if is_bf16, else fp32) as fp32 */
static inline vf load_vector(const void *src, int is_bf16) {
    return is_bf16 ? widen_bf16(*(const vbf *)src) : (vf)*(const vf_unaligned *)src;
}

#endif
