/* Decoding's inner loops on x86 CPUs (scratchgpt/kernels.py builds and loads this): the matrix-vector
   products of int8 and bf16 weights (with AVX-512; plain loops otherwise, which kernels.py leaves unused), and the rest of a one-token step (RMS norm, SwiGLU's
   activation, attention over the KV cache) as one call each.

   Decoding one token at batch 1 reads every weight once: the speed is how fast weights stream from memory.
   torch's batch-1 kernels for int8 (`_weight_int8pack_mm`) and bf16 weights (`mm`) are bound by their own
   instruction loop at ~7-9 GB/s on the project's CPU; these loops widen each 16 weights to fp32 in registers
   and reach ~14-19 GB/s (BENCHMARKS.md). Each output is a dot product of one weight row with one input row,
   accumulated in fp32; rows are split among the OpenMP threads torch uses (the same libgomp).

   y has M x N floats: y[m * N + n] = x[m] . w[n] (then scaled, rounded, biased as each function says). */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PREFETCH_BYTES 2048 /* how far ahead in the weight stream to prefetch (measured: 2-4 KB best) */

int sg_fast_path(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_bits(float f) { /* f as bf16, rounded to nearest even as torch rounds; a NaN stays a NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(bf16_bits(f)); } /* as torch's .to(torch.bfloat16) */

static float dot_i8(const float *x, const int8_t *w, int64_t K) {
    int64_t k = 0;
    float acc = 0.f;
#ifdef __AVX512F__
#define I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k + PREFETCH_BYTES), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), I8(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), I8(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), I8(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), I8(w + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), I8(w + k), a0);
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

static float dot_bf16(const float *x, const uint16_t *w, int64_t K) {
    int64_t k = 0;
    float acc = 0.f;
#ifdef __AVX512F__
#define BF(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), BF(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), BF(w + k + 16), a1);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), BF(w + k), a0);
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < K; k++) acc += x[k] * bf16_to_f32(w[k]);
    return acc;
}

/* int8 weights, one bf16 scale per row: what torch's _weight_int8pack_mm computes, the same roundings
   (x rounded to bf16, the scaled sum rounded to bf16), then the fp32 bias (NULL: none) added.
   Returns 0, or -1 if memory for the rounded inputs could not be had. */
int sg_int8_rows(const float *x, int64_t M, const int8_t *w, const uint16_t *scale, const float *bias, float *y,
                 int64_t N, int64_t K) {
    float *xr = malloc((size_t)(M * K) * sizeof(float));
    if (!xr) return -1;
    for (int64_t i = 0; i < M * K; i++) xr[i] = round_bf16(x[i]);
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s = bf16_to_f32(scale[n]), b = bias ? bias[n] : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = round_bf16(dot_i8(xr + m * K, w + n * K, K) * s) + b;
    }
    free(xr);
    return 0;
}

/* bf16 weights, fp32 inputs and outputs (no rounding but the weights'), then the fp32 bias (NULL: none). */
int sg_bf16_rows(const float *x, int64_t M, const uint16_t *w, const float *bias, float *y, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float b = bias ? bias[n] : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_bf16(x + m * K, w + n * K, K) + b;
    }
    return 0;
}

/* ---- the rest of a decoding step, for rows of one new token (model.DecodeStep): each is one call where
   torch takes 2-12 small ops of ~1-3 us each, ~1000 a token on a 30-layer model ---- */

/* y = x / sqrt(mean(x^2) + eps) * w, per row of C (torch.rms_norm's arithmetic in fp32) */
void sg_rms_norm(const float *x, int64_t B, int64_t C, const float *w, float eps, float *y) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t c = 0; c < C; c++) ss += xb[c] * xb[c];
        float r = 1.f / sqrtf(ss / (float)C + eps);
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) y[b * C + c] = xb[c] * r * w[c];
    }
}

/* gated MLP's activation: h = [gate; up] per row (B, 2 * F) -> y = silu(gate) * up (B, F) */
void sg_silu_mul(const float *h, int64_t B, int64_t F, float *y) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t f = 0; f < F; f++) {
            float g = h[b * 2 * F + f];
            y[b * F + f] = g / (1.f + expf(-g)) * h[b * 2 * F + F + f];
        }
}

/* one head of D: optional RMS norm over the head (qk norm, no weight; qk_eps < 0: none), then RoPE's
   rotation of (first half, second half) pairs by cos/sin (D/2; NULL: no rotation), into out */
static void head_inputs(const float *x, int64_t D, float qk_eps, const float *cos, const float *sin, float *out) {
    float r = 1.f;
    if (qk_eps >= 0.f) { /* -1: no qk norm */
        float ss = 0.f;
        for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
        r = 1.f / sqrtf(ss / (float)D + qk_eps);
    }
    if (!cos) {
        for (int64_t d = 0; d < D; d++) out[d] = x[d] * r;
        return;
    }
    int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        float x1 = x[d] * r, x2 = x[d + half] * r;
        out[d] = x1 * cos[d] - x2 * sin[d];
        out[d + half] = x1 * sin[d] + x2 * cos[d];
    }
}

/* Causal attention of one new token per row, from c_attn's output qkv (B, (H + 2 KV) D): its keys and values
   are written into the layer's cache (B, KV, max_len, D) at `pos`, then each query head h attends to positions
   0..pos of key/value head h / (H / KV) (grouped-query), scaled by 1/sqrt(D). y: (B, H D). Returns 0, or -1
   without memory for the scores. */
int sg_attend_one(const float *qkv, int64_t B, int64_t H, int64_t KV, int64_t D, float qk_eps, const float *cos,
                  const float *sin, float *keys, float *values, int64_t pos, int64_t max_len, float *y) {
    int64_t row = (H + 2 * KV) * D, T = pos + 1, group = H / KV;
    float scale = 1.f / sqrtf((float)D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < KV; j++) {
            const float *src = qkv + b * row + (H + j) * D;
            int64_t at = ((b * KV + j) * max_len + pos) * D;
            head_inputs(src, D, qk_eps, cos, sin, keys + at);
            memcpy(values + at, src + KV * D, (size_t)D * sizeof(float));
        }
    float *scores = malloc((size_t)(B * H * (T + D)) * sizeof(float));
    if (!scores) return -1;
    #pragma omp parallel for schedule(static) if (B * H * T * D > (1 << 14))
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        float *s = scores + bh * (T + D), *q = s + T;
        head_inputs(qkv + b * row + h * D, D, qk_eps, cos, sin, q);
        const float *k = keys + (b * KV + h / group) * max_len * D, *v = values + (b * KV + h / group) * max_len * D;
        float top = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < T; t++) {
            float dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; d++) dot += q[d] * k[t * D + d];
            s[t] = dot * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int64_t t = 0; t < T; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        float *out = y + b * H * D + h * D;
        for (int64_t d = 0; d < D; d++) out[d] = 0.f;
        for (int64_t t = 0; t < T; t++) {
            float p = s[t] / sum;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) out[d] += p * v[t * D + d];
        }
    }
    free(scores);
    return 0;
}

/* Training's attention inputs, one pass each way over c_attn's output instead of a view, a permute, and the
   rotation's (and qk norm's) separate torch ops.

   Forward: qkv (B, T, (H + 2 KV) D), fp32 or (bf16 != 0) bf16 -> q (B, H, T, D), k and v (B, KV, T, D), fp32,
   contiguous; each q and k head RMS-normalised first if qk_eps >= 0 (rstd (B, T, H + KV) keeps 1/rms for the
   backward), then rotated if cos (T, D/2) is given. bf16 input is widened in the pass (exactly: what
   `.float()` gives), so autocast's bf16 c_attn feeds fp32 attention without a separate cast each way. The
   rotation rounds as torch's mul and addcmul do (the second product fused into the sum, fmaf), so without qk
   norm q, k, v and the gradient equal torch's ops bit for bit (a test checks). */
static void rotate(const float *x, float r, const float *cos, const float *sin, int64_t half, float sign, float *out) {
    for (int64_t d = 0; d < half; d++) {
        float x1 = x[d] * r, x2 = x[d + half] * r, s = sign * sin[d];
        out[d] = fmaf(-x2, s, x1 * cos[d]);
        out[d + half] = fmaf(x2, cos[d], x1 * s);
    }
}

static float inv_rms(const float *x, int64_t D, float eps) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) ss += x[d] * x[d];
    return 1.f / sqrtf(ss / (float)D + eps);
}

/* Row bt of qkv as fp32: the row itself, or (bf16) widened into buf. */
static const float *qkv_row(const void *qkv, int bf16, int64_t bt, int64_t width, float *buf) {
    if (!bf16) return (const float *)qkv + bt * width;
    const uint16_t *src = (const uint16_t *)qkv + bt * width;
    for (int64_t i = 0; i < width; i++) buf[i] = bf16_to_f32(src[i]);
    return buf;
}

void sg_heads_fwd(const void *qkv, int bf16, int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, float qk_eps,
                  const float *cos, const float *sin, float *q, float *k, float *v, float *rstd) {
    int64_t heads = H + 2 * KV, half = D / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        float buf[bf16 ? heads * D : 1];
        const float *row = qkv_row(qkv, bf16, bt, heads * D, buf);
        for (int64_t h = 0; h < heads; h++) {
            const float *x = row + h * D;
            float *out = h < H ? q + ((b * H + h) * T + t) * D
                       : h < H + KV ? k + ((b * KV + h - H) * T + t) * D : v + ((b * KV + h - H - KV) * T + t) * D;
            if (h >= H + KV) { memcpy(out, x, (size_t)D * sizeof(float)); continue; }
            float r = 1.f;
            if (qk_eps >= 0.f) r = rstd[bt * (H + KV) + h] = inv_rms(x, D, qk_eps);
            if (cos) rotate(x, r, cos + t * half, sin + t * half, half, 1.f, out);
            else for (int64_t d = 0; d < D; d++) out[d] = x[d] * r;
        }
    }
}

/* Backward of sg_heads_fwd: gq, gk, gv (shaped as q, k, v; any strides but a unit one along D, given as
   (batch, head, position) element strides in `strides`: gq's three, gk's, gv's, so SDPA's gradients, laid out
   (B, T, heads, D), are read where they are) -> gqkv (B, T, (H + 2 KV) D), in qkv's dtype (bf16: rounded to
   nearest even, as the cast's backward rounds). The rotation's backward is the inverse rotation; qk norm's,
   with y = x / rms: gx = (gy - y mean(gy y)) / rms. */
void sg_heads_bwd(const void *qkv, int bf16, const float *rstd, const float *gq, const float *gk, const float *gv,
                  const int64_t *strides, int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, float qk_eps,
                  const float *cos, const float *sin, void *gqkv) {
    int64_t heads = H + 2 * KV, half = D / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        float gy[D], xbuf[bf16 && qk_eps >= 0.f ? heads * D : 1], obuf[bf16 ? heads * D : 1];
        const float *xrow = qk_eps >= 0.f ? qkv_row(qkv, bf16, bt, heads * D, xbuf) : NULL;
        float *orow = bf16 ? obuf : (float *)gqkv + bt * heads * D;
        for (int64_t h = 0; h < heads; h++) {
            float *out = orow + h * D;
            int which = h < H ? 0 : h < H + KV ? 1 : 2;
            int64_t head = h - (which == 0 ? 0 : which == 1 ? H : H + KV);
            const float *base = which == 0 ? gq : which == 1 ? gk : gv;
            const float *g = base + b * strides[3 * which] + head * strides[3 * which + 1] + t * strides[3 * which + 2];
            if (which == 2) { memcpy(out, g, (size_t)D * sizeof(float)); continue; }
            if (cos) rotate(g, 1.f, cos + t * half, sin + t * half, half, -1.f, gy);
            else memcpy(gy, g, (size_t)D * sizeof(float));
            if (qk_eps < 0.f) { memcpy(out, gy, (size_t)D * sizeof(float)); continue; }
            const float *x = xrow + h * D;
            float r = rstd[bt * (H + KV) + h], dot = 0.f;
            for (int64_t d = 0; d < D; d++) dot += gy[d] * x[d];
            dot *= r / (float)D;  /* mean(gy y) */
            for (int64_t d = 0; d < D; d++) out[d] = (gy[d] - x[d] * r * dot) * r;
        }
        if (bf16) {
            uint16_t *dst = (uint16_t *)gqkv + bt * heads * D;
            for (int64_t i = 0; i < heads * D; i++) dst[i] = bf16_bits(obuf[i]);
        }
    }
}
