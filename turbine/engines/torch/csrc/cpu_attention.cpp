// Turbine's paged decode attention for the CPU: one query token per sequence over its context,
// read straight from the KV cache's blocks. The CPU counterpart of `triton_decode.py`.
//
// Why: the plain path gathers every sequence's blocks into a padded copy (index_select of K and V)
// and calls SDPA on it, so each layer reads the step's KV three times (cache, copy, SDPA) and pays
// two gathers and a padded mask. Here each KV row is read once, where it lies.
//
// Work item = one sequence and one KV head (the query heads sharing it are its rows), over torch's
// thread pool. Scores, softmax and the weighted sum of V are float32; the output is rounded to the
// dtype once, as SDPA rounds it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename T>
void decode_one(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t ctx, int64_t block,
                int64_t kv_heads, int64_t head, int64_t group, int64_t dim, float scale, T* out) {
  std::vector<float> qf(group * dim), scores(group * ctx), acc(group * dim, 0.0f), kf(dim);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < dim; ++i) qf[g * dim + i] = static_cast<float>(q[g * dim + i]) * scale;
  std::vector<float> top(group, -std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block]) * block + t % block;
    const T* k = k_cache + (slot * kv_heads + head) * dim;
    for (int64_t i = 0; i < dim; ++i) kf[i] = static_cast<float>(k[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * dim;
      float s = 0.0f;
      for (int64_t i = 0; i < dim; ++i) s += qg[i] * kf[i];
      scores[g * ctx + t] = s;
      top[g] = std::max(top[g], s);
    }
  }
  std::vector<float> total(group, 0.0f);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < ctx; ++t) {
      const float p = std::exp(scores[g * ctx + t] - top[g]);
      scores[g * ctx + t] = p;
      total[g] += p;
    }
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block]) * block + t % block;
    const T* v = v_cache + (slot * kv_heads + head) * dim;
    for (int64_t i = 0; i < dim; ++i) kf[i] = static_cast<float>(v[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * ctx + t];
      float* a = acc.data() + g * dim;
      for (int64_t i = 0; i < dim; ++i) a[i] += p * kf[i];
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < dim; ++i) out[g * dim + i] = static_cast<T>(acc[g * dim + i] / total[g]);
}

// Token j of a 16-token tile is folded from position kBitReversed[j]: fold16 leaves its results in
// bit-reversed order, so feeding it bit-reversed gives them in order.
constexpr int kBitReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// Sixteen vectors in, the sum of each vector's lanes out (lane i: vector kBitReversed[i]'s sum).
// Four levels; each adds the two halves of every block of lanes, pairing up vectors, so 16 vectors
// of 16 partial sums become 8 of 8 (two items each), then 4 of 4, 2 of 2, 1 of 1.
// Per level (block of 16, 8, 4, 2 lanes): the lanes of the pair (x, y) (y's as 16 + lane) whose
// sum makes each output lane: the first halves of their blocks, then the second halves.
alignas(64) constexpr int32_t kFold[8][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
};

inline __m512 fold16(__m512* v) {
  int n = 16;
  for (int level = 0; level < 4; ++level, n /= 2) {
    const __m512i lo = _mm512_load_si512(kFold[2 * level]), hi = _mm512_load_si512(kFold[2 * level + 1]);
    for (int j = 0; j < n / 2; ++j)
      v[j] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * j], lo, v[2 * j + 1]),
                           _mm512_permutex2var_ps(v[2 * j], hi, v[2 * j + 1]));
  }
  return v[0];
}

// bfloat16 with head_dim a multiple of 32 (up to 256): AVX-512. Each K and V row is read once for
// all the query heads that share it; the next rows are prefetched, since a layer's cache was last
// touched a whole step ago and comes from memory.
void decode_one_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* table,
                     int64_t ctx, int64_t block, int64_t kv_heads, int64_t head, int64_t group, int64_t dim,
                     float scale, uint16_t* out) {
  constexpr int64_t kAhead = 4;
  const int64_t chunks = dim / 16;
  std::vector<int64_t> rows(ctx);  // where this head's K (and V) row of each context token starts
  for (int64_t t = 0; t < ctx; ++t)
    rows[t] = ((static_cast<int64_t>(table[t / block]) * block + t % block) * kv_heads + head) * dim;
  std::vector<float> p(group * ctx), acc(group * dim, 0.0f);
  // Scores: VDPBF16PS multiplies q's and K's bfloat16 pairs exactly into float32 sums, so K is used as
  // stored. 16 tokens at a time: their 16 partial-sum vectors fold into one vector of 16 scores
  // (fold16), a quarter of the work of 16 separate horizontal sums.
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int64_t pairs = dim / 32;  // 32 bfloat16 per vector
  int64_t t0 = 0;
  for (; t0 + 16 <= ctx; t0 += 16) {
    for (int64_t j = 0; j < 16 && t0 + 16 + j < ctx; ++j) {
      const char* next = reinterpret_cast<const char*>(k_cache + rows[t0 + 16 + j]);
      for (int64_t b = 0; b < 2 * dim; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 part[16];
      for (int j = 0; j < 16; ++j) {
        const uint16_t* k = k_cache + rows[t0 + kBitReversed[j]];
        __m512 s = _mm512_setzero_ps();
        for (int64_t c = 0; c < pairs; ++c)
          s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(q + g * dim + 32 * c),
                               (__m512bh)_mm512_loadu_si512(k + 32 * c));
        part[j] = s;
      }
      _mm512_storeu_ps(p.data() + g * ctx + t0, _mm512_mul_ps(fold16(part), scale_v));
    }
  }
  for (int64_t t = t0; t < ctx; ++t)
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < pairs; ++c)
        s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(q + g * dim + 32 * c),
                             (__m512bh)_mm512_loadu_si512(k_cache + rows[t] + 32 * c));
      p[g * ctx + t] = _mm512_reduce_add_ps(s) * scale;
    }
  std::vector<float> total(group);
  for (int64_t g = 0; g < group; ++g) {
    float* pg = p.data() + g * ctx;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) top = std::max(top, pg[t]);
    const __m512 shift = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) {
      const __m512 e = turbine_cpu::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(pg + t), shift));
      _mm512_storeu_ps(pg + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[g] = _mm512_reduce_add_ps(sum);
    for (; t < ctx; ++t) {
      pg[t] = std::exp(pg[t] - top);
      total[g] += pg[t];
    }
  }
  for (int64_t t = 0; t < ctx; ++t) {
    if (t + kAhead < ctx) {
      const char* next = reinterpret_cast<const char*>(v_cache + rows[t + kAhead]);
      for (int64_t b = 0; b < 2 * dim; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    __m512 v[16];
    for (int64_t c = 0; c < chunks; ++c) v[c] = turbine_cpu::load_bf16(v_cache + rows[t] + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * ctx + t]);
      float* a = acc.data() + g * dim;
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(w, v[c], _mm512_loadu_ps(a + 16 * c)));
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
    for (int64_t c = 0; c < chunks; ++c)
      turbine_cpu::store_bf16(out + g * dim + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + g * dim + 16 * c), inv));
  }
}

at::Tensor paged_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "q [seqs, heads, dim], caches [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const at::Tensor q = q_in.contiguous();
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0 && k_cache.scalar_type() == q.scalar_type(),
              "head sizes and dtypes must agree");
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == seqs && lens.numel() == seqs, "one table and length per seq");
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t width = tables.size(1);
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lp[s] >= 1 && (lp[s] + block - 1) / block <= width, "context length outside the block table");
    for (int64_t b = 0; b < (lp[s] + block - 1) / block; ++b)
      TORCH_CHECK(tp[s * width + b] >= 0 && tp[s * width + b] < num_blocks, "block id out of range");
  }
  const int64_t group = heads / kv_heads;
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16 && dim % 32 == 0 && dim <= 256) {
    const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
    const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
    const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
    auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t a, int64_t b) {
      for (int64_t item = a; item < b; ++item) {
        const int64_t s = item / kv_heads, h = item % kv_heads;
        const int64_t row = (s * heads + h * group) * dim;
        decode_one_bf16(qp + row, kp, vp, tp + s * width, lp[s], block, kv_heads, h, group, dim,
                        static_cast<float>(scale), op + row);
      }
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t a, int64_t b) {
      for (int64_t item = a; item < b; ++item) {
        const int64_t s = item / kv_heads, h = item % kv_heads;
        const int64_t row = (s * heads + h * group) * dim;  // this KV head's query heads are consecutive
        decode_one<scalar_t>(qp + row, kp, vp, tp + s * width, lp[s], block, kv_heads, h, group, dim,
                             static_cast<float>(scale), op + row);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(turbine_cpu, lib) {
  lib.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
          "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbine_cpu, CPU, lib) { lib.impl("paged_decode", paged_decode); }
