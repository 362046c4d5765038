// helios._C: TORCH_LIBRARY schemas + CPU kernels for tensor ops, pybind11 for the host allocator.
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "block_allocator.h"
#include "ops.h"

TORCH_LIBRARY(helios, m) {
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int sliding_window) -> ()");
  m.def("softmax_rows_(Tensor(a!) logits) -> (Tensor, Tensor)");
  m.def(
      "distill_rows_(Tensor(a!) logits, Tensor probs, Tensor target, float ce_weight, float grad_scale, "
      "bool write_grad) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, int out_features, "
      "Tensor? bias=None, Tensor? residual=None, bool round_activations=False) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "decode_layers(Tensor hidden, Tensor positions, Tensor[] weights, Tensor?[] biases, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor cos, Tensor sin, "
      "int num_heads, int num_kv_heads, float eps, float scale, int[] sliding_windows, int weight_bits=32, "
      "bool round_activations=False) -> Tensor");
  m.def("decode_stack_timing(bool enable) -> Tensor", &helios::decode_stack_timing_cpu);  // no tensor in: catch-all
  m.def("integer_dot_rows() -> int", &helios::integer_dot_rows_cpu);  // no tensor in: catch-all
  m.def("head_stats(Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "int8_head_stats(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, int vocab, "
      "bool round_activations=False) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, int out_features, "
      "Tensor? bias=None, Tensor? residual=None, bool round_activations=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(helios, CPU, m) {
  m.impl("store_kv", &helios::store_kv_cpu);
  m.impl("paged_attention", &helios::paged_attention_cpu);
  m.impl("softmax_rows_", &helios::softmax_rows_cpu);
  m.impl("distill_rows_", &helios::distill_rows_cpu);
  m.impl("rms_norm", &helios::rms_norm_cpu);
  m.impl("rotary_embedding", &helios::rotary_embedding_cpu);
  m.impl("silu_and_mul", &helios::silu_and_mul_cpu);
  m.impl("int8_linear", &helios::int8_linear_cpu);
  m.impl("int4_linear", &helios::int4_linear_cpu);
  m.impl("linear", &helios::linear_cpu);
  m.impl("decode_layers", &helios::decode_layers_cpu);
  m.impl("head_stats", &helios::head_stats_cpu);
  m.impl("int8_head_stats", &helios::int8_head_stats_cpu);
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "helios native extension: paged KV cache allocator and cache ops";
#ifdef HELIOS_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  py::class_<helios::BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &helios::BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &helios::BlockAllocator::block_size)
      .def_property_readonly("num_free", &helios::BlockAllocator::num_free)
      .def_property_readonly("num_sequences", &helios::BlockAllocator::num_sequences)
      .def("allocate", &helios::BlockAllocator::allocate)
      .def("incref", &helios::BlockAllocator::incref, py::arg("block"))
      .def("free", &helios::BlockAllocator::free, py::arg("block"))
      .def("ref_count", &helios::BlockAllocator::ref_count, py::arg("block"))
      .def("blocks_needed", &helios::BlockAllocator::blocks_needed, py::arg("seq_id"), py::arg("num_tokens"))
      .def("can_hold", &helios::BlockAllocator::can_hold, py::arg("seq_id"), py::arg("num_tokens"))
      .def("ensure_capacity", &helios::BlockAllocator::ensure_capacity, py::arg("seq_id"), py::arg("num_tokens"))
      .def("free_sequence", &helios::BlockAllocator::free_sequence, py::arg("seq_id"))
      .def("has_sequence", &helios::BlockAllocator::has_sequence, py::arg("seq_id"))
      .def("block_table", &helios::BlockAllocator::block_table, py::arg("seq_id"))
      .def("slots", &helios::BlockAllocator::slots, py::arg("seq_id"), py::arg("start"), py::arg("end"))
      .def("match_prefix", &helios::BlockAllocator::match_prefix, py::arg("seq_id"), py::arg("block_hashes"))
      .def("cache_block", &helios::BlockAllocator::cache_block, py::arg("seq_id"), py::arg("index"),
           py::arg("hash"))
      .def_property_readonly("num_cached_blocks", &helios::BlockAllocator::num_cached_blocks)
      .def("reset_prefix_cache", &helios::BlockAllocator::reset_prefix_cache);
}
