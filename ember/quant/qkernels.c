/* ember's CPU kernels for weight-only quantized linears (see ember/quant/kernels.py).
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]                       (int8, per output channel)
 *   y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k] + (z[n, g] - 8 s[n, g]) * sum_{k in g} x[m, k]
 *                                                      (int4, groups of G; s, z fp16: w = (q - 8) s + z)
 *
 * Each output row n is computed by one thread, for every input row m, with the same sequence of
 * operations whatever M is: a row's result never depends on which other rows share the call (batch
 * invariance), and the weight row is read from memory once for all M input rows.
 *
 * int4 layout: row n holds K/2 bytes; in group g (G codes, G/2 bytes starting at g*G/2), byte j
 * holds code k = g*G + j in its low nibble and code k = g*G + j + G/2 in its high nibble, so that
 * 8 consecutive bytes give 8 consecutive codes twice (no shuffles).
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

#define MB 4  /* input rows sharing one pass over a weight row */

int ember_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

void ember_q8_linear(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int64_t mb = M - m0 < MB ? M - m0 : MB;
            float out[MB];
            int64_t k = 0;
#ifdef __AVX2__
            __m256 acc[MB];
            for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
            for (; k + 8 <= K; k += 8) {
                __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
                for (int i = 0; i < mb; i++)
                    acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (m0 + i) * K + k), wv, acc[i]);
            }
            for (int i = 0; i < mb; i++) out[i] = hsum8(acc[i]);
#else
            for (int i = 0; i < mb; i++) out[i] = 0.f;
#endif
            for (int i = 0; i < mb; i++) {
                float s = out[i];
                const float *xr = x + (m0 + i) * K;
                for (int64_t kk = k; kk < K; kk++) s += xr[kk] * (float)w[kk];
                s *= scale[n];
                if (bias) s += bias[n];
                y[(m0 + i) * N + n] = s;
            }
        }
    }
}

/* xsum: (M, K/G) sums of x over each group (computed by the caller once per call) */
void ember_q4_linear(const float *x, const float *xsum, const uint8_t *q, const _Float16 *scale, const _Float16 *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    const int64_t ng = K / G, half = G / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *w = q + n * (K / 2);
        const _Float16 *sc = scale + n * ng;
        const _Float16 *zp = zero + n * ng;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int64_t mb = M - m0 < MB ? M - m0 : MB;
            for (int i = 0; i < mb; i++) {
                const float *xr = x + (m0 + i) * K;
                const float *xs = xsum + (m0 + i) * ng;
                float corr = 0.f;
#ifdef __AVX2__
                __m256 tot = _mm256_setzero_ps();
#else
                float tot = 0.f;
#endif
                for (int64_t g = 0; g < ng; g++) {
                    const uint8_t *wg = w + g * half;
                    const float *xg = xr + g * G;
#ifdef __AVX2__
                    __m256 acc = _mm256_setzero_ps();
                    const __m128i mask = _mm_set1_epi8(0x0F);
                    for (int64_t j = 0; j < half; j += 8) {
                        __m128i b = _mm_loadl_epi64((const __m128i *)(wg + j));
                        __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                        __m256 wl = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                        __m256 wh = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j), wl, acc);
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(xg + half + j), wh, acc);
                    }
                    tot = _mm256_fmadd_ps(acc, _mm256_set1_ps((float)sc[g]), tot);
#else
                    float acc = 0.f;
                    for (int64_t j = 0; j < half; j++) {
                        acc += xg[j] * (float)(wg[j] & 0x0F);
                        acc += xg[half + j] * (float)(wg[j] >> 4);
                    }
                    tot += acc * (float)sc[g];
#endif
                    corr += ((float)zp[g] - 8.f * (float)sc[g]) * xs[g];
                }
#ifdef __AVX2__
                float s = hsum8(tot) + corr;
#else
                float s = tot + corr;
#endif
                if (bias) s += bias[n];
                y[(m0 + i) * N + n] = s;
            }
        }
    }
}
