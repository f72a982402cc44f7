/* A whole batch-1 decode step of a Llama-style GPT in one native call (infer/native.py).
 *
 * Per layer: RMSNorm, the fused QKV product, RoPE (rotate-half), attention over the KV cache (GQA; a KV
 * layout: NativeDecoder's contiguous cache, or the engine's paged block pool through a block table), the output projection and residual, RMSNorm, the fused [gate; up] product, SwiGLU, the down
 * projection and residual; then the final norm and the head. Compiled on first use by transforms/kernels.py
 * (gcc -O3 -march=native -ffast-math -fopenmp) and called through ctypes: one call per token instead of
 * ~40 PyTorch ops per layer. Buffers are preallocated by the caller; nothing is allocated here.
 *
 * Linear layers keep the layouts of transforms/quantize.py (their PyTorch definitions in kernels.py):
 *   LIN_F32   w (N, K) fp32;                LIN_INT8  q (N, K) int8, s (N,);
 *   LIN_INT4  packed (K/2, N) uint8, s, m (K/g, N): w[k, n] = code * s[k/g, n] + m[k/g, n];
 *   LIN_INT8G q (N, K) int8, s (N, K/g): w[n, k] = q[n, k] * s[n, k/g] (GGUF's Q8_0).
 * Each product is split across threads by output ranges aligned to 32; AVX2 paths where available.
 *
 * A Lin with `a8` set takes int8 activations (w8a8, as llama.cpp's Q8_0/Q8_1 dot products): lin() quantizes the
 * input once into blocks of 32 (Act8: codes q, one scale d per block, d times the block's code sum for the int4
 * minimum's term), each thread multiplies integer codes by integer codes (AVX2 sign/maddubs/madd, or AVX-VNNI's
 * dpbusd where -march=native has it) into one int32 per block and output, then one float FMA per block. Needs
 * K and the weight groups in multiples of 32 (native.py checks); fp32 weights keep fp32 activations. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <omp.h>

/* The row-wise helpers both steps share (norms, RoPE, attention, SwiGLU) are never inlined: -ffast-math lets GCC
 * vectorise a reduction differently in each caller, and decode_batch's rows must equal decode_step bit for bit. */
#define NOINLINE __attribute__((noinline))

#include "gemm.c"    /* the register-tiled kernels of the batched step (decode_batch) */
#include "gemm_a8.c" /* and its w8a8 kernels */

enum { LIN_F32 = 0, LIN_INT8 = 1, LIN_INT4 = 2, LIN_INT8G = 3 };

typedef struct {
  int kind, K, N, g, a8, f16; /* a8: int8 activations (quantized layouts only); f16: int4 s, m as fp16 (a8 only) */
  const void* w;
  const void* s; /* fp32, or fp16 with f16 */
  const void* m;
  const float* bias; /* (N,) or NULL */
  /* an a8 layer's batched layout (gemm_a8.c), or NULLs: panels, fp32 scales and mins, int8's corrections */
  const void* pw;
  const float* ps;
  const float* pm;
  const int32_t* pc;
} Lin;

/* Where the keys and values live: position t of head j in layer l is at base + l * layer + blk * block +
 * (t % bs) * pos + j * head, blk = table[t / bs] (the engine's paged pool (n_layer, num_blocks, bs, kv, hd) and one
 * sequence's block table), or t / bs without a table (NativeDecoder's KVCache (n_layer, kv, max_len, hd): bs =
 * max_len, one block). */
typedef struct {
  float* k;
  float* v;
  const int64_t* table; /* the sequence's block ids, or NULL */
  int64_t layer, block, pos, head;
  int bs;
} KV;

typedef struct {
  int n_layer, D, h, kv, hd, ff, V, max_len, nthreads;
  float eps, scale, norm_offset;
  const float* rope_cos; /* (block_size, hd/2) */
  const float* rope_sin;
  int emb_kind, emb_g; /* LIN_F32: (V, D) fp32; LIN_INT8G: q (V, D), s (V, D/g) */
  const void* emb_w;
  const float* emb_s;
  const float* const* ln1; /* n_layer pointers to (D,) */
  const float* const* ln2;
  const float* lnf;
  const Lin* qkv; /* n_layer each */
  const Lin* proj;
  const Lin* fc;
  const Lin* down;
  Lin head;
  KV cache;
  float* scratch; /* native.scratch_floats() floats */
  void* act;      /* act_bytes(largest K) bytes for the quantized activations, or NULL without a8 linears */
} Model;

/* An activation vector (K,) as int8 blocks of 32: x[k] ~ q[k] * d[k / 32]; sd[b] = d[b] * sum of block b's codes. */
typedef struct {
  int8_t* q;
  float* d;
  float* sd;
} Act8;

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
static inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

/* fp32 rows [n0, n1): four rows share each load of x. */
static void lin_f32(const float* x, const float* w, float* y, int K, int n0, int n1) {
  int n = n0;
#ifdef __AVX2__
  for (; n + 4 <= n1 && K % 16 == 0; n += 4) {
    const float* r = w + (int64_t)n * K;
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r + (int64_t)i * K + k), a[2 * i]);
        a[2 * i + 1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(r + (int64_t)i * K + k + 8), a[2 * i + 1]);
      }
    }
    for (int i = 0; i < 4; i++) y[n + i] = hsum8(_mm256_add_ps(a[2 * i], a[2 * i + 1]));
  }
#endif
  for (; n < n1; n++) {
    const float* r = w + (int64_t)n * K;
    float acc = 0.f;
    for (int k = 0; k < K; k++) acc += x[k] * r[k];
    y[n] = acc;
  }
}

/* int8 with one scale per row (g == K) or per group of g inputs (s (N, K/g)): rows [n0, n1). */
static void lin_int8(const float* x, const int8_t* q, const float* s, float* y, int K, int g, int n0, int n1) {
  int G = K / g, n = n0;
#ifdef __AVX2__
  for (; n + 4 <= n1 && g % 8 == 0; n += 4) {
    __m256 tot[4];
    for (int i = 0; i < 4; i++) tot[i] = _mm256_setzero_ps();
    for (int gi = 0; gi < G; gi++) {
      __m256 acc[4];
      for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
      for (int k = gi * g; k < (gi + 1) * g; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(xv, load8_i8(q + (int64_t)(n + i) * K + k), acc[i]);
      }
      for (int i = 0; i < 4; i++) tot[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(s[(int64_t)(n + i) * G + gi]), tot[i]);
    }
    for (int i = 0; i < 4; i++) y[n + i] = hsum8(tot[i]);
  }
#endif
  for (; n < n1; n++) {
    const int8_t* r = q + (int64_t)n * K;
    float acc = 0.f;
    for (int gi = 0; gi < G; gi++) {
      float a = 0.f;
      for (int k = gi * g; k < (gi + 1) * g; k++) a += x[k] * (float)r[k];
      acc += a * s[(int64_t)n * G + gi];
    }
    y[n] = acc;
  }
}

/* int4, packed (K/2, N): outputs [n0, n1), 32 at a time across the row of bytes. */
static void lin_int4(const float* x, const uint8_t* p, const float* s, const float* m, float* y, int K, int N, int g,
                     int n0, int n1) {
  int G = K / g, n = n0;
#ifdef __AVX2__
  const __m256i low = _mm256_set1_epi32(15);
  for (; n + 32 <= n1; n += 32) {
    __m256 out[4];
    for (int i = 0; i < 4; i++) out[i] = _mm256_setzero_ps();
    for (int gi = 0; gi < G; gi++) {
      __m256 acc[4];
      for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
      float xs = 0.f;
      for (int j = gi * g / 2; j < (gi + 1) * g / 2; j++) {
        __m256 x0 = _mm256_set1_ps(x[2 * j]), x1 = _mm256_set1_ps(x[2 * j + 1]);
        xs += x[2 * j] + x[2 * j + 1];
        const uint8_t* row = p + (int64_t)j * N + n;
        for (int i = 0; i < 4; i++) { /* 8 bytes zero-extended to 32-bit lanes, both nibbles of each */
          __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + 8 * i)));
          acc[i] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_and_si256(b, low)), acc[i]);
          acc[i] = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), acc[i]);
        }
      }
      __m256 xsv = _mm256_set1_ps(xs);
      for (int i = 0; i < 4; i++) {
        const int64_t o = (int64_t)gi * N + n + 8 * i;
        out[i] = _mm256_fmadd_ps(acc[i], _mm256_loadu_ps(s + o), out[i]);
        out[i] = _mm256_fmadd_ps(xsv, _mm256_loadu_ps(m + o), out[i]);
      }
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + n + 8 * i, out[i]);
  }
#endif
  for (; n < n1; n++) {
    float out = 0.f;
    for (int gi = 0; gi < G; gi++) {
      float acc = 0.f, xs = 0.f;
      for (int j = gi * g / 2; j < (gi + 1) * g / 2; j++) {
        uint8_t b = p[(int64_t)j * N + n];
        acc += x[2 * j] * (float)(b & 15) + x[2 * j + 1] * (float)(b >> 4);
        xs += x[2 * j] + x[2 * j + 1];
      }
      out += acc * s[(int64_t)gi * N + n] + xs * m[(int64_t)gi * N + n];
    }
    y[n] = out;
  }
}

/* --- int8 activations (a8) ------------------------------------------------------------------------------- */

/* x (K,) → a's blocks: d = max|x| / 127 (written as a product, as kernels.quantize_act_ref computes it), codes
 * round-half-even(x / d) in [-127, 127]. Serial: K is at most a few thousand. */
static void quantize_act(const float* x, int K, Act8 a) {
  for (int b = 0; b < K / 32; b++) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
    float d = amax * (1.f / 127.f), id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < 32; i++) {
      float v = fminf(fmaxf(nearbyintf(xb[i] * id), -127.f), 127.f);
      a.q[32 * b + i] = (int8_t)v;
      sum += (int)v;
    }
    a.d[b] = d;
    a.sd[b] = d * (float)sum;
  }
}

/* An IEEE half's value (the scalar tails of f16 scales). */
static inline float half_to_float(uint16_t h) {
  int e = (h >> 10) & 31, f = h & 1023;
  float v = e == 0 ? ldexpf((float)f, -24) : e == 31 ? INFINITY : ldexpf((float)(f | 1024), e - 25);
  return h >> 15 ? -v : v;
}

static inline float scale_at(const void* p, int64_t i, int f16) {
  return f16 ? half_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static Act8 act_views(void* buf, int K) {
  Act8 a = {(int8_t*)buf, (float*)((char*)buf + K), (float*)((char*)buf + K) + K / 32};
  return a;
}

#ifdef __AVX2__
/* acc + in each int32 lane the sum of four products u·s of its bytes: u unsigned, s signed (|u·s| pairs < 2^15). */
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

/* int8 weights · int8 activations, rows [n0, n1): g == K, one scale per row (scaling the row's total), or
 * s (N, K/g) per group of g (a multiple of 32). Per block and row one exact int32 dot, then one FMA into the row's
 * total in block order (gemm_a8.c's batched kernel does the same, so the two agree bit for bit). Four rows share
 * each block of activation codes; the next four are prefetched (one sequential stream is all the hardware
 * prefetcher sees here: measured 1.4x on SmolLM2's int8). */
static void lin_int8_a8(Act8 a, const int8_t* q, const float* s, float* y, int K, int g, int n0, int n1) {
  int B = K / 32, G = K / g, per = g / 32, by_row = g == K, n = n0;
#ifdef __AVX2__
  for (; n + 4 <= n1; n += 4) {
    __m128 tot = _mm_setzero_ps();
    for (int b = 0; b < B; b++) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(a.q + 32 * b)), dots[4];
      for (int i = 0; i < 4; i++) {
        const int8_t* r = q + (int64_t)(n + i) * K + 32 * b;
        _mm_prefetch((const char*)(r + (int64_t)4 * K), _MM_HINT_T0); /* the next 4 rows' block (never faults) */
        __m256i w = _mm256_loadu_si256((const __m256i*)r);
        dots[i] = dot4(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
      }
      __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(dots[0], dots[1]), _mm256_hadd_epi32(dots[2], dots[3]));
      __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)); /* rows' dots */
      __m128 d = _mm_set1_ps(a.d[b]);
      __m128 scale = by_row ? d
                            : _mm_mul_ps(d, _mm_set_ps(s[(int64_t)(n + 3) * G + b / per], s[(int64_t)(n + 2) * G + b / per],
                                                       s[(int64_t)(n + 1) * G + b / per], s[(int64_t)n * G + b / per]));
      tot = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), scale, tot);
    }
    _mm_storeu_ps(y + n, by_row ? _mm_mul_ps(tot, _mm_loadu_ps(s + n)) : tot);
  }
#endif
  for (; n < n1; n++) {
    const int8_t* r = q + (int64_t)n * K;
    float tot = 0.f;
    for (int b = 0; b < B; b++) {
      int dot = 0;
      for (int k = 32 * b; k < 32 * b + 32; k++) dot += (int)r[k] * (int)a.q[k];
      tot = fmaf((float)dot, by_row ? a.d[b] : a.d[b] * s[(int64_t)n * G + b / per], tot);
    }
    y[n] = by_row ? tot * s[n] : tot;
  }
}

#ifdef __AVX2__
/* Byte rows j, j+1 of the packed int4 weight for 32 outputs → 4 vectors of [code 2j, 2j+1, 2j+2, 2j+3] per
 * output (uint8 × 4 per int32 lane), outputs in the order of unpack's 128-bit lanes: {0-3 | 16-19}, {4-7 | 20-23},
 * {8-11 | 24-27}, {12-15 | 28-31} (int4_a8_block puts them back in order). */
static inline void int4_quads(const uint8_t* r0, const uint8_t* r1, __m256i u[4]) {
  const __m256i low = _mm256_set1_epi8(15);
  __m256i b0 = _mm256_loadu_si256((const __m256i*)r0), b1 = _mm256_loadu_si256((const __m256i*)r1);
  __m256i c0 = _mm256_and_si256(b0, low), c1 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
  __m256i c2 = _mm256_and_si256(b1, low), c3 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
  __m256i lo01 = _mm256_unpacklo_epi8(c0, c1), hi01 = _mm256_unpackhi_epi8(c0, c1);
  __m256i lo23 = _mm256_unpacklo_epi8(c2, c3), hi23 = _mm256_unpackhi_epi8(c2, c3);
  u[0] = _mm256_unpacklo_epi16(lo01, lo23);
  u[1] = _mm256_unpackhi_epi16(lo01, lo23);
  u[2] = _mm256_unpacklo_epi16(hi01, hi23);
  u[3] = _mm256_unpackhi_epi16(hi01, hi23);
}
#endif

#ifdef __AVX2__
/* Block b (inputs 32b .. 32b+31) of lin_int4_a8 for T (1 or 2) × 32 outputs from n, added to y[n ..] (set at b = 0). */
static inline __m256 load8_scales(const void* p, int64_t i, int f16) {
  return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)))
             : _mm256_loadu_ps((const float*)p + i);
}

static inline __attribute__((always_inline)) void int4_a8_block(Act8 a, const uint8_t* p, const void* s,
                                                                const void* m, int f16, float* y, int N, int per,
                                                                int b, int n, const int T) {
  __m256i acc[8], u[4];
  for (int i = 0; i < 4 * T; i++) acc[i] = _mm256_setzero_si256();
  for (int j = 16 * b; j < 16 * b + 16; j += 2) { /* byte rows j, j+1: inputs 2j .. 2j+3 */
    const uint8_t* r = p + (int64_t)j * N + n; /* and the next block's rows, prefetched (measured 1.5x) */
    _mm_prefetch((const char*)(r + (int64_t)16 * N), _MM_HINT_T0);
    _mm_prefetch((const char*)(r + (int64_t)17 * N), _MM_HINT_T0);
    int32_t x4;
    memcpy(&x4, a.q + 2 * j, 4);
    __m256i xv = _mm256_set1_epi32(x4);
    for (int t = 0; t < T; t++) {
      int4_quads(r + 32 * t, r + N + 32 * t, u);
      for (int i = 0; i < 4; i++) acc[4 * t + i] = dot4(acc[4 * t + i], u[i], xv);
    }
  }
  __m256 d = _mm256_set1_ps(a.d[b]), sd = _mm256_set1_ps(a.sd[b]);
  for (int t = 0; t < T; t++) {
    __m256i* c = acc + 4 * t;
    __m256i dots[4] = {_mm256_permute2x128_si256(c[0], c[1], 0x20), _mm256_permute2x128_si256(c[2], c[3], 0x20),
                       _mm256_permute2x128_si256(c[0], c[1], 0x31),
                       _mm256_permute2x128_si256(c[2], c[3], 0x31)}; /* outputs in order */
    const int64_t o = (int64_t)(b / per) * N + n + 32 * t;
    for (int i = 0; i < 4; i++) {
      float* out = y + n + 32 * t + 8 * i;
      __m256 v = b ? _mm256_loadu_ps(out) : _mm256_setzero_ps();
      v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[i]), _mm256_mul_ps(d, load8_scales(s, o + 8 * i, f16)), v);
      _mm256_storeu_ps(out, _mm256_fmadd_ps(sd, load8_scales(m, o + 8 * i, f16), v));
    }
  }
}
#endif

/* int4 weights (packed (K/2, N), s and m (K/g, N)) · int8 activations, outputs [n0, n1): per block b of 32 inputs
 * and output n, sum_k w[k, n] x[k] = d_b s[n] · (codes · q) + d_b (sum q) · m[n]. One block across all the outputs
 * (64 then 32 at a time, y accumulating in L1) before the next: its 16 byte rows are read as sequential streams,
 * which the hardware prefetches (walking one output tile down all K/2 rows, N bytes apart, it does not). */
static void lin_int4_a8(Act8 a, const uint8_t* p, const void* s, const void* m, int f16, float* y, int K, int N,
                        int g, int n0, int n1) {
  int B = K / 32, per = g / 32, n = n0;
#ifdef __AVX2__
  for (int b = 0; b < B; b++) {
    for (n = n0; n + 64 <= n1; n += 64) int4_a8_block(a, p, s, m, f16, y, N, per, b, n, 2);
    for (; n + 32 <= n1; n += 32) int4_a8_block(a, p, s, m, f16, y, N, per, b, n, 1);
  }
#endif
  for (; n < n1; n++) {
    float out = 0.f;
    for (int b = 0; b < B; b++) {
      int dot = 0;
      for (int j = 16 * b; j < 16 * b + 16; j++) {
        uint8_t c = p[(int64_t)j * N + n];
        dot += (c & 15) * (int)a.q[2 * j] + (c >> 4) * (int)a.q[2 * j + 1];
      }
      const int64_t o = (int64_t)(b / per) * N + n; /* the vector path's order: gemm_a8.c repeats it */
      out = fmaf(a.sd[b], scale_at(m, o, f16), fmaf((float)dot, a.d[b] * scale_at(s, o, f16), out));
    }
    y[n] = out;
  }
}

/* y (N,) = W x (+ bias), on the calling thread team: each thread takes one range of outputs; `a` holds x's int8
 * blocks when L->a8 (quantized by lin()). */
static void lin_range(const Lin* L, const float* x, Act8 a, float* y, int n0, int n1) {
  if (L->kind == LIN_F32) lin_f32(x, (const float*)L->w, y, L->K, n0, n1);
  else if (L->a8 && L->kind == LIN_INT4)
    lin_int4_a8(a, (const uint8_t*)L->w, L->s, L->m, L->f16, y, L->K, L->N, L->g, n0, n1);
  else if (L->a8) lin_int8_a8(a, (const int8_t*)L->w, L->s, y, L->K, L->kind == LIN_INT8 ? L->K : L->g, n0, n1);
  else if (L->kind == LIN_INT8) lin_int8(x, (const int8_t*)L->w, L->s, y, L->K, L->K, n0, n1);
  else if (L->kind == LIN_INT8G) lin_int8(x, (const int8_t*)L->w, L->s, y, L->K, L->g, n0, n1);
  else lin_int4(x, (const uint8_t*)L->w, L->s, L->m, y, L->K, L->N, L->g, n0, n1);
  if (L->bias)
    for (int n = n0; n < n1; n++) y[n] += L->bias[n];
}

/* `act`: act_bytes(K) bytes of scratch, used when L->a8 (the caller guarantees it then). */
static void lin(const Lin* L, const float* x, float* y, int nthreads, void* act) {
  Act8 a = {NULL, NULL, NULL};
  if (L->a8) {
    a = act_views(act, L->K);
    quantize_act(x, L->K, a);
  }
#pragma omp parallel num_threads(nthreads)
  {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int chunk = ((L->N + T - 1) / T + 31) / 32 * 32;
    int n0 = t * chunk, n1 = n0 + chunk < L->N ? n0 + chunk : L->N;
    if (n0 < n1) lin_range(L, x, a, y, n0, n1);
  }
}

/* One product through the step's own kernels, for the tests against kernels.py's references; `act` as lin's. */
void native_linear(const Lin* L, const float* x, float* y, int nthreads, void* act) { lin(L, x, y, nthreads, act); }

static NOINLINE void rmsnorm(const float* x, const float* w, float offset, float eps, float* y, int D) {
  float ss = 0.f;
  for (int i = 0; i < D; i++) ss += x[i] * x[i];
  float r = 1.f / sqrtf(ss / D + eps);
  for (int i = 0; i < D; i++) y[i] = x[i] * r * (offset + w[i]);
}

/* a (n, hd) heads rotated in place at one position: pairs (i, i + hd/2). */
static NOINLINE void rope(float* a, int n, int hd, const float* c, const float* s) {
  int half = hd / 2;
  for (int h = 0; h < n; h++) {
    float* v = a + h * hd;
    for (int i = 0; i < half; i++) {
      float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * c[i] - x2 * s[i];
      v[i + half] = x2 * c[i] + x1 * s[i];
    }
  }
}

/* The offset of (layer l, kv head j, position t) in the cache's k and v. */
static inline int64_t kv_at(const KV* c, int l, int j, int t) {
  int64_t blk = c->table ? c->table[t / c->bs] : t / c->bs;
  return l * c->layer + blk * c->block + (int64_t)(t % c->bs) * c->pos + j * c->head;
}

/* Query head h (hd,) over keys/values [0, len) of layer l in the layout c; out (hd,); p: len floats of scores. Block
 * by block: one table lookup per block of bs positions (pos floats apart), not two divisions per position. */
static NOINLINE void attend_head(const Model* M, const KV* c, int l, const float* qh, int h, int len, float* o, float* p) {
  int hd = M->hd, j = h / (M->h / M->kv);
  float mx = -INFINITY;
  for (int t0 = 0; t0 < len; t0 += c->bs) {
    const float* kb = c->k + kv_at(c, l, j, t0);
    int n = len - t0 < c->bs ? len - t0 : c->bs;
    for (int i = 0; i < n; i++) {
      float d = dot(qh, kb + (int64_t)i * c->pos, hd) * M->scale;
      p[t0 + i] = d;
      mx = d > mx ? d : mx;
    }
  }
  float sum = 0.f;
  for (int t = 0; t < len; t++) sum += (p[t] = expf(p[t] - mx));
  for (int i = 0; i < hd; i++) o[i] = 0.f;
  for (int t0 = 0; t0 < len; t0 += c->bs) {
    const float* vb = c->v + kv_at(c, l, j, t0);
    int n = len - t0 < c->bs ? len - t0 : c->bs;
    for (int i = 0; i < n; i++) axpy(p[t0 + i] / sum, vb + (int64_t)i * c->pos, o, hd);
  }
}

/* q (h, hd) over keys/values [0, len) of layer l's cache; out (h, hd); sc (h, max_len). */
static void attention(const Model* M, int l, const float* q, int len, float* out, float* sc) {
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
  for (int h = 0; h < M->h; h++)
    attend_head(M, &M->cache, l, q + h * M->hd, h, len, out + h * M->hd, sc + (int64_t)h * M->max_len);
}

static void embed(const Model* M, int token, float* x) {
  if (M->emb_kind == LIN_F32) {
    memcpy(x, (const float*)M->emb_w + (int64_t)token * M->D, M->D * sizeof(float));
    return;
  }
  const int8_t* q = (const int8_t*)M->emb_w + (int64_t)token * M->D;
  const float* s = M->emb_s + (int64_t)token * (M->D / M->emb_g);
  for (int i = 0; i < M->D; i++) x[i] = (float)q[i] * s[i / M->emb_g];
}

/* One row's fused q|k|v (qd + 2 kvd,) at position pos: RoPE on q and k in place, k and v stored in the layout c. */
static NOINLINE void rope_store(const Model* M, const KV* c, int l, float* qkv, int pos) {
  int hd = M->hd, qd = M->h * hd, kvd = M->kv * hd;
  const float *cs = M->rope_cos + (int64_t)pos * hd / 2, *sn = M->rope_sin + (int64_t)pos * hd / 2;
  rope(qkv, M->h, hd, cs, sn);
  rope(qkv + qd, M->kv, hd, cs, sn);
  for (int j = 0; j < M->kv; j++) {
    int64_t at = kv_at(c, l, j, pos);
    memcpy(c->k + at, qkv + qd + j * hd, hd * sizeof(float));
    memcpy(c->v + at, qkv + qd + kvd + j * hd, hd * sizeof(float));
  }
}

/* hb (2 ff,) = [gate; up] → hb[0:ff] = silu(gate) * up. */
static NOINLINE void swiglu(float* hb, int ff) {
  for (int i = 0; i < ff; i++) hb[i] = hb[i] / (1.f + expf(-hb[i])) * hb[ff + i];
}

static void layer(const Model* M, int l, int pos, float* x, float* buf) {
  int D = M->D, hd = M->hd, qd = M->h * hd, kvd = M->kv * hd;
  float *xn = buf, *qkv = xn + D, *att = qkv + qd + 2 * kvd, *hb = att + qd, *tmp = hb + 2 * M->ff;
  float* sc = tmp + D;
  rmsnorm(x, M->ln1[l], M->norm_offset, M->eps, xn, D);
  lin(&M->qkv[l], xn, qkv, M->nthreads, M->act);
  rope_store(M, &M->cache, l, qkv, pos);
  attention(M, l, qkv, pos + 1, att, sc);
  lin(&M->proj[l], att, tmp, M->nthreads, M->act);
  for (int i = 0; i < D; i++) x[i] += tmp[i];
  rmsnorm(x, M->ln2[l], M->norm_offset, M->eps, xn, D);
  lin(&M->fc[l], xn, hb, M->nthreads, M->act);
  swiglu(hb, M->ff);
  lin(&M->down[l], hb, tmp, M->nthreads, M->act);
  for (int i = 0; i < D; i++) x[i] += tmp[i];
}

/* The logits (V,) of `token` at position `pos`; writes its keys and values into the cache at `pos`. */
void decode_step(const Model* M, int token, int pos, float* logits) {
  float* x = M->scratch;
  float* buf = x + M->D;
  embed(M, token, x);
  for (int l = 0; l < M->n_layer; l++) layer(M, l, pos, x, buf);
  rmsnorm(x, M->lnf, M->norm_offset, M->eps, buf, M->D);
  lin(&M->head, buf, logits, M->nthreads, M->act);
}

/* --- a batch of decoding sequences in one call (the engine's batched decode step) ------------------------------ */

/* B rows x (B, K) → ActRows in `act` (batch_act_bytes(B, K) bytes): each row quantized as quantize_act does, and
 * its codes + 128 for the int8 kernels' unsigned operand. */
static ActRows quantize_rows(const float* x, int B, int K, void* act, int nthreads) {
  int8_t* q = (int8_t*)act;
  uint8_t* u = (uint8_t*)(q + (int64_t)B * K);
  float* d = (float*)(u + (int64_t)B * K);
  float* sd = d + (int64_t)B * (K / 32);
#pragma omp parallel for num_threads(nthreads)
  for (int b = 0; b < B; b++) {
    Act8 a = {q + (int64_t)b * K, d + (int64_t)b * (K / 32), sd + (int64_t)b * (K / 32)};
    quantize_act(x + (int64_t)b * K, K, a);
    for (int k = 0; k < K; k++) u[(int64_t)b * K + k] = (uint8_t)(a.q[k] + 128);
  }
  ActRows r = {q, u, d, sd};
  return r;
}

static int64_t batch_act_bytes(int B, int K) { return (int64_t)B * (2 * K + 8 * (K / 32)); }

/* An a8 layer for B rows: gemm_a8.c's batched kernels on its batched layout, or (a build without them, or a layer
 * without the layout) each row through the batch-1 kernel. */
static void lin_rows_a8(const Lin* L, const float* x, float* y, int B, void* act, int nthreads) {
  if (A8_BATCHED && L->pw) {
    ActRows a = quantize_rows(x, B, L->K, act, nthreads);
#if A8_BATCHED
    if (L->kind == LIN_INT4) gemm_a8_int4(a, B, L->pw, L->ps, L->pm, y, L->K, L->N, L->g, nthreads);
    else gemm_a8_int8(a, B, L->pw, L->pc, L->ps, y, L->K, L->N, L->kind == LIN_INT8 ? L->K : L->g, nthreads);
#endif
    return;
  }
  for (int b = 0; b < B; b++) lin(L, x + (int64_t)b * L->K, y + (int64_t)b * L->N, nthreads, act);
}

/* Y (B, N) = X (B, K) · Wᵀ (+ bias) through gemm.c's register-tiled kernels: each weight tile read once for all B
 * rows, dequantized once per tile; a8 layers through lin_rows_a8 (`act`: batch_act_bytes(B, K) of scratch). */
static void lin_rows(const Lin* L, const float* x, float* y, int B, void* act, int nthreads) {
  if (L->a8) lin_rows_a8(L, x, y, B, act, nthreads);
  else if (L->kind == LIN_F32) gemm_tiled_f32(x, (const float*)L->w, y, B, L->K, L->N);
  else if (L->kind == LIN_INT8) gemm_tiled_int8(x, (const int8_t*)L->w, (const float*)L->s, y, B, L->K, L->N);
  else if (L->kind == LIN_INT8G)
    gemm_tiled_int8g(x, (const int8_t*)L->w, (const float*)L->s, y, B, L->K, L->N, L->g);
  else gemm_tiled_int4(x, (const uint8_t*)L->w, (const float*)L->s, (const float*)L->m, y, B, L->K, L->N, L->g);
  if (L->bias)
    for (int b = 0; b < B; b++)
      for (int n = 0; n < L->N; n++) y[(int64_t)b * L->N + n] += L->bias[n];
}

/* B rows through one layer's batched product (what the tests compare); `act`: batch_act_bytes(B, K) bytes. */
void native_linear_rows(const Lin* L, const float* x, float* y, int B, int nthreads, void* act) {
  lin_rows(L, x, y, B, act, nthreads);
}

/* M's KV layout with row b's block table (tables (B, W)). */
static inline KV row_kv(const Model* M, const int64_t* tables, int W, int b) {
  KV c = M->cache;
  c.table = tables + (int64_t)b * W;
  return c;
}

/* Layer l for B rows x (B, D) at positions pos (B,); buf as decode_batch's. Row-wise work (norms, RoPE, cache
 * writes, SwiGLU) and the (row, head) attention pairs are split across the threads; the products are batched. */
static void layer_rows(const Model* M, int l, int B, const int* pos, const int64_t* tables, int W, float* x,
                       float* buf, void* act) {
  int D = M->D, hd = M->hd, qd = M->h * hd, Q = qd + 2 * M->kv * hd, F = 2 * M->ff;
  float *xn = buf, *qkv = xn + (int64_t)B * D, *att = qkv + (int64_t)B * Q, *hb = att + (int64_t)B * qd;
  float *tmp = hb + (int64_t)B * F, *sc = tmp + (int64_t)B * D;
#pragma omp parallel for num_threads(M->nthreads)
  for (int b = 0; b < B; b++) rmsnorm(x + (int64_t)b * D, M->ln1[l], M->norm_offset, M->eps, xn + (int64_t)b * D, D);
  lin_rows(&M->qkv[l], xn, qkv, B, act, M->nthreads);
#pragma omp parallel for num_threads(M->nthreads)
  for (int b = 0; b < B; b++) {
    KV c = row_kv(M, tables, W, b);
    rope_store(M, &c, l, qkv + (int64_t)b * Q, pos[b]);
  }
#pragma omp parallel for num_threads(M->nthreads) schedule(dynamic, 4)
  for (int bh = 0; bh < B * M->h; bh++) {
    int b = bh / M->h, h = bh % M->h;
    KV c = row_kv(M, tables, W, b);
    attend_head(M, &c, l, qkv + (int64_t)b * Q + h * hd, h, pos[b] + 1, att + (int64_t)b * qd + h * hd,
                sc + (int64_t)omp_get_thread_num() * M->max_len);
  }
  lin_rows(&M->proj[l], att, tmp, B, act, M->nthreads);
  for (int64_t i = 0; i < (int64_t)B * D; i++) x[i] += tmp[i];
#pragma omp parallel for num_threads(M->nthreads)
  for (int b = 0; b < B; b++) rmsnorm(x + (int64_t)b * D, M->ln2[l], M->norm_offset, M->eps, xn + (int64_t)b * D, D);
  lin_rows(&M->fc[l], xn, hb, B, act, M->nthreads);
#pragma omp parallel for num_threads(M->nthreads)
  for (int b = 0; b < B; b++) swiglu(hb + (int64_t)b * F, M->ff);
  for (int b = 0; b < B; b++) /* the down product reads rows of ff: pack silu(gate) * up down to them */
    memmove(hb + (int64_t)b * M->ff, hb + (int64_t)b * F, M->ff * sizeof(float));
  lin_rows(&M->down[l], hb, tmp, B, act, M->nthreads);
  for (int64_t i = 0; i < (int64_t)B * D; i++) x[i] += tmp[i];
}

static int64_t batch_work_floats(const Model* M, int B) {
  int64_t qd = M->h * M->hd, Q = qd + 2 * M->kv * M->hd;
  return (int64_t)B * (3 * M->D + Q + qd + 2 * M->ff) + (int64_t)M->nthreads * M->max_len;
}

/* Floats of decode_batch's scratch for B rows: the layers' work, then (a8 layers) the rows' activation codes. */
int64_t batch_floats(const Model* M, int B) {
  int K = M->D > M->ff ? M->D : M->ff;
  K = K > M->h * M->hd ? K : M->h * M->hd;
  return batch_work_floats(M, B) + (M->act ? (batch_act_bytes(B, K) + 3) / 4 : 0);
}

/* B rows: tokens (B,) at positions pos (B,), row b through block table b of tables (B, W); writes their keys and
 * values. Rows of one sequence (the same table, consecutive positions: a prefill chunk, a speculative
 * verification) attend causally to each other, because every row's keys and values of a layer are written before
 * any row of it attends. The logits (n_out, V) are those of rows out[0..n_out). buf: batch_floats(M, B) floats.
 * a8 layers run gemm_a8.c's kernels on their batched layouts (each row as its batch-1 step computes it). */
void decode_batch(const Model* M, int B, const int* tokens, const int* pos, const int64_t* tables, int W,
                  int n_out, const int* out, float* logits, float* buf) {
  int D = M->D;
  float *x = buf, *rest = x + (int64_t)B * D;
  void* act = buf + batch_work_floats(M, B);
  for (int b = 0; b < B; b++) embed(M, tokens[b], x + (int64_t)b * D);
  for (int l = 0; l < M->n_layer; l++) layer_rows(M, l, B, pos, tables, W, x, rest, act);
  for (int i = 0; i < n_out; i++)
    rmsnorm(x + (int64_t)out[i] * D, M->lnf, M->norm_offset, M->eps, rest + (int64_t)i * D, D);
  if (n_out) lin_rows(&M->head, rest, logits, n_out, act, M->nthreads);
}
