// The weight layout of helios' int8 / int4 linears (quant_ops.cpp, and the fused decode stack): tiles of gemm::kNR
// output rows, groups of 32 along K with a float32 scale and minimum each, loaded and dequantized in registers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "gemm.h"
#include "integer_dot.h"
#include "simd.h"

namespace helios::quant {

using gemm::kNR;
constexpr int64_t kGroup = 32;  // group size along K (one scale and minimum each)
static_assert(integer_dot::kGroup == kGroup, "activations are rounded per weight group");

// Layout, interleaved by tiles of kNR output rows so that one tile is one sequential stream in memory (four
// separate row streams ran at a third of the bandwidth):
//   q [tiles, K/32, kNR, 32 * Bits / 8], scale/minimum [tiles, K/32, kNR]; w = q * scale + minimum per group of 32
//   along K. int8 (Bits 8): byte i holds value i. int4 (Bits 4, llama.cpp's Q4_1): byte i holds value i in the low
//   nibble and value 16 + i in the high one.
// Rows past out_features are zero padding.
template <int Bits>
struct GroupTiles {
  static constexpr int kBits = Bits;
  static constexpr bool kTail = false;  // K is a whole number of groups
  // this build can take integer dot products (integer_dot.h); `integer_dot()` says whether this weight does
  static constexpr bool kIntegerDot = integer_dot::kAvailable;
  static constexpr int64_t kIntegerRows = integer_dot::kMinRows;
  static constexpr int64_t kGroupBytes = kGroup * Bits / 8;
  const uint8_t* q;
  const float* scale;
  const float* minimum;
  int64_t K;
  // from kIntegerRows rows, activations rounded to 8 or 16 bits for integer dot products; 0: float32 products
  int activation_bits = 0;
  bool integer_dot() const { return activation_bits != 0; }
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
    return simd::fma(simd::from_bytes(group_bytes(row(t, g, j), within)), simd::broadcast(scale[at(t, g, j)]),
                     simd::broadcast(minimum[at(t, g, j)]));
  }
  // (gemm::direct_rows asks each weight format for the next tile's data: a tile here is one sequential stream,
  // which the hardware prefetcher follows, and at 8 rows these kernels are bound by arithmetic: nothing to ask for.)
  void prefetch_next(int64_t, int64_t) const {}
  // The stored integers `within`..`within`+kLanes of the group at b (within a multiple of kLanes).
  static __m128i group_bytes(const uint8_t* b, int64_t within) {
    if constexpr (Bits == 8) return simd::load_bytes(b + within);
    // values 0..15 of a group are the low nibbles of its 16 bytes, 16..31 the high ones
    __m128i bytes = simd::load_bytes(b + within % (kGroup / 2));
    if (within >= kGroup / 2) bytes = _mm_srli_epi16(bytes, 4);
    return _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
  }
#endif
  // Row j of tile t, dequantized, into dst[0:K].
  void dequant(int64_t t, int64_t j, float* dst) const {
#ifdef HELIOS_SIMD
    // group by group, walking the row's groups (kNR groups apart): the wide kernel dequantizes every weight once
    // per call, and per-vector index arithmetic (load) made int8 slower than float32 at 32 rows
    const uint8_t* b = row(t, 0, j);
    const float *s = scale + at(t, 0, j), *m = minimum + at(t, 0, j);
    for (int64_t g = 0; g < groups(); ++g, b += kNR * kGroupBytes, s += kNR, m += kNR) {
      const simd::Vec sv = simd::broadcast(*s), mv = simd::broadcast(*m);
#pragma GCC unroll 4
      for (int64_t i = 0; i < kGroup; i += simd::kLanes)
        simd::store(dst + g * kGroup + i, simd::fma(simd::from_bytes(group_bytes(b, i)), sv, mv));
    }
#else
    for (int64_t g = 0; g < groups(); ++g) {
      const uint8_t* b = row(t, g, j);
      const float s = scale[at(t, g, j)], m = minimum[at(t, g, j)];
      for (int i = 0; i < kGroup; ++i) dst[g * kGroup + i] = static_cast<float>(value(b, i)) * s + m;
    }
#endif
  }
  // Output rows of tiles [t_begin, t_end) for all M (<= gemm::kSmallM) rows of x, on the calling thread: x rounded
  // into this thread's buffer, then multiplied. Callers that multiply the same rows by several slices (head_ops.cpp's
  // chunks) call the two steps themselves, rounding once.
  void integer_range(const float* x, int64_t M, int64_t t_begin, int64_t t_end, const gemm::Epilogue& epi) const {
    thread_local integer_dot::QuantizedRows xq;  // grown, never shrunk
    round_rows(x, M, xq);
    rounded_range(xq, M, t_begin, t_end, epi);
  }
  void round_rows(const float* x, int64_t M, integer_dot::QuantizedRows& out) const {
    if (activation_bits == 8) integer_dot::round_rows<8>(x, M, K, out);
    else integer_dot::round_rows<16>(x, M, K, out);
  }
  void rounded_range(const integer_dot::QuantizedRows& xq, int64_t M, int64_t t_begin, int64_t t_end,
                     const gemm::Epilogue& epi) const {
    if (activation_bits == 8) integer_dot::rounded_range<8>(xq, M, t_begin, t_end, *this, epi);
    else integer_dot::rounded_range<16>(xq, M, t_begin, t_end, *this, epi);
  }
  // The tiles from t0 on, as a weight of their own (n, its output rows, is implied by the caller's tile count).
  GroupTiles slice(int64_t t0, int64_t /*n*/) const {
    const int64_t at0 = t0 * groups() * kNR;
    return {q + at0 * kGroupBytes, scale + at0, minimum + at0, K, activation_bits};
  }
  // `total` rows of K floats from output row n0 on, the first `valid` dequantized into buffer, zeros after
  // (gemm::wide_range).
  const float* rows(int64_t n0, int64_t valid, int64_t total, float* buffer) const {
    for (int64_t r = 0; r < valid; ++r) dequant((n0 + r) / kNR, (n0 + r) % kNR, buffer + r * K);
    std::fill(buffer + valid * K, buffer + total * K, 0.f);
    return buffer;
  }
  // Tile t as kNR x K floats, dequantized into buffer (gemm::tile_range without SIMD).
  const float* tile(int64_t t, float* buffer) const {
    for (int64_t j = 0; j < kNR; ++j) dequant(t, j, buffer + j * K);
    return buffer;
  }
};

// The tiles of a quantized weight (qweight, scale, minimum as helios.ops.quant lays them out), checked;
// where the build has integer dot products, activations are rounded to int16 for them, or to int8 with
// round_activations (w8a8 / w4a8).
template <int Bits>
GroupTiles<Bits> checked_tiles(const char* op, const at::Tensor& qweight, const at::Tensor& scale,
                               const at::Tensor& minimum, bool round_activations = false) {
  constexpr int64_t bytes = GroupTiles<Bits>::kGroupBytes;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 4 && qweight.size(2) == kNR &&
                  qweight.size(3) == bytes && qweight.is_contiguous(),
              op, ": qweight must be contiguous uint8 [tiles, in_features / ", kGroup, ", ", kNR, ", ", bytes, "]");
  const int64_t tiles = qweight.size(0), groups = qweight.size(1);
  for (const auto* t : {&scale, &minimum})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == tiles && t->size(1) == groups &&
                    t->size(2) == kNR && t->is_contiguous(),
                op, ": scale and minimum must be contiguous float32 [", tiles, ", ", groups, ", ", kNR, "]");
  return GroupTiles<Bits>{qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(), minimum.data_ptr<float>(),
                          groups * kGroup, !integer_dot::kAvailable ? 0 : round_activations ? 8 : 16};
}

}  // namespace helios::quant
