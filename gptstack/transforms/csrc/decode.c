/* A whole batch-1 decode step of a Llama-style GPT in one native call (infer/native.py).
 *
 * Per layer: RMSNorm, the fused QKV product, RoPE (rotate-half), attention over the contiguous KV cache
 * (GQA), the output projection and residual, RMSNorm, the fused [gate; up] product, SwiGLU, the down
 * projection and residual; then the final norm and the head. Compiled on first use by transforms/kernels.py
 * (gcc -O3 -march=native -ffast-math -fopenmp) and called through ctypes: one call per token instead of
 * ~40 PyTorch ops per layer. Buffers are preallocated by the caller; nothing is allocated here.
 *
 * Linear layers keep the layouts of transforms/quantize.py (their PyTorch definitions in kernels.py):
 *   LIN_F32   w (N, K) fp32;                LIN_INT8  q (N, K) int8, s (N,);
 *   LIN_INT4  packed (K/2, N) uint8, s, m (K/g, N): w[k, n] = code * s[k/g, n] + m[k/g, n];
 *   LIN_INT8G q (N, K) int8, s (N, K/g): w[n, k] = q[n, k] * s[n, k/g] (GGUF's Q8_0).
 * Each product is split across threads by output ranges aligned to 32; AVX2 paths where available. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <omp.h>

enum { LIN_F32 = 0, LIN_INT8 = 1, LIN_INT4 = 2, LIN_INT8G = 3 };

typedef struct {
  int kind, K, N, g;
  const void* w;
  const float* s;
  const float* m;
  const float* bias; /* (N,) or NULL */
} Lin;

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
  float* kcache; /* (n_layer, kv, max_len, hd): KVCache's k for batch 1 */
  float* vcache;
  float* scratch; /* native.scratch_floats() floats */
} Model;

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

/* y (N,) = W x (+ bias), on the calling thread team: each thread takes one range of outputs. */
static void lin_range(const Lin* L, const float* x, float* y, int n0, int n1) {
  if (L->kind == LIN_F32) lin_f32(x, (const float*)L->w, y, L->K, n0, n1);
  else if (L->kind == LIN_INT8) lin_int8(x, (const int8_t*)L->w, L->s, y, L->K, L->K, n0, n1);
  else if (L->kind == LIN_INT8G) lin_int8(x, (const int8_t*)L->w, L->s, y, L->K, L->g, n0, n1);
  else lin_int4(x, (const uint8_t*)L->w, L->s, L->m, y, L->K, L->N, L->g, n0, n1);
  if (L->bias)
    for (int n = n0; n < n1; n++) y[n] += L->bias[n];
}

static void lin(const Lin* L, const float* x, float* y, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int chunk = ((L->N + T - 1) / T + 31) / 32 * 32;
    int n0 = t * chunk, n1 = n0 + chunk < L->N ? n0 + chunk : L->N;
    if (n0 < n1) lin_range(L, x, y, n0, n1);
  }
}

/* One product through the step's own kernels, for the tests against kernels.py's references. */
void native_linear(const Lin* L, const float* x, float* y, int nthreads) { lin(L, x, y, nthreads); }

static void rmsnorm(const float* x, const float* w, float offset, float eps, float* y, int D) {
  float ss = 0.f;
  for (int i = 0; i < D; i++) ss += x[i] * x[i];
  float r = 1.f / sqrtf(ss / D + eps);
  for (int i = 0; i < D; i++) y[i] = x[i] * r * (offset + w[i]);
}

/* a (n, hd) heads rotated in place at one position: pairs (i, i + hd/2). */
static void rope(float* a, int n, int hd, const float* c, const float* s) {
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

/* q (h, hd) over keys/values [0, len) of one layer's cache (kv, max_len, hd); out (h, hd); sc (h, max_len). */
static void attention(const Model* M, const float* q, const float* kc, const float* vc, int len, float* out,
                      float* sc) {
  int hd = M->hd, per = M->h / M->kv;
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
  for (int h = 0; h < M->h; h++) {
    const float* kh = kc + (int64_t)(h / per) * M->max_len * hd;
    const float* vh = vc + (int64_t)(h / per) * M->max_len * hd;
    const float* qh = q + h * hd;
    float* p = sc + (int64_t)h * M->max_len;
    float mx = -INFINITY;
    for (int t = 0; t < len; t++) {
      float d = 0.f;
      for (int i = 0; i < hd; i++) d += qh[i] * kh[(int64_t)t * hd + i];
      p[t] = d * M->scale;
      mx = p[t] > mx ? p[t] : mx;
    }
    float sum = 0.f;
    for (int t = 0; t < len; t++) sum += (p[t] = expf(p[t] - mx));
    float* o = out + h * hd;
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (int t = 0; t < len; t++) {
      float w = p[t] / sum;
      for (int i = 0; i < hd; i++) o[i] += w * vh[(int64_t)t * hd + i];
    }
  }
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

static void layer(const Model* M, int l, int pos, float* x, float* buf) {
  int D = M->D, hd = M->hd, qd = M->h * hd, kvd = M->kv * hd;
  float *xn = buf, *qkv = xn + D, *att = qkv + qd + 2 * kvd, *hb = att + qd, *tmp = hb + 2 * M->ff;
  float* sc = tmp + D;
  rmsnorm(x, M->ln1[l], M->norm_offset, M->eps, xn, D);
  lin(&M->qkv[l], xn, qkv, M->nthreads);
  const float *c = M->rope_cos + (int64_t)pos * hd / 2, *s = M->rope_sin + (int64_t)pos * hd / 2;
  rope(qkv, M->h, hd, c, s);
  rope(qkv + qd, M->kv, hd, c, s);
  int64_t lay = (int64_t)l * M->kv * M->max_len * hd;
  for (int j = 0; j < M->kv; j++) {
    memcpy(M->kcache + lay + ((int64_t)j * M->max_len + pos) * hd, qkv + qd + j * hd, hd * sizeof(float));
    memcpy(M->vcache + lay + ((int64_t)j * M->max_len + pos) * hd, qkv + qd + kvd + j * hd, hd * sizeof(float));
  }
  attention(M, qkv, M->kcache + lay, M->vcache + lay, pos + 1, att, sc);
  lin(&M->proj[l], att, tmp, M->nthreads);
  for (int i = 0; i < D; i++) x[i] += tmp[i];
  rmsnorm(x, M->ln2[l], M->norm_offset, M->eps, xn, D);
  lin(&M->fc[l], xn, hb, M->nthreads);
  for (int i = 0; i < M->ff; i++) hb[i] = hb[i] / (1.f + expf(-hb[i])) * hb[M->ff + i]; /* silu(gate) * up */
  lin(&M->down[l], hb, tmp, M->nthreads);
  for (int i = 0; i < D; i++) x[i] += tmp[i];
}

/* The logits (V,) of `token` at position `pos`; writes its keys and values into the cache at `pos`. */
void decode_step(const Model* M, int token, int pos, float* logits) {
  float* x = M->scratch;
  float* buf = x + M->D;
  embed(M, token, x);
  for (int l = 0; l < M->n_layer; l++) layer(M, l, pos, x, buf);
  rmsnorm(x, M->lnf, M->norm_offset, M->eps, buf, M->D);
  lin(&M->head, buf, logits, M->nthreads);
}
