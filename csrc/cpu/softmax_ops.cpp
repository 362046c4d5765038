// Row-wise softmax statistics for exit tuning (self-distillation over a whole vocabulary), CPU.
//
// Both ops read each [vocab] row a few times while it sits in L2 (SmolLM2: 49k floats = 192 KB), instead of
// one pass over all [rows, vocab] per torch op: log_softmax, exp, products, sums and argmax become 3 passes
// over a cache-resident row. exp is a branch-free polynomial that the compiler vectorizes (glibc's expf is
// scalar here): round-to-nearest range reduction to [-0.5, 0.5]·ln 2, degree-6 Taylor (relative error ~2e-7).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "../ops.h"

namespace helios {
namespace {

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: smaller arguments (also -inf) flush to ~0, no denormal bits
  const float t = x * 1.44269504088896341f;  // x·log2(e)
  const float magic = 12582912.0f;            // 1.5·2^23: adding it rounds to the nearest integer
  const float n = (t + magic) - magic;
  const float f = (t - n) * 0.693147180559945f;  // |f| <= ln2/2
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;  // ·2^n
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

inline float row_max(const float* z, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < v; ++i) m = std::max(m, z[i]);
  return m;
}

inline int64_t first_index_of(const float* z, int64_t v, float value) {
  for (int64_t i = 0; i < v; ++i)
    if (z[i] == value) return i;
  return 0;  // only for NaN rows
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous float32 [rows, vocab] tensor");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_rows_cpu(at::Tensor& logits) {
  check_rows(logits, "softmax_rows_", "logits");
  const int64_t rows = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "softmax_rows_: empty vocabulary");
  auto neg_entropy = at::empty({rows}, logits.options());
  auto argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  float* base = logits.data_ptr<float>();
  float* ne = neg_entropy.data_ptr<float>();
  int64_t* am = argmax.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = base + r * v;
      const float m = row_max(z, v);
      am[r] = first_index_of(z, v, m);
      double sum = 0.0, weighted = 0.0;  // Σ e, Σ e·(z − m), with e = exp(z − m); double: 49k-term sums
#pragma omp simd reduction(+ : sum, weighted)
      for (int64_t i = 0; i < v; ++i) {
        const float shifted = z[i] - m;
        const float e = exp_nonpositive(shifted);
        z[i] = e;
        sum += e;
        weighted += e * shifted;
      }
      const float inv = static_cast<float>(1.0 / sum);
#pragma omp simd
      for (int64_t i = 0; i < v; ++i) z[i] *= inv;
      ne[r] = static_cast<float>(weighted / sum - std::log(sum));  // Σ p log p with log p = z − m − log Σe
    }
  });
  return {neg_entropy, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_rows_cpu(at::Tensor& logits, const at::Tensor& probs,
                                                                 const at::Tensor& target, double ce_weight,
                                                                 double grad_scale, bool write_grad) {
  check_rows(logits, "distill_rows_", "logits");
  check_rows(probs, "distill_rows_", "probs");
  TORCH_CHECK(probs.sizes() == logits.sizes(), "distill_rows_: probs and logits shapes differ");
  const int64_t rows = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "distill_rows_: empty vocabulary");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == rows && target.is_contiguous(),
              "distill_rows_: target must be a contiguous int64 [rows] CPU tensor");
  auto cross = at::empty({rows}, logits.options());
  auto ce = at::empty({rows}, logits.options());
  auto argmax = at::empty({rows}, logits.options().dtype(at::kLong));
  float* base = logits.data_ptr<float>();
  const float* pbase = probs.data_ptr<float>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  float* cr = cross.data_ptr<float>();
  float* cep = ce.data_ptr<float>();
  int64_t* am = argmax.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tgt[r] >= 0 && tgt[r] < v, "distill_rows_: target ", tgt[r], " is outside the vocabulary of ", v);
  const float alpha = static_cast<float>(ce_weight), scale = static_cast<float>(grad_scale);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = base + r * v;
      const float* p = pbase + r * v;
      const int64_t t = tgt[r];
      const float m = row_max(z, v);
      am[r] = first_index_of(z, v, m);
      double sum = 0.0, pz = 0.0, psum = 0.0;
#pragma omp simd reduction(+ : sum, pz, psum)
      for (int64_t i = 0; i < v; ++i) {
        sum += exp_nonpositive(z[i] - m);
        pz += p[i] * z[i];
        psum += p[i];
      }
      const double lse = m + std::log(sum);
      cr[r] = static_cast<float>(lse * psum - pz);  // −Σ p log q
      cep[r] = static_cast<float>(lse - z[t]);      // −log q(target)
      if (write_grad) {
        const float a = scale * (1.0f + alpha), lse_f = static_cast<float>(lse);
#pragma omp simd
        for (int64_t i = 0; i < v; ++i) z[i] = a * exp_nonpositive(z[i] - lse_f) - scale * p[i];
        z[t] -= scale * alpha;
      }
    }
  });
  return {cross, ce, argmax};
}

}  // namespace helios
