/* 16-bit floats <-> float32 for the CPU kernels: float16 and bfloat16 bits, round to nearest even. */
#ifndef TQ_HALF_H
#define TQ_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float tq_f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f);  /* subnormal: m * 2^-24, exact */
        memcpy(&x, &f, 4);
        x |= s;
    } else if (e == 31) {
        x = s | 0x7f800000u | (m << 13);
    } else {
        x = s | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &x, 4);
    return f;
}

static inline float tq_bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* float -> float16 bits, nearest even (as torch's .to(float16)); inf beyond the range, NaN kept. */
static inline uint16_t tq_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* >= 65520: rounds to inf */
    if (a < 0x38800000u) {                                     /* below 2^-14: subnormal or zero */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)rintf(v * 16777216.0f));  /* units of 2^-24, ties to even */
    }
    uint32_t h = ((((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13)), rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;  /* a carry moves the exponent, as it should */
    return (uint16_t)(sign | h);
}

/* float -> bfloat16 bits, nearest even (as torch's .to(bfloat16)); NaN kept. */
static inline uint16_t tq_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

#endif
