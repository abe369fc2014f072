// Turbine's CPU kernel for a GGUF's 4-bit weights: y = x @ W.T for a decode step's rows, on AMX.
//
// Why: torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) dequantizes to floating point with
// AVX-512 and is bound by that arithmetic as rows grow (SmolLM2's 120 layer matmuls: ~5 ms at 1 row,
// ~15 ms at 8, ~27 ms at 16 on this project's CPU machine). Here the matrix unit (AMX, TDPBF16PS:
// 16 rows x 16 columns x 32 inputs per instruction) does the multiplications, so the cost is
// unpacking the nibbles, whatever the number of rows up to 16: ~10-12 ms for those 120 matmuls.
//
// Exact, not approximate: the 4-bit values q (0..15) become bfloat16 exactly, x stays the model's
// bfloat16, products and sums are float32. For w = q * d + m over a group of 32 inputs,
//   sum_k w_k x_k = d * sum_k q_k x_k + m * sum_k x_k,
// so one tile instruction per group and 16 columns gives sum_k q_k x_k for up to 16 rows, and d
// (per column) and m (times the group's sum of x, per row) are applied in float32 afterwards.
//
// Layout (`q4_pack`): the weight's rows in tiles of 16 columns of y; per tile and per group of 32
// inputs, 8 chunks of 32 bytes, then 16 fp16 d and 16 fp16 m (the GGUF's own fp16 values). In chunk
// c, byte 2 n + j holds, low, the q of column n at input 4 c + j and, high, at input 4 c + 2 + j:
// masking (or shifting) a chunk and widening its bytes to 16 bits gives one row of the tile operand
// B in the pair-interleaved order TDPBF16PS reads (row p: inputs 2 p and 2 p + 1 of each column).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_vec.h"

namespace {

constexpr int64_t kChunkBytes = 8 * 32;
constexpr int64_t kTileBytes = kChunkBytes + 64;
constexpr int64_t kMaxRows = 16;  // rows of x per tile instruction

bool amx_ready() {
  // Linux hands the AMX register state only to processes that ask (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); asking again is harmless.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

at::Tensor q4_pack(const at::Tensor& nibbles, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(nibbles.dim() == 3 && nibbles.size(2) == 16 && nibbles.scalar_type() == at::kByte,
              "nibbles must be uint8 [rows, groups, 16]");
  const int64_t n = nibbles.size(0), groups = nibbles.size(1);
  // Messages without formatted numbers: on one platform (torch 2.11, GCC 13.3) a check whose message
  // formats an integer crashed the process instead of raising.
  TORCH_CHECK(n % 16 == 0, "rows must be a multiple of 16");
  TORCH_CHECK(d.dim() == 2 && d.sizes() == m.sizes() && d.size(0) == n && d.size(1) == groups,
              "d and m must be [rows, groups]");
  const at::Tensor nib = nibbles.contiguous();
  const at::Tensor dd = d.to(at::kFloat).contiguous(), mm = m.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n / 16, groups, kTileBytes}, nibbles.options());
  const uint8_t* src = nib.data_ptr<uint8_t>();
  const float* dp = dd.data_ptr<float>();
  const float* mp = mm.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* tile = dst + (t * groups + g) * kTileBytes;
        uint16_t* scales = reinterpret_cast<uint16_t*>(tile + kChunkBytes);
        for (int c = 0; c < 16; ++c) {
          const int64_t col = 16 * t + c;
          const uint8_t* block = src + (col * groups + g) * 16;  // byte i: input i low, i + 16 high
          auto q = [block](int i) { return i < 16 ? (block[i] & 15) : (block[i - 16] >> 4); };
          for (int ch = 0; ch < 8; ++ch)
            for (int j = 0; j < 2; ++j)
              tile[32 * ch + 2 * c + j] = static_cast<uint8_t>(q(4 * ch + j) | (q(4 * ch + 2 + j) << 4));
          scales[c] = _cvtss_sh(dp[col * groups + g], _MM_FROUND_TO_NEAREST_INT);
          scales[16 + c] = _cvtss_sh(mp[col * groups + g], _MM_FROUND_TO_NEAREST_INT);
        }
      }
  });
  return out;
}

// Columns [16 t0, 16 t1) of y for rows [r0, r0 + rows) of x (rows <= 16).
void tiles(const uint16_t* x, const float* sums, const uint8_t* w, uint16_t* y, int64_t k, int64_t n,
           int64_t r0, int64_t rows, int64_t t0, int64_t t1) {
  const int64_t groups = k / 32;
  // bfloat16 of 0..15, the values a nibble indexes (VPERMW reads the low 5 bits of each index).
  const __m512i lut = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160,
                                       0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
                                       0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  TileConfig cfg;  // tiles 0, 1: C (two, alternating by group); 2: A (x); 3: B (the weights' q)
  for (int i = 0; i < 3; ++i) {
    cfg.rows[i] = static_cast<uint8_t>(rows);
    cfg.colsb[i] = 64;
  }
  cfg.rows[3] = 16;
  cfg.colsb[3] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t b[2][16 * 32];
  alignas(64) float c[2][kMaxRows * 16];
  for (int64_t t = t0; t < t1; ++t) {
    __m512 out[kMaxRows];
    for (int64_t r = 0; r < rows; ++r) out[r] = _mm512_setzero_ps();
    const uint8_t* tile = w + t * groups * kTileBytes;
    for (int64_t g = 0; g < groups; ++g, tile += kTileBytes) {
      uint16_t* bb = b[g & 1];
      for (int ch = 0; ch < 8; ++ch) {
        const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 32 * ch));
        const __m256i lo = _mm256_and_si256(z, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
        _mm512_store_si512(bb + 64 * ch, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), lut));
        _mm512_store_si512(bb + 64 * ch + 32, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), lut));
      }
      _tile_loadd(2, x + r0 * k + 32 * g, 2 * k);
      _tile_loadd(3, bb, 64);
      float* cc = c[g & 1];
      // Two C tiles, so that one group's product overlaps the previous group's read-back.
      if (g & 1) {
        _tile_zero(1);
        _tile_dpbf16ps(1, 2, 3);
        _tile_stored(1, cc, 64);
      } else {
        _tile_zero(0);
        _tile_dpbf16ps(0, 2, 3);
        _tile_stored(0, cc, 64);
      }
      const auto* half = reinterpret_cast<const __m256i*>(tile + kChunkBytes);
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(half));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(half + 1));
      for (int64_t r = 0; r < rows; ++r) {
        out[r] = _mm512_fmadd_ps(_mm512_load_ps(cc + 16 * r), d, out[r]);
        out[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[(r0 + r) * groups + g]), out[r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (r0 + r) * n + 16 * t), turbine_cpu::to_bf16(out[r]));
  }
  _tile_release();
}

at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kTileBytes && packed.scalar_type() == at::kByte,
              "packed weight expected from q4_pack");
  const at::Tensor x = x_in.to(at::kBFloat16).contiguous();
  const int64_t rows = x.size(0), k = x.size(1), groups = k / 32, ntiles = n / 16;
  TORCH_CHECK(k % 32 == 0 && packed.size(0) == ntiles && packed.size(1) == groups && n == 16 * ntiles,
              "x does not fit the packed weight (its inputs or the output rows differ)");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  // Each row's float sum per group of 32 inputs: the m term.
  std::vector<float> sums(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i)
    sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(turbine_cpu::load_bf16(xp + 32 * i), turbine_cpu::load_bf16(xp + 32 * i + 16)));
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* sp = sums.data();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows)
      tiles(xp, sp, w, yp, k, n, r0, std::min(kMaxRows, rows - r0), t0, t1);
  });
  return x_in.scalar_type() == at::kBFloat16 ? y : y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(turbine_cpu, lib) {
  lib.def("amx_ready() -> bool", &amx_ready);
  lib.def("q4_pack(Tensor nibbles, Tensor d, Tensor m) -> Tensor");
  lib.def("q4_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbine_cpu, CPU, lib) {
  lib.impl("q4_pack", q4_pack);
  lib.impl("q4_linear", q4_linear);
}
