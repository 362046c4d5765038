// CPU decoder-layer ops: RMSNorm, rotary embedding (in place) and SiLU-and-mul, one pass each.
// They replace 5-15 small torch ops apiece on the decode path, where per-op dispatch, not arithmetic, is the cost
// (batch 1: a few hundred floats per op). Each rounds exactly where its torch reference (helios.ops.layer_ops)
// rounds, so 16-bit results match the reference bit for bit up to float32 arithmetic order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"
#include "layer_rows.h"

namespace helios {

namespace {

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, op, ": the last dimension must be contiguous");
  TORCH_CHECK(x.device().is_cpu(), op, ": expects CPU tensors");
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.is_contiguous(),
              "rms_norm: weight must be contiguous [", d, "]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and input dtypes differ");
  const auto input = x.reshape({-1, d}).contiguous();
  auto out = at::empty_like(input);
  const int64_t rows = input.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* src = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(src + r * d, w, dst + r * d, d, static_cast<float>(eps));
    });
  });
  return out.view(x.sizes());
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                          const at::Tensor& sin) {
  check_rows(query, "rotary_embedding");
  check_rows(key, "rotary_embedding");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.size(0) == key.size(0) && query.size(2) == key.size(2),
              "rotary_embedding: query/key must be [tokens, heads, head_dim] with equal tokens and head_dim");
  TORCH_CHECK(query.stride(1) == query.size(2) && key.stride(1) == key.size(2),
              "rotary_embedding: each token's heads must be contiguous");
  const int64_t tokens = query.size(0), dim = query.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "rotary_embedding: head_dim must be even");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == dim && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rotary_embedding: cos/sin must be contiguous [max_positions, head_dim]");
  TORCH_CHECK(cos.scalar_type() == query.scalar_type() && key.scalar_type() == query.scalar_type() &&
                  sin.scalar_type() == query.scalar_type(),
              "rotary_embedding: query, key, cos and sin must share a dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == tokens,
              "rotary_embedding: positions must be int64 [tokens]");
  const auto pos_acc = positions.contiguous();
  const int64_t* pos = pos_acc.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rotary_embedding: position ", pos[t], " outside [0, ",
                cos.size(0), ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding", [&] {
    const scalar_t* cos_ptr = cos.data_ptr<scalar_t>();
    const scalar_t* sin_ptr = sin.data_ptr<scalar_t>();
    scalar_t* q_ptr = query.data_ptr<scalar_t>();
    scalar_t* k_ptr = key.data_ptr<scalar_t>();
    const int64_t q_heads = query.size(1), k_heads = key.size(1);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_ptr + pos[t] * dim;
        const scalar_t* s = sin_ptr + pos[t] * dim;
        for (int64_t h = 0; h < q_heads; ++h) rotate_row(q_ptr + t * query.stride(0) + h * dim, c, s, half);
        for (int64_t h = 0; h < k_heads; ++h) rotate_row(k_ptr + t * key.stride(0) + h * dim, c, s, half);
      }
    });
  });
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  const int64_t width = x.size(-1), d = width / 2;
  TORCH_CHECK(width % 2 == 0, "silu_and_mul: the last dimension must be even (gate | up)");
  const auto input = x.reshape({-1, width}).contiguous();
  const int64_t rows = input.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = d;
  auto out = at::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* src = input.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(src + r * width, src + r * width + d, dst + r * d, d);
    });
  });
  return out;
}

}  // namespace helios
