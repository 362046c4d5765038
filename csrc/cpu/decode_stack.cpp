// The decode layer stack of a Llama-family model in one OpenMP parallel region (float32, CPU).
//
// Per layer the per-op path opens ~5 parallel regions (4 linears, attention); with the sleeping-threads policy
// helios sets by default (OMP_WAIT_POLICY=PASSIVE, see README "CPU threads") every region pays a futex wake-up
// of the workers and a sleep at its end: tens of microseconds each on a VM, 5-15 ms of a 30-45 ms batch-1 step.
// Here the whole stack is one region: its threads split each phase (norm rows, linear tiles, attention units)
// and meet at a barrier of their own that spins briefly and then yields the core, so they never sleep inside a
// step, and a machine shared with other work still gets its cores back between steps and while a thread waits.
// The arithmetic is the per-op path's: gemm.h's kernel (linear_ops.cpp), paged_attention.h, layer_rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../ops.h"
#include "gemm.h"
#include "layer_rows.h"
#include "paged_attention.h"

namespace helios {

namespace {

constexpr int64_t kWeightsPerLayer = 6;  // input_norm, qkv, o_proj, post_norm, gate_up, down
constexpr int64_t kBiasesPerLayer = 4;   // qkv, o_proj, gate_up, down (each may be None)

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Threads of one region meet here between phases. Spins (a phase's imbalance is microseconds), then yields the
// core to whatever else wants it; never sleeps.
class SpinBarrier {
 public:
  void wait(int threads) {
    if (threads == 1) return;
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < kSpins) cpu_relax();
      else std::this_thread::yield();
    }
  }

 private:
  static constexpr int kSpins = 4096;  // ~20-200 us of pause instructions, then sched_yield in a loop
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

// This thread's share [begin, end) of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int threads) {
  return {n * tid / threads, n * (tid + 1) / threads};
}

struct LayerWeights {
  const float* input_norm;
  gemm::FloatRows qkv, o_proj;
  const float* post_norm;
  gemm::FloatRows gate_up, down;
  const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;  // null when absent
  PagedKV<float> kv;
  float* key_cache;  // the same caches, written
  float* value_cache;
  int64_t window;
};

const float* optional_data(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 && t->size(0) == n,
              "decode_layers: ", what, " bias must be contiguous float32 [", n, "]");
  return t->data_ptr<float>();
}

gemm::FloatRows float_rows(const at::Tensor& w, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == N && w.size(1) == K,
              "decode_layers: ", what, " weight must be contiguous float32 [", N, ", ", K, "], got ", w.sizes());
  return gemm::FloatRows{w.data_ptr<float>(), N, K};
}

}  // namespace

at::Tensor decode_layers_cpu(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList key_caches,
                             at::TensorList value_caches, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                             double scale, at::IntArrayRef sliding_windows) {
  // ---- checks (nothing may throw inside the parallel region)
  TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && hidden.dim() == 2 &&
                  hidden.is_contiguous(),
              "decode_layers: hidden must be contiguous float32 [tokens, hidden_size] on CPU");
  const int64_t T = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(T <= gemm::kSmallM, "decode_layers: at most ", gemm::kSmallM, " tokens per call, got ", T);
  const int64_t layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kWeightsPerLayer &&
                  static_cast<int64_t>(biases.size()) == layers * kBiasesPerLayer &&
                  static_cast<int64_t>(key_caches.size()) == layers &&
                  static_cast<int64_t>(value_caches.size()) == layers &&
                  static_cast<int64_t>(sliding_windows.size()) == layers,
              "decode_layers: per layer ", kWeightsPerLayer, " weights, ", kBiasesPerLayer,
              " biases, one key cache, one value cache and one sliding window");
  TORCH_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "decode_layers: heads must be a multiple of kv_heads");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "decode_layers: cos/sin must be contiguous float32 [max_positions, head_dim]");
  const int64_t dim = cos.size(1), q_out = num_heads * dim, kv_out = num_kv_heads * dim;
  TORCH_CHECK(dim % 2 == 0, "decode_layers: head_dim must be even");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T &&
                  positions.is_contiguous(),
              "decode_layers: positions must be contiguous int64 [tokens]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == T &&
                  slot_mapping.is_contiguous(),
              "decode_layers: slot_mapping must be contiguous int64 [tokens]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == T &&
                  block_tables.is_contiguous(),
              "decode_layers: block_tables must be contiguous int32 [tokens, max_blocks] (one sequence per token)");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == T,
              "decode_layers: seq_lens must be int32 [tokens]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const auto lens_c = seq_lens.contiguous();
  const int32_t* lens = lens_c.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);

  const int64_t inter = weights.size() ? weights[4].size(0) / 2 : 0;
  TORCH_CHECK(inter % gemm::kNR == 0, "decode_layers: intermediate_size must be a multiple of ", gemm::kNR);
  std::vector<LayerWeights> stack;
  stack.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * kWeightsPerLayer];
    for (const auto* norm : {&w[0], &w[3]})
      TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == d,
                  "decode_layers: norm weights must be contiguous float32 [", d, "]");
    const at::Tensor &kc = key_caches[l], &vc = value_caches[l];
    TORCH_CHECK(kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat && kc.dim() == 4 &&
                    kc.sizes() == vc.sizes() && kc.is_contiguous() && vc.is_contiguous() &&
                    kc.size(2) == num_kv_heads && kc.size(3) == dim,
                "decode_layers: caches must be contiguous float32 [num_blocks, block_size, ", num_kv_heads, ", ",
                dim, "]");
    const int64_t block_size = kc.size(1), num_slots = kc.size(0) * block_size;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "decode_layers: slot ", slots[t], " outside the cache");
      TORCH_CHECK(lens[t] == pos[t] + 1 && pos[t] >= 0 && pos[t] < cos.size(0) &&
                      lens[t] <= max_blocks * block_size,
                  "decode_layers: token ", t, " at position ", pos[t], " with context ", lens[t],
                  " is not a decode step inside its block table and the rotary tables");
    }
    stack.push_back(LayerWeights{
        w[0].data_ptr<float>(), float_rows(w[1], q_out + 2 * kv_out, d, "qkv"), float_rows(w[2], d, q_out, "o_proj"),
        w[3].data_ptr<float>(), float_rows(w[4], 2 * inter, d, "gate_up"), float_rows(w[5], d, inter, "down"),
        optional_data(biases.get(l * kBiasesPerLayer), q_out + 2 * kv_out, "qkv"),
        optional_data(biases.get(l * kBiasesPerLayer + 1), d, "o_proj"),
        optional_data(biases.get(l * kBiasesPerLayer + 2), 2 * inter, "gate_up"),
        optional_data(biases.get(l * kBiasesPerLayer + 3), d, "down"),
        PagedKV<float>{kc.data_ptr<float>(), vc.data_ptr<float>(), block_size, num_kv_heads, dim,
                       num_heads / num_kv_heads},
        kc.data_ptr<float>(), vc.data_ptr<float>(), sliding_windows[l]});
  }

  // ---- buffers
  auto out = hidden.clone();
  const int64_t qkv_width = q_out + 2 * kv_out;
  auto normed_t = at::empty({T, d}, hidden.options()), qkv_t = at::empty({T, qkv_width}, hidden.options());
  auto attn_t = at::empty({T, q_out}, hidden.options()), gate_up_t = at::empty({T, 2 * inter}, hidden.options());
  auto act_t = at::empty({T, inter}, hidden.options());
  float *h = out.data_ptr<float>(), *normed = normed_t.data_ptr<float>(), *qkv = qkv_t.data_ptr<float>();
  float *attn = attn_t.data_ptr<float>(), *gate_up = gate_up_t.data_ptr<float>(), *act = act_t.data_ptr<float>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = sin.data_ptr<float>();
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);
  const int64_t group = num_heads / num_kv_heads, half = dim / 2;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64)));
  // attention units: a token with all its heads (each cache slot read front to back), or, when tokens are fewer
  // than two per thread, a (token, KV head) pair so that batch 1 still spreads over the cores
  const bool per_head = T < 2 * threads;
  const int64_t units = per_head ? T * num_kv_heads : T;
  SpinBarrier barrier;

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    AttentionScratch scratch(num_heads, dim, kv_out, stack.empty() ? 1 : stack[0].kv.block_size);
    const auto [row_begin, row_end] = share(T, tid, nt);
    const auto [unit_begin, unit_end] = share(units, tid, nt);
    auto linear = [&](const float* x, const gemm::FloatRows& w, const float* bias, const float* residual, float* y,
                      int64_t t_begin, int64_t t_end) {
      gemm::tile_range(x, T, t_begin, t_end, w, gemm::Epilogue{bias, residual, y, w.N}, nullptr);
    };
    auto tiles_of = [&](const gemm::FloatRows& w) { return share((w.N + gemm::kNR - 1) / gemm::kNR, tid, nt); };
    for (const LayerWeights& L : stack) {
      for (int64_t r = row_begin; r < row_end; ++r) rms_norm_row(h + r * d, L.input_norm, normed + r * d, d, feps);
      barrier.wait(nt);
      {
        const auto [b, e] = tiles_of(L.qkv);
        linear(normed, L.qkv, L.qkv_bias, nullptr, qkv, b, e);
      }
      barrier.wait(nt);
      for (int64_t u = unit_begin; u < unit_end; ++u) {
        const int64_t t = per_head ? u / num_kv_heads : u;
        const int64_t g0 = per_head ? u % num_kv_heads : 0, g1 = per_head ? g0 + 1 : num_kv_heads;
        float* q = qkv + t * qkv_width;
        float* k = q + q_out;
        const float* v = k + kv_out;
        const float* c = cos_ptr + pos[t] * dim;
        const float* s = sin_ptr + pos[t] * dim;
        for (int64_t hq = g0 * group; hq < g1 * group; ++hq) rotate_row(q + hq * dim, c, s, half);
        for (int64_t g = g0; g < g1; ++g) {
          rotate_row(k + g * dim, c, s, half);
          std::copy(k + g * dim, k + (g + 1) * dim, L.key_cache + slots[t] * kv_out + g * dim);
          std::copy(v + g * dim, v + (g + 1) * dim, L.value_cache + slots[t] * kv_out + g * dim);
        }
        // only this unit wrote this token's K/V heads that these query heads read
        attend_token(L.kv, q, tables + t * max_blocks, pos[t], L.window, fscale, g0 * group, g1 * group,
                     attn + t * q_out, scratch);
      }
      barrier.wait(nt);
      {
        const auto [b, e] = tiles_of(L.o_proj);
        linear(attn, L.o_proj, L.o_bias, h, h, b, e);  // h += attn·Wᵀ, in place
      }
      barrier.wait(nt);
      for (int64_t r = row_begin; r < row_end; ++r) rms_norm_row(h + r * d, L.post_norm, normed + r * d, d, feps);
      barrier.wait(nt);
      {
        // gate tiles [b, e) and the matching up tiles, then silu(gate) * up on exactly those columns
        const auto [b, e] = share(inter / gemm::kNR, tid, nt);
        const int64_t up = inter / gemm::kNR;
        linear(normed, L.gate_up, L.gate_up_bias, nullptr, gate_up, b, e);
        linear(normed, L.gate_up, L.gate_up_bias, nullptr, gate_up, b + up, e + up);
        const int64_t c0 = b * gemm::kNR, width = (e - b) * gemm::kNR;
        for (int64_t r = 0; r < T; ++r)
          silu_and_mul_row(gate_up + r * 2 * inter + c0, gate_up + r * 2 * inter + inter + c0, act + r * inter + c0,
                           width);
      }
      barrier.wait(nt);
      {
        const auto [b, e] = tiles_of(L.down);
        linear(act, L.down, L.down_bias, h, h, b, e);  // h += act·Wᵀ, in place
      }
      barrier.wait(nt);
    }
  }
  return out;
}

}  // namespace helios
