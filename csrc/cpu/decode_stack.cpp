// The decode layer stack of a Llama-family model in one OpenMP parallel region (float32 activations, CPU; float32,
// int8 or int4 weights).
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
#include <chrono>
#include <mutex>
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
#include "quant_tiles.h"

namespace helios {

namespace {

constexpr int64_t kBiasesPerLayer = 4;  // qkv, o_proj, gate_up, down (each may be None)

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

// Phases of a layer, for the optional timing (decode_stack_timing).
enum Phase { kInputNorm, kQkv, kAttention, kOProj, kPostNorm, kGateUp, kDown, kPhases };

// Seconds thread 0 spent per phase [working, waiting at the barrier after it], summed over calls while enabled.
struct StackTiming {
  std::mutex mutex;
  bool enabled = false;
  double seconds[kPhases][2] = {};
};
StackTiming& stack_timing() {
  static StackTiming timing;
  return timing;
}

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// This thread's share [begin, end) of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int threads) {
  return {n * tid / threads, n * (tid + 1) / threads};
}

// One linear of the stack: its weight tiles (gemm::FloatRows or quant::GroupTiles), output features and bias.
template <typename Tiles>
struct StackLinear {
  Tiles w;
  int64_t N;
  const float* bias;  // null when absent
  int64_t tiles() const { return (N + gemm::kNR - 1) / gemm::kNR; }
};

// A layer's K/V caches in the pool's dtype: float32, or float16 / bfloat16 (kv_cache_dtype; values are rounded as
// they are stored and read back as float32).
struct LayerCache {
  void* k;
  void* v;
  at::ScalarType dtype;
  int64_t block_size, kv_heads, dim, group;
  template <typename cache_t>
  PagedKV<cache_t> view() const {
    return {static_cast<const cache_t*>(k), static_cast<const cache_t*>(v), block_size, kv_heads, dim, group};
  }
};

template <typename Tiles>
struct LayerWeights {
  const float* input_norm;
  const float* post_norm;
  StackLinear<Tiles> qkv, o_proj, gate_up, down;
  LayerCache cache;
  int64_t window;
};

// Tensors per linear in the weights list: the float32 weight, or (qweight, scale, minimum).
template <typename Tiles>
constexpr int64_t kParts = std::is_same_v<Tiles, gemm::FloatRows> ? 1 : 3;

const float* optional_data(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 && t->size(0) == n,
              "decode_layers: ", what, " bias must be contiguous float32 [", n, "]");
  return t->data_ptr<float>();
}

template <typename Tiles>
StackLinear<Tiles> stack_linear(const at::Tensor* parts, int64_t N, int64_t K, const std::optional<at::Tensor>& bias,
                                const char* what, bool round_activations) {
  const float* b = optional_data(bias, N, what);
  if constexpr (std::is_same_v<Tiles, gemm::FloatRows>) {
    (void)round_activations;  // float32 weights: float32 products
    const at::Tensor& w = parts[0];
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == N &&
                    w.size(1) == K,
                "decode_layers: ", what, " weight must be contiguous float32 [", N, ", ", K, "], got ", w.sizes());
    return {gemm::FloatRows{w.data_ptr<float>(), N, K}, N, b};
  } else {
    const Tiles w =
        quant::checked_tiles<Tiles::kBits>("decode_layers", parts[0], parts[1], parts[2], round_activations);
    TORCH_CHECK(w.K == K && parts[0].size(0) == (N + gemm::kNR - 1) / gemm::kNR, "decode_layers: ", what,
                " quantized weight must hold [", N, ", ", K, "] (in_features a multiple of ", quant::kGroup, ")");
    return {w, N, b};
  }
}

// Everything a step needs besides the weights.
struct StepArgs {
  int64_t T, d, inter, num_heads, num_kv_heads, dim;
  const int64_t* pos;
  const int64_t* slots;
  const int32_t* tables;
  int64_t max_blocks;
  const float* cos;
  const float* sin;
  float eps, scale;
  bool round_activations;  // quantized weights: int8 (else int16) activations in integer dot products (integer_dot.h)
};

template <typename Tiles>
at::Tensor run_stack(const at::Tensor& hidden, const std::vector<LayerWeights<Tiles>>& stack, const StepArgs& a) {
  const int64_t T = a.T, d = a.d, inter = a.inter, dim = a.dim, num_kv_heads = a.num_kv_heads;
  const int64_t q_out = a.num_heads * dim, kv_out = num_kv_heads * dim, qkv_width = q_out + 2 * kv_out;
  auto out = hidden.clone();
  auto normed_t = at::empty({T, d}, hidden.options()), qkv_t = at::empty({T, qkv_width}, hidden.options());
  auto attn_t = at::empty({T, q_out}, hidden.options()), gate_up_t = at::empty({T, 2 * inter}, hidden.options());
  auto act_t = at::empty({T, inter}, hidden.options());
  float *h = out.data_ptr<float>(), *normed = normed_t.data_ptr<float>(), *qkv = qkv_t.data_ptr<float>();
  float *attn = attn_t.data_ptr<float>(), *gate_up = gate_up_t.data_ptr<float>(), *act = act_t.data_ptr<float>();
  const int64_t group = a.num_heads / num_kv_heads, half = dim / 2;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64)));
  // attention units: a token with all its heads (each cache slot read front to back), or, when tokens are fewer
  // than two per thread, a (token, KV head) pair so that batch 1 still spreads over the cores
  const bool per_head = T < 2 * threads;
  const int64_t units = per_head ? T * num_kv_heads : T;
  SpinBarrier barrier;
  const bool timed = stack_timing().enabled;
  double seconds[kPhases][2] = {};

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    AttentionScratch scratch(a.num_heads, dim, kv_out, stack.front().cache.block_size);
    std::vector<float> tile_buffer;  // a dequantized tile, for kernels without SIMD intrinsics
#ifndef HELIOS_SIMD
    tile_buffer.resize(gemm::kNR * std::max(d, std::max(q_out, inter)));
#endif
    const auto [row_begin, row_end] = share(T, tid, nt);
    const auto [unit_begin, unit_end] = share(units, tid, nt);
    // y[:, tiles b..e) = x·Wᵀ (+ bias) (+ residual) on this thread
    auto linear = [&](const float* x, const StackLinear<Tiles>& L, const float* residual, float* y, int64_t b,
                      int64_t e) {
      gemm::tile_range(x, T, b, e, L.w, gemm::Epilogue{L.bias, residual, y, L.N}, tile_buffer.data());
    };
    auto my_tiles = [&](const StackLinear<Tiles>& L) { return share(L.tiles(), tid, nt); };
    double last = timed ? now_seconds() : 0.0;
    // the end of a phase: every thread waits for the others (thread 0 times both when timing is on)
    auto sync = [&](Phase phase) {
      if (!timed || tid != 0) return barrier.wait(nt);
      const double done = now_seconds();
      barrier.wait(nt);
      const double released = now_seconds();
      seconds[phase][0] += done - last;
      seconds[phase][1] += released - done;
      last = released;
    };
    for (const LayerWeights<Tiles>& L : stack) {
      for (int64_t r = row_begin; r < row_end; ++r) rms_norm_row(h + r * d, L.input_norm, normed + r * d, d, a.eps);
      sync(kInputNorm);
      {
        const auto [b, e] = my_tiles(L.qkv);
        linear(normed, L.qkv, nullptr, qkv, b, e);
      }
      sync(kQkv);
      for (int64_t u = unit_begin; u < unit_end; ++u) {
        const int64_t t = per_head ? u / num_kv_heads : u;
        const int64_t g0 = per_head ? u % num_kv_heads : 0, g1 = per_head ? g0 + 1 : num_kv_heads;
        float* q = qkv + t * qkv_width;
        float* k = q + q_out;
        const float* v = k + kv_out;
        const float* c = a.cos + a.pos[t] * dim;
        const float* s = a.sin + a.pos[t] * dim;
        for (int64_t hq = g0 * group; hq < g1 * group; ++hq) rotate_row(q + hq * dim, c, s, half);
        with_cache_type(L.cache.dtype, [&](auto type) {
          using cache_t = decltype(type);
          cache_t* k_slot = static_cast<cache_t*>(L.cache.k) + a.slots[t] * kv_out;
          cache_t* v_slot = static_cast<cache_t*>(L.cache.v) + a.slots[t] * kv_out;
          for (int64_t g = g0; g < g1; ++g) {
            rotate_row(k + g * dim, c, s, half);
            std::copy(k + g * dim, k + (g + 1) * dim, k_slot + g * dim);  // (rounded to a narrower cache type)
            std::copy(v + g * dim, v + (g + 1) * dim, v_slot + g * dim);
          }
          // only this unit wrote this token's K/V heads that these query heads read
          attend_token(L.cache.template view<cache_t>(), q, a.tables + t * a.max_blocks, a.pos[t], L.window, a.scale,
                       g0 * group, g1 * group, attn + t * q_out, scratch);
        });
      }
      sync(kAttention);
      {
        const auto [b, e] = my_tiles(L.o_proj);
        linear(attn, L.o_proj, h, h, b, e);  // h += attn·Wᵀ, in place
      }
      sync(kOProj);
      for (int64_t r = row_begin; r < row_end; ++r) rms_norm_row(h + r * d, L.post_norm, normed + r * d, d, a.eps);
      sync(kPostNorm);
      {
        // gate tiles [b, e) and the matching up tiles, then silu(gate) * up on exactly those columns
        const int64_t up = inter / gemm::kNR;
        const auto [b, e] = share(up, tid, nt);
        linear(normed, L.gate_up, nullptr, gate_up, b, e);
        linear(normed, L.gate_up, nullptr, gate_up, b + up, e + up);
        const int64_t c0 = b * gemm::kNR, width = (e - b) * gemm::kNR;
        for (int64_t r = 0; r < T; ++r)
          silu_and_mul_row(gate_up + r * 2 * inter + c0, gate_up + r * 2 * inter + inter + c0, act + r * inter + c0,
                           width);
      }
      sync(kGateUp);
      {
        const auto [b, e] = my_tiles(L.down);
        linear(act, L.down, h, h, b, e);  // h += act·Wᵀ, in place
      }
      sync(kDown);
    }
  }
  if (timed) {
    StackTiming& timing = stack_timing();
    std::lock_guard<std::mutex> lock(timing.mutex);
    for (int p = 0; p < kPhases; ++p)
      for (int k = 0; k < 2; ++k) timing.seconds[p][k] += seconds[p][k];
  }
  return out;
}

template <typename Tiles>
at::Tensor decode_stack(const at::Tensor& hidden, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                        at::TensorList key_caches, at::TensorList value_caches, at::IntArrayRef sliding_windows,
                        StepArgs a) {
  const int64_t per_layer = 2 + 4 * kParts<Tiles>;
  const int64_t layers = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(weights.size()) == layers * per_layer &&
                  static_cast<int64_t>(biases.size()) == layers * kBiasesPerLayer &&
                  static_cast<int64_t>(value_caches.size()) == layers &&
                  static_cast<int64_t>(sliding_windows.size()) == layers,
              "decode_layers: per layer ", per_layer, " weights, ", kBiasesPerLayer,
              " biases, one key cache, one value cache and one sliding window");
  const int64_t d = a.d, dim = a.dim, q_out = a.num_heads * dim, kv_out = a.num_kv_heads * dim;
  const at::Tensor& gate_up = weights[2 + 2 * kParts<Tiles>];  // [2 * inter, d] rows, or tiles of kNR rows
  a.inter = (kParts<Tiles> == 1 ? gate_up.size(0) : gate_up.size(0) * gemm::kNR) / 2;
  TORCH_CHECK(a.inter % gemm::kNR == 0, "decode_layers: intermediate_size must be a multiple of ", gemm::kNR);
  std::vector<LayerWeights<Tiles>> stack;
  stack.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * per_layer];
    for (const auto* norm : {&w[0], &w[1]})
      TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == d,
                  "decode_layers: norm weights must be contiguous float32 [", d, "]");
    const at::Tensor &kc = key_caches[l], &vc = value_caches[l];
    const at::ScalarType cache_type = kc.scalar_type();
    TORCH_CHECK((cache_type == at::kFloat || cache_type == at::kHalf || cache_type == at::kBFloat16) &&
                    vc.scalar_type() == cache_type && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
                    kc.is_contiguous() && vc.is_contiguous() && kc.size(2) == a.num_kv_heads && kc.size(3) == dim,
                "decode_layers: caches must be contiguous float32, float16 or bfloat16 [num_blocks, block_size, ",
                a.num_kv_heads, ", ", dim, "], the key and value caches of a layer of one dtype");
    const int64_t block_size = kc.size(1), num_slots = kc.size(0) * block_size;
    for (int64_t t = 0; t < a.T; ++t)
      TORCH_CHECK(a.slots[t] >= 0 && a.slots[t] < num_slots, "decode_layers: slot ", a.slots[t],
                  " outside the cache");
    TORCH_CHECK(stack.empty() || block_size == stack.front().cache.block_size,
                "decode_layers: every layer's cache must have one block size");
    const int64_t P = kParts<Tiles>;
    const int64_t bias0 = l * kBiasesPerLayer;
    stack.push_back(LayerWeights<Tiles>{
        w[0].data_ptr<float>(), w[1].data_ptr<float>(),
        stack_linear<Tiles>(w + 2, q_out + 2 * kv_out, d, biases.get(bias0), "qkv", a.round_activations),
        stack_linear<Tiles>(w + 2 + P, d, q_out, biases.get(bias0 + 1), "o_proj", a.round_activations),
        stack_linear<Tiles>(w + 2 + 2 * P, 2 * a.inter, d, biases.get(bias0 + 2), "gate_up", a.round_activations),
        stack_linear<Tiles>(w + 2 + 3 * P, d, a.inter, biases.get(bias0 + 3), "down", a.round_activations),
        LayerCache{kc.data_ptr(), vc.data_ptr(), cache_type, block_size, a.num_kv_heads, dim,
                   a.num_heads / a.num_kv_heads},
        sliding_windows[l]});
  }
  return run_stack(hidden, stack, a);
}

}  // namespace

at::Tensor decode_layers_cpu(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList key_caches,
                             at::TensorList value_caches, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                             double scale, at::IntArrayRef sliding_windows, int64_t weight_bits,
                             bool round_activations) {
  // every check happens here: nothing may throw inside the parallel region
  TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && hidden.dim() == 2 &&
                  hidden.is_contiguous(),
              "decode_layers: hidden must be contiguous float32 [tokens, hidden_size] on CPU");
  const int64_t T = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(T >= 1 && T <= gemm::kSmallM, "decode_layers: 1 to ", gemm::kSmallM, " tokens per call, got ", T);
  TORCH_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "decode_layers: heads must be a multiple of kv_heads");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "decode_layers: cos/sin must be contiguous float32 [max_positions, head_dim]");
  const int64_t dim = cos.size(1);
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
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == T &&
                  seq_lens.is_contiguous(),
              "decode_layers: seq_lens must be contiguous int32 [tokens]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t block_size = key_caches.empty() ? 1 : key_caches[0].size(1);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(lens[t] == pos[t] + 1 && pos[t] >= 0 && pos[t] < cos.size(0) &&
                    lens[t] <= block_tables.size(1) * block_size,
                "decode_layers: token ", t, " at position ", pos[t], " with context ", lens[t],
                " is not a decode step inside its block table and the rotary tables");
  const StepArgs args{T, d, 0, num_heads, num_kv_heads, dim, pos, slot_mapping.data_ptr<int64_t>(),
                      block_tables.data_ptr<int32_t>(), block_tables.size(1), cos.data_ptr<float>(),
                      sin.data_ptr<float>(), static_cast<float>(eps), static_cast<float>(scale), round_activations};
  switch (weight_bits) {
    case 32: return decode_stack<gemm::FloatRows>(hidden, weights, biases, key_caches, value_caches, sliding_windows, args);
    case 8: return decode_stack<quant::GroupTiles<8>>(hidden, weights, biases, key_caches, value_caches, sliding_windows, args);
    case 4: return decode_stack<quant::GroupTiles<4>>(hidden, weights, biases, key_caches, value_caches, sliding_windows, args);
    default: TORCH_CHECK(false, "decode_layers: weight_bits must be 32 (float32), 8 or 4, got ", weight_bits);
  }
}

at::Tensor decode_stack_timing_cpu(bool enable) {
  StackTiming& timing = stack_timing();
  std::lock_guard<std::mutex> lock(timing.mutex);
  auto out = at::empty({kPhases, 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int p = 0; p < kPhases; ++p)
    for (int k = 0; k < 2; ++k) {
      o[p * 2 + k] = timing.seconds[p][k];
      timing.seconds[p][k] = 0.0;
    }
  timing.enabled = enable;
  return out;
}

}  // namespace helios
