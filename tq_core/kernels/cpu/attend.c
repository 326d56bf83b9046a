/* Attention over packed TurboQuant codes on the CPU, without decoding the history.
 *
 * A stored vector is packed b-bit codes + an fp16 norm s, decoded x = s * (c[code] @ R). The
 * caller rotates the query once (q_rot = q @ R_k^T), so a score is s_j * <q_rot, c_k[code_j]>,
 * and values are summed in V's rotated space: u = sum_j p_j s_j c_v[code_j] (the caller rotates
 * u back once). Per (batch, KV head) all G*Tq query rows share one pass over the codes, with an
 * online (running max) softmax in base 2 (scale * log2(e) is folded into the query).
 *
 * Loop per block of NB = 64 tokens: K stage (scores of every query row, norm applied); block
 * max and exp2 per row (vectorized polynomial, running max and sum); V stage (acc[row] += p * v).
 * With AVX-512 or AVX2 and bits 1-4 (head dim a multiple of 64) both stages are fused: 64 dims of
 * a token are decoded into registers and used at once; K keeps 4 rows x 2 tokens (AVX2: x 1) of
 * accumulators and reduces them with one transpose; V keeps 4 rows x 64 dims (AVX2: x 32) of
 * accumulators in registers across the block. Other widths and dims decode a token into an L1
 * buffer first (portable C with GCC/Clang vector extensions).
 *
 * Lane order. A code is expanded to a float lane without moving bits between lanes: for the
 * fast paths (head dim a multiple of 64, bits 1, 2, 3, 4, 8) the head dim is walked in groups of
 * 64 dims and lane p of the decoded buffer holds dim order[p], a fixed permutation per bit
 * width (4-bit: byte i of a 16-byte slice gives the even dim in its low nibble, the odd dim in
 * its high nibble; 2-bit / 1-bit / 3-bit: lane i of shift s holds dim 4i + s). A dot product
 * does not care about the order of its terms, so the query is permuted once per call (K's
 * order) and the accumulator is un-permuted once at the end (V's order). Lookups: AVX-512
 * vpermps (16-entry table in one register), AVX2 two vpermps + a blend on bit 3; bits 5-7 and
 * head dims not a multiple of 64 use a portable table decode in natural order; 8 bits a gather.
 *
 * Threads: work items are (batch, KV head, sequence split) pairs taken from a shared counter by
 * an OpenMP team when built with -fopenmp (on Linux the library's libgomp.so.1 is the one torch
 * loaded, so the team is torch's own pool, still spinning from the previous op), else by a
 * pthread fork/join per call. Splits are merged by log-sum-exp.
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors of static helpers: no ABI crosses a call */
#endif

#if defined(__AVX512F__)
#define TQ_ISA "avx512"
#define TQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define TQ_ISA "avx2"
#define TQ_AVX2 1
#else
#define TQ_ISA "generic"
#endif

#define TQ_ABI 4
#define NB 64   /* tokens per softmax block */
#define VT 4    /* value tokens accumulated per pass over a row's accumulator */
#define MAXD 4096

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static const double LOG2E = 1.4426950408889634074;
static const double LN2 = 0.6931471805599453094;

/* ------------------------------------------------------------------------------------------ */
/* fp16 -> fp32                                                                                 */

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; ++e; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* decoding one token's codes into centroids, in lane order                                    */

typedef struct Spec Spec;
typedef void (*decode_fn)(const Spec *, const uint8_t *, float *);

struct Spec {
    int bits, D, Dp, fast;
    decode_fn decode;
    float tbl[16] __attribute__((aligned(64)));  /* c[i mod 2^bits] (fast paths, bits <= 4) */
    const float *cent;                           /* 2^bits centroids */
    int nplanes, width[3];
    int32_t *order;                              /* (Dp,) dim held by lane p; >= D: padding */
};

/* Portable decode, natural order (lane p holds dim p): codes unpacked plane by plane into bytes
 * (loops the compiler vectorizes), then one table read per dim. */
static inline void unpack_plane(const uint8_t *restrict src, int nbytes, int w, int shift, uint8_t *restrict code) {
    switch (w) {
    case 8: for (int i = 0; i < nbytes; ++i) code[i] = src[i]; break;
    case 4:
        for (int i = 0; i < nbytes; ++i) {
            code[2 * i] |= (uint8_t)((src[i] & 15) << shift);
            code[2 * i + 1] |= (uint8_t)((src[i] >> 4) << shift);
        }
        break;
    case 2:
        for (int i = 0; i < nbytes; ++i)
            for (int k = 0; k < 4; ++k) code[4 * i + k] |= (uint8_t)(((src[i] >> (2 * k)) & 3) << shift);
        break;
    default:
        for (int i = 0; i < nbytes; ++i)
            for (int k = 0; k < 8; ++k) code[8 * i + k] |= (uint8_t)(((src[i] >> k) & 1) << shift);
    }
}

static void decode_generic(const Spec *s, const uint8_t *row, float *out) {
    const int m = (s->D + 7) / 8 * 8; /* padded code count: a plane of width w takes m*w/8 bytes */
    uint8_t code[MAXD];
    memset(code, 0, (size_t)m);
    for (int k = 0, start = 0, shift = 0; k < s->nplanes; ++k) {
        const int w = s->width[k];
        unpack_plane(row + start, m * w / 8, w, shift, code);
        start += m * w / 8;
        shift += w;
    }
    for (int p = 0; p < s->D; ++p) out[p] = s->cent[code[p]];
    for (int p = s->D; p < s->Dp; ++p) out[p] = 0.0f;
}

#if defined(TQ_AVX512)
static void decode4(const Spec *s, const uint8_t *row, float *out) {
    const __m512 t = _mm512_load_ps(s->tbl);
    for (int g = 0; g < s->D / 64; ++g, row += 32, out += 64) {
        __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16)));
        _mm512_store_ps(out, _mm512_permutexvar_ps(a, t)); /* vpermps reads index bits 0-3 only */
        _mm512_store_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), t));
        _mm512_store_ps(out + 32, _mm512_permutexvar_ps(b, t));
        _mm512_store_ps(out + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t));
    }
}

static void decode2(const Spec *s, const uint8_t *row, float *out) {
    const __m512 t = _mm512_load_ps(s->tbl); /* 4 entries repeated: bits above the code are ignored */
    for (int g = 0; g < s->D / 64; ++g, row += 16, out += 64) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
        _mm512_store_ps(out, _mm512_permutexvar_ps(x, t));
        _mm512_store_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(x, 2), t));
        _mm512_store_ps(out + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), t));
        _mm512_store_ps(out + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(x, 6), t));
    }
}

/* 1-bit plane in the 2-bit lane order: lane i of shift s is bit 4(i&1)+s of byte i>>1. */
static inline __m512i ones_plane(const uint8_t *p) {
    const __m512i sh = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), sh);
}

static void decode1(const Spec *s, const uint8_t *row, float *out) {
    const __m512 t = _mm512_load_ps(s->tbl);
    for (int g = 0; g < s->D / 64; ++g, row += 8, out += 64) {
        __m512i y = ones_plane(row);
        _mm512_store_ps(out, _mm512_permutexvar_ps(y, t));
        _mm512_store_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(y, 1), t));
        _mm512_store_ps(out + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(y, 2), t));
        _mm512_store_ps(out + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(y, 3), t));
    }
}

static void decode3(const Spec *s, const uint8_t *row, float *out) {
    const __m512 t = _mm512_load_ps(s->tbl); /* 8 entries repeated: bit 3 is ignored */
    const __m512i three = _mm512_set1_epi32(3);
    const uint8_t *ones = row + s->D / 4;
    for (int g = 0; g < s->D / 64; ++g, row += 16, ones += 8, out += 64) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
        __m512i y = _mm512_slli_epi32(ones_plane(ones), 2);
        /* code = (x >> 2s) & 3 | (y >> s) & ~3: bitwise select, 0xE4 = C ? A : B with C = 3 */
#define TQ_D3(k) _mm512_store_ps(out + 16 * k, _mm512_permutexvar_ps(_mm512_ternarylogic_epi32( \
            _mm512_srli_epi32(x, 2 * k), _mm512_srli_epi32(y, k), three, 0xE4), t))
        TQ_D3(0); TQ_D3(1); TQ_D3(2); TQ_D3(3);
#undef TQ_D3
    }
}

static void decode8(const Spec *s, const uint8_t *row, float *out) {
    for (int p = 0; p < s->D; p += 16) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + p)));
        _mm512_store_ps(out + p, _mm512_i32gather_ps(x, s->cent, 4));
    }
}
#elif defined(TQ_AVX2)
static inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static void decode4(const Spec *s, const uint8_t *row, float *out) {
    const __m256 lo = _mm256_load_ps(s->tbl), hi = _mm256_load_ps(s->tbl + 8);
    for (int g = 0; g < s->D / 64; ++g, row += 32, out += 64) {
        for (int h = 0; h < 2; ++h) {
            __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * h)));
            __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 16 + 8 * h)));
            _mm256_store_ps(out + 8 * h, lut16(a, lo, hi));
            _mm256_store_ps(out + 16 + 8 * h, lut16(_mm256_srli_epi32(a, 4), lo, hi));
            _mm256_store_ps(out + 32 + 8 * h, lut16(b, lo, hi));
            _mm256_store_ps(out + 48 + 8 * h, lut16(_mm256_srli_epi32(b, 4), lo, hi));
        }
    }
}

static void decode2(const Spec *s, const uint8_t *row, float *out) {
    const __m256 t = _mm256_load_ps(s->tbl);
    for (int g = 0; g < s->D / 64; ++g, row += 16, out += 64) {
        for (int h = 0; h < 2; ++h) {
            __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * h)));
            _mm256_store_ps(out + 8 * h, _mm256_permutevar8x32_ps(t, x));
            _mm256_store_ps(out + 16 + 8 * h, _mm256_permutevar8x32_ps(t, _mm256_srli_epi32(x, 2)));
            _mm256_store_ps(out + 32 + 8 * h, _mm256_permutevar8x32_ps(t, _mm256_srli_epi32(x, 4)));
            _mm256_store_ps(out + 48 + 8 * h, _mm256_permutevar8x32_ps(t, _mm256_srli_epi32(x, 6)));
        }
    }
}

static inline void ones_plane(const uint8_t *p, __m256i y[2]) {
    const __m256i sh = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    b = _mm_unpacklo_epi8(b, b);
    y[0] = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), sh);
    y[1] = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), sh);
}

static void decode1(const Spec *s, const uint8_t *row, float *out) {
    const __m256 t = _mm256_load_ps(s->tbl);
    for (int g = 0; g < s->D / 64; ++g, row += 8, out += 64) {
        __m256i y[2];
        ones_plane(row, y);
        for (int h = 0; h < 2; ++h)
            for (int k = 0; k < 4; ++k)
                _mm256_store_ps(out + 16 * k + 8 * h, _mm256_permutevar8x32_ps(t, _mm256_srli_epi32(y[h], k)));
    }
}

static void decode3(const Spec *s, const uint8_t *row, float *out) {
    const __m256 t = _mm256_load_ps(s->tbl);
    const __m256i three = _mm256_set1_epi32(3), four = _mm256_set1_epi32(4);
    const uint8_t *ones = row + s->D / 4;
    for (int g = 0; g < s->D / 64; ++g, row += 16, ones += 8, out += 64) {
        __m256i y[2];
        ones_plane(ones, y);
        for (int h = 0; h < 2; ++h) {
            __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * h)));
            __m256i y4 = _mm256_slli_epi32(y[h], 2);
            for (int k = 0; k < 4; ++k) {
                __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 2 * k), three),
                                            _mm256_and_si256(_mm256_srli_epi32(y4, k), four));
                _mm256_store_ps(out + 16 * k + 8 * h, _mm256_permutevar8x32_ps(t, c));
            }
        }
    }
}

static void decode8(const Spec *s, const uint8_t *row, float *out) {
    for (int p = 0; p < s->D; p += 8) {
        __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + p)));
        _mm256_store_ps(out + p, _mm256_i32gather_ps(s->cent, x, 4));
    }
}
#endif

#if defined(TQ_AVX512) || defined(TQ_AVX2)
#define TQ_FAST 1
#endif

/* Which dim lane p holds (lane order of the fast paths, or natural order). */
static int lane_dim(int bits, int fast, int p) {
    if (!fast || bits == 8 || bits > 4) return p;
    int g = p / 64, s = (p % 64) / 16, i = p % 16;
    if (bits == 4) return 64 * g + 32 * (s / 2) + 2 * i + (s % 2);
    return 64 * g + 4 * i + s; /* bits 1, 2, 3 */
}

static void spec_free(Spec *s) { free(s->order); }

static int spec_init(Spec *s, int bits, int D, const float *cent, int allow_fast) {
    memset(s, 0, sizeof *s);
    s->bits = bits;
    s->D = D;
    s->cent = cent;
#ifdef TQ_FAST
    s->fast = allow_fast && D % 64 == 0 && (bits <= 4 || bits == 8);
#else
    (void)allow_fast;
    s->fast = 0;
#endif
    s->Dp = s->fast ? D : (D + 15) / 16 * 16;
    if (bits == 8) { s->nplanes = 1; s->width[0] = 8; }
    else for (int w = 4; w >= 1; w /= 2) if (bits & w) s->width[s->nplanes++] = w;
    for (int i = 0; i < 16; ++i) s->tbl[i] = bits <= 4 ? cent[i % (1 << bits)] : 0.0f;
    s->order = malloc(sizeof(int32_t) * s->Dp);
    if (!s->order) return -1;
    for (int p = 0; p < s->Dp; ++p) s->order[p] = lane_dim(bits, s->fast, p);
    s->decode = decode_generic;
#ifdef TQ_FAST
    if (s->fast) {
        switch (bits) {
        case 1: s->decode = decode1; break;
        case 2: s->decode = decode2; break;
        case 3: s->decode = decode3; break;
        case 4: s->decode = decode4; break;
        case 8: s->decode = decode8; break;
        }
    }
#endif
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* vector helpers (GCC/Clang vector extensions: zmm with AVX-512, pairs of ymm with AVX2)        */

static inline __attribute__((always_inline)) float hsum(v16f v) {
#if defined(TQ_AVX512)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
#endif
}

/* 2^x for x <= 0 (scores minus the running max): degree-7 Taylor polynomial of 2^f on
 * |f| <= 1/2 (relative error < 1e-8 before rounding), exponent added in the bits. */
static inline __attribute__((always_inline)) v16f exp2v(v16f x) {
    const v16f lo = (v16f){} - 125.0f, magic = (v16f){} + 12582912.0f; /* 1.5 * 2^23 */
    v16i small = x < lo;
    x = (v16f)(((v16i)x & ~small) | ((v16i)lo & small));
    v16f t = x + magic;
    v16f r = t - magic;        /* round to nearest */
    v16i n = (v16i)t - (v16i)magic;
    v16f f = x - r;
    v16f p = (v16f){} + 1.525273380405984e-05f;
    p = p * f + 1.540353039338161e-04f;
    p = p * f + 1.333355814642844e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    p = p * f + 1.0f;
    return p * (v16f)((n + 127) << 23);
}

/* ------------------------------------------------------------------------------------------ */
/* the kernel                                                                                   */

typedef struct Job Job;
typedef struct Scratch Scratch;
/* K stage: S[r * NB + j] = score of token j0 + j for every row (base 2, norm applied), j < n.
 * V stage: acc[r] += sum_j P[r * NB + j] * c_v[code of token j0 + j] (P already holds the norm). */
typedef void (*kstage_fn)(const Job *, Scratch *, const uint8_t *, const uint16_t *, int64_t, int);
typedef void (*vstage_fn)(const Job *, Scratch *, const uint8_t *, int64_t, int);

struct Job {
    int B, Hkv, G, Tq, D, R, R4, nsplit;
    int64_t length, chunk;
    int nthreads;
    const float *q;
    int64_t qs[3];
    const uint8_t *kc, *vc;
    const uint16_t *kn, *vn;
    int64_t kcs[3], kns[3], vcs[3], vns[3];
    float *out, *lse;
    float qscale;
    Spec sk, sv;
    float *pm, *pl, *pacc; /* split partials: (items, R), (items, R), (items, R, Dpv) */
    kstage_fn kstage;
    vstage_fn vstage;
    int nitems;
    int next;  /* next work item (atomic) */
    int error;
};

struct Scratch {  /* per thread; rows padded to R4 (a multiple of 4) with zero queries */
    float *qs, *acc, *S, *kbuf, *vbuf, *m, *l, *vnorm;
    void *mem;
};

static int scratch_init(Scratch *w, const Job *J) {
    const size_t R = J->R4, Dk = J->sk.Dp, Dv = J->sv.Dp;
    size_t n = R * Dk + R * Dv + R * NB + Dk + VT * Dv + 2 * R + NB + 16 * 8;
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    w->mem = aligned_alloc(64, bytes);
    if (!w->mem) return -1;
    memset(w->mem, 0, bytes);
    float *p = w->mem;
#define TQ_TAKE(dst, cnt) do { dst = p; p += ((cnt) + 15) / 16 * 16; } while (0)
    TQ_TAKE(w->qs, R * Dk);
    TQ_TAKE(w->acc, R * Dv);
    TQ_TAKE(w->S, R * NB);
    TQ_TAKE(w->kbuf, Dk);
    TQ_TAKE(w->vbuf, VT * Dv);
    TQ_TAKE(w->m, R);
    TQ_TAKE(w->l, R);
    TQ_TAKE(w->vnorm, NB);
#undef TQ_TAKE
    return 0;
}

/* scores of one decoded key against all rows: S[r * NB + j] = <qs[r], kbuf> * norm */
static inline void score_rows(const float *restrict qs, const float *restrict kbuf, int R, int Dp,
                              float norm, float *restrict S, int j) {
    const v16f *k = (const v16f *)kbuf;
    const int C = Dp / 16;
    int r = 0;
    for (; r + 4 <= R; r += 4) {
        const v16f *q0 = (const v16f *)(qs + (size_t)r * Dp), *q1 = q0 + C, *q2 = q1 + C, *q3 = q2 + C;
        v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int c = 0; c < C; ++c) {
            v16f kv = k[c];
            a0 += q0[c] * kv; a1 += q1[c] * kv; a2 += q2[c] * kv; a3 += q3[c] * kv;
        }
        S[(r + 0) * NB + j] = hsum(a0) * norm;
        S[(r + 1) * NB + j] = hsum(a1) * norm;
        S[(r + 2) * NB + j] = hsum(a2) * norm;
        S[(r + 3) * NB + j] = hsum(a3) * norm;
    }
    for (; r < R; ++r) {
        const v16f *q0 = (const v16f *)(qs + (size_t)r * Dp);
        v16f a0 = {}, a1 = {};
        int c = 0;
        for (; c + 2 <= C; c += 2) { a0 += q0[c] * k[c]; a1 += q0[c + 1] * k[c + 1]; }
        if (c < C) a0 += q0[c] * k[c];
        S[r * NB + j] = hsum(a0 + a1) * norm;
    }
}

/* portable stages: one token's codes decoded into an L1 buffer, then all rows read it */
static void kstage_buffered(const Job *J, Scratch *w, const uint8_t *kc, const uint16_t *kn, int64_t j0, int n) {
    for (int j = 0; j < n; ++j) {
        J->sk.decode(&J->sk, kc + (j0 + j) * J->kcs[2], w->kbuf);
        score_rows(w->qs, w->kbuf, J->R, J->sk.Dp, h2f(kn[(j0 + j) * J->kns[2]]), w->S, j);
    }
}

static void vstage_buffered(const Job *J, Scratch *w, const uint8_t *vc, int64_t j0, int n) {
    const int Dv = J->sv.Dp, Cv = Dv / 16;
    for (int j = 0; j < n; j += VT) { /* VT tokens per pass over each row's accumulator */
        const int nt = n - j < VT ? n - j : VT;
        for (int u = 0; u < nt; ++u) J->sv.decode(&J->sv, vc + (j0 + j + u) * J->vcs[2], w->vbuf + u * Dv);
        const v16f *v0 = (const v16f *)w->vbuf, *v1 = v0 + Cv, *v2 = v1 + Cv, *v3 = v2 + Cv;
        for (int r = 0; r < J->R; ++r) {
            const float *p = w->S + r * NB + j; /* p[u] == 0 for u >= nt (cleared by the softmax) */
            const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
            v16f *a = (v16f *)(w->acc + (size_t)r * Dv);
            for (int c = 0; c < Cv; ++c) a[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c];
        }
    }
}

#ifdef TQ_FAST
/* Fused stages for bits 1-4 (head dim a multiple of 64): a "unit" of 4 vectors of a token's
 * 64-dim group g is decoded into registers and used at once (lane order as above: vector s of
 * unit h holds positions 64g + 16s + VW*h .. + VW-1). K: 4 rows x KTB tokens of accumulators,
 * each query vector read from L1 once per KTB tokens, one transpose-reduction per 4 x KTB
 * scores. V: 4 rows x VSP vectors of accumulators held in registers over the whole block of
 * tokens (no accumulator traffic per token). */
#define ALWAYS static inline __attribute__((always_inline))

#if defined(TQ_AVX512)
typedef __m512 vf;
#define VW 16
#define KTB 2
#define VSP 4
#define VLOAD _mm512_load_ps
#define VSTORE _mm512_store_ps
#define VFMA _mm512_fmadd_ps
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
typedef struct { __m512 t; } Lut;
ALWAYS Lut lut_load(const float *tbl) { Lut L = {_mm512_load_ps(tbl)}; return L; }
#define LOOK(L, idx) _mm512_permutexvar_ps((idx), (L).t) /* reads index bits 0-3 only */

ALWAYS __m512i cvt16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }

ALWAYS void unit4(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)h; (void)D;
    __m512i a = cvt16(row + 32 * g), b = cvt16(row + 32 * g + 16);
    v[0] = LOOK(L, a);
    v[1] = LOOK(L, _mm512_srli_epi32(a, 4));
    v[2] = LOOK(L, b);
    v[3] = LOOK(L, _mm512_srli_epi32(b, 4));
}

ALWAYS void unit2(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)h; (void)D;
    __m512i x = cvt16(row + 16 * g);
    for (int s = 0; s < 4; ++s) v[s] = LOOK(L, _mm512_srli_epi32(x, 2 * s));
}

ALWAYS void unit1(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)h; (void)D;
    __m512i y = ones_plane(row + 8 * g);
    for (int s = 0; s < 4; ++s) v[s] = LOOK(L, _mm512_srli_epi32(y, s));
}

ALWAYS void unit3(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)h;
    const __m512i three = _mm512_set1_epi32(3);
    __m512i x = cvt16(row + 16 * g);
    __m512i y = _mm512_slli_epi32(ones_plane(row + D / 4 + 8 * g), 2);
    for (int s = 0; s < 4; ++s)
        v[s] = LOOK(L, _mm512_ternarylogic_epi32(_mm512_srli_epi32(x, 2 * s), _mm512_srli_epi32(y, s), three, 0xE4));
}

/* out[i] = sum of the lanes of v[i], i < 8 */
ALWAYS void reduce_k(const vf v[8], float out[8]) {
    __m512 p[4];
    for (int i = 0; i < 4; ++i)
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    __m512 q0 = _mm512_add_ps(_mm512_shuffle_f32x4(p[0], p[1], 0x88), _mm512_shuffle_f32x4(p[0], p[1], 0xDD));
    __m512 q1 = _mm512_add_ps(_mm512_shuffle_f32x4(p[2], p[3], 0x88), _mm512_shuffle_f32x4(p[2], p[3], 0xDD));
    /* 128-bit lane k of q0 holds partial sums of v[k], of q1 those of v[4 + k] */
    __m512 z = _mm512_add_ps(_mm512_unpacklo_ps(q0, q1), _mm512_unpackhi_ps(q0, q1));
    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
    float tmp[16] __attribute__((aligned(64)));
    _mm512_store_ps(tmp, z);
    for (int k = 0; k < 4; ++k) { out[k] = tmp[4 * k]; out[4 + k] = tmp[4 * k + 1]; }
}
#else /* AVX2 */
typedef __m256 vf;
#define VW 8
#define KTB 1
#define VSP 2
#define VLOAD _mm256_load_ps
#define VSTORE _mm256_store_ps
#define VFMA _mm256_fmadd_ps
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
typedef struct { __m256 lo, hi; } Lut;
ALWAYS Lut lut_load(const float *tbl) { Lut L = {_mm256_load_ps(tbl), _mm256_load_ps(tbl + 8)}; return L; }
#define LOOK8(L, idx) _mm256_permutevar8x32_ps((L).lo, (idx)) /* bits <= 3: index bits 0-2 */

ALWAYS __m256i cvt8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

ALWAYS __m256i ones_half(const uint8_t *p, int h) {
    const __m256i sh = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    b = _mm_unpacklo_epi8(b, b);
    if (h) b = _mm_srli_si128(b, 8);
    return _mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), sh);
}

ALWAYS void unit4(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)D;
    __m256i a = cvt8(row + 32 * g + 8 * h), b = cvt8(row + 32 * g + 16 + 8 * h);
    v[0] = lut16(a, L.lo, L.hi);
    v[1] = lut16(_mm256_srli_epi32(a, 4), L.lo, L.hi);
    v[2] = lut16(b, L.lo, L.hi);
    v[3] = lut16(_mm256_srli_epi32(b, 4), L.lo, L.hi);
}

ALWAYS void unit2(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)D;
    __m256i x = cvt8(row + 16 * g + 8 * h);
    for (int s = 0; s < 4; ++s) v[s] = LOOK8(L, _mm256_srli_epi32(x, 2 * s));
}

ALWAYS void unit1(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    (void)D;
    __m256i y = ones_half(row + 8 * g, h);
    for (int s = 0; s < 4; ++s) v[s] = LOOK8(L, _mm256_srli_epi32(y, s));
}

ALWAYS void unit3(const uint8_t *row, int g, int h, int D, Lut L, vf v[4]) {
    const __m256i three = _mm256_set1_epi32(3), four = _mm256_set1_epi32(4);
    __m256i x = cvt8(row + 16 * g + 8 * h);
    __m256i y = _mm256_slli_epi32(ones_half(row + D / 4 + 8 * g, h), 2);
    for (int s = 0; s < 4; ++s)
        v[s] = LOOK8(L, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 2 * s), three),
                                        _mm256_and_si256(_mm256_srli_epi32(y, s), four)));
}

/* out[i] = sum of the lanes of v[i], i < 4 */
ALWAYS void reduce_k(const vf v[4], float out[4]) {
    __m256 ab = _mm256_hadd_ps(v[0], v[1]), cd = _mm256_hadd_ps(v[2], v[3]);
    __m256 x = _mm256_hadd_ps(ab, cd); /* per 128-bit half: a, b, c, d partial sums */
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
}
#endif

#define UNITS (16 / VW) /* units per 64-dim group */

#define TQ_FUSED_STAGES(B)                                                                           \
static void kstage##B(const Job *J, Scratch *w, const uint8_t *kc, const uint16_t *kn, int64_t j0, int n) { \
    const Lut L = lut_load(J->sk.tbl);                                                               \
    const int Dp = J->sk.Dp, NG = Dp / 64, D = J->D;                                                 \
    const int64_t st = J->kcs[2];                                                                    \
    for (int j = 0; j < n; j += KTB) {                                                               \
        const uint8_t *rows[KTB];                                                                    \
        float nrm[KTB];                                                                              \
        for (int u = 0; u < KTB; ++u) {                                                              \
            const int64_t jj = j0 + (j + u < n ? j + u : n - 1); /* past the end: repeat, unused */   \
            rows[u] = kc + jj * st;                                                                  \
            nrm[u] = h2f(kn[jj * J->kns[2]]);                                                        \
        }                                                                                            \
        for (int rb = 0; rb < J->R4; rb += 4) {                                                      \
            const float *q = w->qs + (size_t)rb * Dp;                                                \
            vf acc[4 * KTB];                                                                         \
            for (int i = 0; i < 4 * KTB; ++i) acc[i] = VZERO();                                      \
            for (int g = 0; g < NG; ++g)                                                             \
                for (int h = 0; h < UNITS; ++h) {                                                    \
                    vf v[KTB][4];                                                                    \
                    for (int u = 0; u < KTB; ++u) unit##B(rows[u], g, h, D, L, v[u]);                \
                    for (int s = 0; s < 4; ++s)                                                      \
                        for (int r = 0; r < 4; ++r) {                                                \
                            const vf qv = VLOAD(q + (size_t)r * Dp + 64 * g + 16 * s + VW * h);      \
                            for (int u = 0; u < KTB; ++u)                                            \
                                acc[KTB * r + u] = VFMA(qv, v[u][s], acc[KTB * r + u]);              \
                        }                                                                            \
                }                                                                                    \
            float sums[4 * KTB];                                                                     \
            reduce_k(acc, sums);                                                                     \
            for (int r = 0; r < 4; ++r)                                                              \
                for (int u = 0; u < KTB; ++u)                                                        \
                    if (j + u < n) w->S[(rb + r) * NB + j + u] = sums[KTB * r + u] * nrm[u];         \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
static void vstage##B(const Job *J, Scratch *w, const uint8_t *vc, int64_t j0, int n) {             \
    const Lut L = lut_load(J->sv.tbl);                                                               \
    const int Dp = J->sv.Dp, NG = Dp / 64, D = J->D;                                                 \
    const int64_t st = J->vcs[2];                                                                    \
    for (int rb = 0; rb < J->R4; rb += 4)                                                            \
        for (int g = 0; g < NG; ++g)                                                                 \
            for (int h = 0; h < UNITS; ++h)                                                          \
                for (int s0 = 0; s0 < 4; s0 += VSP) {                                                \
                    float *a = w->acc + (size_t)rb * Dp + 64 * g + VW * h + 16 * s0;                 \
                    const float *P = w->S + rb * NB;                                                 \
                    vf acc[4 * VSP];                                                                 \
                    for (int r = 0; r < 4; ++r)                                                      \
                        for (int s = 0; s < VSP; ++s) acc[VSP * r + s] = VLOAD(a + (size_t)r * Dp + 16 * s); \
                    const uint8_t *row = vc + j0 * st;                                               \
                    for (int j = 0; j < n; ++j, row += st) {                                         \
                        vf v[4];                                                                     \
                        unit##B(row, g, h, D, L, v);                                                 \
                        for (int r = 0; r < 4; ++r) {                                                \
                            const vf p = VSET1(P[r * NB + j]);                                       \
                            for (int s = 0; s < VSP; ++s)                                            \
                                acc[VSP * r + s] = VFMA(p, v[s0 + s], acc[VSP * r + s]);             \
                        }                                                                            \
                    }                                                                                \
                    for (int r = 0; r < 4; ++r)                                                      \
                        for (int s = 0; s < VSP; ++s) VSTORE(a + (size_t)r * Dp + 16 * s, acc[VSP * r + s]); \
                }                                                                                    \
}

TQ_FUSED_STAGES(1)
TQ_FUSED_STAGES(2)
TQ_FUSED_STAGES(3)
TQ_FUSED_STAGES(4)
#undef TQ_FUSED_STAGES

static const kstage_fn KSTAGE[5] = {0, kstage1, kstage2, kstage3, kstage4};
static const vstage_fn VSTAGE[5] = {0, vstage1, vstage2, vstage3, vstage4};
#endif

/* Online softmax over tokens [t0, t1) of (b, h): running max m, sum l and acc per row (lane order). */
static void attend_range(const Job *J, Scratch *w, int b, int h, int64_t t0, int64_t t1) {
    const int R = J->R, Dv = J->sv.Dp, Cv = Dv / 16;
    const uint8_t *kc = J->kc + b * J->kcs[0] + h * J->kcs[1];
    const uint8_t *vc = J->vc + b * J->vcs[0] + h * J->vcs[1];
    const uint16_t *kn = J->kn + b * J->kns[0] + h * J->kns[1];
    const uint16_t *vn = J->vn + b * J->vns[0] + h * J->vns[1];
    float *S = w->S;
    for (int r = 0; r < R; ++r) { w->m[r] = -INFINITY; w->l[r] = 0.0f; }
    memset(w->acc, 0, sizeof(float) * (size_t)J->R4 * Dv);
    memset(S, 0, sizeof(float) * (size_t)J->R4 * NB); /* padded rows stay 0: no weight */

    for (int64_t j0 = t0; j0 < t1; j0 += NB) {
        const int n = (int)(t1 - j0 < NB ? t1 - j0 : NB);
        J->kstage(J, w, kc, kn, j0, n);
        for (int j = 0; j < n; ++j) w->vnorm[j] = h2f(vn[(j0 + j) * J->vns[2]]);
        for (int j = n; j < NB; ++j) w->vnorm[j] = 0.0f;
        /* softmax block: P = 2^(S - m) * vnorm (S is overwritten by P) */
        for (int r = 0; r < R; ++r) {
            float *s = S + r * NB;
            float bm = s[0];
            for (int j = 1; j < n; ++j) bm = s[j] > bm ? s[j] : bm;
            if (bm > w->m[r]) {
                const float alpha = w->m[r] == -INFINITY ? 0.0f : exp2f(w->m[r] - bm);
                v16f *a = (v16f *)(w->acc + (size_t)r * Dv);
                for (int c = 0; c < Cv; ++c) a[c] *= alpha;
                w->l[r] *= alpha;
                w->m[r] = bm;
            }
            const float m = w->m[r];
            const int nc = (n + 15) / 16;
            for (int c = 0; c < nc; ++c) ((v16f *)s)[c] = exp2v(((v16f *)s)[c] - m);
            for (int j = n; j < NB; ++j) s[j] = 0.0f; /* padding: no weight, no value */
            v16f sum = {};
            for (int c = 0; c < nc; ++c) {
                sum += ((v16f *)s)[c];
                ((v16f *)s)[c] *= ((const v16f *)w->vnorm)[c];
            }
            w->l[r] += hsum(sum);
        }
        J->vstage(J, w, vc, j0, n);
    }
}

/* normalize one row: out[order[p]] = acc[p] / l, lse = (m + log2 l) ln 2 */
static void finish_row(const Job *J, const float *acc, float m, float l, float *o, float *lse) {
    const Spec *sv = &J->sv;
    if (l == 0.0f) { /* nothing attended (length 0) */
        memset(o, 0, sizeof(float) * J->D);
        *lse = -INFINITY;
        return;
    }
    const float inv = 1.0f / l;
    for (int p = 0; p < sv->Dp; ++p)
        if (sv->order[p] < J->D) o[sv->order[p]] = acc[p] * inv;
    *lse = (float)(((double)m + log2((double)l)) * LN2);
}

static void run_item(Job *J, Scratch *w, int item) {
    const int bh = item / J->nsplit, split = item % J->nsplit;
    const int b = bh / J->Hkv, h = bh % J->Hkv, R = J->R, G = J->G, Tq = J->Tq;
    const int Dk = J->sk.Dp, Dv = J->sv.Dp;
    const int64_t t0 = split * J->chunk, t1 = t0 + J->chunk < J->length ? t0 + J->chunk : J->length;
    /* query rows r = g * Tq + t of query head h * G + g, scaled and put in K's lane order */
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < Tq; ++t) {
            const float *q = J->q + b * J->qs[0] + (int64_t)(h * G + g) * J->qs[1] + t * J->qs[2];
            float *dst = w->qs + (size_t)(g * Tq + t) * Dk;
            for (int p = 0; p < Dk; ++p) {
                const int d = J->sk.order[p];
                dst[p] = d < J->D ? q[d] * J->qscale : 0.0f;
            }
        }
    if (t1 > t0) attend_range(J, w, b, h, t0, t1);
    else for (int r = 0; r < R; ++r) { w->m[r] = -INFINITY; w->l[r] = 0.0f; memset(w->acc + (size_t)r * Dv, 0, sizeof(float) * Dv); }
    if (J->nsplit == 1) {
        for (int r = 0; r < R; ++r) {
            const int g = r / Tq, t = r % Tq;
            const int64_t row = ((int64_t)(b * J->Hkv + h) * G + g) * Tq + t;
            finish_row(J, w->acc + (size_t)r * Dv, w->m[r], w->l[r], J->out + row * J->D, J->lse + row);
        }
    } else {
        memcpy(J->pm + (size_t)item * R, w->m, sizeof(float) * R);
        memcpy(J->pl + (size_t)item * R, w->l, sizeof(float) * R);
        memcpy(J->pacc + (size_t)item * R * Dv, w->acc, sizeof(float) * R * Dv);
    }
}

static void *worker(void *arg) {
    Job *J = arg;
    Scratch w;
    if (scratch_init(&w, J)) { __atomic_store_n(&J->error, 1, __ATOMIC_RELAXED); return NULL; }
    for (;;) {
        int item = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (item >= J->nitems) break;
        run_item(J, &w, item);
    }
    free(w.mem);
    return NULL;
}

/* merge the splits of one (b, h) by log-sum-exp */
static int merge_splits(Job *J) {
    const int R = J->R, Dv = J->sv.Dp, S = J->nsplit;
    float *acc = aligned_alloc(64, ((sizeof(float) * Dv + 63) / 64) * 64);
    if (!acc) return -1;
    for (int bh = 0; bh < J->B * J->Hkv; ++bh)
        for (int r = 0; r < R; ++r) {
            float m = -INFINITY, l = 0.0f;
            for (int s = 0; s < S; ++s) {
                const float ms = J->pm[(size_t)(bh * S + s) * R + r];
                m = ms > m ? ms : m;
            }
            memset(acc, 0, sizeof(float) * Dv);
            if (m > -INFINITY) {
                for (int s = 0; s < S; ++s) {
                    const size_t it = (size_t)(bh * S + s) * R + r;
                    if (J->pm[it] == -INFINITY) continue;
                    const float wgt = exp2f(J->pm[it] - m);
                    l += J->pl[it] * wgt;
                    const float *a = J->pacc + it * Dv;
                    for (int p = 0; p < Dv; ++p) acc[p] += a[p] * wgt;
                }
            }
            const int g = r / J->Tq, t = r % J->Tq;
            const int64_t row = ((int64_t)bh * J->G + g) * J->Tq + t;
            finish_row(J, acc, m, l, J->out + row * J->D, J->lse + row);
        }
    free(acc);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                                 */

int tq_abi(void) { return TQ_ABI; }
const char *tq_isa(void) { return TQ_ISA; }
#ifdef _OPENMP
int tq_openmp(void) { return 1; }
#else
int tq_openmp(void) { return 0; }
#endif

/* ip[0:25]: B, Hkv, G, Tq, D, bits_k, bits_v, length, nthreads, flags (1: vector decoders allowed,
 *     2: use exactly nthreads threads, no minimum work per thread),
 *     q strides (b, h, t), k_codes (b, h, t), k_norms (b, h, t), v_codes, v_norms  [elements];
 * ip[25:34]: addresses of q, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids,
 *     out (B, Hq, Tq, D) and lse (B, Hq, Tq), both contiguous.
 * Returns 0, or 1 (bad arguments), 2 (out of memory). */
int tq_attend_codes(const int64_t *ip, double scale) {
    void *ptr[9];
    for (int i = 0; i < 9; ++i) ptr[i] = (void *)(uintptr_t)ip[25 + i];
    Job J;
    memset(&J, 0, sizeof J);
    J.B = (int)ip[0]; J.Hkv = (int)ip[1]; J.G = (int)ip[2]; J.Tq = (int)ip[3]; J.D = (int)ip[4];
    const int bits_k = (int)ip[5], bits_v = (int)ip[6];
    J.length = ip[7];
    int nthreads = (int)ip[8];
    const int allow_fast = (int)(ip[9] & 1), exact_threads = (int)((ip[9] >> 1) & 1);
    for (int i = 0; i < 3; ++i) {
        J.qs[i] = ip[10 + i]; J.kcs[i] = ip[13 + i]; J.kns[i] = ip[16 + i];
        J.vcs[i] = ip[19 + i]; J.vns[i] = ip[22 + i];
    }
    if (J.B < 1 || J.Hkv < 1 || J.G < 1 || J.Tq < 1 || J.D < 1 || J.D > MAXD || J.length < 0 ||
        bits_k < 1 || bits_k > 8 || bits_v < 1 || bits_v > 8)
        return 1;
    J.q = ptr[0]; J.kc = ptr[1]; J.kn = ptr[2]; J.vc = ptr[3]; J.vn = ptr[4];
    J.out = ptr[7]; J.lse = ptr[8];
    J.R = J.G * J.Tq;
    J.R4 = (J.R + 3) / 4 * 4;
    J.qscale = (float)(scale * LOG2E);
    int rc = 0;
    if (spec_init(&J.sk, bits_k, J.D, ptr[5], allow_fast) || spec_init(&J.sv, bits_v, J.D, ptr[6], allow_fast)) {
        rc = 2;
        goto done;
    }
    J.kstage = kstage_buffered;
    J.vstage = vstage_buffered;
#ifdef TQ_FAST
    if (J.sk.fast && bits_k <= 4) J.kstage = KSTAGE[bits_k];
    if (J.sv.fast && bits_v <= 4) J.vstage = VSTAGE[bits_v];
#endif
    /* Work split: (b, h) pairs, and the sequence too when there are fewer pairs than threads
     * can balance (each split keeps >= 512 tokens: a split costs a partial merge). */
    const int BH = J.B * J.Hkv;
    if (nthreads < 1) nthreads = 1;
    int64_t max_split = J.length / 512 > 1 ? J.length / 512 : 1;
    int64_t nsplit = 1;
    if (nthreads > 1 && BH % nthreads) nsplit = (4 * nthreads + BH - 1) / BH;
    if (nsplit > max_split) nsplit = max_split;
    if (nsplit > 256) nsplit = 256;
    J.chunk = (J.length + nsplit - 1) / nsplit;
    J.chunk = (J.chunk + NB - 1) / NB * NB;
    if (J.chunk < 1) J.chunk = NB;
    J.nsplit = (int)((J.length + J.chunk - 1) / J.chunk);
    if (J.nsplit < 1) J.nsplit = 1;
    J.nitems = BH * J.nsplit;
    if (nthreads > J.nitems) nthreads = J.nitems;
    /* A thread costs ~20-50 us to start, and right after a torch op its OpenMP workers still spin
     * on the other cores: give each thread >= 16384 (token, KV head) pairs (~0.5 ms of work). */
    const int64_t work = (int64_t)BH * J.length / 16384;
    if (!exact_threads && nthreads > work) nthreads = work > 1 ? (int)work : 1;
    if (J.nsplit > 1) {
        const size_t items = (size_t)J.nitems, R = J.R, Dv = J.sv.Dp;
        J.pm = malloc(sizeof(float) * items * R);
        J.pl = malloc(sizeof(float) * items * R);
        J.pacc = malloc(sizeof(float) * items * R * Dv);
        if (!J.pm || !J.pl || !J.pacc) { rc = 2; goto done; }
    }
    if (nthreads > 256) nthreads = 256;
    if (nthreads == 1) {
        worker(&J);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
        worker(&J);
#else
        pthread_t tid[256];
        int started = 0;
        for (int i = 1; i < nthreads; ++i) {
            if (pthread_create(&tid[started], NULL, worker, &J)) break; /* fewer threads: still correct */
            ++started;
        }
        worker(&J);
        for (int i = 0; i < started; ++i) pthread_join(tid[i], NULL);
#endif
    }
    if (J.error) { rc = 2; goto done; }
    if (J.nsplit > 1 && merge_splits(&J)) rc = 2;
done:
    free(J.pm); free(J.pl); free(J.pacc);
    spec_free(&J.sk);
    spec_free(&J.sv);
    return rc;
}
