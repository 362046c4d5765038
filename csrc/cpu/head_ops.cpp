// The LM head's softmax statistics without [rows, vocab] logits (CPU): for each row of x, its logits z = x·Wᵀ over
// the vocabulary give (argmax token, p1, p2, entropy), p = softmax(z): what plain greedy decoding (token, p1) and an
// exit check (all four) need. helios.ops.exit_head.exit_head_native is the torch reference.
//
// The vocabulary is cut into chunks of kChunk rows: the threads compute a chunk's logits with the linears' kernel
// (gemm.h: float32 rows or int8 / int4 tiles) into an L1-sized buffer and reduce each row to (max, its first index,
// second max, Σ e^(z-max), Σ (z-max)·e^(z-max)); the chunks are then merged in vocabulary order (online softmax,
// Milakov & Gimelshein), so the result does not depend on the thread count and ties go to the lowest token id.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "gemm.h"
#include "quant_tiles.h"

namespace helios {

using quant::kGroup;

namespace {

constexpr int64_t kChunk = 240;  // vocabulary rows per chunk: whole register blocks of 4, 8 and 12 rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One row's statistics over a run of logits (z relative to nothing: max is the run's own).
struct RowStats {
  float top1 = kNegInf, top2 = kNegInf;  // the largest and second-largest logit (equal when the max repeats)
  int64_t token = 0;                     // the first index of top1
  float d = 0.f, s = 0.f;                // Σ e^(z - top1), Σ (z - top1)·e^(z - top1)
};

float max_of(const float* z, int64_t n) {
  float best = kNegInf;
  int64_t i = 0;
#ifdef HELIOS_SIMD
  simd::Vec v = simd::broadcast(kNegInf);
  for (; i + simd::kLanes <= n; i += simd::kLanes) v = simd::max(v, simd::load(z + i));
  best = simd::max_of(v);
#endif
  for (; i < n; ++i) best = std::max(best, z[i]);
  return best;
}

// Statistics of logits z[0:n] (n >= 1); token is relative to z.
RowStats chunk_stats(const float* z, int64_t n) {
  RowStats r;
  r.top1 = max_of(z, n);
  while (r.token < n - 1 && !(z[r.token] == r.top1)) ++r.token;  // (NaN logits stop at the end)
  r.top2 = std::max(max_of(z, r.token), max_of(z + r.token + 1, n - r.token - 1));
  int64_t i = 0;
#ifdef HELIOS_SIMD
  simd::Vec d = simd::zero(), s = simd::zero();
  const simd::Vec shift = simd::broadcast(-r.top1);
  for (; i + simd::kLanes <= n; i += simd::kLanes) {
    const simd::Vec x = simd::add(simd::load(z + i), shift);
    const simd::Vec e = simd::exp(x);
    d = simd::add(d, e);
    s = simd::fma(x, e, s);
  }
  r.d = simd::sum(d);
  r.s = simd::sum(s);
#endif
  for (; i < n; ++i) {
    const float x = z[i] - r.top1, e = std::exp(x);
    r.d += e;
    r.s += x * e;
  }
  return r;
}

// `run` followed by `next` (whose tokens come after run's): the online-softmax merge of exit_head_native.
void merge(RowStats& run, const RowStats& next, int64_t next_offset) {
  if (next.top1 > run.top1) {  // strict: a tie keeps the earlier token
    const float shift = run.top1 - next.top1;  // < 0, -inf for an empty run
    const float scale = std::exp(shift);
    if (std::isfinite(shift)) {
      run.s = scale * (run.s + shift * run.d) + next.s;
      run.d = scale * run.d + next.d;
    } else {
      run.s = next.s;
      run.d = next.d;
    }
    run.top2 = std::max(run.top1, next.top2);
    run.top1 = next.top1;
    run.token = next.token + next_offset;
  } else {
    const float shift = next.top1 - run.top1;  // <= 0
    const float scale = std::exp(shift);
    run.s += scale * (next.s + shift * next.d);
    run.d += scale * next.d;
    run.top2 = std::max(run.top2, next.top1);
  }
}

template <typename Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats(const at::Tensor& x, const Tiles& w,
                                                                      int64_t vocab) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  std::vector<RowStats> per_chunk(chunks * M);
  const float* xp = x.data_ptr<float>();
  // the kernels take at most kSmallM rows at a time; each block of rows is prepared once for all chunks: transposed
  // for the float kernels, or rounded for integer dot products (rounding it per chunk cost ~30% of the head)
  std::vector<std::vector<float>> prepared;
  std::vector<integer_dot::QuantizedRows> rounded;
  for (int64_t m0 = 0; m0 < M; m0 += gemm::kSmallM) {
    const int64_t rows = std::min(gemm::kSmallM, M - m0);
    rounded.emplace_back();
    if constexpr (Tiles::kIntegerDot) {
      if (w.integer_dot() && rows >= Tiles::kIntegerRows) {
        w.round_rows(xp + m0 * K, rows, rounded.back());
        prepared.emplace_back();
        continue;
      }
    }
    prepared.push_back(gemm::prepared_rows(xp + m0 * K, rows, K));
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(gemm::kSmallM * kChunk), tile_buffer(gemm::kNR * K);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunk, n = std::min(kChunk, vocab - first);
      const int64_t t0 = first / gemm::kNR, tiles = (n + gemm::kNR - 1) / gemm::kNR;
      for (int64_t m0 = 0; m0 < M; m0 += gemm::kSmallM) {
        const int64_t rows = std::min(gemm::kSmallM, M - m0);
        const gemm::Epilogue epi{nullptr, nullptr, logits.data(), n};
        const int64_t block = m0 / gemm::kSmallM;
        const std::vector<float>& xt = prepared[block];
        bool done = false;
        if constexpr (Tiles::kIntegerDot) {
          if (!rounded[block].q.empty()) {
            w.slice(t0, n).rounded_range(rounded[block], rows, 0, tiles, epi);
            done = true;
          }
        }
        if (!done)
          gemm::tile_range(xp + m0 * K, rows, 0, tiles, w.slice(t0, n), epi, tile_buffer.data(),
                           xt.empty() ? nullptr : xt.data());
        for (int64_t m = 0; m < rows; ++m) per_chunk[c * M + m0 + m] = chunk_stats(logits.data() + m * n, n);
      }
    }
  });
  auto token = at::empty({M}, x.options().dtype(at::kLong));
  auto p1 = at::empty({M}, x.options()), p2 = at::empty({M}, x.options()), entropy = at::empty({M}, x.options());
  for (int64_t m = 0; m < M; ++m) {
    RowStats run;
    for (int64_t c = 0; c < chunks; ++c) merge(run, per_chunk[c * M + m], c * kChunk);
    token.data_ptr<int64_t>()[m] = run.token;
    p1.data_ptr<float>()[m] = 1.f / run.d;
    p2.data_ptr<float>()[m] = std::exp(run.top2 - run.top1) / run.d;
    entropy.data_ptr<float>()[m] = std::log(run.d) - run.s / run.d;
  }
  return {token, p1, p2, entropy};
}

void check_rows(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be contiguous float32 [rows, hidden] on CPU");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats_cpu(const at::Tensor& x,
                                                                          const at::Tensor& weight) {
  check_rows("head_stats", x);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous() &&
                  weight.device().is_cpu(),
              "head_stats: weight must be contiguous float32 [vocab, hidden] on CPU");
  TORCH_CHECK(weight.size(1) == x.size(1), "head_stats: x has ", x.size(1), " features, the weight expects ",
              weight.size(1));
  TORCH_CHECK(weight.size(0) >= 1, "head_stats: empty vocabulary");
  return head_stats(x, gemm::FloatRows{weight.data_ptr<float>(), weight.size(0), weight.size(1)}, weight.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_head_stats_cpu(const at::Tensor& x,
                                                                               const at::Tensor& qweight,
                                                                               const at::Tensor& scale,
                                                                               const at::Tensor& minimum,
                                                                               int64_t vocab,
                                                                               bool round_activations) {
  check_rows("int8_head_stats", x);
  const auto w = quant::checked_tiles<8>("int8_head_stats", qweight, scale, minimum, round_activations);
  // the tiles hold K rounded up to whole groups (zero weights past in_features): x gets zero columns to match
  TORCH_CHECK(x.size(1) <= w.K && w.K - x.size(1) < kGroup, "int8_head_stats: x has ", x.size(1),
              " features, the weight expects ", w.K, " (", kGroup, "-column groups)");
  TORCH_CHECK(vocab >= 1 && (vocab + gemm::kNR - 1) / gemm::kNR == qweight.size(0), "int8_head_stats: vocab ", vocab,
              " does not match ", qweight.size(0), " tiles of ", gemm::kNR, " rows");
  return head_stats(x.size(1) == w.K ? x : at::constant_pad_nd(x, {0, w.K - x.size(1)}), w, vocab);
}

}  // namespace helios
