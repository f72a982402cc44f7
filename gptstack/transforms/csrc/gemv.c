/* Batch-1 decode kernels: y (N,) = W x for one activation row x (K,), weight-only quantized or fp32.
 * Compiled on first use by gptstack/infer/kernels.py (gcc -O3 -march=native -ffast-math -fopenmp)
 * and called through ctypes; kernels.py holds the PyTorch definitions these must equal.
 * Memory-bound: each weight is read once; outputs are split across threads. */
#include <stdint.h>

/* fp32: w (N, K) row-major, as nn.Linear stores it. */
void gemv_f32(const float* x, const float* w, float* y, int K, int N) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const float* row = w + (int64_t)n * K;
    float acc = 0.f;
    for (int k = 0; k < K; k++) acc += x[k] * row[k];
    y[n] = acc;
  }
}

/* int8: q (N, K), one scale per output row. */
void gemv_int8(const float* x, const int8_t* q, const float* scales, float* y, int K, int N) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const int8_t* row = q + (int64_t)n * K;
    float acc = 0.f;
    for (int k = 0; k < K; k++) acc += x[k] * (float)row[k];
    y[n] = acc * scales[n];
  }
}

/* int4: packed (K/2, N), byte [j, n] = code[2j, n] | code[2j+1, n] << 4; scales, mins (K/g, N);
 * w[k, n] = code[k, n] * scale[k/g, n] + min[k/g, n]. Vectorised across a block of NB outputs. */
#define NB 128
void gemv_int4(const float* x, const uint8_t* packed, const float* scales, const float* mins, float* y, int K,
               int N, int g) {
  int G = K / g;
#pragma omp parallel for schedule(static)
  for (int nb = 0; nb < N; nb += NB) {
    int w = N - nb < NB ? N - nb : NB;
    float out[NB] = {0};
    for (int gi = 0; gi < G; gi++) {
      float acc[NB] = {0};
      float xs = 0.f;
      for (int j = gi * g / 2; j < (gi + 1) * g / 2; j++) {
        float x0 = x[2 * j], x1 = x[2 * j + 1];
        xs += x0 + x1;
        const uint8_t* row = packed + (int64_t)j * N + nb;
        for (int n = 0; n < w; n++) acc[n] += x0 * (float)(row[n] & 15) + x1 * (float)(row[n] >> 4);
      }
      const float* s = scales + (int64_t)gi * N + nb;
      const float* m = mins + (int64_t)gi * N + nb;
      for (int n = 0; n < w; n++) out[n] += acc[n] * s[n] + xs * m[n];
    }
    for (int n = 0; n < w; n++) y[nb + n] = out[n];
  }
}

/* int8 in groups along the input (GGUF's Q8_0): q (N, K), scales (N, K/g), w[n, k] = q[n, k] * scale[n, k/g];
 * x (M, K), y (M, N); kernels.py calls it for one row (more rows: gemm.c's gemm_tiled_int8g). */
void gemm_int8g(const float* x, const int8_t* q, const float* scales, float* y, int M, int K, int N, int g) {
  int G = K / g;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const int8_t* row = q + (int64_t)n * K;
    const float* s = scales + (int64_t)n * G;
    for (int m = 0; m < M; m++) {
      const float* xm = x + (int64_t)m * K;
      float acc = 0.f;
      for (int gi = 0; gi < G; gi++) {
        float a = 0.f;
        for (int k = gi * g; k < (gi + 1) * g; k++) a += xm[k] * (float)row[k];
        acc += a * s[gi];
      }
      y[(int64_t)m * N + n] = acc;
    }
  }
}
