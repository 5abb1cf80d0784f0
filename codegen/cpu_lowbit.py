"""The CPU low-bit kernels (``cpu_lowbit.cpp``) from torch: the fused 4-bit linear and the 4-bit decode.

* :func:`linear_4bit` computes ``x @ W.T + bias`` for a blockwise 4-bit W (NF4 / FP4, double quant or not).
  Up to FUSED_MAX_ROWS rows of x (decode) it runs the fused kernel, which decodes each 64-weight chunk in
  registers, uses it for every row of x, and never writes the weight anywhere: the weight is read once, at
  4 bits. Above it, bands of rows are decoded by the C++ decoder into a reused buffer, and each band is
  multiplied by torch's matmul (oneDNN / MKL, AMX where present).
* :func:`linear_affine` computes it for an affine group-wise integer W in GPTQ's layout (``affine``, ``gptq``,
  ``awq``, ``hqq``): up to AFFINE_FUSED_MAX_ROWS rows of x a fused kernel (W in float32, never written);
  above, bands of output features decoded in C++ (bit-exact) and multiplied by torch's matmul.
* :func:`decode_4bit` fills a float tensor with a window of rows x columns of W, bit for bit the torch
  reference's values.

Both return None when the library is unavailable (no compiler; see ``cpu_build``) or the arguments are
outside what it takes, and the caller runs the torch reference.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qcompile.codegen.cpu_build import cpu_library

# Rows of x up to which the fused kernel beats decode + matmul: its cost grows with every row of x (each
# row is a dot product over the whole weight), decode + matmul's hardly does. Measured one thread on a
# Sapphire Rapids core, NF4 + double quant, bf16 (ms, fused / decode + matmul): 4096x4096 M=8 4.0 / 4.3,
# M=12 5.9 / 4.5; 4096x14336 M=8 13.2 / 18.1, M=12 19.5 / 18.9.
FUSED_MAX_ROWS = 8
# Weights per band of the decode + matmul path (bf16: 8 MiB), at least MIN_BAND_ROWS rows: fewer, larger
# matmuls were faster (4096x4096, M=16: 128-row bands 5.0 ms, 1024-row bands 4.2 ms, the whole weight 3.9).
BAND_ELEMENTS = 1 << 22
MIN_BAND_ROWS = 64

# The affine fused kernel decodes every weight again for each tile of rows of x; decode + matmul decodes once.
# Measured (2 threads, 4096x4096 int4 g128, bf16, ms, fused / decode + matmul): M=8 3.0 / ~5.5,
# M=16 7.5 / 5.6; the torch reference took 236 ms at M=17.
AFFINE_FUSED_MAX_ROWS = 8

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_library("lowbit")
    return None if lib is None else declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give ``lib`` (a build of ``cpu_lowbit.cpp``, e.g. a variant from ``cpu_build.build_library``) its
    functions' signatures; returns it."""
    lib.qc_isa.restype = ctypes.c_char_p
    lib.qc_lowbit4_decode.argtypes = [_p, _p, _p, _p, _f32, _p, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _p, _i64,
                                      _i32, _i32]
    lib.qc_lowbit4_decode.restype = _i32
    lib.qc_lowbit4_linear.argtypes = [_p, _i32, _i64, _p, _p, _p, _p, _f32, _p, _i64, _i64, _i64, _i32, _p, _i32,
                                      _p, _i32, _i32]
    lib.qc_lowbit4_linear.restype = _i32
    lib.qc_affine_linear.argtypes = [_p, _i64, _p, _p, _p, _p, _p, _i32, _i64, _i64, _i64, _i32, _p, _i32, _p, _i32,
                                     _i32]
    lib.qc_affine_linear.restype = _i32
    lib.qc_affine_decode.argtypes = [_p, _p, _p, _p, _p, _p, _i32, _i64, _i64, _i64, _i64, _i64, _p, _i64, _i32, _i32]
    lib.qc_affine_decode.restype = _i32
    return lib


def available() -> bool:
    """Whether the C++ kernels built and loaded on this machine."""
    return _library() is not None


def isa(library: ctypes.CDLL | None = None) -> str | None:
    """The instruction set the kernels were built for ("avx512_bf16", "avx512", "avx2", "generic"), or None."""
    lib = library or _library()
    return None if lib is None else lib.qc_isa().decode()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _takes(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    # is_cpu, not device.type: this runs on every call, and building a device object costs more than the check.
    return all(t is None or (t.is_cpu and t.is_contiguous()) for t in tensors)


def _linear_library(library: ctypes.CDLL | None, x: torch.Tensor, compute_dtype: torch.dtype) -> ctypes.CDLL | None:
    """The library a linear runs with (``library``, else this machine's), or None when there is none or x and
    the compute dtype are not what the kernels take (CPU; float32, bfloat16, float16)."""
    lib = library or _library()
    if lib is None or compute_dtype not in _DTYPE_CODES or not x.is_cpu or x.dtype not in _DTYPE_CODES:
        return None
    return lib


def _kernel_bias(bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor | None:
    """The bias (a contiguous CPU tensor, ``_takes``) in a dtype the fused kernels load: as it is, else rounded to
    compute_dtype, which the kernels round it to anyway."""
    if bias is None or bias.dtype in _DTYPE_CODES:
        return bias
    return bias.to(compute_dtype)


def _bias_args(bias: torch.Tensor | None) -> tuple[int | None, int]:
    return _ptr(bias), 0 if bias is None else _DTYPE_CODES[bias.dtype]


def _weight_args(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize):
    return (_ptr(packed), _ptr(absmax), _ptr(nested_absmax), _ptr(nested_code), float(nested_offset), _ptr(code),
            blocksize)


def _weight_ok(packed, absmax, code, nested_absmax, nested_code) -> bool:
    if packed.dtype != torch.uint8 or code.dtype != torch.float32 or code.numel() != 16:
        return False
    if nested_absmax is None:
        return absmax.dtype == torch.float32
    return (absmax.dtype == torch.uint8 and nested_code is not None and nested_absmax.dtype == torch.float32
            and nested_code.dtype == torch.float32 and nested_code.numel() == 256)


def decode_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nested_absmax: torch.Tensor | None,
                nested_code: torch.Tensor | None, nested_offset: float, blocksize: int, shape: tuple[int, int],
                rows: tuple[int, int], cols: tuple[int, int], out: torch.Tensor,
                library: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """Fill ``out`` ([rows, cols] window, row-contiguous, float32 / bfloat16 / float16) with rows ``rows`` and
    columns ``cols`` of the [N, K] = ``shape`` weight; returns ``out``, or None if the kernels cannot.
    ``library``: a :func:`declare`-d build to use instead of this machine's default one (tests)."""
    lib = library or _library()
    if lib is None or out.dtype not in _DTYPE_CODES or out.stride(-1) != 1 or out.dim() != 2:
        return None
    if not (_takes((packed, absmax, code, nested_absmax, nested_code)) and out.is_cpu):
        return None
    if not _weight_ok(packed, absmax, code, nested_absmax, nested_code):
        return None
    (r0, r1), (c0, c1) = rows, cols
    status = lib.qc_lowbit4_decode(*_weight_args(packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                                 blocksize), shape[0], shape[1], r0, r1, c0, c1, out.data_ptr(),
                                   out.stride(0), _DTYPE_CODES[out.dtype], torch.get_num_threads())
    return out if status == 0 else None


def _band_rows(in_features: int) -> int:
    return max(MIN_BAND_ROWS, BAND_ELEMENTS // max(in_features, 1))


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, bias: torch.Tensor | None,
                nested_offset: float, blocksize: int, out_features: int, in_features: int,
                compute_dtype: torch.dtype, library: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """``qcompile::linear_4bit`` on CPU: x is rounded to ``compute_dtype``, products are summed in float32 (in
    another order than the reference's matmul), and the result is rounded to ``compute_dtype`` and returned in
    ``x.dtype``. Above FUSED_MAX_ROWS the weights are the reference's values (``code * absmax`` rounded to
    ``compute_dtype``); the fused kernel rounds the code to ``compute_dtype`` before scaling it by the absmax:
    the same size of rounding error per weight, not the same bits. None: not taken.
    ``library`` as for :func:`decode_4bit`."""
    lib = _linear_library(library, x, compute_dtype)
    if lib is None:
        return None
    # The bias too: the fused kernel reads it by pointer (a CUDA bias would be a crash, not an error).
    if not (_takes((packed, absmax, code, nested_absmax, nested_code, bias))
            and _weight_ok(packed, absmax, code, nested_absmax, nested_code)):
        return None
    # x as it is when it already is what the kernel reads (decode: every call), else a converted copy.
    x_c = x if x.dtype == compute_dtype and x.is_contiguous() else x.reshape(-1, in_features).to(compute_dtype)
    m = x_c.numel() // in_features if in_features else 0
    if m <= FUSED_MAX_ROWS:
        # The kernel adds the bias, rounds once to compute_dtype (as a matmul with bias does) and writes x's dtype.
        bias = _kernel_bias(bias, compute_dtype)
        y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
        status = lib.qc_lowbit4_linear(x_c.data_ptr(), _DTYPE_CODES[compute_dtype], m, *_weight_args(
            packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize), out_features, in_features,
            _DTYPE_CODES[compute_dtype], *_bias_args(bias), y.data_ptr(), _DTYPE_CODES[x.dtype],
            torch.get_num_threads())
        return y if status == 0 else None
    x_c = x_c.reshape(-1, in_features).contiguous()
    rows = _band_rows(in_features)
    band = torch.empty((min(rows, out_features), in_features), dtype=compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)

    def band_product(start: int, stop: int) -> torch.Tensor | None:
        weight = decode_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                             (out_features, in_features), (start, stop), (0, in_features), band[: stop - start],
                             lib)
        return None if weight is None else torch.nn.functional.linear(
            x_c, weight, None if bias_c is None else bias_c[start:stop])

    if rows >= out_features:  # one band: its product is the output (no buffer to copy it into: QLoRA's peak)
        out = band_product(0, out_features)
        if out is None:
            return None
    else:
        out = torch.empty((m, out_features), dtype=compute_dtype)
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            part = band_product(start, stop)
            if part is None:
                return None
            out[:, start:stop] = part
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def linear_affine(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor | None, zeros: torch.Tensor | None,
                  scales: torch.Tensor, g_idx: torch.Tensor, input_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int, out_features: int, in_features: int,
                  compute_dtype: torch.dtype, library: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """``qcompile::linear_affine`` on CPU. Up to AFFINE_FUSED_MAX_ROWS rows of x, fused: x rounded to
    ``compute_dtype`` (and multiplied by ``input_scale``, AWQ's), W's values in float32 (the reference rounds
    them to ``compute_dtype``), float32 sums, the result rounded to ``compute_dtype`` and returned in
    ``x.dtype``. Above, decode + matmul with the reference's weights. None: not taken (no library, a layout
    it does not read)."""
    lib = _linear_library(library, x, compute_dtype)
    if lib is None:
        return None
    m = x.numel() // in_features if in_features else 0
    if not _takes((qweight, qzeros, zeros, scales, g_idx, input_scale, bias)):
        return None
    if qzeros is not None:
        zero_ok = qzeros.dtype == torch.int32
    else:
        zero_ok = zeros is not None and zeros.dtype == torch.float16
    if (qweight.dtype != torch.int32 or scales.dtype != torch.float16 or g_idx.dtype != torch.int32 or not zero_ok
            or scales.dim() != 2 or scales.shape[1] != out_features or g_idx.numel() != in_features):
        return None
    if m > AFFINE_FUSED_MAX_ROWS:
        return _affine_banded(lib, x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias, bits, out_features,
                              in_features, compute_dtype)
    x_c = x.reshape(-1, in_features).to(compute_dtype).float()
    if input_scale is not None:
        x_c = x_c * input_scale.float()
    x_c = x_c.contiguous()
    bias = _kernel_bias(bias, compute_dtype)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    status = lib.qc_affine_linear(x_c.data_ptr(), m, qweight.data_ptr(), _ptr(qzeros), _ptr(zeros), scales.data_ptr(),
                                  g_idx.data_ptr(), bits, scales.shape[0], out_features, in_features,
                                  _DTYPE_CODES[compute_dtype], *_bias_args(bias), y.data_ptr(), _DTYPE_CODES[x.dtype],
                                  torch.get_num_threads())
    return y if status == 0 else None


def _affine_banded(lib, x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias, bits, out_features, in_features,
                   compute_dtype):
    """Above the fused rows: W^T decoded a band of output features at a time (the reference's values, bit
    for bit), each band multiplied by torch's matmul."""
    x_c = x.reshape(-1, in_features).to(compute_dtype)
    scale_in = None if input_scale is None else input_scale.float().contiguous()
    cols = max(64, BAND_ELEMENTS // max(in_features, 1) // 64 * 64)
    band = torch.empty((in_features, min(cols, out_features)), dtype=compute_dtype)
    out = torch.empty((x_c.shape[0], out_features), dtype=compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)
    for start in range(0, out_features, cols):
        stop = min(start + cols, out_features)
        weight_t = band[:, : stop - start]
        status = lib.qc_affine_decode(qweight.data_ptr(), _ptr(qzeros), _ptr(zeros), scales.data_ptr(),
                                      g_idx.data_ptr(), _ptr(scale_in), bits, scales.shape[0], out_features,
                                      in_features, start, stop, weight_t.data_ptr(), band.stride(0),
                                      _DTYPE_CODES[compute_dtype], torch.get_num_threads())
        if status != 0:
            return None
        part = x_c @ weight_t
        if bias_c is not None:
            part += bias_c[start:stop]
        out[:, start:stop] = part
    return out.to(x.dtype).view(*x.shape[:-1], out_features)
