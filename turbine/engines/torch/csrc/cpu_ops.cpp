// Turbine's fused element-wise CPU kernels for a layer: the CPU counterparts of `triton_ops.py`.
//
// Why: written with torch ops, the element-wise work of a decode step is ~1,000 small calls
// (RMSNorm alone is a cast, a square, a mean, an add, an rsqrt, two multiplies and a cast), each a
// few microseconds of dispatch for a few thousand numbers. One call per job instead:
// - rms_norm(x, w, eps, residual): optionally x += residual in place first, then RMSNorm;
// - rope_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, ...): RoPE on q and k, K and V
//   written into the paged cache at their slots; returns q;
// - silu_mul(gate_up): SiLU(gate) * up.
// Rounding follows the plain torch path (and transformers) step by step, not float32 throughout:
// the residual sum is rounded before it is normalised, the normalised row is rounded before the
// weight multiplies it, RoPE's cos and sin are rounded to the dtype and each product and the sum
// are rounded, SiLU is rounded before the multiply. So the fused path agrees with the plain one.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <cmath>
#include <cstdint>
#include <optional>

namespace {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);  // c10::BFloat16 rounds to nearest even; float is itself
}

template <typename T>
void rms_norm_rows(T* x, const T* res, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = x + r * n;
    if (res != nullptr) {
      const T* d = res + r * n;
      for (int64_t i = 0; i < n; ++i) row[i] = round_to<T>(static_cast<float>(row[i]) + static_cast<float>(d[i]));
    }
    float sq = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(row[i]);
      sq += v * v;
    }
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
    T* o = out + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float h = static_cast<float>(round_to<T>(static_cast<float>(row[i]) * inv));
      o[i] = round_to<T>(h * static_cast<float>(w[i]));
    }
  }
}

at::Tensor rms_norm(at::Tensor x, const at::Tensor& w, double eps, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, n]");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(w.numel() == n && w.scalar_type() == x.scalar_type(), "weight must be [n] of x's dtype");
  at::Tensor wc = w.contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual must match x");
  }
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.has_value() ? res.data_ptr<scalar_t>() : nullptr,
                            wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
  });
  return out;
}

template <typename T>
void rope_rows(const T* qkv, int64_t stride, const int64_t* pos, const float* inv_freq, T* q_out, T* k_cache,
               T* v_cache, const int64_t* slots, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<float> cos_(half), sin_(half);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[t]) * inv_freq[i];
      cos_[i] = static_cast<float>(round_to<T>(std::cos(angle)));
      sin_[i] = static_cast<float>(round_to<T>(std::sin(angle)));
    }
    const T* row = qkv + t * stride;
    auto rotate = [&](const T* src, T* dst) {
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(src[i]), b = static_cast<float>(src[half + i]);
        // x * cos + rotate_half(x) * sin, each product and the sum rounded as torch's ops round them
        dst[i] = round_to<T>(static_cast<float>(round_to<T>(a * cos_[i])) +
                             static_cast<float>(round_to<T>(-b * sin_[i])));
        dst[half + i] = round_to<T>(static_cast<float>(round_to<T>(b * cos_[i])) +
                                    static_cast<float>(round_to<T>(a * sin_[i])));
      }
    };
    for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, q_out + (t * heads + h) * dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = (slots[t] * kv_heads + h) * dim;
      rotate(row + (heads + h) * dim, k_cache + at);
      const T* v = row + (heads + kv_heads + h) * dim;
      for (int64_t i = 0; i < dim; ++i) v_cache[at + i] = v[i];
    }
  }
}

at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                          at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots, int64_t heads,
                          int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [tokens, (heads + 2 kv_heads) head_dim]");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv width");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type(),
              "caches must be contiguous, in qkv's dtype");
  const int64_t tokens = qkv.size(0);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const at::Tensor freq = inv_freq.to(at::kFloat).contiguous();
  TORCH_CHECK(pos.numel() == tokens && sl.numel() == tokens && freq.numel() == head_dim / 2, "sizes");
  const int64_t capacity = k_cache.numel() / (kv_heads * head_dim);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot out of range");
  at::Tensor q = at::empty({tokens, heads, head_dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_and_cache", [&] {
    rope_rows<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), pos.data_ptr<int64_t>(), freq.data_ptr<float>(),
                        q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), sp, tokens,
                        heads, kv_heads, head_dim);
  });
  return q;
}

// bfloat16 rows of a multiple of 16: AVX-512, with exp from cpu_vec.h (about 1 ulp from torch's, so
// the rounded SiLU can differ from torch's in the last bfloat16 bit, rarely).
void silu_mul_bf16(const uint16_t* src, uint16_t* dst, int64_t tokens, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 g = turbine_cpu::load_bf16(src + t * 2 * n + i);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, turbine_cpu::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      const __m512 rounded = turbine_cpu::load_bf16_from(turbine_cpu::to_bf16(silu));
      turbine_cpu::store_bf16(dst + t * n + i, _mm512_mul_ps(rounded, turbine_cpu::load_bf16(src + t * 2 * n + n + i)));
    }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [tokens, 2 n]");
  const at::Tensor x = gate_up.contiguous();
  const int64_t tokens = x.size(0), n = x.size(1) / 2;
  at::Tensor out = at::empty({tokens, n}, x.options());
  if (x.scalar_type() == at::kBFloat16 && n % 16 == 0) {
    silu_mul_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                  tokens, n);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < n; ++i) {
        const float g = static_cast<float>(src[t * 2 * n + i]);
        const float s = static_cast<float>(round_to<scalar_t>(g / (1.0f + std::exp(-g))));
        dst[t * n + i] = round_to<scalar_t>(s * static_cast<float>(src[t * 2 * n + n + i]));
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(turbine_cpu, lib) {
  lib.def("rms_norm(Tensor(a!) x, Tensor w, float eps, Tensor? residual) -> Tensor");
  lib.def(
      "rope_and_cache(Tensor qkv, Tensor positions, Tensor inv_freq, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots, int heads, int kv_heads, int head_dim) -> Tensor");
  lib.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbine_cpu, CPU, lib) {
  lib.impl("rms_norm", rms_norm);
  lib.impl("rope_and_cache", rope_and_cache);
  lib.impl("silu_mul", silu_mul);
}
