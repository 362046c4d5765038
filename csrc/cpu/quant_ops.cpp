// CPU weight-only quantized linears: y = x·Wᵀ (+ bias) (+ residual) with W stored as 8- or 4-bit integers in
// groups of 32 along K, each group with a float32 scale and minimum (int4 is llama.cpp's Q4_1; int8 the same with
// 255 steps, which holds Q4_1 and Q8_0 blocks exactly); activations and accumulation are float32.
//
// Decode (few rows) is bound by reading the weights, so the win is the bytes: each thread streams tiles of NR
// output rows, converts 8 or 16 weights at a time in registers and multiplies them into MR x NR accumulators
// (AVX-512 or AVX2; a tile buffer + plain loops without either). PyTorch's _weight_int8pack_mm / _weight_int4pack_mm_for_cpu were 3-12x slower than the fp32
// oneDNN linear on an AVX2 EPYC, hence this kernel. Prefill (many rows) is bound by arithmetic: weights are
// dequantized in slabs and multiplied with at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../ops.h"

#include "gemm.h"
#include "simd.h"

namespace helios {

namespace {

using gemm::Epilogue;
using gemm::kNR;                     // output rows per tile: the weights are stored tile by tile (see below)
using gemm::kSmallM;                 // up to here weights are converted in registers; above, slabs + at::mm
constexpr int64_t kGroup = 32;       // group size along K (one scale and minimum each)
constexpr int64_t kSlabTiles = 256;  // tiles (x kNR rows) dequantized at once on the at::mm path

// Layout, interleaved by tiles of kNR output rows so that one tile is one sequential stream in memory (four
// separate row streams ran at a third of the bandwidth):
//   q [tiles, K/32, kNR, 32 * Bits / 8], scale/minimum [tiles, K/32, kNR]; w = q * scale + minimum per group of 32
//   along K. int8 (Bits 8): byte i holds value i. int4 (Bits 4, llama.cpp's Q4_1): byte i holds value i in the low
//   nibble and value 16 + i in the high one.
// Rows past out_features are zero padding.
template <int Bits>
struct GroupTiles {
  static constexpr bool kTail = false;  // K is a whole number of groups
  static constexpr int64_t kGroupBytes = kGroup * Bits / 8;
  const uint8_t* q;
  const float* scale;
  const float* minimum;
  int64_t K;
  int64_t groups() const { return K / kGroup; }
  int64_t at(int64_t t, int64_t g, int64_t j) const { return (t * groups() + g) * kNR + j; }  // group (t, g, j)
  const uint8_t* row(int64_t t, int64_t g, int64_t j) const { return q + at(t, g, j) * kGroupBytes; }
  static int value(const uint8_t* b, int i) {
    if constexpr (Bits == 8) return b[i];
    else return i < kGroup / 2 ? b[i] & 0x0F : b[i - kGroup / 2] >> 4;
  }
#ifdef HELIOS_SIMD
  // Weights k..k+kLanes of row j of tile t, dequantized in registers (k is a multiple of kLanes).
  simd::Vec load(int64_t t, int64_t j, int64_t k) const {
    const int64_t g = k / kGroup, within = k % kGroup;
    __m128i bytes;
    if constexpr (Bits == 8) {
      bytes = simd::load_bytes(row(t, g, j) + within);
    } else {  // values 0..15 of a group are the low nibbles of its 16 bytes, 16..31 the high ones
      bytes = simd::load_bytes(row(t, g, j) + within % (kGroup / 2));
      if (within >= kGroup / 2) bytes = _mm_srli_epi16(bytes, 4);
      bytes = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    }
    return simd::fma(simd::from_bytes(bytes), simd::broadcast(scale[at(t, g, j)]),
                     simd::broadcast(minimum[at(t, g, j)]));
  }
#endif
  // Row j of tile t, dequantized, into dst[0:K].
  void dequant(int64_t t, int64_t j, float* dst) const {
#ifdef HELIOS_SIMD
    for (int64_t k = 0; k < K; k += simd::kLanes) simd::store(dst + k, load(t, j, k));
#else
    for (int64_t g = 0; g < groups(); ++g) {
      const uint8_t* b = row(t, g, j);
      const float s = scale[at(t, g, j)], m = minimum[at(t, g, j)];
      for (int i = 0; i < kGroup; ++i) dst[g * kGroup + i] = static_cast<float>(value(b, i)) * s + m;
    }
#endif
  }
  // Tile t as kNR x K floats, dequantized into buffer (gemm::tile_range without SIMD).
  const float* tile(int64_t t, float* buffer) const {
    for (int64_t j = 0; j < kNR; ++j) dequant(t, j, buffer + j * K);
    return buffer;
  }
};

// Many rows (prefill): slabs of the weight dequantized to float32 and multiplied with at::mm.
template <typename Tiles>
void slab_gemm(const at::Tensor& x, int64_t tiles, const Tiles& w, const Epilogue& epi) {
  const int64_t M = x.size(0), K = w.K;
  for (int64_t t0 = 0; t0 < tiles; t0 += kSlabTiles) {
    const int64_t count = std::min(kSlabTiles, tiles - t0), rows = count * kNR;
    auto slab = at::empty({rows, K}, x.options());
    float* dst = slab.data_ptr<float>();
    at::parallel_for(0, count, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < kNR; ++j) w.dequant(t0 + t, j, dst + (t * kNR + j) * K);
    });
    const auto part = at::mm(x, slab.t()).contiguous();
    const float* p = part.data_ptr<float>();
    const int64_t n0 = t0 * kNR, valid = std::min(rows, epi.N - n0);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t j = 0; j < valid; ++j) epi.put(m, n0 + j, p[m * rows + j]);
    });
  }
}

// Shared driver: argument checks, the output, and the choice of path by the number of input rows.
template <typename Tiles>
at::Tensor quant_linear(const char* op, const at::Tensor& x, const Tiles& w, int64_t tiles, int64_t N, int64_t k_align,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  const int64_t K = w.K;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor");
  TORCH_CHECK(N >= 1 && N <= tiles * kNR && N > (tiles - 1) * kNR, op, ": out_features ", N,
              " does not fit a weight of ", tiles, " tiles of ", kNR, " rows");
  // the weight's in_features were zero-padded to a multiple of k_align
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) <= K && x.size(-1) > K - k_align, op, ": x has ", x.size(-1),
              " features, the weight expects ", K, " (padded to a multiple of ", k_align, ")");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  if (x2.size(1) != K) x2 = at::constant_pad_nd(x2, {0, K - x2.size(1)}, 0.0);  // the weight's zero padding
  const int64_t M = x2.size(0);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  auto out = at::empty({M, N}, x.options());
  at::Tensor bias_c, residual_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, op, ": bias must be float32 [", N, "]");
    bias_c = bias->contiguous();
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->numel() == M * N, op,
                ": residual must be float32 with the output's shape");
    residual_c = residual->reshape({M, N}).contiguous();
  }
  const Epilogue epi{bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
                     residual_c.defined() ? residual_c.data_ptr<float>() : nullptr, out.data_ptr<float>(), N};
  const float* xp = x2.data_ptr<float>();
  if (M == 0) {
  } else if (M <= kSmallM) {
    gemm::small_gemm(xp, M, tiles, w, epi);
  } else {
    slab_gemm(x2, tiles, w, epi);
  }
  return out.view(out_sizes);
}

template <int Bits>
at::Tensor group_linear(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual) {
  constexpr int64_t bytes = GroupTiles<Bits>::kGroupBytes;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 4 && qweight.size(2) == kNR &&
                  qweight.size(3) == bytes && qweight.is_contiguous(),
              op, ": qweight must be contiguous uint8 [tiles, in_features / ", kGroup, ", ", kNR, ", ", bytes, "]");
  const int64_t tiles = qweight.size(0), groups = qweight.size(1);
  for (const auto* t : {&scale, &minimum})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == tiles && t->size(1) == groups &&
                    t->size(2) == kNR && t->is_contiguous(),
                op, ": scale and minimum must be contiguous float32 [", tiles, ", ", groups, ", ", kNR, "]");
  const GroupTiles<Bits> w{qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(), minimum.data_ptr<float>(),
                           groups * kGroup};
  return quant_linear(op, x, w, tiles, out_features, kGroup, bias, residual);
}

}  // namespace

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual) {
  return group_linear<8>("int8_linear", x, qweight, scale, minimum, out_features, bias, residual);
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual) {
  return group_linear<4>("int4_linear", x, qweight, scale, minimum, out_features, bias, residual);
}

}  // namespace helios
