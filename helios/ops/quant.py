"""Weight-only quantization for CPU serving: int8 and int4, both in groups of 32 input features with a float32
scale and minimum per group (w ≈ q * scale + minimum).

Weights are quantized once at load; activations stay float32 and the kernels (helios._C int8_linear /
int4_linear) dequantize tiles on the fly, except from integer_dot_rows() (12) to 48 rows per call (decode batches
of 12+, on CPUs with AVX-512 VNNI), where the activations are rounded to int16 per group of 32 (~1.5e-5 of the
group's largest value) for integer dot products: 1.3-1.7x faster linears at 32 rows than float products. "w8a8" /
"w4a8" store the same weights and round those activations to int8 instead (llama.cpp's Q8_0): about 2.5x faster
than float products at 32 rows, at a measurable cost in greedy agreement (README).
At decode batch sizes a linear's cost is reading its weights, so int8 reads ~5/16 (1.25 bytes per weight) and int4
~3/16 (0.75 bytes) of the float32 bytes. The dequantize_* functions are the oracle: a quantized linear must equal
F.linear with the dequantized weight (w8a8 / w4a8: and the rounded input, as_multiplied) up to float32 summation
order.

int4 is the Q4_1 scheme of llama.cpp: per group, scale = (max - min) / 15, q = round((w - min) / scale) in 0..15.
Bytes: group g's 32 values in 16 bytes, byte i = q[i] | q[16 + i] << 4.

int8 has 255 steps per group and, per group, keeps the better (lower squared error) of two grids: min/max
(scale = (max - min) / 255, minimum = min) and symmetric (scale = amax / 127, minimum = -128 * scale). The first
holds a llama.cpp Q4_1 block exactly (255 = 15 * 17), the second a Q8_0 block, so a checkpoint that ships
quantized (smollm2: Q4_1 linears, Q8_0 embedding) is served with its own weights rather than a re-rounded copy.
Per-output-channel int8 was measured worse: greedy agreement with fp32 0.57 vs 0.71 for groups (smollm2, 64
gsm8k chat prompts x 48 tokens; the shipped Q4_1 weights scored 0.75).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# weight-only int8 / int4, and the same weights with activations rounded to int8 in batched calls (w8a8 / w4a8)
WEIGHT_FORMAT = {"int8": "int8", "int4": "int4", "w8a8": "int8", "w4a8": "int4"}
QUANTIZATIONS = tuple(WEIGHT_FORMAT)
SMALL_ROWS = 48  # csrc/cpu/gemm.h kSmallM: the most rows a call multiplies with the register-blocked kernels
GROUP = 32  # input features per scale/minimum (csrc/cpu/quant_ops.cpp kGroup)
TILE_ROWS = 4  # output rows interleaved per tile (csrc/cpu/quant_ops.cpp: one tile is one sequential stream)


def rounds_activations(quantization: str | None) -> bool:
    """Whether this quantization rounds activations to int8 (w8a8 / w4a8) rather than int16 for integer dot
    products."""
    return quantization is not None and WEIGHT_FORMAT[quantization] != quantization


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}")


def _groups(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] zero-padded to whole tiles of rows and whole groups, viewed as [N', K' / 32, 32]."""
    n, k = weight.shape
    w = F.pad(weight.float(), (0, -k % GROUP, 0, -n % TILE_ROWS))
    return w.reshape(w.shape[0], -1, GROUP)


def _tiled(t: torch.Tensor) -> torch.Tensor:
    """[N, groups, ...] -> [tiles, groups, 4, ...]: the kernels' tile-interleaved layout."""
    return t.reshape(t.shape[0] // TILE_ROWS, TILE_ROWS, *t.shape[1:]).transpose(1, 2).contiguous()


def _untiled(t: torch.Tensor) -> torch.Tensor:
    """[tiles, groups, 4, ...] -> [N, groups, ...]."""
    return t.transpose(1, 2).reshape(t.shape[0] * TILE_ROWS, *t.shape[1:2], *t.shape[3:])


def _round_to_grid(groups: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, top: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, 1)[..., None]
    return torch.round((groups - minimum[..., None]) / safe).clamp_(0, top)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q uint8 [tiles, K/32, 4, 32], scale and minimum float32 [tiles, K/32, 4])."""
    groups = _groups(weight)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    minmax_scale, sym_scale = (high - low) / 255, torch.maximum(high, -low) / 127
    q_minmax = _round_to_grid(groups, minmax_scale, low, 255)
    q_sym = _round_to_grid(groups, sym_scale, -128 * sym_scale, 255)
    use_sym = _squared_error(groups, q_sym, sym_scale, -128 * sym_scale) < _squared_error(
        groups, q_minmax, minmax_scale, low)
    q = torch.where(use_sym[..., None], q_sym, q_minmax).to(torch.uint8)
    scale = torch.where(use_sym, sym_scale, minmax_scale)
    return _tiled(q), _tiled(scale), _tiled(torch.where(use_sym, -128 * sym_scale, low))


def _on_grid(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """[N, groups, 32] integer values and [N, groups] scale/minimum -> float32 [N, groups, 32]."""
    return q.float() * scale[..., None] + minimum[..., None]


def _squared_error(groups: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    return (_on_grid(q, scale, minimum) - groups).square().sum(dim=-1)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """[N, groups, 32] integer values and [N, groups] scale/minimum -> float32 [N, groups * 32]."""
    w = _on_grid(q, scale, minimum)
    return w.reshape(w.shape[0], -1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 [tiles * 4, K] weight (padding included) that int8_linear multiplies by."""
    return _dequantize(_untiled(q), _untiled(scale), _untiled(minimum))


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q uint8 [tiles, K/32, 4, 16], scale and minimum float32 [tiles, K/32, 4])."""
    groups = _groups(weight)
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum) / 15
    q = _round_to_grid(groups, scale, minimum, 15).to(torch.uint8)
    half = GROUP // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # [N, groups, 16]
    return _tiled(packed), _tiled(scale), _tiled(minimum)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 [tiles * 4, K] weight (padding included) that int4_linear multiplies by."""
    rows = _untiled(packed)
    return _dequantize(torch.cat([rows & 0x0F, rows >> 4], dim=-1), _untiled(scale), _untiled(minimum))


class QuantizedLinear:
    """y = x·Wᵀ + b with W held as int8 or int4; the same interface as helios.ops.linear.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str):
        check_quantization(quantization)
        if quantization is None:
            raise ValueError("QuantizedLinear needs quantization='int8' or 'int4'")
        if weight.device.type != "cpu":
            raise ValueError(f"quantized linears run on CPU only, not on {weight.device.type}")
        self.quantization = quantization
        self.weight_format = WEIGHT_FORMAT[quantization]  # how the weight is stored: "int8" or "int4"
        self.round_activations = rounds_activations(quantization)  # w8a8 / w4a8 (integer dot products)
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.float().contiguous()
        self.packed = None  # (Linear's oneDNN handle; a quantized weight is never oneDNN-packed)
        self.weight = None
        self.parts = quantize_int8(weight) if self.weight_format == "int8" else quantize_int4(weight)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)

    def dequantized(self) -> torch.Tensor:
        """The float32 [out_features, in_features] weight this linear multiplies by (the oracle's weight)."""
        full = dequantize_int8(*self.parts) if self.weight_format == "int8" else dequantize_int4(*self.parts)
        return full[:self.out_features, :self.in_features]

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float()
        res = None if residual is None else residual.float()
        op = torch.ops.helios.int8_linear if self.weight_format == "int8" else torch.ops.helios.int4_linear
        y = op(x32, *self.parts, self.out_features, self.bias, res, self.round_activations)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._run(x, residual)


def integer_dot_rows() -> int:
    """The fewest rows from which quantized linears round their input per group of 32 (to int16; w8a8 / w4a8: int8)
    for integer dot products (up to 48 rows per call); 0 on a build without AVX-512 VNNI (they then multiply in
    float32)."""
    return int(torch.ops.helios.integer_dot_rows())


ACTIVATION_LEVELS = {8: 127, 16: 32639}  # csrc/cpu/integer_dot.h kLevels: the largest |q| per activation width


def quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x [M, K] as the integer-dot kernel multiplies it (csrc/cpu/integer_dot.h; 8 bits: llama.cpp's Q8_0): per row
    and group of 32 along K (zero-padded), xs = max|x| / L and q = round(x / xs) in [-L, L] (L: ACTIVATION_LEVELS),
    returned as xs * q in float64 (the same float32 rounding steps as the kernel)."""
    levels = ACTIVATION_LEVELS[bits]
    rows, features = x.shape
    padded = F.pad(x.float(), (0, -features % GROUP)).reshape(rows, -1, GROUP)
    absmax = padded.abs().amax(dim=-1, keepdim=True)
    scale = absmax / levels
    # a tensor numerator: torch computes `scalar / tensor` as a reciprocal times the scalar, not one IEEE division
    inverse = torch.where(absmax > 0, torch.full_like(absmax, levels) / absmax, torch.zeros_like(absmax))
    q = (padded * inverse).round().clamp(-levels, levels)
    return (q.double() * scale.double()).reshape(rows, -1)[:, :features]


def quantized_linear_reference(x: torch.Tensor, linear: QuantizedLinear) -> torch.Tensor:
    """The oracle: F.linear in float64 with the dequantized weight and x rounded as the kernel rounds it where it
    takes integer dot products (integer_dot_rows() to 48 rows)."""
    bias = None if linear.bias is None else linear.bias.double()
    x64 = as_multiplied(x.reshape(-1, x.shape[-1]), linear.round_activations)
    return F.linear(x64.reshape(*x.shape[:-1], -1), linear.dequantized().double(), bias)


def as_multiplied(x: torch.Tensor, round_activations: bool) -> torch.Tensor:
    """x [M, K] in float64 as the int8/int4 kernels multiply it in one call: where they take integer dot products
    (integer_dot_rows() to 48 rows), rounded by quantize_activations to int8 with round_activations (w8a8 / w4a8),
    else to int16; elsewhere as it is."""
    if 0 < integer_dot_rows() <= x.shape[0] <= SMALL_ROWS:
        return quantize_activations(x, 8 if round_activations else 16)
    return x.double()
