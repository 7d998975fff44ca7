/* The Rect LIF kernel's step loops in C: lightning_tlbptt.neurons.RectLIFFunction, one pass over memory per step.
 *
 * Compiled at first use by lightning_tlbptt.native with the system's C compiler and loaded with ctypes. Every
 * float operation is the one the torch path runs (and SpikingJelly's reference), in the same order and in float32,
 * so spikes and voltages are bit-identical to it: the file must be compiled without -ffast-math and with
 * -ffp-contract=off (no fused multiply-add).
 *
 * Layout: x, spike, grad tensors are [steps, numel] row-major float32; v and carry [numel]; masks are bits, element
 * g = t * numel + i at bit g % 8 (least significant first) of byte g / 8, as lightning_tlbptt.packing.pack_bits
 * writes them. numel must be a multiple of 8 (whole bytes per step). Each call handles neurons [begin, end) (both
 * multiples of 8), so that callers may split a layer over threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Neurons per tile: a tile's voltage stays in L1 cache while the loop walks all steps. */
#define TILE 2048

static inline uint8_t pack8(const uint8_t *b) {
    uint64_t w;
    memcpy(&w, b, 8);
    return (uint8_t)((w * 0x0102040810204080ULL) >> 56); /* byte j (0 or 1) of the word lands on bit j */
}

static inline void unpack8(uint8_t byte, float *out) {
    for (int j = 0; j < 8; j++) out[j] = (float)((byte >> j) & 1);
}

void rect_lif_forward(const float *x, float *spike, float *v, float *h_seq, uint8_t *window, uint8_t *fired,
                      int64_t steps, int64_t numel, int64_t begin, int64_t end, float tau, int decay_input,
                      float v_threshold, int hard, float v_reset, float half_width) {
    uint8_t in_window[TILE], fired_now[TILE];
    for (int64_t lo = begin; lo < end; lo += TILE) {
        int64_t n = end - lo < TILE ? end - lo : TILE;
        float *vt = v + lo;
        for (int64_t t = 0; t < steps; t++) {
            const float *xt = x + t * numel + lo;
            float *st = spike + t * numel + lo;
            float *ht = h_seq ? h_seq + t * numel + lo : 0;
            for (int64_t i = 0; i < n; i++) {
                float vi = vt[i];
                float relative = hard ? vi - v_reset : vi;
                /* SpikingJelly's charge: v + (x - (v - v_reset)) / tau, or v - (v - v_reset) / tau + x */
                float h = decay_input ? vi + (xt[i] - relative) / tau : (vi - relative / tau) + xt[i];
                float s = h >= v_threshold ? 1.0f : 0.0f;
                st[i] = s;
                if (ht) ht[i] = h;
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

/* grad_x may be grad_spike itself (written over in place): each element is read before it is written. */
void rect_lif_backward(const float *grad_spike, float *grad_x, float *carry, const uint8_t *window,
                       const uint8_t *fired, const float *h_seq, int64_t steps, int64_t numel, int64_t begin,
                       int64_t end, float tau, int decay_input, float v_threshold, int hard, float v_reset,
                       float alpha, int detach_reset, float keep) {
    float in_window[TILE], not_fired[TILE];
    for (int64_t lo = begin; lo < end; lo += TILE) {
        int64_t n = end - lo < TILE ? end - lo : TILE;
        float *ct = carry + lo;
        for (int64_t t = steps - 1; t >= 0; t--) {
            int64_t byte = (t * numel + lo) / 8;
            for (int64_t j = 0; j < n / 8; j++) unpack8(window[byte + j], in_window + 8 * j);
            if (hard)
                for (int64_t j = 0; j < n / 8; j++) unpack8((uint8_t)~fired[byte + j], not_fired + 8 * j);
            const float *gs = grad_spike + t * numel + lo;
            float *gx = grad_x + t * numel + lo;
            const float *ht = h_seq ? h_seq + t * numel + lo : 0;
            for (int64_t i = 0; i < n; i++) {
                float c = ct[i];
                float g = gs[i]; /* dL/ds_t, plus the reset's dependence on s_t unless it is detached */
                if (!detach_reset) g = hard ? g + c * (v_reset - ht[i]) : g + (-v_threshold) * c;
                if (hard) c = c * not_fired[i];
                float gh = c + alpha * g * in_window[i]; /* dL/dh_t */
                ct[i] = gh * keep;
                gx[i] = decay_input ? gh / tau : gh;
            }
        }
    }
}
