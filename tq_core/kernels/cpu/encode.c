/* TurboQuant encode of a few rows on the CPU: a decode step's tokens leaving the window.
 *
 * Same meaning as TurboQuantizer.encode (tq_core/quantizer.py) with float32 precision:
 *   n = |x|;  y = (x @ R^T) / max(n, 1e-30);  code_i = #{boundaries < y_i};
 *   stored = n / |c[code]| (norm correction) or n, rounded to fp16 (nearest even).
 * Sums (|x|^2, each rotated coordinate, |c[code]|^2) are taken in double and rounded to float once,
 * so codes equal the array-ops path's except where float32 rounding itself decides (a coordinate
 * within ~1e-7 of a boundary), and stored norms are within one fp16 ulp.
 *
 * Packing (tq_core/packing.py): bit planes of widths (4, 2, 1) (8: one byte per code), widest first,
 * plane p holding bits [shift_p, shift_p + w) of each code; a w-bit plane packs 8 / w codes per
 * byte, the lowest dim in the lowest bits; rows are zero-padded to a multiple of 8 dims.
 *
 * One call encodes rows of one or two kinds (keys and values of the same tokens): the per-call
 * cost of the array-ops path (~25 small ops per kind) is what a decode step pays on the CPU.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half.h"

#define TQ_ENC_MAXD 1024

typedef struct {
    const void *x;          /* (n, D) rows: float32 (dtype 0), bfloat16 (1) or float16 (2) */
    int64_t sx_row, sx_col; /* strides in elements */
    const float *rot_t;     /* (D, D) R^T, contiguous */
    const float *bnd;       /* (2^bits - 1,) sorted */
    const float *cent;      /* (2^bits,) */
    uint8_t *codes;         /* row r at codes + r * sc_row, ceil(D/8) * bits bytes */
    int64_t sc_row;
    uint16_t *norms;        /* row r at norms[r * sn_row] (fp16 bits) */
    int64_t sn_row;
    int bits;
} EncKind;

static int encode_kind(const EncKind *k, int64_t n, int D, int dtype, int norm_corr) {
    if (D < 1 || D > TQ_ENC_MAXD || k->bits < 1 || k->bits > 8) return 1;
    const int nb = 1 << k->bits, W = (D + 7) / 8;
    float x[TQ_ENC_MAXD];
    uint8_t code[TQ_ENC_MAXD + 8];
    double acc[TQ_ENC_MAXD];
    for (int64_t r = 0; r < n; r++) {
        const char *row = (const char *)k->x;
        double ss = 0.0;
        for (int d = 0; d < D; d++) {
            int64_t off = r * k->sx_row + (int64_t)d * k->sx_col;
            float v = dtype == 0 ? ((const float *)row)[off]
                    : dtype == 1 ? tq_bf16_to_f32(((const uint16_t *)row)[off]) : tq_f16_to_f32(((const uint16_t *)row)[off]);
            x[d] = v;
            ss += (double)v * v;
        }
        float norm = (float)sqrt(ss);
        float nz = norm > 1e-30f ? norm : 1e-30f;
        for (int j = 0; j < D; j++) acc[j] = 0.0;
        for (int d = 0; d < D; d++) {  /* acc_j += x_d * R^T[d, j]: rows of R^T read in order */
            const float *rt = k->rot_t + (int64_t)d * D;
            double xd = x[d];
            for (int j = 0; j < D; j++) acc[j] += xd * rt[j];
        }
        double csq = 0.0;
        for (int j = 0; j < D; j++) {
            float y = (float)acc[j] / nz;
            int c = 0;
            for (int b = 0; b < nb - 1; b++) c += k->bnd[b] < y;
            code[j] = (uint8_t)c;
            double cv = k->cent[c];
            csq += cv * cv;
        }
        for (int j = D; j < W * 8; j++) code[j] = 0;
        uint8_t *out = k->codes + r * k->sc_row;
        if (k->bits == 8) {
            memcpy(out, code, (size_t)W * 8);
        } else {
            int shift = 0, off = 0;
            for (int w = 4; w >= 1; w >>= 1) {
                if (!(k->bits & w)) continue;
                const int per = 8 / w, mask = (1 << w) - 1;
                for (int i = 0; i < W * w; i++) {
                    int byte = 0;
                    for (int t = 0; t < per; t++) byte |= ((code[i * per + t] >> shift) & mask) << (w * t);
                    out[off + i] = (uint8_t)byte;
                }
                off += W * w;
                shift += w;
            }
        }
        float stored = norm_corr ? norm / (float)sqrt(csq) : norm;
        k->norms[r * k->sn_row] = tq_f32_to_f16(stored);
    }
    return 0;
}

/* Argument block: for each of `kinds` (1 or 2) kinds: 8 int64 (sx_row, sx_col, sc_row, sn_row, bits,
 * unused x3) then 6 addresses (x, rot_t, bnd, cent, codes, norms); before them n, D, dtype, norm_corr,
 * kinds. Returns 0, or 1 for bad arguments. */
int tq_encode_rows(const int64_t *a) {
    int64_t n = a[0];
    int D = (int)a[1], dtype = (int)a[2], norm_corr = (int)a[3], kinds = (int)a[4];
    if (n < 0 || kinds < 1 || kinds > 2 || dtype < 0 || dtype > 2) return 1;
    for (int i = 0; i < kinds; i++) {
        const int64_t *s = a + 5 + i * 14;
        EncKind k = {(const void *)(uintptr_t)s[8], s[0], s[1], (const float *)(uintptr_t)s[9],
                     (const float *)(uintptr_t)s[10], (const float *)(uintptr_t)s[11],
                     (uint8_t *)(uintptr_t)s[12], s[2], (uint16_t *)(uintptr_t)s[13], s[3], (int)s[4]};
        int rc = encode_kind(&k, n, D, dtype, norm_corr);
        if (rc) return rc;
    }
    return 0;
}
