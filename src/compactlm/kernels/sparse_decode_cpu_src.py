"""C++ source of :mod:`compactlm.kernels.sparse_decode_cpu` (kept apart so that the Python stays readable).

``CPP`` holds the kernels and their pybind entry points, ``DECLS`` the declarations ``load_inline`` binds. Every
routine here has its reference named in :mod:`compactlm.kernels.sparse_decode_cpu`'s docstring; the tests in
``tests/kernels/test_sparse_decode_cpu.py`` compare them.
"""

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float load1(const c10::BFloat16* p) { uint32_t u = uint32_t(*reinterpret_cast<const uint16_t*>(p)) << 16;
                                              float f; std::memcpy(&f, &u, 4); return f; }
inline float load1(const c10::Half* p) { return static_cast<float>(*p); }
inline float load1(const float* p) { return *p; }
inline double load1(const double* p) { return *p; }

template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<A>(load1(src + j));
}

// Lane-wise accumulators: each acc[l] is its own chain, so the compiler vectorises without reassociating.
template <typename A>
inline A dot(const A* a, const A* b, int64_t d) {
  constexpr int W = 16;
  A acc[W] = {};
  int64_t j = 0;
  for (; j + W <= d; j += W)
    for (int l = 0; l < W; ++l) acc[l] += a[j + l] * b[j + l];
  A s = 0;
  for (int l = 0; l < W; ++l) s += acc[l];
  for (; j < d; ++j) s += a[j] * b[j];
  return s;
}

// exp for x <= 0 in fp32: 2^n * p(r), |r| <= ln2/2, degree-7 Taylor (relative error < 1e-8 before rounding).
// Why not std::exp: it does not vectorise here, and 4 x 33K of them per KV head would cost more than the gathers.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  float n = std::nearbyint(x * 1.4426950408889634f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s; std::memcpy(&s, &e, 4);
  return p * s;
}
inline double exp_neg(double x) { return std::exp(x); }

// Two prefetch distances: rows far ahead go to L2 only (L2 keeps more misses in flight than L1 does), rows a few
// ahead into L1. Measured at 32K (bf16, 1 thread, under load, round-robin): L1 only at 8 rows 4.03 ms, L2 at 32 rows
// + L1 at 4 rows 2.56 ms for the whole step.
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* ix, int64_t i, int64_t n, int64_t stride, int64_t bytes,
                          int64_t pf_near, int64_t pf_far) {
  // The empty asm keeps GCC from vectorising the caller's loop, which silently drops __builtin_prefetch (seen here:
  // a build with no prefetch instruction left ran the step 2.3x slower).
  asm volatile("");
  const char* f = reinterpret_cast<const char*>(base + ix[std::min(i + pf_far, n - 1)] * stride);
  const char* c = reinterpret_cast<const char*>(base + ix[std::min(i + pf_near, n - 1)] * stride);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(f + o, 0, 1);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

template <typename T, typename A>
void attend_impl(const T* q, const T* k, const T* v, const int64_t* idx, const bool* valid, T* out,
                 int64_t B, int64_t H, int64_t G, int64_t n, int64_t D, int64_t L,
                 int64_t kb, int64_t kh, int64_t kl, int64_t vb, int64_t vh, int64_t vl, double scaling,
                 int64_t pf_near, int64_t pf_far) {
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> qf(G * D), row(D), s(G * n), acc(G * D), sum(G);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kbase = k + b * kb + h * kh;
      const T* vbase = v + b * vb + h * vh;
      const int64_t* ix = idx + bh * n;
      const bool* ok = valid ? valid + bh * n : nullptr;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<A>(load1(q + bh * G * D + i)) * static_cast<A>(scaling);
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(ix[i] >= 0 && ix[i] < L, "attend_chosen: slot ", ix[i], " out of range [0, ", L, ")");
        prefetch_rows(kbase, ix, i, n, kl, D * (int64_t)sizeof(T), pf_near, pf_far);
        load_row(kbase + ix[i] * kl, row.data(), D);
        for (int64_t g = 0; g < G; ++g) s[g * n + i] = dot(qf.data() + g * D, row.data(), D);
      }
      int64_t live = 0;
      for (int64_t i = 0; i < n; ++i) live += (!ok || ok[i]);
      for (int64_t g = 0; g < G; ++g) {
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t i = 0; i < n; ++i) if (!ok || ok[i]) m = std::max(m, s[g * n + i]);
        A t = 0;
        A* sg = s.data() + g * n;
        for (int64_t i = 0; i < n; ++i) { A e = exp_neg(sg[i] - m); sg[i] = (!ok || ok[i]) ? e : A(0); t += sg[i]; }
        sum[g] = t;
      }
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t i = 0; i < n; ++i) {
        prefetch_rows(vbase, ix, i, n, vl, D * (int64_t)sizeof(T), pf_near, pf_far);
        if (ok && !ok[i]) continue;
        load_row(vbase + ix[i] * vl, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const A p = s[g * n + i];
          A* a = acc.data() + g * D;
          for (int64_t j = 0; j < D; ++j) a[j] += p * row[j];
        }
      }
      T* o = out + bh * G * D;
      for (int64_t g = 0; g < G; ++g) {
        // A head whose every chosen slot is masked gets NaN, as softmax over all -inf does in the tensor path.
        const A inv = live ? A(1) / sum[g] : std::numeric_limits<A>::quiet_NaN();
        for (int64_t j = 0; j < D; ++j) o[g * D + j] = static_cast<T>(acc[g * D + j] * inv);
      }
    }
  });
}

#if defined(__AVX512F__)
// The same step with explicit AVX-512 for bf16/fp32 rows with D % 16 == 0 (<= 256): row loads widened to fp32,
// a vector exp, and the p.V accumulators kept per query head. The generic loops above, built the same way, took
// 2.7 ms for the key pass alone at 32K (bf16, 1 thread) where this one took 1.2 ms.
inline __m512 load16(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline void store16(c10::BFloat16* p, __m512 x) {  // round to nearest even, as torch's float -> bf16
  __m512i u = _mm512_castps_si512(x);
  __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                  _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }

inline __m512 exp512(__m512 x) {  // x <= 0; the scalar exp_neg, lane-wise
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

template <typename T>
void attend_avx512(const T* q, const T* k, const T* v, const int64_t* idx, const bool* valid, T* out,
                   int64_t B, int64_t H, int64_t G, int64_t n, int64_t D, int64_t L,
                   int64_t kb, int64_t kh, int64_t kl, int64_t vb, int64_t vh, int64_t vl, double scaling,
                   int64_t pf_near, int64_t pf_far) {
  const int64_t nv = D / 16;
  const int64_t np = (n + 15) / 16 * 16;
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<__m512> qv(G * nv), acc(G * nv);
    std::vector<float> s(G * np), sum(G);
    __m512 r[16];
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kbase = k + b * kb + h * kh;
      const T* vbase = v + b * vb + h * vh;
      const int64_t* ix = idx + bh * n;
      const bool* ok = valid ? valid + bh * n : nullptr;
      const __m512 sc = _mm512_set1_ps(static_cast<float>(scaling));
      for (int64_t i = 0; i < G * nv; ++i) qv[i] = _mm512_mul_ps(load16(q + bh * G * D + i * 16), sc);
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(ix[i] >= 0 && ix[i] < L, "attend_chosen: slot ", ix[i], " out of range [0, ", L, ")");
        prefetch_rows(kbase, ix, i, n, kl, D * (int64_t)sizeof(T), pf_near, pf_far);
        const T* row = kbase + ix[i] * kl;
        for (int64_t j = 0; j < nv; ++j) r[j] = load16(row + j * 16);
        for (int64_t g = 0; g < G; ++g) {
          __m512 a = _mm512_mul_ps(r[0], qv[g * nv]);
          for (int64_t j = 1; j < nv; ++j) a = _mm512_fmadd_ps(r[j], qv[g * nv + j], a);
          s[g * np + i] = _mm512_reduce_add_ps(a);
        }
      }
      int64_t live = 0;
      for (int64_t i = 0; i < n; ++i) live += (!ok || ok[i]);
      const float ninf = -std::numeric_limits<float>::infinity();
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * np;
        if (ok) for (int64_t i = 0; i < n; ++i) if (!ok[i]) sg[i] = ninf;
        for (int64_t i = n; i < np; ++i) sg[i] = ninf;
        __m512 m = _mm512_set1_ps(ninf);
        for (int64_t i = 0; i < np; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sg + i));
        const __m512 mx = _mm512_set1_ps(live ? _mm512_reduce_max_ps(m) : 0.0f);
        __m512 t = _mm512_setzero_ps();
        for (int64_t i = 0; i < np; i += 16) {
          __m512 x = _mm512_loadu_ps(sg + i);
          __mmask16 fin = _mm512_cmp_ps_mask(x, _mm512_set1_ps(ninf), _CMP_NEQ_OQ);  // masked slots weigh 0
          __m512 e = _mm512_maskz_mov_ps(fin, exp512(_mm512_sub_ps(x, mx)));
          _mm512_storeu_ps(sg + i, e);
          t = _mm512_add_ps(t, e);
        }
        sum[g] = _mm512_reduce_add_ps(t);
      }
      for (int64_t i = 0; i < G * nv; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        prefetch_rows(vbase, ix, i, n, vl, D * (int64_t)sizeof(T), pf_near, pf_far);
        if (ok && !ok[i]) continue;
        const T* row = vbase + ix[i] * vl;
        for (int64_t j = 0; j < nv; ++j) r[j] = load16(row + j * 16);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(s[g * np + i]);
          for (int64_t j = 0; j < nv; ++j) acc[g * nv + j] = _mm512_fmadd_ps(p, r[j], acc[g * nv + j]);
        }
      }
      T* o = out + bh * G * D;
      for (int64_t g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(live ? 1.0f / sum[g] : std::numeric_limits<float>::quiet_NaN());
        for (int64_t j = 0; j < nv; ++j) store16(o + g * D + j * 16, _mm512_mul_ps(acc[g * nv + j], inv));
      }
    }
  });
}
#endif

// Order-preserving uint32 key of a float: positive floats get the top bit set, negative ones count down from it
// (-0.0 and +0.0 share a key). The low 16 bits of a bf16 value's key stay zero, so the search stops after 16 bits.
inline uint32_t ukey(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  const uint32_t neg = u >> 31;  // branch-free: the sign of a score is a coin flip, a branch on it mispredicts
  return 0x80000000u + (((u & 0x7FFFFFFFu) ^ (0u - neg)) + neg);
}
constexpr uint32_t FORCED = 0xFFFF0000u;  // above every non-NaN key, and keeps the low 16 bits of bf16 keys zero
constexpr uint32_t DROPPED = 0u;          // below every key but that of -NaN

// counts[t*H + h] = #{l : key[l*H + h] >= thr[t*H + h]} (strict: >) for K <= 3 thresholds per head, keys (L, H).
// Several thresholds per pass: the keys are read from cache once for K comparisons.
void count_at_least(const uint32_t* key, int64_t L, int64_t H, const uint32_t* thr, int K, bool strict,
                    int64_t* counts) {
  for (int64_t i = 0; i < K * H; ++i) counts[i] = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (16 % H == 0) {  // 16 / H tokens per vector; lane j holds head j % H
    __m512i tv[3], cnt[3];
    for (int t = 0; t < K; ++t) {
      alignas(64) uint32_t lanes[16];
      for (int j = 0; j < 16; ++j) lanes[j] = thr[t * H + j % H];
      tv[t] = _mm512_load_si512(lanes);
      cnt[t] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (; i + 16 <= L * H; i += 16) {
      const __m512i k = _mm512_loadu_si512(key + i);
      for (int t = 0; t < K; ++t) {
        const __mmask16 m = strict ? _mm512_cmpgt_epu32_mask(k, tv[t]) : _mm512_cmpge_epu32_mask(k, tv[t]);
        cnt[t] = _mm512_mask_add_epi32(cnt[t], m, cnt[t], one);
      }
    }
    for (int t = 0; t < K; ++t) {
      alignas(64) uint32_t c[16];
      _mm512_store_si512(c, cnt[t]);
      for (int j = 0; j < 16; ++j) counts[t * H + j % H] += c[j];
    }
  }
#endif
  for (; i < L * H; ++i)
    for (int t = 0; t < K; ++t) {
      const uint32_t th = thr[t * H + i % H];
      counts[t * H + i % H] += strict ? key[i] > th : key[i] >= th;
    }
}

// Per head: the n-th largest key T by search on its bits, two per step (one vectorised counting pass over all heads),
// then one pass that emits, in slot order, every slot with a larger key and the first slots equal to T: exactly
// n slots, the top-n set up to ties at T. keys (L, H); out (H, n).
void select_rows(const uint32_t* key, int64_t L, int64_t H, int64_t n, bool low_zero, int64_t* out) {
  std::vector<uint32_t> thr(H, 0u), cand(3 * H);
  std::vector<int64_t> counts(3 * H);
  std::vector<int32_t> need(H), eq(H, 0), w(H, 0);  // not int64_t: stores to out[] cannot alias them
  for (int bit = 30; bit >= (low_zero ? 16 : 0); bit -= 2) {  // two bits per pass: 3 candidate thresholds
    for (int t = 0; t < 3; ++t)
      for (int64_t h = 0; h < H; ++h) cand[t * H + h] = thr[h] | (uint32_t(t + 1) << bit);
    count_at_least(key, L, H, cand.data(), 3, false, counts.data());
    for (int64_t h = 0; h < H; ++h)  // counts fall as the threshold rises: keep the largest one still >= n
      for (int t = 2; t >= 0; --t)
        if (counts[t * H + h] >= n) { thr[h] = cand[t * H + h]; break; }
  }
  count_at_least(key, L, H, thr.data(), 1, true, counts.data());
  for (int64_t h = 0; h < H; ++h) need[h] = n - counts[h];
  auto take = [&](int64_t l, int64_t h, bool gt) {
    if (gt || eq[h] < need[h]) {
      eq[h] += !gt;
      out[h * n + w[h]++] = l;
    }
  };
  int64_t i = 0;
#if defined(__AVX512F__)
  if (16 % H == 0) {
    alignas(64) uint32_t t[16];
    for (int j = 0; j < 16; ++j) t[j] = thr[j % H];
    const __m512i tv = _mm512_load_si512(t);
    int32_t lane_h[16], lane_t[16];  // head and token offset of each lane: no division in the loop
    for (int j = 0; j < 16; ++j) { lane_h[j] = j % H; lane_t[j] = j / H; }
    for (int64_t tok = 0; i + 16 <= L * H; i += 16, tok += 16 / H) {
      __m512i k = _mm512_loadu_si512(key + i);
      const uint32_t gt = _mm512_cmpgt_epu32_mask(k, tv);
      uint32_t m = gt | _mm512_cmpeq_epu32_mask(k, tv);
      while (m) {
        const int j = __builtin_ctz(m);
        m &= m - 1;
        take(tok + lane_t[j], lane_h[j], (gt >> j) & 1u);
      }
    }
  }
#endif
  for (; i < L * H; ++i) {
    const int64_t h = i % H;
    if (key[i] >= thr[h]) take(i / H, h, key[i] > thr[h]);
  }
  for (int64_t h = 0; h < H; ++h) TORCH_CHECK(w[h] == n, "pooled_topk: selected ", w[h], " of ", n, " slots");
}

// Keys (L, H) of forced slots (the forced row, the first sink_slots, the last recent_slots) set above all, of padding
// (not valid) below all; forced wins. forced/valid are one batch row's (L) flags, or nullptr.
void force_and_drop(uint32_t* keys, int64_t L, int64_t H, const bool* forced, const bool* valid, int64_t sink_slots,
                    int64_t recent_slots) {
  auto mark = [&](int64_t l, uint32_t key) { for (int64_t h = 0; h < H; ++h) keys[l * H + h] = key; };
  if (forced || valid)
    for (int64_t l = 0; l < L; ++l) {
      const bool f = forced && forced[l];
      if (f || (valid && !valid[l])) mark(l, f ? FORCED : DROPPED);
    }
  for (int64_t l = 0; l < std::min(sink_slots, L); ++l) mark(l, FORCED);
  for (int64_t l = std::max<int64_t>(0, L - recent_slots); l < L; ++l) mark(l, FORCED);
}

#if defined(__AVX512BW__)
// ukey, lane-wise: 0x80000000 + ((u & 0x7FFFFFFF) ^ -sign) + sign
inline __m512i ukeys512(__m512i u) {
  const __m512i sign = _mm512_srli_epi32(u, 31);
  const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_add_epi32(_mm512_add_epi32(_mm512_xor_si512(mag, _mm512_sub_epi32(_mm512_setzero_si512(), sign)), sign),
                          _mm512_set1_epi32(int32_t(0x80000000u)));
}

// Max over G query heads of bf16 scores laid out (L, G, H) -> keys (L, H), 16 lanes at a time: P = 16 / H tokens'
// G * H scores are 16 G contiguous bf16 (two registers for G <= 4), and one two-register permute per g puts
// head h of token t in lane t * H + h. Returns the tokens done (a multiple of P); the caller finishes the rest.
int64_t pool_keys_bf16(const c10::BFloat16* s, int64_t L, int64_t G, int64_t H, uint32_t* keys) {
  if (16 % H != 0 || G > 4) return 0;
  const int64_t P = 16 / H;
  __m512i perm[4];
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) uint16_t ix[32] = {};
    for (int j = 0; j < 16; ++j) ix[j] = uint16_t((j / H) * G * H + g * H + j % H);
    perm[g] = _mm512_load_si512(ix);
  }
  const __mmask32 lo = (G * H * P > 32) ? 0xFFFFFFFFu : ((1ull << (G * H * P)) - 1);
  const __mmask32 hi = (G * H * P > 32) ? __mmask32((1ull << (G * H * P - 32)) - 1) : 0;
  int64_t l = 0;
  for (; l + P <= L; l += P) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(s + l * G * H);
    const __m512i a = _mm512_maskz_loadu_epi16(lo, src), b = _mm512_maskz_loadu_epi16(hi, src + 32);
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t g = 0; g < G; ++g) {
      const __m256i x = _mm512_castsi512_si256(_mm512_permutex2var_epi16(a, perm[g], b));
      best = _mm512_max_ps(best, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
    }
    _mm512_storeu_si512(keys + l * H, ukeys512(_mm512_castps_si512(best)));
  }
  return l;
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Keys (L, H) of the max over G query heads of the bf16-rounded scores z·c. Lanes hold query columns, 16 per tile:
// one vdpbf16ps adds the products of one latent pair (a broadcast memory operand) with that pair of 16 columns. A
// step holds 12 accumulators: two tiles x 6 tokens (or one tile x 12), so each column load serves 6 (12) tokens.
// Columns are ordered (G, H) with H dividing 16, so a tile's lanes j and j + H belong to the same KV head:
// log2(16 / H) lane-shuffle maxima pool a tile, an elementwise max joins the tiles. No score matrix is written; the
// keys come out in pooled_topk's layout.
inline __m512 pool_lanes(__m512 x, int64_t H) {  // lane j (j < H) = max over lanes j, j + H, j + 2H, ... of x
  for (int64_t w = 8; w >= H; w /= 2) {
    const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(int32_t(w)));
    x = _mm512_max_ps(x, _mm512_permutexvar_ps(_mm512_and_si512(idx, _mm512_set1_epi32(15)), x));
  }
  return x;
}

inline __m512i bf16_ukeys(__m512 x) {  // round to bf16 (nearest even, as the GEMM's bf16 output), then ukey lane-wise
  __m512i u = _mm512_castps_si512(x);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  return ukeys512(_mm512_and_si512(u, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

template <int NT, int T>
void score_block(const uint32_t* const* rows, int nt, const uint32_t* q, int64_t K, int64_t C, int64_t c0, int64_t H,
                 __m512* best) {
  __m512 acc[NT][T];
  for (int j = 0; j < NT; ++j)
    for (int t = 0; t < T; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512bh qk[NT];
    for (int j = 0; j < NT; ++j) qk[j] = (__m512bh)_mm512_loadu_si512(q + (j * K + k) * 16);
    for (int t = 0; t < T; ++t) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(int32_t(rows[t][k]));
      for (int j = 0; j < NT; ++j) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], qk[j], x);
    }
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < NT; ++j) {
    const int64_t live = std::min<int64_t>(16, C - c0 - j * 16);
    const __mmask16 m = __mmask16((1u << live) - 1);
    // constant bounds only: a runtime index into acc would keep it in memory (stored on every k step)
    for (int t = 0; t < T; ++t)
      if (t < nt) best[t] = _mm512_max_ps(best[t], _mm512_mask_blend_ps(m, _mm512_set1_ps(ninf), acc[j][t]));
  }
}

void scored_keys_bf16(const c10::BFloat16* z, int64_t zl, int64_t L, int64_t R, const c10::BFloat16* cols, int64_t G,
                      int64_t H, uint32_t* keys) {
  constexpr int T2 = 6, T1 = 12;  // tokens per step with two tiles / one tile of 16 columns
  const int64_t K = R / 2, C = G * H, tiles = (C + 15) / 16;
  // qp[(tile * K + k) * 16 + lane] = pair k of column tile * 16 + lane (padded columns 0, masked out of the max)
  std::vector<uint32_t> qp(tiles * K * 16, 0u);
  for (int64_t c = 0; c < C; ++c)  // memcpy: cols need not be 4-byte aligned
    for (int64_t k = 0; k < K; ++k) std::memcpy(&qp[((c / 16) * K + k) * 16 + c % 16], cols + c * R + 2 * k, 4);
  const __mmask16 store = __mmask16((1u << H) - 1);
  const uint32_t* zu = reinterpret_cast<const uint32_t*>(z);
  const int64_t step = tiles == 1 ? T1 : T2;
  for (int64_t l = 0; l < L; l += step) {
    const int nt = int(std::min<int64_t>(step, L - l));
    const uint32_t* rows[T1];
    for (int t = 0; t < T1; ++t) rows[t] = zu + std::min(l + t, L - 1) * (zl / 2);  // past L: repeats, not stored
    __m512 best[T1];
    for (int t = 0; t < T1; ++t) best[t] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t tile = 0;
    if (tiles == 1) {
      score_block<1, T1>(rows, nt, qp.data(), K, C, 0, H, best);
      tile = 1;
    }
    for (; tile + 2 <= tiles; tile += 2)
      score_block<2, T2>(rows, nt, qp.data() + tile * K * 16, K, C, tile * 16, H, best);
    if (tile < tiles) score_block<1, T2>(rows, nt, qp.data() + tile * K * 16, K, C, tile * 16, H, best);
    for (int t = 0; t < nt; ++t)
      _mm512_mask_storeu_epi32(keys + (l + t) * H, store, bf16_ukeys(pool_lanes(best[t], H)));
  }
}
#endif

template <typename T, typename A>
void latent_queries_impl(const T* q, const T* cos, const T* sin, const T* proj, int64_t B, int64_t H, int64_t G,
                         int64_t D, int64_t R, bool mean, T* out) {
  // Per query row: undo RoPE (x·cos + rotate_half(x)·(−sin)) / (cos² + sin²), then project on the KV head's r*
  // columns, in A (fp32, fp64 for fp64); rows out are ordered (G', H_kv), G' = 1 for the group mean.
  const int64_t half = D / 2, Go = mean ? 1 : G;
  std::vector<A> x(D), xp(D), c(D), s(D), acc(R);
  for (int64_t b = 0; b < B; ++b) {
    load_row(cos + b * D, c.data(), D);
    load_row(sin + b * D, s.data(), D);
    for (int64_t h = 0; h < H; ++h) {
      const T* P = proj + h * D * R;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t g = 0; g < G; ++g) {
        load_row(q + ((b * H + h) * G + g) * D, x.data(), D);
        for (int64_t i = 0; i < D; ++i) {
          const A rot = i < half ? -x[i + half] : x[i - half];
          xp[i] = (x[i] * c[i] - rot * s[i]) / (c[i] * c[i] + s[i] * s[i]);
        }
        for (int64_t i = 0; i < D; ++i) {
          const A v = xp[i];
          const T* row = P + i * R;
          for (int64_t j = 0; j < R; ++j) acc[j] += v * static_cast<A>(load1(row + j));
        }
        if (!mean) {
          T* o = out + ((b * Go + g) * H + h) * R;
          for (int64_t j = 0; j < R; ++j) { o[j] = static_cast<T>(acc[j]); acc[j] = A(0); }
        }
      }
      if (mean) {
        T* o = out + (b * H + h) * R;
        for (int64_t j = 0; j < R; ++j) o[j] = static_cast<T>(acc[j] / A(G));
      }
    }
  }
}

template <typename T>
void pooled_topk_impl(const T* s, int64_t B, int64_t L, int64_t G, int64_t H, const bool* forced,
                      const bool* valid, int64_t n, int64_t sink_slots, int64_t recent_slots, int64_t* out) {
  const bool bf16 = std::is_same_v<T, c10::BFloat16>;
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys(L * H);
    for (int64_t b = lo; b < hi; ++b) {
      const T* sb = s + b * L * G * H;
      if (G == 1) {  // already pooled: one flat, vectorisable pass
        uint32_t* kp = keys.data();
        for (int64_t i = 0; i < L * H; ++i) kp[i] = ukey(load1(sb + i));
      } else {
        int64_t l0 = 0;
#if defined(__AVX512BW__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) l0 = pool_keys_bf16(sb, L, G, H, keys.data());
#endif
        for (int64_t l = l0; l < L; ++l)
          for (int64_t h = 0; h < H; ++h) {
            float best = float(load1(sb + l * G * H + h));
            for (int64_t g = 1; g < G; ++g) best = std::max(best, float(load1(sb + (l * G + g) * H + h)));
            keys[l * H + h] = ukey(best);
          }
      }
      force_and_drop(keys.data(), L, H, forced ? forced + b * L : nullptr, valid ? valid + b * L : nullptr, sink_slots,
                     recent_slots);
      select_rows(keys.data(), L, H, n, bf16, out + b * H * n);
    }
  });
}

}  // namespace

// A (B, L) bool mask of slots (forced, valid), or nullptr when absent.
static const bool* slot_flags(const c10::optional<torch::Tensor>& t, int64_t B, int64_t L, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kBool && t->numel() == B * L, name,
              " must be a contiguous (B, L) bool tensor");
  return t->data_ptr<bool>();
}

torch::Tensor attend_chosen(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor idx,
                            c10::optional<torch::Tensor> valid, double scaling,
                            int64_t prefetch, int64_t prefetch_l2) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && idx.dim() == 3, "attend_chosen: bad ranks");
  TORCH_CHECK(q.is_contiguous() && idx.is_contiguous() && idx.scalar_type() == at::kLong, "attend_chosen: q, idx");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "attend_chosen: rows must be contiguous");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "attend_chosen: dtypes");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), n = idx.size(2), L = keys.size(2);
  TORCH_CHECK(keys.size(1) == H && values.size(1) == H && values.size(2) == L && idx.size(1) == H,
              "attend_chosen: shapes");
  const bool* ok = nullptr;
  if (valid.has_value()) {
    TORCH_CHECK(valid->is_contiguous() && valid->scalar_type() == at::kBool && valid->numel() == B * H * n,
                "attend_chosen: valid must be a contiguous (B, H_kv, n) bool tensor");
    ok = valid->data_ptr<bool>();
  }
  auto out = torch::empty_like(q);
#if defined(__AVX512F__)
  if (D % 16 == 0 && D <= 256 && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat)) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attend_chosen_avx512", [&] {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float>)
        attend_avx512<scalar_t>(q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                                idx.data_ptr<int64_t>(), ok, out.data_ptr<scalar_t>(), B, H, G, n, D, L,
                                keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2), scaling, prefetch, prefetch_l2);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attend_chosen", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attend_impl<scalar_t, A>(q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                             idx.data_ptr<int64_t>(), ok, out.data_ptr<scalar_t>(), B, H, G, n, D, L,
                             keys.stride(0), keys.stride(1), keys.stride(2),
                             values.stride(0), values.stride(1), values.stride(2), scaling, prefetch, prefetch_l2);
  });
  return out;
}

bool fused_scoring_available() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

torch::Tensor scored_topk(torch::Tensor z, torch::Tensor cols, int64_t kv_heads, int64_t n,
                          c10::optional<torch::Tensor> forced, c10::optional<torch::Tensor> valid, int64_t sink_slots,
                          int64_t recent_slots) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  TORCH_CHECK(z.dim() == 3 && cols.dim() == 3 && z.stride(2) == 1 && cols.is_contiguous(),
              "scored_topk: z (B, L, r*) with contiguous rows, cols (B, G*H_kv, r*) contiguous");
  TORCH_CHECK(z.scalar_type() == at::kBFloat16 && cols.scalar_type() == at::kBFloat16, "scored_topk: bf16 only");
  const int64_t B = z.size(0), L = z.size(1), R = z.size(2), H = kv_heads, C = cols.size(1), G = C / H;
  TORCH_CHECK(cols.size(0) == B && cols.size(2) == R && G * H == C && R % 2 == 0 && z.stride(1) % 2 == 0 &&
              z.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % 4 == 0 && 16 % H == 0 && n >= 1 &&
              n <= L, "scored_topk: shapes (even r* and strides, pairs 4-byte aligned, H_kv dividing 16)");
  const bool* f = slot_flags(forced, B, L, "scored_topk: forced");
  const bool* ok = slot_flags(valid, B, L, "scored_topk: valid");
  auto out = torch::empty({B, H, n}, z.options().dtype(at::kLong));
  const c10::BFloat16* zp = z.data_ptr<c10::BFloat16>();
  const c10::BFloat16* cp = cols.data_ptr<c10::BFloat16>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t zb = z.stride(0), zl = z.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys(L * H);
    for (int64_t b = lo; b < hi; ++b) {
      scored_keys_bf16(zp + b * zb, zl, L, R, cp + b * C * R, G, H, keys.data());
      force_and_drop(keys.data(), L, H, f ? f + b * L : nullptr, ok ? ok + b * L : nullptr, sink_slots, recent_slots);
      select_rows(keys.data(), L, H, n, true, op + b * H * n);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "scored_topk: this build has no AVX512-BF16 (see fused_scoring_available)");
  return torch::Tensor();
#endif
}

torch::Tensor latent_queries(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, torch::Tensor proj, bool mean) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && proj.dim() == 3 && proj.is_contiguous() && cos.is_contiguous() &&
              sin.is_contiguous(), "latent_queries: contiguous q (B, H_kv, G, D), proj (H_kv, D, r*)");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), R = proj.size(2);
  TORCH_CHECK(proj.size(0) == H && proj.size(1) == D && D % 2 == 0 && cos.numel() == B * D && sin.numel() == B * D,
              "latent_queries: shapes");
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type() &&
              proj.scalar_type() == q.scalar_type(), "latent_queries: dtypes");
  auto out = torch::empty({B, (mean ? 1 : G) * H, R}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "latent_queries", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    latent_queries_impl<scalar_t, A>(q.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                     proj.data_ptr<scalar_t>(), B, H, G, D, R, mean, out.data_ptr<scalar_t>());
  });
  return out;
}

torch::Tensor pooled_topk(torch::Tensor scores, int64_t kv_heads, int64_t n, c10::optional<torch::Tensor> forced,
                          c10::optional<torch::Tensor> valid, int64_t sink_slots, int64_t recent_slots) {
  TORCH_CHECK(scores.dim() == 3 && scores.is_contiguous(), "pooled_topk: scores must be contiguous (B, L, G*H_kv)");
  const int64_t B = scores.size(0), L = scores.size(1), H = kv_heads, G = scores.size(2) / kv_heads;
  TORCH_CHECK(G * H == scores.size(2) && n >= 1 && n <= L, "pooled_topk: shapes");
  const bool* f = slot_flags(forced, B, L, "pooled_topk: forced");
  const bool* ok = slot_flags(valid, B, L, "pooled_topk: valid");
  auto out = torch::empty({B, H, n}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "pooled_topk", [&] {
    pooled_topk_impl<scalar_t>(scores.data_ptr<scalar_t>(), B, L, G, H, f, ok, n, sink_slots, recent_slots,
                               out.data_ptr<int64_t>());
  });
  return out;
}
"""

DECLS = """
bool fused_scoring_available();
torch::Tensor scored_topk(torch::Tensor z, torch::Tensor cols, int64_t kv_heads, int64_t n,
                          c10::optional<torch::Tensor> forced, c10::optional<torch::Tensor> valid, int64_t sink_slots,
                          int64_t recent_slots);
torch::Tensor latent_queries(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, torch::Tensor proj, bool mean);
torch::Tensor attend_chosen(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor idx,
                            c10::optional<torch::Tensor> valid, double scaling, int64_t prefetch,
                            int64_t prefetch_l2);
torch::Tensor pooled_topk(torch::Tensor scores, int64_t kv_heads, int64_t n, c10::optional<torch::Tensor> forced,
                          c10::optional<torch::Tensor> valid, int64_t sink_slots, int64_t recent_slots);
"""
