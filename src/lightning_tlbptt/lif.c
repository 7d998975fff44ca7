/* The LIF family's step loops in C: lightning_tlbptt.neurons.LIFFunction, one pass over memory per step.
 *
 * Compiled at first use by lightning_tlbptt.native with the system's C compiler and loaded with ctypes. Every
 * float operation of the forward is the one the torch path runs (and SpikingJelly's reference loops,
 * spikingjelly._ops.{if_,lif,plif}), in the same order and in float32, so spikes and voltages are bit-identical to
 * them: the file must be compiled without -ffast-math and with -ffp-contract=off (no fused multiply-add).
 * -fno-trapping-math (floating-point exceptions are not observed; no value changes) lets the compiler vectorize
 * loops with selects, such as the clamp in exp_vectorizable.
 *
 * Neurons (charge): IF h = v + x; LIF h = v + (x - (v - v_reset)) / tau, or without decay_input
 * h = v - (v - v_reset) / tau + x; ParametricLIF the same with "* q" for "/ tau", q = sigmoid(w) (its decay is
 * passed as the float q). A soft reset (hard = 0) leaves out "- v_reset" (SpikingJelly subtracts 0.0: no bit
 * changes). Surrogates: the derivative formulas of spikingjelly._ops.surrogate, and Rect's window.
 *
 * Layout: x, spike, h, lever, grad tensors are [steps, numel] row-major float32; v, carry and grad_decay [numel];
 * masks are bits, element g = t * numel + i at bit g % 8 (least significant first) of byte g / 8, as
 * lightning_tlbptt.packing.pack_bits writes them. With masks numel must be a multiple of 8 (whole bytes per step).
 * Each call handles neurons [begin, end) (multiples of 8 but for the last end), so that callers may split a layer
 * over threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Neurons per tile: a tile's voltage stays in L1 cache while the loop walks all steps. */
#define TILE 2048

#define PI 3.14159265358979323846 /* math.pi (M_PI is not C99) */

/* lightning_tlbptt.native.CHARGES and .SURROGATES, in order */
enum { CHARGE_IF, CHARGE_LIF, CHARGE_PLIF };
enum { SIGMOID, ATAN, PIECEWISE_QUADRATIC, PIECEWISE_EXP, SOFT_SIGN, SUPER_SPIKE, ERF, RECT };

static inline uint8_t pack8(const uint8_t *b) {
    uint64_t w;
    memcpy(&w, b, 8);
    return (uint8_t)((w * 0x0102040810204080ULL) >> 56); /* byte j (0 or 1) of the word lands on bit j */
}

static inline void unpack8(uint8_t byte, float *out) {
    for (int j = 0; j < 8; j++) out[j] = (float)((byte >> j) & 1);
}

/* One charge's forward loop: inlined with a constant charge (and whether PLIF's levers are written) into lif_forward,
 * so that each loop body is free of the others' operations (a division or a store the compiler may not make
 * speculatively keeps a loop from vectorizing);
 * restrict: no two arrays overlap, so the compiler needs no run-time overlap checks to vectorize (it gives up past
 * a few pairs).
 * lever (PLIF only): dh/dq with decay_input (x - (v - v_reset)); without, v - v_reset (dh/dq is its negative). */
static inline __attribute__((always_inline)) void forward_loop(
    const int charge, const int levers, const float *restrict x, float *restrict spike, float *restrict v, float *restrict h_seq,
    float *restrict lever, uint8_t *restrict window, uint8_t *restrict fired, int64_t steps, int64_t numel,
    int64_t begin, int64_t end, float decay, int decay_input, float v_threshold, int hard, float v_reset,
    float half_width) {
    uint8_t in_window[TILE], fired_now[TILE];
    for (int64_t lo = begin; lo < end; lo += TILE) {
        int64_t n = end - lo < TILE ? end - lo : TILE;
        float *vt = v + lo;
        for (int64_t t = 0; t < steps; t++) {
            const float *xt = x + t * numel + lo;
            float *st = spike + t * numel + lo;
            float *ht = h_seq ? h_seq + t * numel + lo : 0;
            float *lt = lever ? lever + t * numel + lo : 0;
            for (int64_t i = 0; i < n; i++) {
                float vi = vt[i];
                float relative = hard ? vi - v_reset : vi;
                float h;
                if (charge == CHARGE_IF)
                    h = vi + xt[i];
                else if (charge == CHARGE_LIF)
                    h = decay_input ? vi + (xt[i] - relative) / decay : (vi - relative / decay) + xt[i];
                else
                    h = decay_input ? vi + (xt[i] - relative) * decay : (vi - relative * decay) + xt[i];
                float s = h >= v_threshold ? 1.0f : 0.0f;
                st[i] = s;
                if (ht) ht[i] = h;
                if (levers) lt[i] = decay_input ? xt[i] - relative : relative;
                in_window[i] = fabsf(h - v_threshold) < half_width;
                fired_now[i] = (uint8_t)s;
                vt[i] = hard ? s * v_reset + (1.0f - s) * h : h - s * v_threshold;
            }
            int64_t byte = (t * numel + lo) / 8;
            if (window)
                for (int64_t j = 0; j < n / 8; j++) window[byte + j] = pack8(in_window + 8 * j);
            if (fired)
                for (int64_t j = 0; j < n / 8; j++) fired[byte + j] = pack8(fired_now + 8 * j);
        }
    }
}

void lif_forward(const float *x, float *spike, float *v, float *h_seq, float *lever, uint8_t *window, uint8_t *fired,
                 int64_t steps, int64_t numel, int64_t begin, int64_t end, int charge, float decay, int decay_input,
                 float v_threshold, int hard, float v_reset, float half_width) {
#define FORWARD(CHARGE, LEVERS)                                                                                      \
    forward_loop(CHARGE, LEVERS, x, spike, v, h_seq, lever, window, fired, steps, numel, begin, end, decay,          \
                 decay_input, v_threshold, hard, v_reset, half_width)
    if (charge == CHARGE_IF)
        FORWARD(CHARGE_IF, 0);
    else if (charge == CHARGE_LIF)
        FORWARD(CHARGE_LIF, 0);
    else if (lever)
        FORWARD(CHARGE_PLIF, 1);
    else
        FORWARD(CHARGE_PLIF, 0);
#undef FORWARD
}

/* e^x to about 1 ulp (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, times 2^n), in operations the
 * compiler vectorizes: glibc's expf runs one value at a time without -ffast-math, which made the Sigmoid surrogate's
 * backward several times slower than ATan's. Only gradients use it (to float rounding, not to the bit); below
 * -87 it returns about 1.6e-38 instead of a subnormal or 0, above 88 about 1.7e38 instead of inf. */
static inline float exp_vectorizable(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* n = x / ln 2 rounded to the nearest integer: adding and subtracting 1.5 * 2^23 drops the fraction */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln 2 in two parts: r exact to float rounding */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union {
        int32_t bits;
        float value;
    } scale = {((int32_t)n + 127) << 23}; /* 2^n */
    return p * scale.value;
}

/* The surrogate's derivative at h - v_threshold, as spikingjelly._ops.surrogate._surrogate_gradient computes it
 * (constants from the double alpha rounded to float, as torch rounds a Python scalar). One switch per tile-step. */
static void slopes(int surrogate, double alpha, const float *restrict h, float v_threshold, int64_t n,
                   float *restrict out) {
    const float a = (float)alpha;
    switch (surrogate) {
    case SIGMOID:
        for (int64_t i = 0; i < n; i++) {
            float s = 1.0f / (1.0f + exp_vectorizable(-(a * (h[i] - v_threshold))));
            out[i] = (1.0f - s) * s * a;
        }
        break;
    case ATAN: {
        const float scale = (float)(PI / 2 * alpha), half = (float)(alpha / 2);
        for (int64_t i = 0; i < n; i++) {
            float z = (h[i] - v_threshold) * scale;
            out[i] = half / (1.0f + z * z);
        }
        break;
    }
    case PIECEWISE_QUADRATIC: {
        const float square = (float)(alpha * alpha);
        for (int64_t i = 0; i < n; i++) {
            float g = a - square * fabsf(h[i] - v_threshold);
            out[i] = g > 0.0f ? g : 0.0f;
        }
        break;
    }
    case PIECEWISE_EXP: {
        const float half = (float)(alpha / 2), minus = (float)(-alpha);
        for (int64_t i = 0; i < n; i++) out[i] = half * exp_vectorizable(minus * fabsf(h[i] - v_threshold));
        break;
    }
    case SOFT_SIGN: {
        const float inverse = (float)(1 / alpha), twice = (float)(2 * alpha);
        for (int64_t i = 0; i < n; i++) {
            float z = inverse + fabsf(h[i] - v_threshold);
            out[i] = 1.0f / (twice * z * z);
        }
        break;
    }
    case SUPER_SPIKE:
        for (int64_t i = 0; i < n; i++) {
            float z = 1.0f + fabsf(h[i] - v_threshold);
            out[i] = a / (z * z);
        }
        break;
    case ERF: {
        const float scale = (float)(alpha / sqrt(PI));
        for (int64_t i = 0; i < n; i++) {
            float z = a * (h[i] - v_threshold);
            out[i] = scale * exp_vectorizable(-z * z);
        }
        break;
    }
    }
}

/* One charge's backward loop, inlined with a constant charge (and whether grad_decay is summed) into lif_backward,
 * as forward_loop.
 * grad_x may be grad_spike itself (written over in place; so neither is restrict): each element is read before it
 * is written.
 * Rect reads its window bits (and for a hard reset the spikes' bits, and h only when the reset is not detached);
 * every other surrogate reads h. grad_decay (PLIF) accumulates dL/dh * lever over the steps, per neuron. */
static inline __attribute__((always_inline)) void backward_loop(
    const int charge, const int levers, const float *grad_spike, float *grad_x, float *restrict carry, float *restrict grad_decay,
    const uint8_t *restrict window, const uint8_t *restrict fired, const float *restrict h_seq,
    const float *restrict lever, int64_t steps, int64_t numel, int64_t begin, int64_t end, float decay,
    int decay_input, float v_threshold, int hard, float v_reset, int surrogate, double alpha, int detach_reset,
    float keep) {
    float slope[TILE], not_fired[TILE];
    /* Rect: dL/dh = carry + alpha * dL/ds * window, the window 0 or 1 */
    const float scale = surrogate == RECT ? (float)alpha : 1.0f;
    for (int64_t lo = begin; lo < end; lo += TILE) {
        int64_t n = end - lo < TILE ? end - lo : TILE;
        float *ct = carry + lo;
        float *gd = grad_decay ? grad_decay + lo : 0;
        for (int64_t t = steps - 1; t >= 0; t--) {
            const float *gs = grad_spike + t * numel + lo;
            float *gx = grad_x + t * numel + lo;
            const float *ht = h_seq ? h_seq + t * numel + lo : 0;
            const float *lt = lever ? lever + t * numel + lo : 0;
            if (surrogate == RECT) {
                int64_t byte = (t * numel + lo) / 8;
                for (int64_t j = 0; j < n / 8; j++) unpack8(window[byte + j], slope + 8 * j);
                if (hard)
                    for (int64_t j = 0; j < n / 8; j++) unpack8((uint8_t)~fired[byte + j], not_fired + 8 * j);
            } else {
                slopes(surrogate, alpha, ht, v_threshold, n, slope);
                if (hard)
                    for (int64_t i = 0; i < n; i++) not_fired[i] = ht[i] >= v_threshold ? 0.0f : 1.0f;
            }
            for (int64_t i = 0; i < n; i++) {
                float c = ct[i];
                float g = gs[i]; /* dL/ds_t, plus the reset's dependence on s_t unless it is detached */
                if (!detach_reset) g = hard ? g + c * (v_reset - ht[i]) : g + (-v_threshold) * c;
                if (hard) c = c * not_fired[i];
                float gh = c + scale * g * slope[i]; /* dL/dh_t */
                if (levers) gd[i] += gh * lt[i];
                ct[i] = gh * keep;
                if (charge == CHARGE_IF)
                    gx[i] = gh;
                else if (charge == CHARGE_LIF)
                    gx[i] = decay_input ? gh / decay : gh;
                else
                    gx[i] = decay_input ? gh * decay : gh;
            }
        }
    }
}

void lif_backward(const float *grad_spike, float *grad_x, float *carry, float *grad_decay, const uint8_t *window,
                  const uint8_t *fired, const float *h_seq, const float *lever, int64_t steps, int64_t numel,
                  int64_t begin, int64_t end, int charge, float decay, int decay_input, float v_threshold, int hard,
                  float v_reset, int surrogate, double alpha, int detach_reset, float keep) {
#define BACKWARD(CHARGE, LEVERS)                                                                                     \
    backward_loop(CHARGE, LEVERS, grad_spike, grad_x, carry, grad_decay, window, fired, h_seq, lever, steps, numel,  \
                  begin, end, decay, decay_input, v_threshold, hard, v_reset, surrogate, alpha, detach_reset, keep)
    if (charge == CHARGE_IF)
        BACKWARD(CHARGE_IF, 0);
    else if (charge == CHARGE_LIF)
        BACKWARD(CHARGE_LIF, 0);
    else if (grad_decay)
        BACKWARD(CHARGE_PLIF, 1);
    else
        BACKWARD(CHARGE_PLIF, 0);
#undef BACKWARD
}
