/* Veil: the pointwise work of one LSTM time step, forward and backward, for float32 buffers.
 *
 * Called once per step from veil/layers/_recurrence.py through ctypes (see veil/utils/native.py). Rows are
 * samples; each buffer has its own row stride (in floats), so the batch-major [B, T, .] buffers are
 * read and written in place. Gate order is PyTorch's: i, f, g, o.
 *
 * exp is computed here (range reduction to r in [-ln2/2, ln2/2], degree-6 Taylor polynomial, relative
 * error ~2e-7) so that the loops vectorise without libm's vector variants or -ffast-math;
 * tanh(x) = 2 sigmoid(2x) - 1. Inputs are clamped to exp's finite range by comparisons that keep NaN.
 */
#include <stdint.h>

#define R restrict
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = __builtin_floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (0.00833333377f + r * 0.00138888892f)))));
    int32_t i = ((int32_t)n + 127) << 23;
    float s;
    __builtin_memcpy(&s, &i, 4);
    return p * s;
}
static inline float vsig(float x) { return 1.0f / (1.0f + vexp(-x)); }
static inline float vtanh(float x) { return 2.0f / (1.0f + vexp(-2.0f * x)) - 1.0f; }

static void gates_fwd(int64_t H, const float* R w, const float* R bh, const float* R x, float* R z, float* R a) {
    if (bh) for (int64_t j = 0; j < 4 * H; j++) z[j] = w[j] + bh[j];
    else for (int64_t j = 0; j < 4 * H; j++) z[j] = w[j];
    for (int64_t j = 0; j < 2 * H; j++) a[j] = vsig(x[j] + z[j]);
    for (int64_t j = 2 * H; j < 3 * H; j++) a[j] = vtanh(x[j] + z[j]);
    for (int64_t j = 3 * H; j < 4 * H; j++) a[j] = vsig(x[j] + z[j]);
}

static void cell_fwd(int64_t H, const float* R a, const float* R cp, float* R c, float* R tc, float* R h) {
    for (int64_t k = 0; k < H; k++) {
        float cn = a[H + k] * cp[k] + a[k] * a[2 * H + k];
        float t = vtanh(cn);
        c[k] = cn;
        tc[k] = t;
        h[k] = a[3 * H + k] * t;
    }
}

/* A layer-direction's buffers, set up once per scan (an int64 array on the Python side; pointers as
 * addresses). Sequence buffers are batch-major: x, z, acts, dG [B, T, 4H]; c, tc, out, dout [B, T, H];
 * mask [T, B] bytes (0: the sample has ended) or 0; h0, c0, dh, dc dense [B, H]; bh [4H] or 0. */
typedef struct {
    int64_t B, H, T, reverse;
    int64_t x, bh, h0, c0, z, acts, c, tc, out, mask, dout, dh, dc, dG;
} lstm_ctx;

#define F32(a) ((float*)(intptr_t)(a))
#define U8(a) ((const uint8_t*)(intptr_t)(a))

/* One forward step t. hw = h_prev W_hhᵀ ([B, 4H], dense). Writes z = hw + b_hh, acts = σ(i), σ(f),
 * tanh(g), σ(o) of x + z, the cell state c, tc = tanh(c) and the output h. A sample whose mask byte is
 * 0 has ended: it keeps c_prev and h_prev. */
void lstm_fwd_step(const lstm_ctx* s, int64_t t, const float* hw) {
    const int64_t B = s->B, H = s->H, T = s->T, G = 4 * H;
    const int64_t prev = s->reverse ? t + 1 : t - 1;
    const int first = prev < 0 || prev >= T;
    const float* cp = first ? F32(s->c0) : F32(s->c) + prev * H;
    const float* hp = first ? F32(s->h0) : F32(s->out) + prev * H;
    const int64_t sp = first ? H : T * H;
    const uint8_t* mask = s->mask ? U8(s->mask) + t * B : 0;
    for (int64_t b = 0; b < B; b++) {
        float* a = F32(s->acts) + b * T * G + t * G;
        float* c = F32(s->c) + b * T * H + t * H;
        float* h = F32(s->out) + b * T * H + t * H;
        gates_fwd(H, hw + b * G, s->bh ? F32(s->bh) : 0, F32(s->x) + b * T * G + t * G, F32(s->z) + b * T * G + t * G, a);
        cell_fwd(H, a, cp + b * sp, c, F32(s->tc) + b * T * H + t * H, h);
        if (mask && !mask[b]) {
            for (int64_t k = 0; k < H; k++) { c[k] = cp[b * sp + k]; h[k] = hp[b * sp + k]; }
        }
    }
}

static void cell_bwd(int64_t H, const float* R a, const float* R cp, const float* R tc, const float* R dh,
                     float* R dc, float* R d) {
    for (int64_t k = 0; k < H; k++) {
        float i = a[k], f = a[H + k], g = a[2 * H + k], o = a[3 * H + k], t = tc[k], x = dh[k];
        float dcv = dc[k] + x * o * (1.0f - t * t);
        d[k] = dcv * g * i * (1.0f - i);
        d[H + k] = dcv * cp[k] * f * (1.0f - f);
        d[2 * H + k] = dcv * i * (1.0f - g * g);
        d[3 * H + k] = x * t * o * (1.0f - o);
        dc[k] = dcv * f;
    }
}

static void dh_next(int64_t H, const float* R dout, const float* R gw, float* R dh, int carry) {
    if (carry) for (int64_t k = 0; k < H; k++) dh[k] += dout[k] + gw[k];
    else for (int64_t k = 0; k < H; k++) dh[k] = dout[k] + gw[k];
}

/* One backward step t (steps are processed in the reverse of the scan's order). dh holds the gradient
 * reaching h at the previously processed step; unless gw is 0 (the first processed step, dh already
 * set), it becomes dout_t + gw (gw = dG_next W_hh, dense [B, H]) plus the old dh for a sample that was
 * masked at the previously processed step. Then this step's dc and dG (the gates' pre-activation
 * gradients); a sample masked at step t gets dG = 0 and passes dc and dh through unchanged. */
void lstm_bwd_step(const lstm_ctx* s, int64_t t, const float* gw) {
    const int64_t B = s->B, H = s->H, T = s->T, G = 4 * H;
    const int64_t prev = s->reverse ? t + 1 : t - 1, later = s->reverse ? t - 1 : t + 1;
    const int first = prev < 0 || prev >= T;
    const float* cp = first ? F32(s->c0) : F32(s->c) + prev * H;
    const int64_t sp = first ? H : T * H;
    const uint8_t* mcur = s->mask ? U8(s->mask) + t * B : 0;
    const uint8_t* mlater = (s->mask && gw) ? U8(s->mask) + later * B : 0;
    for (int64_t b = 0; b < B; b++) {
        float* dh = F32(s->dh) + b * H;
        if (gw) dh_next(H, F32(s->dout) + b * T * H + t * H, gw + b * H, dh, mlater && !mlater[b]);
        float* d = F32(s->dG) + b * T * G + t * G;
        if (mcur && !mcur[b]) { for (int64_t j = 0; j < G; j++) d[j] = 0.0f; continue; }
        cell_bwd(H, F32(s->acts) + b * T * G + t * G, cp + b * sp, F32(s->tc) + b * T * H + t * H, dh,
                 F32(s->dc) + b * H, d);
    }
}
