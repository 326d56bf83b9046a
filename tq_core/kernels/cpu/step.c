/* The rest of a compressed layer's attention call on the CPU, after the history kernel.
 *
 * What a layer holds is [sinks | history (packed codes) | window] plus the call's own tokens. The
 * history was attended by tq_attend_codes (attend.c): per query row a normalized output in V's
 * rotated space and its log-sum-exp. Per (batch, query head, query row) this function
 *   1. attends the query over the full-precision tokens of up to three segments (sinks, window,
 *      own tokens; any strides; float32, bfloat16 or float16; the last segment causal: row t reads
 *      own token i when i <= t + shift), online softmax in float32 with exp, as View.attend does
 *      in array ops;
 *   2. rotates the history's output back once (o = o_rot @ R_v) and joins both parts by their
 *      log-sum-exp;
 *   3. writes the output in the query's dtype (round to nearest even for the 16-bit ones).
 * A row with nothing to attend writes 0. One call replaces the ~60 small array ops of the
 * composed path, which cost a decode step more than its arithmetic.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half.h"

#define TQ_STEP_MAXD 256  /* head dims, as kernels.MAX_DIM */

static inline float st_load(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    return dtype == 1 ? tq_bf16_to_f32(h) : tq_f16_to_f32(h);
}

static inline void st_store(void *p, int64_t i, int dtype, float f) {
    if (dtype == 0)
        ((float *)p)[i] = f;
    else
        ((uint16_t *)p)[i] = dtype == 1 ? tq_f32_to_bf16(f) : tq_f32_to_f16(f);
}

static void st_row(const void *p, int64_t off, int64_t stride, int dtype, int64_t D, float *out) {
    /* one token's D values as float32, the dtype switch outside the loop so each loop vectorizes */
    if (dtype == 0 && stride == 1) {
        memcpy(out, (const float *)p + off, (size_t)D * sizeof(float));
    } else if (dtype == 1 && stride == 1) {
        const uint16_t *h = (const uint16_t *)p + off;
        for (int64_t d = 0; d < D; d++) {
            uint32_t x = (uint32_t)h[d] << 16;
            memcpy(out + d, &x, 4);
        }
    } else {
        for (int64_t d = 0; d < D; d++) out[d] = st_load(p, off + d * stride, dtype);
    }
}

static inline float st_dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

#define TQ_STEP_MAXR 16  /* query rows per KV head (G * Tq), as kernels.MAX_ROWS */

/* Argument block (int64): B, Hkv, G, Tq, D, has_hist, shift, q_dtype, out_dtype,
 *   q strides (b, h, t, d), out strides (b, h, t, d),
 *   3 segments x (n, k_dtype, v_dtype, k strides b h n d, v strides b h n d) = 3 x 11,
 *   then addresses: q, out, o_rot (B, Hq, Tq, D) float32 contiguous, lse (B, Hq, Tq), rot_v (D, D),
 *   3 x (k, v). Dtypes: 0 float32, 1 bfloat16, 2 float16. Returns 0, or 1 for bad arguments. */
int tq_attend_dense(const int64_t *a, double scale_d) {
    const int64_t B = a[0], H = a[1], G = a[2], T = a[3], D = a[4], has_hist = a[5], shift = a[6];
    const int qdt = (int)a[7], odt = (int)a[8];
    const int64_t *qs = a + 9, *os = a + 13, *seg = a + 17;
    const uint64_t *p = (const uint64_t *)(a + 17 + 33);
    const void *q = (const void *)(uintptr_t)p[0];
    void *out = (void *)(uintptr_t)p[1];
    const float *o_rot = (const float *)(uintptr_t)p[2], *lse = (const float *)(uintptr_t)p[3];
    const float *rot_v = (const float *)(uintptr_t)p[4];
    const float scale = (float)scale_d;
    const int64_t R = G * T;
    if (D < 1 || D > TQ_STEP_MAXD || B < 0 || H < 1 || G < 1 || T < 1 || R > TQ_STEP_MAXR || qdt < 0 || qdt > 2
        || odt < 0 || odt > 2)
        return 1;
    float qv[TQ_STEP_MAXR][TQ_STEP_MAXD], acc[TQ_STEP_MAXR][TQ_STEP_MAXD], m[TQ_STEP_MAXR], l[TQ_STEP_MAXR];
    float krow[TQ_STEP_MAXD], vrow[TQ_STEP_MAXD], hv[TQ_STEP_MAXD];
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            /* the G * Tq query rows sharing KV head h read each full-precision token once */
            for (int64_t r = 0; r < R; r++) {
                const int64_t g = r / T, t = r % T;
                st_row(q, b * qs[0] + (h * G + g) * qs[1] + t * qs[2], qs[3], qdt, D, qv[r]);
                for (int64_t d = 0; d < D; d++) qv[r][d] *= scale;
                memset(acc[r], 0, (size_t)D * sizeof(float));
                m[r] = -INFINITY;
                l[r] = 0.0f;
            }
            for (int s = 0; s < 3; s++) {
                const int64_t *sg = seg + 11 * s;
                const int64_t n = sg[0];
                const void *K = (const void *)(uintptr_t)p[5 + 2 * s];
                const void *V = (const void *)(uintptr_t)p[6 + 2 * s];
                for (int64_t j = 0; j < n; j++) {
                    if (s == 2 && j > (T - 1) + shift) break;  /* no row reads it (own tokens: causal) */
                    st_row(K, b * sg[3] + h * sg[4] + j * sg[5], sg[6], (int)sg[1], D, krow);
                    st_row(V, b * sg[7] + h * sg[8] + j * sg[9], sg[10], (int)sg[2], D, vrow);
                    for (int64_t r = 0; r < R; r++) {
                        if (s == 2 && j > r % T + shift) continue;
                        const float sc = st_dot(qv[r], krow, D);
                        if (sc > m[r]) {  /* a new running max: rescale what is summed so far */
                            const float alpha = expf(m[r] - sc);  /* 0 on the row's first token */
                            l[r] *= alpha;
                            for (int64_t d = 0; d < D; d++) acc[r][d] *= alpha;
                            m[r] = sc;
                        }
                        const float pj = expf(sc - m[r]);
                        l[r] += pj;
                        for (int64_t d = 0; d < D; d++) acc[r][d] += pj * vrow[d];
                    }
                }
            }
            for (int64_t r = 0; r < R; r++) {
                const int64_t g = r / T, t = r % T, hq = h * G + g;
                const int64_t row = (b * H * G + hq) * T + t;  /* (B, Hq, Tq) flattened */
                float wd = 1.0f, wh = 0.0f;
                if (has_hist) {
                    const float lh = lse[row], top = m[r] > lh ? m[r] : lh;
                    if (top > -INFINITY) {
                        wd = m[r] > -INFINITY ? expf(m[r] - top) : 0.0f;
                        wh = lh > -INFINITY ? expf(lh - top) : 0.0f;
                    }
                }
                memset(hv, 0, (size_t)D * sizeof(float));
                if (wh > 0.0f) {  /* the history's output rotated back: o_rot @ R_v, rows of R_v in order */
                    const float *orow = o_rot + row * D;
                    for (int64_t d = 0; d < D; d++) {
                        const float od = orow[d];
                        const float *rv = rot_v + d * D;
                        for (int64_t c = 0; c < D; c++) hv[c] += od * rv[c];
                    }
                }
                const float den = l[r] * wd + wh;
                const float inv = den > 0.0f ? 1.0f / den : 0.0f;
                const int64_t oo = b * os[0] + hq * os[1] + t * os[2];
                for (int64_t c = 0; c < D; c++) st_store(out, oo + c * os[3], odt, (acc[r][c] * wd + hv[c] * wh) * inv);
            }
        }
    return 0;
}
