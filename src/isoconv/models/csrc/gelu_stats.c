/* The forward of GELU -> BatchNorm's first half on a CPU, channels-last (see act_norm.py): one pass over the
   activation input a (rows = pixels, c channels innermost) that writes h = gelu(a) and the slope gelu'(a) in a's
   dtype, and sums d = h - shift and d^2 per channel in fp32 (shift: h of the first pixel, so that the variance
   E[d^2] - E[d]^2 does not cancel). The sums use h as stored (rounded to bf16 in bf16), as BatchNorm sees it.

   gelu(a) = a cdf(a) and gelu'(a) = cdf(a) + a pdf(a), with erf from Abramowitz & Stegun 7.1.26 (absolute error
   <= 1.5e-7; aten's vectorised erf uses the same), whose exp(-a^2/2) is also the density: one exp per element.
   Rows are split into fixed chunks with their own partial sums, added in a fixed order, so results do not depend
   on the thread count. Built by compiled.py (-O3 -march=native -fopenmp). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "vectors.h"

#define CHUNK_ROWS 512

typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static const float INV_SQRT2 = 0.70710678118654752f, INV_SQRT_2PI = 0.39894228040143268f;
static const float P = 0.3275911f, A1 = 0.254829592f, A2 = -0.284496736f, A3 = 1.421413741f, A4 = -1.453152027f,
                   A5 = 1.061405429f;

static inline vf splat(float v) { return (vf){0} + v; }

/* lanes of `yes` where mask (all ones) is set, else of `no` (C has no vector ?:) */
static inline vf choose(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

#define SIGN_BIT ((vi){0} + (int32_t)0x80000000)

/* exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial; underflows to 0) */
static inline vf exp_nonpositive(vf x) {
    x = choose(x < splat(-87.0f), splat(-87.0f), x);
    const vi n = __builtin_convertvector(x * splat(1.44269504088896341f) - splat(0.5f), vi);  /* round, x <= 0 */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    const vi scale = (n + 127) << 23;
    return p * (vf)scale;
}

/* fp32 -> bf16, rounding to nearest even (NaN stays NaN): the CPU's instruction where it has one (AVX512-BF16,
   which also flushes denormals to zero, as aten's vectorised conversion there does), else integer arithmetic, which
   took 30% of this kernel's time */
#if defined(__AVX512BF16__) && LANES == 16
static inline vbf to_bf16(vf v) {
    const __m256bh converted = _mm512_cvtneps_pbh((__m512)v);
    vbf out;
    memcpy(&out, &converted, sizeof(out));
    return out;
}
#else
static inline vbf to_bf16(vf v) {
    const vu bits = (vu)v;
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const vu quiet_nan = (vu){0} + 0x7fc0u;
    return __builtin_convertvector((vu)choose(v != v, (vf)quiet_nan, (vf)rounded), vbf);
}
#endif

/* the value as stored: rounded to bf16 and back, or unchanged in fp32 */
static inline vf store_channels(void *dst, vf v, int is_bf16) {
    if (is_bf16) {
        const vbf b = to_bf16(v);
        memcpy(dst, &b, sizeof(b));
        return widen_bf16(b);
    }
    memcpy(dst, &v, sizeof(v));
    return v;
}

static inline void gelu_and_slope(vf a, vf *h, vf *slope) {
    const vf z = a * splat(INV_SQRT2);
    const vf az = (vf)((vi)z & ~SIGN_BIT);
    const vf t = splat(1.0f) / (splat(1.0f) + splat(P) * az);
    const vf gauss = exp_nonpositive(-z * z);
    const vf poly = splat(A1) + t * (splat(A2) + t * (splat(A3) + t * (splat(A4) + t * splat(A5))));
    const vf erf_abs = splat(1.0f) - t * poly * gauss;
    const vf erf = (vf)(((vi)erf_abs & ~SIGN_BIT) | ((vi)z & SIGN_BIT));  /* copysign(erf_abs, z) */
    const vf cdf = splat(0.5f) + splat(0.5f) * erf;
    *h = a * cdf;
    *slope = cdf + a * gauss * splat(INV_SQRT_2PI);
}

/* One block of up to LANES channels of `rows` pixels; `lanes` < LANES goes through a zero-padded copy. */
static void block_rows(const char *a, char *h, char *slope, int is_bf16, int64_t rows, int64_t c, int64_t lanes,
                       vf shift, vf *sum, vf *sq) {
    const int64_t elem = is_bf16 ? 2 : 4, pitch = c * elem;
    vf s = {0}, q = {0};
    for (int64_t r = 0; r < rows; r++) {
        vf av, hv, sv;
        if (lanes == LANES) {
            av = load_vector(a + r * pitch, is_bf16);
        } else {
            char tmp[LANES * 4] = {0};
            memcpy(tmp, a + r * pitch, (size_t)(lanes * elem));
            av = load_vector(tmp, is_bf16);
        }
        gelu_and_slope(av, &hv, &sv);
        if (lanes == LANES) {
            hv = store_channels(h + r * pitch, hv, is_bf16);
            store_channels(slope + r * pitch, sv, is_bf16);
        } else {
            char th[LANES * 4], ts[LANES * 4];
            hv = store_channels(th, hv, is_bf16);
            store_channels(ts, sv, is_bf16);
            memcpy(h + r * pitch, th, (size_t)(lanes * elem));
            memcpy(slope + r * pitch, ts, (size_t)(lanes * elem));
        }
        const vf d = hv - shift;
        s += d;
        q += d * d;
    }
    *sum += s;
    *sq += q;
}

/* a, h, slope: (rows, c) channels-last, fp32 or bf16 (is_bf16). Writes h, slope, and per channel the fp32
   sum_d = sum of (h - shift), sum_d2 = sum of (h - shift)^2 and shift (h of row 0). Returns 0, or -1 when memory
   could not be allocated. */
int gelu_stats(const void *a, void *h, void *slope, int is_bf16, int64_t rows, int64_t c, float *sum_d,
               float *sum_d2, float *shift, int threads) {
    const int64_t blocks = (c + LANES - 1) / LANES, chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const int64_t elem = is_bf16 ? 2 : 4;
    vf *partial = aligned_alloc(64, (size_t)(chunks * blocks * 2) * sizeof(vf));
    vf *shifts = aligned_alloc(64, (size_t)blocks * sizeof(vf));
    if (partial == NULL || shifts == NULL) {
        free(partial); free(shifts);
        return -1;
    }
    for (int64_t b = 0; b < blocks; b++) {  /* h of the first pixel, as stored */
        const int64_t lanes = c - b * LANES < LANES ? c - b * LANES : LANES;
        char in[LANES * 4] = {0}, out[LANES * 4];
        memcpy(in, (const char *)a + b * LANES * elem, (size_t)(lanes * elem));
        vf hv, sv;
        gelu_and_slope(load_vector(in, is_bf16), &hv, &sv);
        shifts[b] = store_channels(out, hv, is_bf16);
    }
    threads = threads < 1 ? 1 : threads;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        const int64_t r0 = chunk * CHUNK_ROWS, count = rows - r0 < CHUNK_ROWS ? rows - r0 : CHUNK_ROWS;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t lanes = c - b * LANES < LANES ? c - b * LANES : LANES, offset = (r0 * c + b * LANES) * elem;
            vf *out = partial + (chunk * blocks + b) * 2;
            out[0] = out[1] = (vf){0};
            block_rows((const char *)a + offset, (char *)h + offset, (char *)slope + offset, is_bf16, count, c, lanes,
                       shifts[b], &out[0], &out[1]);
        }
    }
    for (int64_t b = 0; b < blocks; b++) {
        vf s = {0}, q = {0};
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            s += partial[(chunk * blocks + b) * 2];
            q += partial[(chunk * blocks + b) * 2 + 1];
        }
        for (int64_t l = 0; l < LANES && b * LANES + l < c; l++) {
            sum_d[b * LANES + l] = s[l];
            sum_d2[b * LANES + l] = q[l];
            shift[b * LANES + l] = shifts[b][l];
        }
    }
    free(partial); free(shifts);
    return 0;
}
