/* Batched decode kernels: y (M, N) = x (M, K) · Wᵀ for a few to a few dozen activation rows (M = 2..64: a
 * decode batch, a speculative verification), fp32 or weight-only quantized. Compiled on first use by
 * gptstack/transforms/kernels.py and called through ctypes; kernels.py holds the PyTorch definitions these
 * must equal.
 *
 * Register tiling: each weight tile is read from memory once for all M rows and kept in L1 while MR rows of x
 * stream past it from L2; MR × NR accumulators of VL lanes live in registers (GCC vector extensions, so the same
 * source builds for AVX2, AVX-512 or NEON). Two micro-kernels:
 * - dot form, for weights stored (N, K) (fp32, int8, grouped int8): NR weight rows × MR x rows, VL lanes along K,
 *   one horizontal sum per output at the end;
 * - outer form, for weights stored (K, N) (int4's packed codes): CB outputs (two vectors) × MR x rows,
 *   one broadcast of x per k.
 * Quantized weights are dequantized one tile at a time into a per-thread fp32 scratch (L1/L2), then run
 * through the fp32 micro-kernel: the conversion is paid once per weight, not once per row. Threads split N. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* VL lanes per vector: 16 (zmm) where the compiler targets AVX-512 (measured 1.6-1.9x on the batched SmolLM2 step
 * against 8), else 8 (ymm on AVX2, two q registers on NEON). */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float v8 __attribute__((vector_size(4 * VL)));
typedef uint8_t u8x8 __attribute__((vector_size(VL)));
typedef int32_t i32x8 __attribute__((vector_size(4 * VL)));
/* bytes → int32 lanes → fp32 (vpmovzxbd + vcvtdq2ps on AVX2; a direct u8 → fp32 conversion is scalarised) */
static inline v8 tofloat(u8x8 c) { return __builtin_convertvector(__builtin_convertvector(c, i32x8), v8); }

static inline v8 ld(const float* p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void st(float* p, v8 v) { memcpy(p, &v, sizeof v); }
/* Pairwise, halves first (shuffles, not lane extracts): lanes i and i + VL/2, then i and i + VL/4, ... */
static inline float hsum(v8 v) {
#if VL == 16
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
#else
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
#endif
  return (v[0] + v[2]) + (v[1] + v[3]);
}
/* Pin a loaded vector in a register: GCC would otherwise fold the load into every FMA that uses it, and the
 * tile becomes load-bound (14 loads per 12 FMAs instead of 8). */
#if defined(__x86_64__) || defined(__aarch64__)
#define KEEP(v) __asm__("" : "+x"(v))
#else
#define KEEP(v) (void)0
#endif
static inline v8 bcast(float a) { return (v8){} + a; }

#define MR 6 /* x rows per dot-form tile: MR × NR accumulators + NR weight vectors + one x vector <= 16 */
#define NR 2 /* weight rows per dot-form tile */

/* Dot form: y[m, n] = Σ_k x[m, k] w[n, k] (· scale[n] when scale) for m < mr <= MR, n < nr <= NR.
 * always_inline with literal mr, nr: GCC unrolls each (mr, nr) into its own register tile. */
static inline __attribute__((always_inline)) void tile_dot(const float* x, int ldx, const float* w, int ldw,
                                                           float* y, int ldy, int K, int mr, int nr,
                                                           const float* scale) {
  v8 acc[MR][NR];
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++) acc[m][n] = bcast(0.f);
  int k = 0;
  for (; k + VL <= K; k += VL) {
    v8 wv[NR];
    for (int n = 0; n < nr; n++) wv[n] = ld(w + (int64_t)n * ldw + k);
    for (int m = 0; m < mr; m++) {
      v8 xv = ld(x + (int64_t)m * ldx + k);
      KEEP(xv);
      for (int n = 0; n < nr; n++) acc[m][n] += xv * wv[n];
    }
  }
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++) {
      float s = hsum(acc[m][n]);
      for (int kk = k; kk < K; kk++) s += x[(int64_t)m * ldx + kk] * w[(int64_t)n * ldw + kk];
      y[(int64_t)m * ldy + n] = scale ? s * scale[n] : s;
    }
}

#define DOT_CASE(mr_, nr_) tile_dot(x + (int64_t)m * K, K, w, ldw, y + (int64_t)m * N, N, K, mr_, nr_, scale)
#define DOT_TAIL(nr_)                  \
  switch (M - m) {                     \
    case 5: DOT_CASE(5, nr_); break;   \
    case 4: DOT_CASE(4, nr_); break;   \
    case 3: DOT_CASE(3, nr_); break;   \
    case 2: DOT_CASE(2, nr_); break;   \
    case 1: DOT_CASE(1, nr_); break;   \
    default: break;                    \
  }

/* All M rows against nr (<= NR) weight rows w (nr, ldw) → y[:, 0:nr] (row stride N). */
static void rows_dot(const float* x, const float* w, int ldw, float* y, int M, int K, int N, int nr,
                     const float* scale) {
  int m = 0;
  if (nr == NR) {
    for (; m + MR <= M; m += MR) DOT_CASE(MR, NR);
    DOT_TAIL(NR);
  } else {
    for (; m + MR <= M; m += MR) DOT_CASE(MR, 1);
    DOT_TAIL(1);
  }
}

/* A block of nb weight rows w (nb, K) against all M rows → y[:, 0:nb]. Loop order: MR rows of x at a time (they
 * stay in L1: 6 × 768 floats are 18 KB) against every NR-row tile of the block (the block stays in L2), so x is
 * read from L1 and the weights from L2, where x-outer-most would stream the block from memory M/MR times and
 * weight-outer-most would reread all of x from L2 for every tile. */
#define NB 64
static void block_dot(const float* x, const float* w, float* y, int M, int K, int N, int nb, const float* scale) {
  for (int m0 = 0; m0 < M; m0 += MR) {
    int mr = M - m0 < MR ? M - m0 : MR;
    for (int n = 0; n < nb; n += NR) {
      int nr = nb - n < NR ? nb - n : NR;
      rows_dot(x + (int64_t)m0 * K, w + (int64_t)n * K, K, y + (int64_t)m0 * N + n, mr, K, N, nr,
               scale ? scale + n : NULL);
    }
  }
}

/* fp32: w (N, K) row-major, as nn.Linear stores it. */
void gemm_tiled_f32(const float* x, const float* w, float* y, int M, int K, int N) {
  int blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < blocks; t++) {
    int n0 = t * NB, nb = N - n0 < NB ? N - n0 : NB;
    block_dot(x, w + (int64_t)n0 * K, y + n0, M, K, N, nb, NULL);
  }
}

/* Quantized (N, K) weights: threads take blocks of NQ rows, dequantize each into a per-thread fp32 scratch
 * (NQ × K floats: 48 KB at K = 768, in L2) and run it through block_dot. */
#define NQ 16

/* int8: q (N, K), one scale per output row (applied to the sums). */
void gemm_tiled_int8(const float* x, const int8_t* q, const float* scales, float* y, int M, int K, int N) {
  int blocks = (N + NQ - 1) / NQ;
#pragma omp parallel
  {
    float* buf = malloc(sizeof(float) * NQ * (size_t)K);
#pragma omp for schedule(static)
    for (int t = 0; t < blocks; t++) {
      int n0 = t * NQ, nb = N - n0 < NQ ? N - n0 : NQ;
      const int8_t* src = q + (int64_t)n0 * K;
      for (int64_t i = 0; i < (int64_t)nb * K; i++) buf[i] = (float)src[i];
      block_dot(x, buf, y + n0, M, K, N, nb, scales + n0);
    }
    free(buf);
  }
}

/* int8 in groups along the input (GGUF's Q8_0): q (N, K), scales (N, K/g); w[n, k] = q[n, k] · scale[n, k/g]. */
void gemm_tiled_int8g(const float* x, const int8_t* q, const float* scales, float* y, int M, int K, int N, int g) {
  int blocks = (N + NQ - 1) / NQ, G = K / g;
#pragma omp parallel
  {
    float* buf = malloc(sizeof(float) * NQ * (size_t)K);
#pragma omp for schedule(static)
    for (int t = 0; t < blocks; t++) {
      int n0 = t * NQ, nb = N - n0 < NQ ? N - n0 : NQ;
      for (int n = 0; n < nb; n++) {
        const int8_t* src = q + (int64_t)(n0 + n) * K;
        const float* s = scales + (int64_t)(n0 + n) * G;
        float* dst = buf + (int64_t)n * K;
        for (int gi = 0; gi < G; gi++)
          for (int k = gi * g; k < (gi + 1) * g; k++) dst[k] = (float)src[k] * s[gi];
      }
      block_dot(x, buf, y + n0, M, K, N, nb, NULL);
    }
    free(buf);
  }
}

/* Outer form over a dequantized (K, CB) block b: y[m, 0:CB] = Σ_k x[m, k] b[k, 0:CB], for m < mr <= 6 (CB: two
 * vectors of columns). */
#define CB (2 * VL)
#define OR 6
static inline __attribute__((always_inline)) void tile_outer(const float* x, int K, const float* b, float* y,
                                                             int ldy, int mr, int nc) {
  v8 acc[OR][2];
  for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = bcast(0.f);
  for (int k = 0; k < K; k++) {
    v8 b0 = ld(b + (int64_t)k * CB), b1 = ld(b + (int64_t)k * CB + VL);
    for (int m = 0; m < mr; m++) {
      v8 xv = bcast(x[(int64_t)m * K + k]);
      acc[m][0] += xv * b0;
      acc[m][1] += xv * b1;
    }
  }
  for (int m = 0; m < mr; m++) {
    float out[CB];
    st(out, acc[m][0]);
    st(out + VL, acc[m][1]);
    memcpy(y + (int64_t)m * ldy, out, sizeof(float) * nc);
  }
}

/* int4: packed (K/2, N), byte [j, n] = code[2j, n] | code[2j+1, n] << 4; scales, mins (K/g, N);
 * w[k, n] = code[k, n] · scale[k/g, n] + min[k/g, n]. Threads split N in blocks of CB columns. */
void gemm_tiled_int4(const float* x, const uint8_t* packed, const float* scales, const float* mins, float* y,
                     int M, int K, int N, int g) {
  int blocks = (N + CB - 1) / CB;
#pragma omp parallel
  {
    float* b = malloc(sizeof(float) * CB * (size_t)K);
#pragma omp for schedule(static)
    for (int t = 0; t < blocks; t++) {
      int n0 = t * CB, nc = N - n0 < CB ? N - n0 : CB;
      for (int j = 0; j < K / 2; j++) {  // byte row j holds codes k = 2j (low nibble) and 2j + 1 (high)
        const uint8_t* row = packed + (int64_t)j * N + n0;
        const float* s = scales + (int64_t)(2 * j / g) * N + n0;
        const float* mn = mins + (int64_t)(2 * j / g) * N + n0;
        float* lo = b + (int64_t)(2 * j) * CB;
        float* hi = lo + CB;
        if (nc == CB) {  // VL bytes at a time: nibbles → fp32 lanes, scaled and offset
          for (int h = 0; h < CB; h += VL) {
            u8x8 codes;
            memcpy(&codes, row + h, sizeof codes);
            v8 sv = ld(s + h), mv = ld(mn + h);
            st(lo + h, tofloat(codes & 15) * sv + mv);
            st(hi + h, tofloat(codes >> 4) * sv + mv);
          }
          continue;
        }
        for (int n = 0; n < CB; n++) {
          lo[n] = n < nc ? (float)(row[n] & 15) * s[n] + mn[n] : 0.f;
          hi[n] = n < nc ? (float)(row[n] >> 4) * s[n] + mn[n] : 0.f;
        }
      }
      int m = 0;
      for (; m + OR <= M; m += OR) tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, OR, nc);
      switch (M - m) {
        case 5: tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, 5, nc); break;
        case 4: tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, 4, nc); break;
        case 3: tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, 3, nc); break;
        case 2: tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, 2, nc); break;
        case 1: tile_outer(x + (int64_t)m * K, K, b, y + (int64_t)m * N + n0, N, 1, nc); break;
        default: break;
      }
    }
    free(b);
  }
}

static inline float dot(const float* a, const float* b, int n) {
  v8 acc = bcast(0.f);
  int d = 0;
  for (; d + VL <= n; d += VL) acc += ld(a + d) * ld(b + d);
  float s = hsum(acc);
  for (; d < n; d++) s += a[d] * b[d];
  return s;
}

static inline void axpy(float p, const float* x, float* y, int n) {
  v8 pv = bcast(p);
  int d = 0;
  for (; d + VL <= n; d += VL) st(y + d, ld(y + d) + pv * ld(x + d));
  for (; d < n; d++) y[d] += p * x[d];
}

/* Decode attention straight from the paged KV pool, one query row per sequence: for sequence b and head h,
 * keys j in [lo, len_b) (lo = len_b - window when banded), each at slot table[b, j / bs] * bs + j % bs of the
 * layer's pools k, v (num_blocks · bs, kv, hd); GQA: query head h reads kv head h / (nh / kv).
 * q, out (B, nh, hd); table (B, W) block ids; lens (B,) context lengths; window <= 0: none. No gather of the
 * blocks into a padded copy and no mask: each (b, h) pair is one thread's loop over its own keys. */
void paged_decode_attention(const float* q, const float* k, const float* v, const int64_t* table,
                            const int64_t* lens, float* out, int B, int nh, int kv, int hd, int bs, int W,
                            int window, float scale) {
  int64_t most = 0;
  for (int b = 0; b < B; b++) most = lens[b] > most ? lens[b] : most;
  int group = nh / kv;
#pragma omp parallel
  {
    float* score = malloc(sizeof(float) * (most > 0 ? most : 1));
#pragma omp for schedule(dynamic, 4)
    for (int bh = 0; bh < B * nh; bh++) {
      int b = bh / nh, h = bh % nh, g = h / group;
      int64_t len = lens[b], lo = window > 0 && len > window ? len - window : 0;
      const float* qv = q + (int64_t)bh * hd;
      float* o = out + (int64_t)bh * hd;
      float best = -1e30f;
      for (int64_t j = lo; j < len; j++) {
        int64_t slot = table[(int64_t)b * W + j / bs] * bs + j % bs;
        const float* kj = k + (slot * kv + g) * hd;
        float s = dot(qv, kj, hd) * scale;
        score[j - lo] = s;
        best = s > best ? s : best;
      }
      float total = 0.f;
      for (int64_t j = lo; j < len; j++) total += score[j - lo] = __builtin_expf(score[j - lo] - best);
      for (int d = 0; d < hd; d++) o[d] = 0.f;
      for (int64_t j = lo; j < len; j++) {
        int64_t slot = table[(int64_t)b * W + j / bs] * bs + j % bs;
        const float* vj = v + (slot * kv + g) * hd;
        axpy(score[j - lo] / total, vj, o, hd);
      }
    }
    free(score);
  }
}
