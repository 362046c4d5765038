// CPU float32 linear over weights in their checkpoint layout: y = x·Wᵀ (+ bias) (+ residual).
// Decode batches (<= gemm::kSmallM rows) run helios' register-blocked kernel (gemm.h), the one the fused decode
// stack runs inside its single parallel region, so a model served by the stack keeps one plain copy of each
// weight; more rows (prefill) go to at::linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../ops.h"
#include "gemm.h"

namespace helios {

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear: expects CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "linear: x and weight must be float32");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear: weight must be contiguous [out, in]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "linear: x has ", x.size(-1), " features, the weight expects ", K);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N,
                "linear: bias must be float32 [", N, "]");
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  if (residual.has_value())
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->sizes() == at::IntArrayRef(out_sizes),
                "linear: residual must be float32 with the output's shape");
  const auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M > gemm::kSmallM || N == 0) {
    auto y = at::linear(x2, weight, bias).view(out_sizes);
    return residual.has_value() ? y.add_(*residual) : y;
  }
  auto out = at::empty({M, N}, x.options());
  at::Tensor bias_c, residual_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  if (residual.has_value()) residual_c = residual->reshape({M, N}).contiguous();
  const gemm::Epilogue epi{bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
                           residual_c.defined() ? residual_c.data_ptr<float>() : nullptr, out.data_ptr<float>(), N};
  const gemm::FloatRows w{weight.data_ptr<float>(), N, K};
  if (M > 0) gemm::small_gemm(x2.data_ptr<float>(), M, (N + gemm::kNR - 1) / gemm::kNR, w, epi);
  return out.view(out_sizes);
}

}  // namespace helios
