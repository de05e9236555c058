/* Fused soft attention + per-query cosine of the scoring engine (inference only, float32).
 *
 * Built at first use by itm/models/align/fused.py (gcc -O3 -march=native, no -ffast-math) and
 * loaded with ctypes; the Python side splits the context sets over threads (ctypes releases
 * the GIL). It computes exactly what itm.models.align.engine.attend_cosine computes with ~10
 * tensor passes, but per context set and 16 query sets at a time, so the score tile is read
 * from memory once and everything after it stays in registers / L1:
 *
 *   s      [Bc, Kc, Lq, Bq]  raw scores, context items on axis 1, query items item-major
 *                            (query item w of query set j at s[c, k, w, j]); padded query
 *                            items have zero scores, padded context items any finite value
 *   gram   context Gram matrices, set c at gram + c * gram_stride, row k at + k * Kc
 *   cmask  [Bc, Kc] uint8    1 = valid context item
 *   qsq    [Lq, Bq]          squared norms of the query items
 *   out    [Bc, Bq, Lq]      cos(q, att_q) per query item (query-set-major, ready to pool)
 *
 * Vectorised with GCC / clang vector extensions (16 lanes = 16 query sets), so it compiles to
 * AVX-512, AVX2 or NEON alike.
 *
 * Steps (docs/foundations.md, docs/scan.md): clipped l2 norm of the scores across each query set
 * (leaky_relu slope 0.1, or slope 1 for plain l2norm), times lambda, exp (no max shift: the
 * normed scores lie in [-1, 1]), padded context items weight 0; Z = sum w, dot = sum w s,
 * att = w^T G w (symmetric G: the lower triangle, doubled); cos = (dot / Z) /
 * sqrt(max(|q|^2 att / Z^2, 1e-16)).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VW 16
typedef float vf __attribute__((vector_size(4 * VW)));   /* 16 lanes: one query set each */
typedef int32_t vi __attribute__((vector_size(4 * VW)));

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* leaky_relu(x, slope) for 0 < slope <= 1 (slope 1: the identity) */
static inline vf leaky(vf x, float slope) { return vselect(x > 0.0f, x, x * slope); }

/* exp(x) for |x| <= 87, ~1 ulp: 2^n * p(r) with n = round(x / ln2) (the 1.5 * 2^23 trick,
 * round to nearest), r = x - n ln2 (Cody-Waite), p of degree 6 (Horner). */
static inline vf vexp(vf x) {
    const vf lo = splat(-87.0f), hi = splat(87.0f), magic = splat(12582912.0f);
    x = vselect(x < lo, lo, x);
    x = vselect(x > hi, hi, x);
    vf shifted = x * 1.44269504088896341f + magic;
    vf n = shifted - magic;
    vi ni = (vi)shifted - (vi)magic;
    vf r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    vf p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vf)((ni + 127) << 23);
}

/* the W (<= VW) lanes at x, the others 0 */
static inline __attribute__((always_inline)) vf load(const float *x, const int W) {
    vf v = {0};
    memcpy(&v, x, sizeof(float) * W);
    return v;
}

static inline __attribute__((always_inline)) void store(float *x, vf v, const int W) {
    memcpy(x, &v, sizeof(float) * W);
}

/* Pass 1, streaming over one context set's contiguous score slab: inv[k, j] =
 * lambda / (||leaky(s[k, :, j])|| + 1e-8) over the items of each query set j (0 for padded
 * context items); inv rows are bqp >= bq floats apart. */
static void norms(const float *restrict sc, int64_t kc, int64_t lq, int64_t bq, int64_t bqp,
                  const uint8_t *restrict cm, float slope, float lambda, float *restrict inv) {
    for (int64_t k = 0; k < kc; k++) {
        float *acc = inv + k * bqp;
        for (int64_t j = 0; j < bqp; j++) acc[j] = 0.0f;
        if (!cm[k]) continue;
        for (int64_t w = 0; w < lq; w++) {
            const float *x = sc + (k * lq + w) * bq;
            for (int64_t j = 0; j < bq; j++) {
                float y = x[j] > 0.0f ? x[j] : slope * x[j];
                acc[j] += y * y;
            }
        }
        for (int64_t j = 0; j < bq; j++) acc[j] = lambda / (sqrtf(acc[j]) + 1e-8f);
    }
}

/* Pass 2 for one context set against the query sets j0 .. j0 + W - 1 (lanes; W = VW, or the
 * tail), reading the slab from cache: per query item w, the weights of every context item, then
 * Z, dot and w^T G w; writes cos to oc[j, w] (out is [Bc, Bq, Lq]). */
static inline __attribute__((always_inline)) void tile(
    const float *restrict sc, int64_t kc, int64_t lq, int64_t bq, int64_t bqp,
    const float *restrict g, const uint8_t *restrict cm, const float *restrict qsq, float slope,
    const float *restrict inv, float *restrict oc, int64_t j0, const int W, vf *restrict a) {
    for (int64_t w = 0; w < lq; w++) {
        vf z = {0}, dot = {0}, att = {0};
        for (int64_t k = 0; k < kc; k++) {
            vf x = load(sc + (k * lq + w) * bq + j0, W);
            vf e = cm[k] ? vexp(leaky(x, slope) * load(inv + k * bqp + j0, VW)) : splat(0.0f);
            a[k] = e;
            z += e;
            dot += e * x;
        }
        /* w^T G w / 2 over the lower triangle (a[k] = 0 for padded items), four rows of G at
         * a time: one load of a[m] feeds four independent multiply-add chains */
        int64_t k = 0;
        for (; k + 4 <= kc; k += 4) {
            const float *g0 = g + k * kc, *g1 = g0 + kc, *g2 = g1 + kc, *g3 = g2 + kc;
            vf t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
            for (int64_t m = 0; m < k; m++) {
                const vf am = a[m];
                t0 += am * g0[m];
                t1 += am * g1[m];
                t2 += am * g2[m];
                t3 += am * g3[m];
            }
            const vf a0 = a[k], a1 = a[k + 1], a2 = a[k + 2], a3 = a[k + 3];
            t0 += a0 * (0.5f * g0[k]);
            t1 += a0 * g1[k] + a1 * (0.5f * g1[k + 1]);
            t2 += a0 * g2[k] + a1 * g2[k + 1] + a2 * (0.5f * g2[k + 2]);
            t3 += a0 * g3[k] + a1 * g3[k + 1] + a2 * g3[k + 2] + a3 * (0.5f * g3[k + 3]);
            att += (a0 * t0 + a1 * t1) + (a2 * t2 + a3 * t3);
        }
        for (; k < kc; k++) {
            const float *gk = g + k * kc;
            vf t0 = a[k] * (0.5f * gk[k]), t1 = {0};
            int64_t m = 0;
            for (; m + 2 <= k; m += 2) {
                t0 += a[m] * gk[m];
                t1 += a[m + 1] * gk[m + 1];
            }
            if (m < k) t0 += a[m] * gk[m];
            att += a[k] * (t0 + t1);
        }
        att += att;
        const vf zi = 1.0f / z;
        vf n2 = load(qsq + w * bq + j0, W) * (att * zi * zi);
        n2 = vselect(n2 > 1e-16f, n2, splat(1e-16f));
        float ol[VW];
        memcpy(ol, &n2, sizeof ol);
#pragma GCC unroll 1
        for (int v = 0; v < VW; v++) ol[v] = sqrtf(ol[v]);
        memcpy(&n2, ol, sizeof ol);
        n2 = dot * zi / n2;
        memcpy(ol, &n2, sizeof ol);
        for (int v = 0; v < W; v++) oc[(j0 + v) * lq + w] = ol[v];
    }
}

/* One context set: pass 1 (norms) then pass 2 (tiles of VW query sets). */
static void context_set(const float *restrict sc, int64_t kc, int64_t lq, int64_t bq,
                        int64_t bqp, const float *restrict g, const uint8_t *restrict cm,
                        const float *restrict qsq, float slope, float lambda,
                        float *restrict inv, float *restrict oc, vf *restrict a) {
    norms(sc, kc, lq, bq, bqp, cm, slope, lambda, inv);
    int64_t j0 = 0;
    for (; j0 + VW <= bq; j0 += VW)
        tile(sc, kc, lq, bq, bqp, g, cm, qsq, slope, inv, oc, j0, VW, a);
    if (j0 < bq)  /* the tail: fewer lanes, the others computed on zeros and dropped */
        tile(sc, kc, lq, bq, bqp, g, cm, qsq, slope, inv, oc, j0, (int)(bq - j0), a);
}

/* Context sets c0 .. c1 - 1 of a block (one thread's share). Returns 0, or -1 when a work
 * buffer cannot be had (the caller then falls back to the tensor kernel). */
int itm_attend_f32(const float *s, int64_t kc, int64_t lq, int64_t bq, const float *gram,
                   int64_t gram_stride, const uint8_t *cmask, const float *qsq, float slope,
                   float lambda, float *out, int64_t c0, int64_t c1) {
    const int64_t bqp = (bq + VW - 1) / VW * VW;
    float *inv = aligned_alloc(64, sizeof(float) * (size_t)(kc * bqp));
    vf *a = aligned_alloc(64, sizeof(vf) * (size_t)kc);
    if (inv == NULL || a == NULL) {
        free(inv);
        free(a);
        return -1;
    }
    for (int64_t c = c0; c < c1; c++)
        context_set(s + c * kc * lq * bq, kc, lq, bq, bqp, gram + c * gram_stride, cmask + c * kc,
                    qsq, slope, lambda, inv, out + c * lq * bq, a);
    free(inv);
    free(a);
    return 0;
}

/* The same for bfloat16 scores (the block's product in bf16, eval.precision=bf16): each
 * context set's slab is widened to float32 into a buffer that stays in cache (a bf16 value is
 * the high half of its float32), then scored exactly as above. */
int itm_attend_bf16(const uint16_t *s, int64_t kc, int64_t lq, int64_t bq, const float *gram,
                    int64_t gram_stride, const uint8_t *cmask, const float *qsq, float slope,
                    float lambda, float *out, int64_t c0, int64_t c1) {
    const int64_t bqp = (bq + VW - 1) / VW * VW, slab = kc * lq * bq;
    float *inv = aligned_alloc(64, sizeof(float) * (size_t)(kc * bqp));
    vf *a = aligned_alloc(64, sizeof(vf) * (size_t)kc);
    float *wide = aligned_alloc(64, (sizeof(float) * (size_t)slab + 63) / 64 * 64);
    if (inv == NULL || a == NULL || wide == NULL) {
        free(inv);
        free(a);
        free(wide);
        return -1;
    }
    for (int64_t c = c0; c < c1; c++) {
        const uint16_t *sb = s + c * slab;
        for (int64_t i = 0; i < slab; i++) {
            const uint32_t bits = (uint32_t)sb[i] << 16;
            memcpy(wide + i, &bits, sizeof bits);  /* no type punning through pointers */
        }
        context_set(wide, kc, lq, bq, bqp, gram + c * gram_stride,
                    cmask + c * kc, qsq, slope, lambda, inv, out + c * lq * bq, a);
    }
    free(inv);
    free(a);
    free(wide);
    return 0;
}
