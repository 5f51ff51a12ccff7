/* Veil: i.i.d. standard normal float32 values, scaled by std, from a 64-bit seed.
 *
 * Random bits: Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2,
 * 3", SC 2011), a counter-based generator: block j of a fill is Philox(key = seed, counter = j), four
 * 32-bit words. Normals: the Box-Muller transform of two words at a time,
 *   z0 = r cos θ, z1 = r sin θ,  r = sqrt(-2 ln u1),  θ = 2π u2,
 * with u1 = (w + 1/2) 2^-32 in (0, 1) (the largest |z| is 6.7) and u2 = (w >> 8) 2^-24 in [0, 1).
 * ln, sin and cos are computed here (relative error below 1e-7 before float32 rounding) so the loops
 * vectorise without libm's vector variants or -ffast-math.
 *
 * Work is done in chunks of CH blocks, structure of arrays: the chunk's four outputs per block go to
 * four quarters of the chunk. A fill of n values is fully determined by (seed, n).
 */
#include <stdint.h>
#include <string.h>

#define CH 256

static inline void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[1] = (uint32_t)p1;
        c[3] = (uint32_t)p0;
        c[0] = n0;
        c[2] = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

static inline float ln_(float u) { /* u > 0, finite */
    int32_t bits;
    memcpy(&bits, &u, 4);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mb = (bits & 0x7fffff) | 0x3f800000;
    float m;
    memcpy(&m, &mb, 4);                       /* u = m 2^e, m in [1, 2) */
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;                   /* m in [1/sqrt2, sqrt2) */
    float ef = (float)(e + big);
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;  /* ln m = 2 atanh s, |s| <= 0.172 */
    float p = 2.0f * s * (1.0f + s2 * (0.333333343f + s2 * (0.2f + s2 * (0.142857149f + s2 * 0.111111112f))));
    return p + ef * 0.693147182f;
}

/* sin and cos of 2π v for v in [0, 1) */
static inline void sincos2pi(float v, float* sn, float* cs) {
    float q = __builtin_floorf(4.0f * v + 0.5f);          /* quadrant 0..4 */
    float r = 6.28318531f * (v - 0.25f * q);               /* in [-π/4, π/4] */
    float r2 = r * r;
    float s = r * (1.0f + r2 * (-0.166666672f + r2 * (0.00833333377f + r2 * (-0.000198412701f + r2 * 2.75573188e-6f))));
    float c = 1.0f + r2 * (-0.5f + r2 * (0.0416666679f + r2 * (-0.00138888892f + r2 * 2.48015876e-5f)));
    int32_t k = (int32_t)q & 3;
    float s1 = (k == 0) ? s : (k == 1) ? c : (k == 2) ? -s : -c;
    float c1 = (k == 0) ? c : (k == 1) ? -s : (k == 2) ? -c : s;
    *sn = s1;
    *cs = c1;
}

static void chunk(float* restrict out, uint64_t first_block, uint32_t k0, uint32_t k1, float std) {
    uint32_t w[4][CH];
    for (int j = 0; j < CH; j++) {
        uint64_t b = first_block + (uint64_t)j;
        uint32_t c[4] = {(uint32_t)b, (uint32_t)(b >> 32), 0u, 0u};
        philox(c, k0, k1);
        w[0][j] = c[0]; w[1][j] = c[1]; w[2][j] = c[2]; w[3][j] = c[3];
    }
    for (int h = 0; h < 2; h++) {
        const uint32_t* a = w[2 * h];
        const uint32_t* b = w[2 * h + 1];
        float* o0 = out + (2 * h) * CH;
        float* o1 = out + (2 * h + 1) * CH;
        for (int j = 0; j < CH; j++) {
            float u1 = ((float)a[j] + 0.5f) * 2.32830644e-10f;
            float u2 = (float)(b[j] >> 8) * 5.96046448e-8f;
            float r = std * __builtin_sqrtf(-2.0f * ln_(u1));
            float sn, cs;
            sincos2pi(u2, &sn, &cs);
            o0[j] = r * cs;
            o1[j] = r * sn;
        }
    }
}

/* out[0..n) = std * N(0, 1), a function of (seed, n) only. */
void gaussian_fill(float* out, int64_t n, uint64_t seed, float std) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t per = 4 * CH, full = n / per;
    for (int64_t i = 0; i < full; i++) chunk(out + i * per, (uint64_t)i * CH, k0, k1, std);
    int64_t rest = n - full * per;
    if (rest) {
        float tmp[4 * CH];
        chunk(tmp, (uint64_t)full * CH, k0, k1, std);
        memcpy(out + full * per, tmp, (size_t)rest * sizeof(float));
    }
}
