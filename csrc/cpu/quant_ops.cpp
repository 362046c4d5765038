// CPU weight-only quantized linears: y = x·Wᵀ (+ bias) (+ residual) with W stored as 8- or 4-bit integers in
// groups of 32 along K, each group with a float32 scale and minimum (int4 is llama.cpp's Q4_1; int8 the same with
// 255 steps, which holds Q4_1 and Q8_0 blocks exactly); activations and accumulation are float32, except for
// batches of integer_dot::kMinRows to kSmallM rows on CPUs with AVX-512 VNNI (integer_dot.h: activations rounded to
// int16 per group of 32 (w8a8 / w4a8: int8, as llama.cpp's Q8_0), and integer dot products).
//
// Decode (few rows) is bound by reading the weights, so the win is the bytes: each thread streams tiles of NR
// output rows, converts 8 or 16 weights at a time in registers and multiplies them into MR x NR accumulators
// (AVX-512 or AVX2; a tile buffer + plain loops without either). PyTorch's _weight_int8pack_mm /
// _weight_int4pack_mm_for_cpu were 3-12x slower than the fp32 oneDNN linear on an AVX2 EPYC, hence this kernel.
// Prefill (many rows) is bound by arithmetic: weights are dequantized in slabs and multiplied with at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../ops.h"

#include "gemm.h"
#include "quant_tiles.h"
#include "simd.h"

namespace helios {

namespace {

using gemm::Epilogue;
using gemm::kNR;                     // output rows per tile: the weights are stored tile by tile (see below)
using gemm::kSmallM;                 // up to here weights are converted in registers; above, slabs + at::mm
using quant::kGroup;                 // group size along K (one scale and minimum each)

constexpr int64_t kSlabFloats = 8 << 20;  // float32 weights dequantized at once on the at::mm path (32 MiB)

// Many rows (prefill): the weight dequantized to float32 (whole, or in slabs of output rows when it is larger than
// kSlabFloats, as an LM head is) and multiplied by at::mm / at::addmm straight into the output's columns. (Copying
// each slab's product into the output element by element cost 0.5 s of a 2 s prefill of SmolLM2 at 2,900 tokens.)
template <typename Tiles>
void slab_gemm(const at::Tensor& x, int64_t tiles, const Tiles& w, at::Tensor& out, const at::Tensor& bias,
               const at::Tensor& residual) {
  const int64_t K = w.K, N = out.size(1);
  const int64_t slab_tiles = std::max<int64_t>(1, kSlabFloats / (kNR * K));
  for (int64_t t0 = 0; t0 < tiles; t0 += slab_tiles) {
    const int64_t count = std::min(slab_tiles, tiles - t0), n0 = t0 * kNR;
    const int64_t valid = std::min(count * kNR, N - n0);
    auto slab = at::empty({count * kNR, K}, x.options());
    float* dst = slab.data_ptr<float>();
    at::parallel_for(0, count, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < kNR; ++j) w.dequant(t0 + t, j, dst + (t * kNR + j) * K);
    });
    auto columns = out.narrow(1, n0, valid);
    const auto weight_t = slab.narrow(0, 0, valid).t();
    if (residual.defined()) at::addmm_out(columns, residual.narrow(1, n0, valid), x, weight_t);
    else at::mm_out(columns, x, weight_t);
    if (bias.defined()) columns.add_(bias.narrow(0, n0, valid));
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
    slab_gemm(x2, tiles, w, out, bias_c, residual_c);
  }
  return out.view(out_sizes);
}

template <int Bits>
at::Tensor group_linear(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, bool round_activations) {
  const auto w = quant::checked_tiles<Bits>(op, qweight, scale, minimum, round_activations);
  const int64_t tiles = qweight.size(0);
  return quant_linear(op, x, w, tiles, out_features, kGroup, bias, residual);
}

}  // namespace

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool round_activations) {
  return group_linear<8>("int8_linear", x, qweight, scale, minimum, out_features, bias, residual, round_activations);
}

int64_t integer_dot_rows_cpu() {
#ifdef HELIOS_SIMD
  return integer_dot::kAvailable ? integer_dot::kMinRows : 0;
#else
  return 0;
#endif
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool round_activations) {
  return group_linear<4>("int4_linear", x, qweight, scale, minimum, out_features, bias, residual, round_activations);
}

}  // namespace helios
