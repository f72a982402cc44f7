/* Batched w8a8 products for the engine's batched decode step with int8 activations (decode.c's decode_batch):
 * Y (M, N) for M activation rows quantized as decode.c's Act8 (int8 codes in blocks of 32, one scale d per block
 * and d · Σ codes) against int4 or int8 weights repacked for AVX-512 VNNI by infer/native.py (`batched_layout`):
 * 16 outputs across the 16 int32 lanes of a vector, 4 consecutive inputs in each lane's 4 bytes, so one vpdpbusd
 * adds 4 products to each of 16 outputs for one broadcast of 4 activation codes, and each weight vector loaded
 * serves MR rows.
 *
 * Every output's float work is the batch-1 kernels' (lin_int4_a8, lin_int8_a8) in the same order: one exact int32
 * dot per block, then the same FMAs from zero, so each row equals its batch-1 product bit for bit and a batched
 * step equals its rows' batch-1 steps.
 *
 * Layouts (panel i: outputs 16i .. 16i + 15, contiguous over K; block b: inputs 32b .. 32b + 31):
 *   int4 (N/16, K/32, 4, 64) bytes: byte 4l + t of quad p = code[32b + 8p + t, 16i + l]
 *        | code[32b + 8p + 4 + t, 16i + l] << 4 (a load, a mask and a shift give two quads);
 *   int8 (N/16, K/32, 8, 64) bytes: byte 4l + t of quad p = q[16i + l, 32b + 4p + t], and corr (K/32, N) int32 =
 *        128 · Σ_block q: vpdpbusd multiplies unsigned by signed bytes, so the activations enter as codes + 128
 *        (ActRows.u) and corr takes the 128s back out;
 *   scales (K/g, N) fp32 (int4's s and m, int8g's s), or (N,) (int8 per row). */
#include <stdint.h>
#include <string.h>

/* M rows of Act8 blocks: q, u = q + 128 (M, K) bytes; d, sd (M, K/32). */
typedef struct {
  const int8_t* q;
  const uint8_t* u;
  const float* d;
  const float* sd;
} ActRows;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define A8_BATCHED 1
#define A8_MR 4 /* rows per tile: MR × 2 int32 and MR × 2 float accumulators + 4 weight vectors + scales <= 32 zmm */

/* int4: rows m0 .. m0 + mr against outputs n .. n + 16 nr (panels at pw, pw + 8K bytes). */
static inline __attribute__((always_inline)) void a8_int4_tile(ActRows a, int m0, int mr, const uint8_t* pw,
                                                               const float* s, const float* mn, float* y, int K,
                                                               int N, int per, int n, int nr) {
  const __m512i low = _mm512_set1_epi8(15);
  const int B = K / 32;
  __m512 f[A8_MR][2];
  for (int m = 0; m < mr; m++) f[m][0] = f[m][1] = _mm512_setzero_ps();
  for (int b = 0; b < B; b++) {
    __m512i acc[A8_MR][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int p = 0; p < 4; p++) {
      __m512i lo[2], hi[2];
      for (int r = 0; r < nr; r++) {
        __m512i w = _mm512_loadu_si512(pw + (int64_t)r * 8 * K + (int64_t)(4 * b + p) * 64);
        lo[r] = _mm512_and_si512(w, low);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
      }
      for (int m = 0; m < mr; m++) {
        int32_t x0, x1;
        const int8_t* xq = a.q + (int64_t)(m0 + m) * K + 32 * b + 8 * p;
        memcpy(&x0, xq, 4);
        memcpy(&x1, xq + 4, 4);
        __m512i xa = _mm512_set1_epi32(x0), xb = _mm512_set1_epi32(x1);
        for (int r = 0; r < nr; r++) {
          acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], lo[r], xa);
          acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], hi[r], xb);
        }
      }
    }
    const int64_t o = (int64_t)(b / per) * N + n;
    __m512 sv[2], mv[2];
    for (int r = 0; r < nr; r++) {
      sv[r] = _mm512_loadu_ps(s + o + 16 * r);
      mv[r] = _mm512_loadu_ps(mn + o + 16 * r);
    }
    for (int m = 0; m < mr; m++) {
      __m512 d = _mm512_set1_ps(a.d[(int64_t)(m0 + m) * B + b]), sd = _mm512_set1_ps(a.sd[(int64_t)(m0 + m) * B + b]);
      for (int r = 0; r < nr; r++) {
        f[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), _mm512_mul_ps(d, sv[r]), f[m][r]);
        f[m][r] = _mm512_fmadd_ps(sd, mv[r], f[m][r]);
      }
    }
  }
  for (int m = 0; m < mr; m++)
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(y + (int64_t)(m0 + m) * N + n + 16 * r, f[m][r]);
}

/* int8 (per row when by_row, else int8g's groups): rows m0 .. m0 + mr against outputs n .. n + 16 nr (panels
 * at pw, pw + 16K bytes). */
static inline __attribute__((always_inline)) void a8_int8_tile(ActRows a, int m0, int mr, const int8_t* pw,
                                                               const int32_t* corr, const float* s, int by_row,
                                                               float* y, int K, int N, int per, int n, int nr) {
  const int B = K / 32;
  __m512 f[A8_MR][2];
  for (int m = 0; m < mr; m++) f[m][0] = f[m][1] = _mm512_setzero_ps();
  for (int b = 0; b < B; b++) {
    __m512i acc[A8_MR][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int p = 0; p < 8; p++) {
      __m512i w[2];
      for (int r = 0; r < nr; r++) w[r] = _mm512_loadu_si512(pw + (int64_t)r * 16 * K + (int64_t)(8 * b + p) * 64);
      for (int m = 0; m < mr; m++) {
        int32_t x4;
        memcpy(&x4, a.u + (int64_t)(m0 + m) * K + 32 * b + 4 * p, 4);
        __m512i xv = _mm512_set1_epi32(x4);
        for (int r = 0; r < nr; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, w[r]);
      }
    }
    __m512i cr[2];
    __m512 sv[2];
    for (int r = 0; r < nr; r++) {
      cr[r] = _mm512_loadu_si512(corr + (int64_t)b * N + n + 16 * r);
      sv[r] = by_row ? _mm512_setzero_ps() : _mm512_loadu_ps(s + (int64_t)(b / per) * N + n + 16 * r);
    }
    for (int m = 0; m < mr; m++) {
      __m512 d = _mm512_set1_ps(a.d[(int64_t)(m0 + m) * B + b]);
      for (int r = 0; r < nr; r++) {
        __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][r], cr[r]));
        f[m][r] = _mm512_fmadd_ps(dot, by_row ? d : _mm512_mul_ps(d, sv[r]), f[m][r]);
      }
    }
  }
  for (int m = 0; m < mr; m++)
    for (int r = 0; r < nr; r++) {
      __m512 v = by_row ? _mm512_mul_ps(f[m][r], _mm512_loadu_ps(s + n + 16 * r)) : f[m][r];
      _mm512_storeu_ps(y + (int64_t)(m0 + m) * N + n + 16 * r, v);
    }
}

/* The tile for literal (mr, nr): always_inline unrolls each into its own register tile. */
#define A8_TILES(call)                                 \
  for (int m0 = 0; m0 < M; m0 += A8_MR) {              \
    int mr = M - m0 < A8_MR ? M - m0 : A8_MR;          \
    if (nr == 2) switch (mr) {                         \
        case 4: call(4, 2); break;                     \
        case 3: call(3, 2); break;                     \
        case 2: call(2, 2); break;                     \
        default: call(1, 2); break;                    \
      }                                                \
    else switch (mr) {                                 \
        case 4: call(4, 1); break;                     \
        case 3: call(3, 1); break;                     \
        case 2: call(2, 1); break;                     \
        default: call(1, 1); break;                    \
      }                                                \
  }

/* Y (M, N) = rows a · W for int4 (panels pw, s and mn (K/g, N)). Threads split N in pairs of panels (a pair's
 * 16K bytes stay in L1 while every row passes). N, K: multiples of 16 and 32. */
static void gemm_a8_int4(ActRows a, int M, const uint8_t* pw, const float* s, const float* mn, float* y, int K, int N,
                         int g, int nthreads) {
  const int per = g / 32, pairs = (N + 31) / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int t = 0; t < pairs; t++) {
    int n = 32 * t, nr = N - n >= 32 ? 2 : 1;
    const uint8_t* panel = pw + (int64_t)n * (K / 2);
#define A8_I4(mr_, nr_) a8_int4_tile(a, m0, mr_, panel, s, mn, y, K, N, per, n, nr_)
    A8_TILES(A8_I4)
#undef A8_I4
  }
}

/* Y (M, N) = rows a · W for int8 (panels pw, corr; s (N,) when g == K, else (K/g, N)). */
static void gemm_a8_int8(ActRows a, int M, const int8_t* pw, const int32_t* corr, const float* s, float* y, int K,
                         int N, int g, int nthreads) {
  const int by_row = g == K, per = by_row ? 1 : g / 32, pairs = (N + 31) / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int t = 0; t < pairs; t++) {
    int n = 32 * t, nr = N - n >= 32 ? 2 : 1;
    const int8_t* panel = pw + (int64_t)n * K;
#define A8_I8(mr_, nr_) a8_int8_tile(a, m0, mr_, panel, corr, s, by_row, y, K, N, per, n, nr_)
    A8_TILES(A8_I8)
#undef A8_I8
  }
}
#else
#define A8_BATCHED 0
#endif

/* Whether this build has the batched w8a8 kernels (AVX-512 VNNI); without them decode_batch runs a8 layers one row
 * at a time through the batch-1 kernels (the same values, each row reading the weights). */
int a8_batched(void) { return A8_BATCHED; }
