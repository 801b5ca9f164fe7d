/* Weight and bias gradients of a stride-1 depthwise convolution on a CPU, channels-last (see depthwise.py):

       dW[c, i, j] = sum over n, y, x of g[n, y, x, c] * xpad[n, y + i, x + j, c],    db[c] = sum of g[n, y, x, c]

   Each thread takes chunks of images. Per image it converts x (zero-padded) and g to fp32 in its own buffers,
   regrouped as [channel block][row][column][LANES channels] so that one block's data is contiguous and stays in
   cache, then for each block, kernel row and group of up to 8 kernel columns runs over the image with one vector
   accumulator per column (one load of g, one load of x and one FMA per column and pixel). Sums are fp32; each
   chunk writes its own partial sums, added in a fixed order at the end, so results do not depend on the thread
   count. Built by compiled.py with the system C compiler (-O3 -march=native -fopenmp); GCC vector extensions keep
   it portable between AVX2 and AVX-512. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define MAX_COLS 8      /* kernel columns summed in one pass */
#define CHUNK 4         /* images per chunk (a unit of parallel work with its own partial sums) */

/* 64-byte aligned, zeroed vectors (calloc's alignment is too small for vf) */
static vf *zeroed_vectors(int64_t count) {
    vf *p = aligned_alloc(64, (size_t)count * sizeof(vf));
    if (p != NULL) memset(p, 0, (size_t)count * sizeof(vf));
    return p;
}

typedef struct {
    int64_t c, blocks, h, w, ho, wo, kh, kw, top, left, hp, wp;
} shape_t;

/* LANES channels at src (bf16 or fp32) as fp32; `lanes` < LANES reads only those and zeroes the rest */
static inline vf load_channels(const void *src, int is_bf16, int64_t lanes) {
    if (lanes == LANES) return load_vector(src, is_bf16);
    float out[LANES] = {0};
    for (int64_t l = 0; l < lanes; l++) {
        if (is_bf16) {
            uint32_t bits = (uint32_t)((const uint16_t *)src)[l] << 16;
            memcpy(&out[l], &bits, sizeof(bits));
        } else {
            out[l] = ((const float *)src)[l];
        }
    }
    vf v;
    memcpy(&v, out, sizeof(v));
    return v;
}

/* One image (h, w, c) in fp32 or bf16 -> dst [block][row][col] of fp32 vectors, pixel (y, x) at (y + dy, x + dx)
   of a (rows, cols) grid; lanes past c are zero. */
static void regroup(vf *dst, const char *src, int is_bf16, const shape_t *s, int64_t h, int64_t w, int64_t rows,
                    int64_t cols, int64_t dy, int64_t dx) {
    const int64_t elem = is_bf16 ? 2 : 4;
    for (int64_t b = 0; b < s->blocks; b++) {
        const int64_t lanes = s->c - b * LANES < LANES ? s->c - b * LANES : LANES;
        for (int64_t y = 0; y < h; y++) {
            vf *d = dst + (b * rows + y + dy) * cols + dx;
            const char *p = src + (y * w * s->c + b * LANES) * elem;
            if (is_bf16 && lanes == LANES) {
                for (int64_t x = 0; x < w; x++) d[x] = load_channels(p + x * s->c * 2, 1, LANES);
            } else if (lanes == LANES) {
                for (int64_t x = 0; x < w; x++) d[x] = load_channels(p + x * s->c * 4, 0, LANES);
            } else {
                for (int64_t x = 0; x < w; x++) d[x] = load_channels(p + x * s->c * elem, is_bf16, lanes);
            }
        }
    }
}

/* acc[i * kw + j0 + j] += sum over the image of g * x shifted by (i, j0 + j), for j < COLS and every kernel row i */
#define DEFINE_COLUMN_SUMS(COLS)                                                                                      \
    static void column_sums_##COLS(const vf *xb, const vf *gb, vf *acc, const shape_t *s, int64_t j0) {              \
        for (int64_t i = 0; i < s->kh; i++) {                                                                         \
            vf a[COLS];                                                                                               \
            for (int j = 0; j < COLS; j++) a[j] = (vf){0};                                                            \
            for (int64_t y = 0; y < s->ho; y++) {                                                                     \
                const vf *xr = xb + (y + i) * s->wp + j0, *gr = gb + y * s->wo;                                       \
                for (int64_t x = 0; x < s->wo; x++) {                                                                 \
                    const vf gv = gr[x];                                                                              \
                    for (int j = 0; j < COLS; j++) a[j] += gv * xr[x + j];                                            \
                }                                                                                                     \
            }                                                                                                         \
            for (int j = 0; j < COLS; j++) acc[i * s->kw + j0 + j] += a[j];                                           \
        }                                                                                                             \
    }
DEFINE_COLUMN_SUMS(1)
DEFINE_COLUMN_SUMS(2)
DEFINE_COLUMN_SUMS(3)
DEFINE_COLUMN_SUMS(4)
DEFINE_COLUMN_SUMS(5)
DEFINE_COLUMN_SUMS(6)
DEFINE_COLUMN_SUMS(7)
DEFINE_COLUMN_SUMS(8)

typedef void (*column_sums_t)(const vf *, const vf *, vf *, const shape_t *, int64_t);
static const column_sums_t COLUMN_SUMS[MAX_COLS + 1] = {
    NULL, column_sums_1, column_sums_2, column_sums_3, column_sums_4, column_sums_5, column_sums_6, column_sums_7,
    column_sums_8};

static void image_sums(const vf *xbuf, const vf *gbuf, vf *acc, const shape_t *s) {
    const int64_t per_block = s->kh * s->kw + 1;
    for (int64_t b = 0; b < s->blocks; b++) {
        const vf *xb = xbuf + b * s->hp * s->wp, *gb = gbuf + b * s->ho * s->wo;
        vf *ab = acc + b * per_block;
        /* columns in groups of at most MAX_COLS, as even as possible (9 -> 5 + 4) */
        const int64_t groups = (s->kw + MAX_COLS - 1) / MAX_COLS;
        for (int64_t grp = 0, j0 = 0; grp < groups; grp++) {
            const int64_t cols = (s->kw - j0) / (groups - grp);
            COLUMN_SUMS[cols](xb, gb, ab, s, j0);
            j0 += cols;
        }
        vf bias = {0};
        for (int64_t p = 0; p < s->ho * s->wo; p++) bias += gb[p];
        ab[s->kh * s->kw] += bias;
    }
}

/* g: (n, ho, wo, c), x: (n, h, w, c), both channels-last, fp32 or bf16 (is_bf16); top/left: the zero padding
   before the image (the padding after follows from the sizes). grad_w: (c, kh * kw), grad_b: (c), fp32; `threads`:
   at most this many OpenMP threads. Returns 0, or -1 when memory could not be allocated. */
int depthwise_param_grads(const void *g, const void *x, int is_bf16, int64_t n, int64_t c, int64_t h, int64_t w,
                          int64_t ho, int64_t wo, int64_t kh, int64_t kw, int64_t top, int64_t left,
                          float *grad_w, float *grad_b, int threads) {
    shape_t s = {c, (c + LANES - 1) / LANES, h, w, ho, wo, kh, kw, top, left, ho + kh - 1, wo + kw - 1};
    const int64_t chunks = (n + CHUNK - 1) / CHUNK, per_block = kh * kw + 1, per_chunk = s.blocks * per_block;
    threads = threads < 1 ? 1 : threads < chunks ? threads : (int)chunks;
    const int64_t xsize = s.blocks * s.hp * s.wp, gsize = s.blocks * ho * wo;
    vf *partial = zeroed_vectors(chunks * per_chunk);
    vf *xbufs = zeroed_vectors(threads * xsize);  /* zero: the padding is never written */
    vf *gbufs = zeroed_vectors(threads * gsize);
    if (partial == NULL || xbufs == NULL || gbufs == NULL) {
        free(partial); free(xbufs); free(gbufs);
        return -1;
    }
    const int64_t x_image = h * w * c, g_image = ho * wo * c, elem = is_bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        vf *xbuf = xbufs + omp_get_thread_num() * xsize, *gbuf = gbufs + omp_get_thread_num() * gsize;
        for (int64_t img = chunk * CHUNK; img < n && img < (chunk + 1) * CHUNK; img++) {
            regroup(xbuf, (const char *)x + img * x_image * elem, is_bf16, &s, h, w, s.hp, s.wp, top, left);
            regroup(gbuf, (const char *)g + img * g_image * elem, is_bf16, &s, ho, wo, ho, wo, 0, 0);
            image_sums(xbuf, gbuf, partial + chunk * per_chunk, &s);
        }
    }
    for (int64_t b = 0; b < s.blocks; b++) {
        for (int64_t k = 0; k < per_block; k++) {
            vf sum = {0};
            for (int64_t chunk = 0; chunk < chunks; chunk++) sum += partial[chunk * per_chunk + b * per_block + k];
            for (int64_t l = 0; l < LANES && b * LANES + l < c; l++) {
                if (k < kh * kw) grad_w[(b * LANES + l) * kh * kw + k] = sum[l];
                else grad_b[b * LANES + l] = sum[l];
            }
        }
    }
    free(partial); free(xbufs); free(gbufs);
    return 0;
}
