// qcompile's CPU kernels for blockwise 4-bit weights (bitsandbytes NF4 / FP4, double quant or not).
//
// Built at first use by codegen/cpu_build.py for the machine it runs on (-march=native), loaded with
// ctypes: no torch headers, so a build takes about a second. The instruction set is chosen here at
// compile time (AVX-512 with or without AVX512_BF16, AVX2 + FMA, or plain C++); the Python side passes
// raw pointers of contiguous tensors and never sees which path ran (qc_isa() says, for logs and tests).
//
// The weight W [N, K] is stored flattened: element i = n * K + k has its 4-bit code in byte i / 2
// (high nibble for even i), and belongs to block i / blocksize, whose float32 absmax is either given,
// or decoded from uint8 with the nested (double-quant) state:
//     absmax = nested_code[q] * nested_absmax[block / 256] + nested_offset   (two float32 roundings).
// A weight's value is code[nibble] * absmax in float32, rounded to the compute dtype: bit for bit what
// qcompile.formats.blockwise.dequantize_4bit gives. Built with -ffp-contract=off so that no multiply and
// add are fused into one rounding where the reference rounds twice.
//
// Two entry points:
//   qc_lowbit4_decode   a window of rows x columns of W, decoded into a float buffer (exact).
//   qc_lowbit4_linear   y[M, N] = x[M, K] @ W^T + bias, never writing W anywhere: each 64-weight
//                       chunk (one block's, or part of one) is decoded in registers through the 16-entry
//                       code table rounded to the compute dtype, dotted with every row of x, and each dot
//                       scaled by the block's absmax. So the code, not code * absmax, is what is rounded
//                       to the compute dtype: the same size of error per weight as the reference's, not the
//                       same bits; it spares a scaled table per chunk (14% faster at M = 1 with AVX512_BF16,
//                       7x with AVX2). Sums in float32; the bias (rounded to the compute dtype) added
//                       in float32, the result rounded once to the compute dtype and stored in y's dtype.
//                       For decode-sized M; large M goes to decode + a BLAS matmul.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif


namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Weight {
    const uint8_t* packed;
    const void* absmax;          // float32 [blocks], or uint8 [blocks] when nested_absmax is set
    const float* nested_absmax;  // float32 [ceil(blocks / 256)] or null
    const float* nested_code;    // float32 [256] or null
    float nested_offset;
    const float* code;           // float32 [16]
    int64_t blocksize;
    int64_t n;                   // out_features
    int64_t k;                   // in_features
    int shift;                   // log2(blocksize): bitsandbytes' blocksizes are powers of two
};

inline float block_absmax(const Weight& w, int64_t block) {
    if (w.nested_absmax == nullptr) return static_cast<const float*>(w.absmax)[block];
    const uint8_t q = static_cast<const uint8_t*>(w.absmax)[block];
    return w.nested_code[q] * w.nested_absmax[block / 256] + w.nested_offset;  // two roundings: no fp-contract
}

int log2_exact(int64_t value) {  // -1 unless value is a power of two
    for (int bit = 0; bit < 63; ++bit)
        if (value == (int64_t{1} << bit)) return bit;
    return -1;
}

// The fused kernels read R rows of W side by side, each a stream of k / 2 bytes; at k = 2048 a group of 4
// rows is one 4 KiB page, and hardware prefetchers stop at page boundaries, so every group started cold.
// Each chunk read also prefetches the same chunk of the next group's row (measured, 2-core Sapphire
// Rapids, a Llama-1B layer's seven weights at M = 1: 3.2 -> 2.2 ms; 512 bytes ahead in the same row
// gave 2.7).
inline void prefetch_next_group(const Weight& w, int64_t i, int rows) {
#if defined(__AVX2__) || defined(__AVX512F__)
    _mm_prefetch(reinterpret_cast<const char*>(w.packed + i / 2 + rows * w.k / 2), _MM_HINT_T0);
#else
    (void)w, (void)i, (void)rows;
#endif
}

inline uint16_t bf16_bits(float value) {  // round to nearest even, as torch's float -> bfloat16
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
}

// IEEE half <-> float without F16C (the generic path); round to nearest even.
inline uint16_t f16_bits(float value) {
    uint32_t x;
    std::memcpy(&x, &value, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
    if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (abs < 0x38800000u) {  // below the smallest normal half: a subnormal (or zero)
        float magnitude;
        std::memcpy(&magnitude, &abs, 4);
        // 2^-24 is the subnormal half's unit; adding 0.5 (2^-1) puts that unit at the float's last place.
        const float shifted = magnitude + 0.5f;
        uint32_t bits;
        std::memcpy(&bits, &shifted, 4);
        return static_cast<uint16_t>(sign | (bits - 0x3f000000u));
    }
    const uint32_t mantissa_odd = (abs >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((abs + 0xc8000fffu + mantissa_odd) >> 13));
}

inline float f16_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {
        const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
        std::memcpy(&bits, &value, 4);
        bits |= sign;
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
}

inline float round_to(float value, int dtype) {
    if (dtype == BF16) return bf16_float(bf16_bits(value));
    if (dtype == F16) return f16_float(f16_bits(value));
    return value;
}

inline void store(void* out, int64_t index, float value, int dtype) {
    if (dtype == BF16) static_cast<uint16_t*>(out)[index] = bf16_bits(value);
    else if (dtype == F16) static_cast<uint16_t*>(out)[index] = f16_bits(value);
    else static_cast<float*>(out)[index] = value;
}

inline bool is_dtype(int dtype) { return dtype == F32 || dtype == BF16 || dtype == F16; }

inline float load(const void* x, int64_t index, int dtype) {
    if (dtype == BF16) return bf16_float(static_cast<const uint16_t*>(x)[index]);
    if (dtype == F16) return f16_float(static_cast<const uint16_t*>(x)[index]);
    return static_cast<const float*>(x)[index];
}

// The epilogue torch would run on a linear's float32 sums out[M, N]: the bias rounded to the compute dtype and
// added in float32, the sum rounded once to the compute dtype, then stored in y's dtype. Here, not in Python:
// no second pass over a float32 tensor and no allocations (~5 us less per call at decode sizes).
void write_output(const float* out, int64_t m, int64_t n, const void* bias, int bias_dtype, int compute_dtype,
                  void* y, int y_dtype) {
    for (int64_t row = 0; row < m; ++row) {
        for (int64_t j = 0; j < n; ++j) {
            float value = out[row * n + j];
            if (bias != nullptr) value += round_to(load(bias, j, bias_dtype), compute_dtype);
            store(y, row * n + j, round_to(value, compute_dtype), y_dtype);
        }
    }
}

inline int nibble(const uint8_t* packed, int64_t i) {
    const uint8_t byte = packed[i >> 1];
    return (i & 1) ? (byte & 0xf) : (byte >> 4);
}

// Elements [start, stop) of row n's flattened weight, as float32 values rounded to `dtype`, into dst.
void decode_span_generic(const Weight& w, int64_t start, int64_t stop, int dtype, float* dst) {
    float table[16];
    int64_t block = -1;
    for (int64_t i = start; i < stop; ++i) {
        if (i / w.blocksize != block) {
            block = i / w.blocksize;
            const float a = block_absmax(w, block);
            for (int j = 0; j < 16; ++j) table[j] = round_to(w.code[j] * a, dtype);
        }
        dst[i - start] = table[nibble(w.packed, i)];
    }
}

// ---------------------------------------------------------------------------------------------------
// Decode: rows [r0, r1) x columns [c0, c1) of W into out (row stride out_stride elements, dtype out_dtype).

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr const char* kIsa =
#if defined(__AVX512BF16__)
    "avx512_bf16";
#else
    "avx512";
#endif

// 64 consecutive weights (32 bytes, one block's scaled table) written in natural order as 16-bit values.
inline void decode64_16bit(const uint8_t* bytes, __m512i table16, uint16_t* dst) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    // word j = (b_j >> 4) | (b_j & 0xf) << 8: read as bytes, the nibbles in element order.
    const __m512i order = _mm512_or_si512(_mm512_srli_epi16(v, 4),
                                          _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0xf)), 8));
    const __m512i first = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(order));
    const __m512i second = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(order, 1));
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(first, table16));
    _mm512_storeu_si512(dst + 32, _mm512_permutexvar_epi16(second, table16));
}

inline void decode64_f32(const uint8_t* bytes, __m512 table, float* dst) {
    for (int q = 0; q < 4; ++q) {
        // 8 bytes (16 weights) per quarter; the upper 8 lanes are zero and unused.
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * q)));
        const __m512i hi = _mm512_srli_epi32(v, 4);
        const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0xf));
        // interleave: element 2j = hi_j, 2j + 1 = lo_j for j in 0..7
        const __m512i idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i nibbles = _mm512_permutex2var_epi32(hi, idx, lo);
        _mm512_storeu_ps(dst + 16 * q, _mm512_permutexvar_ps(nibbles, table));
    }
}

// The 16-entry table for one block: code * absmax in float32, rounded to dtype.
inline __m512 scaled_table_f32(const __m512 code, float a, int dtype) {
    __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(a));
    if (dtype == BF16) {
        __m512i bits = _mm512_castps_si512(t);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        bits = _mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
        t = _mm512_castsi512_ps(bits);  // NaN codes cannot occur: code and absmax are finite
    } else if (dtype == F16) {
        t = _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return t;
}

// The 16 codes rounded to dtype (the fused paths scale each chunk's dot product by its absmax afterwards).
inline __m512 rounded_codes(const float* code, int dtype) {
    alignas(64) float codes[16];
    for (int j = 0; j < 16; ++j) codes[j] = round_to(code[j], dtype);
    return _mm512_load_ps(codes);
}

// 16-bit table (bf16 / f16 bits) in the low 16 lanes of a 32-lane vector.
inline __m512i scaled_table_16bit(const __m512 code, float a, int dtype) {
    const __m512 t = scaled_table_f32(code, a, dtype);
    __m256i half;
    if (dtype == F16) {
        half = _mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // t is already bf16-rounded: its high 16 bits
        half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(t), 16));
    }
    return _mm512_castsi256_si512(half);
}

bool decode_row_fast(const Weight& w, int64_t n, int64_t c0, int64_t c1, int dtype, void* out_row) {
    // Fast when every 64-chunk of the window lies in one block and starts on a byte.
    const int64_t base = n * w.k;
    if ((base + c0) % 64 || (c1 - c0) % 64 || w.blocksize % 64 || w.shift < 0) return false;
    const __m512 code = _mm512_loadu_ps(w.code);
    int64_t block = -1;
    __m512 table = _mm512_setzero_ps();
    __m512i table16 = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; c += 64) {
        const int64_t i = base + c;
        if ((i >> w.shift) != block) {
            block = i >> w.shift;
            const float a = block_absmax(w, block);
            if (dtype == F32) table = scaled_table_f32(code, a, dtype);
            else table16 = scaled_table_16bit(code, a, dtype);
        }
        if (dtype == F32) decode64_f32(w.packed + i / 2, table, static_cast<float*>(out_row) + (c - c0));
        else decode64_16bit(w.packed + i / 2, table16, static_cast<uint16_t*>(out_row) + (c - c0));
    }
    return true;
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
bool decode_row_fast(const Weight&, int64_t, int64_t, int64_t, int, void*) { return false; }
#else
constexpr const char* kIsa = "generic";
bool decode_row_fast(const Weight&, int64_t, int64_t, int64_t, int, void*) { return false; }
#endif

void decode_row(const Weight& w, int64_t n, int64_t c0, int64_t c1, int dtype, void* out_row, float* scratch) {
    if (decode_row_fast(w, n, c0, c1, dtype, out_row)) return;
    const int64_t base = n * w.k;
    for (int64_t c = c0; c < c1; c += 1024) {
        const int64_t stop = std::min(c + 1024, c1);
        decode_span_generic(w, base + c, base + stop, dtype, scratch);
        for (int64_t j = c; j < stop; ++j) store(out_row, j - c0, scratch[j - c], dtype);
    }
}

// ---------------------------------------------------------------------------------------------------
// Fused linear. x is given in the compute dtype; the kernels first copy it into the layout their
// instruction set reads (rows of K, each 64-chunk's even elements then its odd ones), so that a chunk's
// high nibbles (even elements) and low nibbles (odd elements) each meet their x without a shuffle.

// x [m, k] -> per SPAN elements: their SPAN / 2 even elements, then their SPAN / 2 odd ones (the order in
// which a SPAN / 2 bytes' high and low nibbles come out of the decode). k is a multiple of SPAN.
template <int SPAN, typename T>
void split_even_odd(const T* x, int64_t m, int64_t k, T* dst) {
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < k; c += SPAN) {
            const T* src = x + r * k + c;
            T* d = dst + r * k + c;
            for (int j = 0; j < SPAN / 2; ++j) {
                d[j] = src[2 * j];
                d[SPAN / 2 + j] = src[2 * j + 1];
            }
        }
    }
}

constexpr int kRows = 4;     // rows of W decoded per step (independent accumulators for M = 1)
constexpr int kXRows = 4;    // rows of x per tile

template <typename Tile>
void run_tiles(const Weight& w, int64_t m, int threads, Tile tile) {
    const int64_t groups = (w.n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t n0 = g * kRows;
        const int rows = static_cast<int>(std::min<int64_t>(kRows, w.n - n0));
        for (int64_t m0 = 0; m0 < m; m0 += kXRows) {
            const int xrows = static_cast<int>(std::min<int64_t>(kXRows, m - m0));
            tile(n0, rows, m0, xrows);
        }
    }
}

#define QC_DISPATCH_TILE(FN, ...)                                                            \
    [&](int64_t n0, int rows, int64_t m0, int xrows) {                                       \
        if (rows == kRows) {                                                                 \
            switch (xrows) {                                                                 \
                case 1: FN<kRows, 1>(w, n0, __VA_ARGS__); break;                             \
                case 2: FN<kRows, 2>(w, n0, __VA_ARGS__); break;                             \
                case 3: FN<kRows, 3>(w, n0, __VA_ARGS__); break;                             \
                default: FN<kRows, 4>(w, n0, __VA_ARGS__); break;                            \
            }                                                                                \
        } else {                                                                             \
            for (int r = 0; r < rows; ++r) {                                                 \
                switch (xrows) {                                                             \
                    case 1: FN<1, 1>(w, n0 + r, __VA_ARGS__); break;                         \
                    case 2: FN<1, 2>(w, n0 + r, __VA_ARGS__); break;                         \
                    case 3: FN<1, 3>(w, n0 + r, __VA_ARGS__); break;                         \
                    default: FN<1, 4>(w, n0 + r, __VA_ARGS__); break;                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

void linear_generic(const Weight& w, const float* x, int64_t m, float* out, int dtype, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float* row = static_cast<float*>(std::malloc(sizeof(float) * (w.k + 1)));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < w.n; ++n) {
            decode_span_generic(w, n * w.k, (n + 1) * w.k, dtype, row);
            for (int64_t r = 0; r < m; ++r) {
                const float* xr = x + r * w.k;
                float acc = 0.0f;
                for (int64_t k = 0; k < w.k; ++k) acc += xr[k] * row[k];
                out[r * w.n + n] = acc;
            }
        }
        std::free(row);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int R, int MT>
void tile_f32(const Weight& w, int64_t n0, const float* xs, int64_t m0, float* out, int dtype) {
    __m512 acc[R][MT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_setzero_ps();
    const __m512 table = rounded_codes(w.code, dtype);
    const __m512i mask = _mm512_set1_epi32(0xf);
    for (int64_t c = 0; c < w.k; c += 64) {
        for (int r = 0; r < R; ++r) {
            const int64_t i = (n0 + r) * w.k + c;
            const __m512 scale = _mm512_set1_ps(block_absmax(w, i >> w.shift));
            const uint8_t* bytes = w.packed + i / 2;
            prefetch_next_group(w, i, R);
            __m512 dot[MT];
            for (int t = 0; t < MT; ++t) dot[t] = _mm512_setzero_ps();
            for (int h = 0; h < 2; ++h) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * h)));
                const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
                const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(v, mask), table);
                for (int t = 0; t < MT; ++t) {
                    const float* xr = xs + (m0 + t) * w.k + c + 32 * h;
                    dot[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr), dot[t]);
                    dot[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr + 16), dot[t]);
                }
            }
            for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_fmadd_ps(dot[t], scale, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) out[(m0 + t) * w.n + n0 + r] = hsum(acc[r][t]);
}

#if defined(__AVX512BF16__)
template <int R, int MT>
void tile_bf16(const Weight& w, int64_t n0, const uint16_t* xs, int64_t m0, float* out) {
    __m512 acc[R][MT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) acc[r][t] = _mm512_setzero_ps();
    // The 16 codes in bf16, twice: vpermw reads 5 index bits, so a byte's low nibble (plus bit 4, one of
    // its high nibble's bits) indexes this table directly, without masking.
    const __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w.code));
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
    const int64_t chunks = w.k / 64;
    for (int64_t c = 0; c < chunks; ++c) {
        for (int r = 0; r < R; ++r) {
            const int64_t i = (n0 + r) * w.k + 64 * c;
            prefetch_next_group(w, i, R);
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + i / 2)));
            const __m512bh hi = (__m512bh)(_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
            const __m512bh lo = (__m512bh)(_mm512_permutexvar_epi16(v, table));
            const __m512 scale = _mm512_set1_ps(block_absmax(w, i >> w.shift));
            for (int t = 0; t < MT; ++t) {
                const uint16_t* xr = xs + (m0 + t) * w.k + 64 * c;
                __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), hi, (__m512bh)(_mm512_loadu_si512(xr)));
                dot = _mm512_dpbf16_ps(dot, lo, (__m512bh)(_mm512_loadu_si512(xr + 32)));
                acc[r][t] = _mm512_fmadd_ps(dot, scale, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) out[(m0 + t) * w.n + n0 + r] = hsum(acc[r][t]);
}
#endif

bool linear_fast(const Weight& w, const void* x, int x_dtype, int64_t m, float* out, int dtype, int threads) {
    if (w.k % 64 || w.blocksize % 64 || w.shift < 0) return false;
#if defined(__AVX512BF16__)
    if (dtype == BF16 && x_dtype == BF16) {
        uint16_t* xs = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * m * w.k));
        split_even_odd<64>(static_cast<const uint16_t*>(x), m, w.k, xs);
        run_tiles(w, m, threads, QC_DISPATCH_TILE(tile_bf16, xs, m0, out));
        std::free(xs);
        return true;
    }
#endif
    float* xf = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * m * w.k));
    float* xs = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * m * w.k));
    for (int64_t i = 0; i < m * w.k; ++i) xf[i] = load(x, i, x_dtype);
    split_even_odd<32>(xf, m, w.k, xs);
    run_tiles(w, m, threads, QC_DISPATCH_TILE(tile_f32, xs, m0, out, dtype));
    std::free(xf);
    std::free(xs);
    return true;
}
#elif defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline __m256 lookup16(__m256i idx, __m256 low, __m256 high) {
    const __m256 a = _mm256_permutevar8x32_ps(low, idx);
    const __m256 b = _mm256_permutevar8x32_ps(high, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
}

template <int R, int MT>
void tile_f32(const Weight& w, int64_t n0, const float* xs, int64_t m0, float* out, int dtype) {
    __m256 acc[R][MT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_ps();
    alignas(32) float codes[16];
    for (int j = 0; j < 16; ++j) codes[j] = round_to(w.code[j], dtype);
    const __m256 low = _mm256_load_ps(codes);
    const __m256 high = _mm256_load_ps(codes + 8);
    const __m256i mask = _mm256_set1_epi32(0xf);
    for (int64_t c = 0; c < w.k; c += 64) {
        for (int r = 0; r < R; ++r) {
            const int64_t i = (n0 + r) * w.k + c;
            const __m256 scale = _mm256_set1_ps(block_absmax(w, i >> w.shift));
            const uint8_t* bytes = w.packed + i / 2;
            prefetch_next_group(w, i, R);
            __m256 dot[MT];
            for (int t = 0; t < MT; ++t) dot[t] = _mm256_setzero_ps();
            for (int q = 0; q < 4; ++q) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * q)));
                const __m256 hi = lookup16(_mm256_srli_epi32(v, 4), low, high);
                const __m256 lo = lookup16(_mm256_and_si256(v, mask), low, high);
                for (int t = 0; t < MT; ++t) {
                    const float* xr = xs + (m0 + t) * w.k + c + 16 * q;
                    dot[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr), dot[t]);
                    dot[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr + 8), dot[t]);
                }
            }
            for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_fmadd_ps(dot[t], scale, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) out[(m0 + t) * w.n + n0 + r] = hsum8(acc[r][t]);
}

bool linear_fast(const Weight& w, const void* x, int x_dtype, int64_t m, float* out, int dtype, int threads) {
    if (w.k % 64 || w.blocksize % 64 || w.shift < 0) return false;
    float* xf = static_cast<float*>(std::aligned_alloc(32, sizeof(float) * m * w.k));
    float* xs = static_cast<float*>(std::aligned_alloc(32, sizeof(float) * m * w.k));
    for (int64_t i = 0; i < m * w.k; ++i) xf[i] = load(x, i, x_dtype);
    split_even_odd<16>(xf, m, w.k, xs);
    run_tiles(w, m, threads, QC_DISPATCH_TILE(tile_f32, xs, m0, out, dtype));
    std::free(xf);
    std::free(xs);
    return true;
}
#else
bool linear_fast(const Weight&, const void*, int, int64_t, float*, int, int) { return false; }
#endif


// ---------------------------------------------------------------------------------------------------
// Affine group-wise integers in GPTQ's layout (formats/packed_affine.py): qweight int32 [K * bits / 32, N]
// packed along K, integer zero points qzeros int32 [G, N * bits / 32] packed along N holding zero - 1, or
// float16 zeros [G, N]; float16 scales [G, N]; int32 g_idx [K]. W[n, k] = (q - zero[g, n]) * scale[g, n]
// with g = g_idx[k], in float32. The fused kernel works on 16 output features at a time: their zeros and
// scales for every group are laid out once per tile, then each input feature k contributes
// x[:, k] * W[n0:n0 + 16, k] to 16 accumulators per row of x; W is never written anywhere, and in float32
// it is not rounded to the compute dtype (a smaller error than the reference's, within the same bound).

struct Affine {
    const int32_t* qweight;
    const int32_t* qzeros;   // or null
    const uint16_t* zeros;   // float16 bits, or null
    const uint16_t* scales;  // float16 bits
    const int32_t* g_idx;
    int bits;
    int64_t groups, n, k;
};

// Word row, shift and whether value `index` of a packed axis straddles into the next word (3 bits only).
inline void affine_field(int bits, int64_t index, int64_t* word, int* shift, bool* straddles) {
    if (bits == 3) {
        const int64_t offset = 3 * (index % 32);
        *word = (index / 32) * 3 + offset / 32;
        *shift = static_cast<int>(offset % 32);
    } else {
        const int per_word = 32 / bits;
        *word = index / per_word;
        *shift = static_cast<int>(index % per_word) * bits;
    }
    *straddles = *shift + bits > 32;
}

inline uint32_t affine_value(const int32_t* words, int64_t stride, int bits, int64_t index, int64_t lane) {
    int64_t word;
    int shift;
    bool straddles;
    affine_field(bits, index, &word, &shift, &straddles);
    uint32_t v = static_cast<uint32_t>(words[word * stride + lane]) >> shift;
    if (straddles) v |= static_cast<uint32_t>(words[(word + 1) * stride + lane]) << (32 - shift);
    return v & ((1u << bits) - 1u);
}

// Zeros and scales of output features [block0, block_end) for every group, as float32 rows of `padded` floats
// (zeros past block_end). BITS is constant, so a packed zero's field is found with shifts.
template <int BITS>
void affine_block_tables(const Affine& a, int64_t block0, int64_t block_end, int64_t padded, float* zero,
                         float* scale) {
    const int64_t words_per_row = (a.n * BITS + 31) / 32;
    for (int64_t g = 0; g < a.groups; ++g) {
        const int32_t* words = a.qzeros == nullptr ? nullptr : a.qzeros + g * words_per_row;
        for (int64_t j = 0; j < padded; ++j) {
            const int64_t n = block0 + j;
            if (n >= block_end) {
                zero[g * padded + j] = scale[g * padded + j] = 0.0f;
                continue;
            }
            scale[g * padded + j] = f16_float(a.scales[g * a.n + n]);
            if (words == nullptr) {
                zero[g * padded + j] = f16_float(a.zeros[g * a.n + n]);
                continue;
            }
            const uint32_t v = BITS == 3
                ? affine_value(words, 1, 3, n, 0)
                : (static_cast<uint32_t>(words[n / (32 / BITS)]) >> ((n % (32 / BITS)) * BITS)) & ((1u << BITS) - 1u);
            zero[g * padded + j] = static_cast<float>(v + 1);
        }
    }
}

// qweight's packing for BITS: a run of kWords int32 words (1, or 3 for 3 bits) holds kRun values of a feature.
template <int BITS>
struct AffinePacking {
    static constexpr int kRun = BITS == 3 ? 32 : 32 / BITS;
    static constexpr int kWords = BITS == 3 ? 3 : 1;
    static constexpr uint32_t kMask = (1u << BITS) - 1u;
};

// affine_block_tables' zeros and scales of one block of features, owned; `slack` floats past the end let
// vector loads of the last row run over.
template <int BITS>
struct BlockTables {
    float* zero;
    float* scale;
    BlockTables(const Affine& a, int64_t block0, int64_t block_end, int64_t padded, int64_t slack)
        : zero(static_cast<float*>(std::malloc(sizeof(float) * (a.groups * padded + slack)))),
          scale(static_cast<float*>(std::malloc(sizeof(float) * (a.groups * padded + slack)))) {
        affine_block_tables<BITS>(a, block0, block_end, padded, zero, scale);
    }
    ~BlockTables() {
        std::free(zero);
        std::free(scale);
    }
    BlockTables(const BlockTables&) = delete;
    BlockTables& operator=(const BlockTables&) = delete;
};

// The portable fused kernel: each thread owns a block of output features and streams qweight's rows across
// it (as the AVX-512 kernel does); the inner loops run over contiguous features, for the compiler to
// vectorize (AVX2 here).
template <int BITS>
void affine_generic_block(const Affine& a, int64_t block0, int64_t block_end, const float* x, int64_t m,
                          float* out) {
    constexpr int kRun = AffinePacking<BITS>::kRun, kWords = AffinePacking<BITS>::kWords;
    constexpr uint32_t kMask = AffinePacking<BITS>::kMask;
    const int64_t cols = block_end - block0;
    const BlockTables<BITS> tables(a, block0, block_end, cols, 1);
    float* acc = static_cast<float*>(std::calloc(m * cols + 1, sizeof(float)));
    const int64_t runs = (a.k + kRun - 1) / kRun;
    for (int64_t run = 0; run < runs; ++run) {
        const int64_t k0 = run * kRun;
        const int values = static_cast<int>(std::min<int64_t>(kRun, a.k - k0));
        const uint32_t* words[kWords];
        for (int w = 0; w < kWords; ++w)
            words[w] = reinterpret_cast<const uint32_t*>(a.qweight + (run * kWords + w) * a.n + block0);
        for (int i = 0; i < values; ++i) {
            const int bit = i * BITS;
            const int word = bit / 32, shift = bit % 32;
            const bool straddles = shift + BITS > 32;
            const int64_t g = a.g_idx[k0 + i];
            const float* zg = tables.zero + g * cols;
            const float* sg = tables.scale + g * cols;
            for (int64_t r = 0; r < m; ++r) {
                const float xk = x[r * a.k + k0 + i];
                float* accr = acc + r * cols;
                for (int64_t j = 0; j < cols; ++j) {
                    uint32_t v = words[word][j] >> shift;
                    if (straddles) v |= words[word + 1][j] << (32 - shift);
                    accr[j] += xk * ((static_cast<float>(v & kMask) - zg[j]) * sg[j]);
                }
            }
        }
    }
    for (int64_t r = 0; r < m; ++r) std::memcpy(out + r * a.n + block0, acc + r * cols, sizeof(float) * cols);
    std::free(acc);
}

void affine_generic(const Affine& a, const float* x, int64_t m, float* out, int threads) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads, (a.n + 15) / 16));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t block0 = a.n * b / blocks, block_end = a.n * (b + 1) / blocks;
        switch (a.bits) {
            case 2: affine_generic_block<2>(a, block0, block_end, x, m, out); break;
            case 3: affine_generic_block<3>(a, block0, block_end, x, m, out); break;
            case 4: affine_generic_block<4>(a, block0, block_end, x, m, out); break;
            default: affine_generic_block<8>(a, block0, block_end, x, m, out); break;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Each thread owns a block of output features and streams qweight's rows across it: one run of words
// (1 word, or 3 for 3 bits) holds the next RUN input features for 16 features, whose zeros and scales come
// from per-group tables of the block laid out once per call. (Walking 16 features down all of K instead
// read qweight with a row stride of N * 4 bytes, which no prefetcher follows: 2-3x slower.)
// BITS is a template parameter so the field arithmetic becomes constant shifts.
template <int BITS, int MT>
void affine_run(const Affine& a, int64_t run, int64_t n0, int cols, int64_t block0, int64_t block_cols,
                const float* zero, const float* scale, const float* x, int64_t m0, float* acc_rows) {
    constexpr int kRun = AffinePacking<BITS>::kRun, kWords = AffinePacking<BITS>::kWords;
    const __mmask16 lanes = static_cast<__mmask16>((1u << cols) - 1u);
    const __m512i mask = _mm512_set1_epi32(AffinePacking<BITS>::kMask);
    __m512i words[kWords];
    for (int w = 0; w < kWords; ++w)
        words[w] = _mm512_maskz_loadu_epi32(lanes, a.qweight + (run * kWords + w) * a.n + n0);
    const int64_t column = n0 - block0;
    __m512 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_loadu_ps(acc_rows + (m0 + t) * block_cols + column);
    const int64_t k0 = run * kRun;
    const int values = static_cast<int>(std::min<int64_t>(kRun, a.k - k0));
#pragma GCC unroll 32
    for (int i = 0; i < kRun; ++i) {
        if (i >= values) break;
        const int bit = i * BITS;
        __m512i v = _mm512_srli_epi32(words[bit / 32], bit % 32);
        if (bit % 32 + BITS > 32) v = _mm512_or_si512(v, _mm512_slli_epi32(words[bit / 32 + 1], 32 - bit % 32));
        const int64_t g = a.g_idx[k0 + i];
        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(q, _mm512_loadu_ps(zero + g * block_cols + column)),
                                       _mm512_loadu_ps(scale + g * block_cols + column));
        for (int t = 0; t < MT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(m0 + t) * a.k + k0 + i]), acc[t]);
    }
    for (int t = 0; t < MT; ++t) _mm512_storeu_ps(acc_rows + (m0 + t) * block_cols + column, acc[t]);
}

template <int BITS>
void affine_block(const Affine& a, int64_t block0, int64_t block_end, int64_t block_cols, const float* x, int64_t m,
                  float* acc_rows) {
    constexpr int kRun = AffinePacking<BITS>::kRun;
    const BlockTables<BITS> tables(a, block0, block_end, block_cols, 16);
    const float* zero = tables.zero;
    const float* scale = tables.scale;
    const int64_t runs = (a.k + kRun - 1) / kRun;
    for (int64_t run = 0; run < runs; ++run) {
        for (int64_t n0 = block0; n0 < block0 + block_cols; n0 += 16) {
            const int cols = static_cast<int>(std::min<int64_t>(16, block0 + block_cols - n0));
            for (int64_t m0 = 0; m0 < m; m0 += 4) {
                switch (std::min<int64_t>(4, m - m0)) {
                    case 1: affine_run<BITS, 1>(a, run, n0, cols, block0, block_cols, zero, scale, x, m0, acc_rows); break;
                    case 2: affine_run<BITS, 2>(a, run, n0, cols, block0, block_cols, zero, scale, x, m0, acc_rows); break;
                    case 3: affine_run<BITS, 3>(a, run, n0, cols, block0, block_cols, zero, scale, x, m0, acc_rows); break;
                    default: affine_run<BITS, 4>(a, run, n0, cols, block0, block_cols, zero, scale, x, m0, acc_rows);
                }
            }
        }
    }
}

bool affine_fast(const Affine& a, const float* x, int64_t m, float* out, int threads) {
    // Blocks of whole 16-feature tiles, one per thread at most (a block's tables: groups x block floats).
    const int64_t tiles = (a.n + 15) / 16;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads, tiles));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t block0 = (tiles * b / blocks) * 16;
        const int64_t block_end = std::min<int64_t>(a.n, (tiles * (b + 1) / blocks) * 16);
        const int64_t block_cols = block_end - block0;
        const int64_t padded = (block_cols + 15) / 16 * 16;
        float* acc_rows = static_cast<float*>(std::calloc(m * padded + 16, sizeof(float)));
        switch (a.bits) {
            case 2: affine_block<2>(a, block0, block_end, padded, x, m, acc_rows); break;
            case 3: affine_block<3>(a, block0, block_end, padded, x, m, acc_rows); break;
            case 4: affine_block<4>(a, block0, block_end, padded, x, m, acc_rows); break;
            default: affine_block<8>(a, block0, block_end, padded, x, m, acc_rows); break;
        }
        for (int64_t r = 0; r < m; ++r)
            std::memcpy(out + r * a.n + block0, acc_rows + r * padded, sizeof(float) * block_cols);
        std::free(acc_rows);
    }
    return true;
}
#else
bool affine_fast(const Affine&, const float*, int64_t, float*, int) { return false; }
#endif

// W^T for output features [n0, n1): out[k, j] = W[n0 + j, k] (times input_scale[k] when given), in
// float32 as the reference computes it, rounded to out_dtype; out's rows are out_stride elements apart.
template <int BITS>
void affine_decode_block(const Affine& a, const float* input_scale, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                         void* out, int64_t out_stride, int out_dtype) {
    constexpr int kRun = AffinePacking<BITS>::kRun, kWords = AffinePacking<BITS>::kWords;
    constexpr uint32_t kMask = AffinePacking<BITS>::kMask;
    const int64_t cols = n1 - n0;
    const BlockTables<BITS> tables(a, n0, n1, cols, 1);
    float* row = static_cast<float*>(std::malloc(sizeof(float) * (cols + 1)));
    for (int64_t kk = k0; kk < k1; ++kk) {
        const int64_t run = kk / kRun;
        const int bit = static_cast<int>(kk % kRun) * BITS;
        const int word = bit / 32, shift = bit % 32;
        const bool straddles = shift + BITS > 32;
        const uint32_t* lo = reinterpret_cast<const uint32_t*>(a.qweight + (run * kWords + word) * a.n + n0);
        const uint32_t* hi = straddles ? reinterpret_cast<const uint32_t*>(a.qweight + (run * kWords + word + 1) * a.n + n0)
                                       : lo;
        const int64_t g = a.g_idx[kk];
        const float* zg = tables.zero + g * cols;
        const float* sg = tables.scale + g * cols;
        for (int64_t j = 0; j < cols; ++j) {
            uint32_t v = lo[j] >> shift;
            if (straddles) v |= hi[j] << (32 - shift);
            row[j] = (static_cast<float>(v & kMask) - zg[j]) * sg[j];
        }
        if (input_scale != nullptr)
            for (int64_t j = 0; j < cols; ++j) row[j] = row[j] * input_scale[kk];
        char* dst = static_cast<char*>(out) + (kk - k0) * out_stride * (out_dtype == F32 ? 4 : 2);
        if (out_dtype == F32) std::memcpy(dst, row, sizeof(float) * cols);
        else for (int64_t j = 0; j < cols; ++j) store(dst, j, row[j], out_dtype);
    }
    std::free(row);
}

}  // namespace

extern "C" {

const char* qc_isa() { return kIsa; }

// Returns 0 on success, nonzero for arguments it does not take (the caller checks them first).
int qc_lowbit4_decode(const uint8_t* packed, const void* absmax, const float* nested_absmax, const float* nested_code,
                      float nested_offset, const float* code, int64_t blocksize, int64_t n, int64_t k,
                      int64_t r0, int64_t r1, int64_t c0, int64_t c1, void* out, int64_t out_stride, int out_dtype,
                      int threads) {
    if (blocksize <= 0 || r0 < 0 || r1 > n || r0 > r1 || c0 < 0 || c1 > k || c0 > c1) return 1;
    if (!is_dtype(out_dtype)) return 2;
    const Weight w{packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, n, k,
                   log2_exact(blocksize)};
    const int64_t element = out_dtype == F32 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        float* scratch = static_cast<float*>(std::malloc(sizeof(float) * 1024));
#pragma omp for schedule(static)
        for (int64_t row = r0; row < r1; ++row) {
            void* out_row = static_cast<char*>(out) + (row - r0) * out_stride * element;
            decode_row(w, row, c0, c1, out_dtype, out_row, scratch);
        }
        std::free(scratch);
    }
    return 0;
}

int qc_lowbit4_linear(const void* x, int x_dtype, int64_t m, const uint8_t* packed, const void* absmax,
                      const float* nested_absmax, const float* nested_code, float nested_offset, const float* code,
                      int64_t blocksize, int64_t n, int64_t k, int compute_dtype, const void* bias, int bias_dtype,
                      void* y, int y_dtype, int threads) {
    if (blocksize <= 0 || m < 0 || n < 0 || k < 0) return 1;
    if (!is_dtype(compute_dtype) || !is_dtype(y_dtype) || (bias != nullptr && !is_dtype(bias_dtype))) return 2;
    if (m == 0 || n == 0) return 0;
    const Weight w{packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, n, k,
                   log2_exact(blocksize)};
    float* out = static_cast<float*>(std::malloc(sizeof(float) * m * n + 4));
    if (!linear_fast(w, x, x_dtype, m, out, compute_dtype, threads)) {
        float* xf = static_cast<float*>(std::malloc(sizeof(float) * m * k + 4));
        for (int64_t i = 0; i < m * k; ++i) xf[i] = load(x, i, x_dtype);
        linear_generic(w, xf, m, out, compute_dtype, threads);
        std::free(xf);
    }
    write_output(out, m, n, bias, bias_dtype, compute_dtype, y, y_dtype);
    std::free(out);
    return 0;
}

// y[M, N] = x[M, K] (float32) @ W^T + bias for an affine weight (above), with write_output's epilogue.
// Returns 0 on success.
int qc_affine_linear(const float* x, int64_t m, const int32_t* qweight, const int32_t* qzeros, const uint16_t* zeros,
                     const uint16_t* scales, const int32_t* g_idx, int bits, int64_t groups, int64_t n, int64_t k,
                     int compute_dtype, const void* bias, int bias_dtype, void* y, int y_dtype, int threads) {
    if (m < 0 || n < 0 || k < 0 || groups <= 0) return 1;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 2;
    if ((qzeros == nullptr) == (zeros == nullptr)) return 3;
    if (!is_dtype(compute_dtype) || !is_dtype(y_dtype) || (bias != nullptr && !is_dtype(bias_dtype))) return 5;
    if (m == 0 || n == 0) return 0;
    for (int64_t i = 0; i < k; ++i)
        if (g_idx[i] < 0 || g_idx[i] >= groups) return 4;
    const Affine a{qweight, qzeros, zeros, scales, g_idx, bits, groups, n, k};
    float* out = static_cast<float*>(std::malloc(sizeof(float) * m * n + 4));
    if (!affine_fast(a, x, m, out, threads)) affine_generic(a, x, m, out, threads);
    write_output(out, m, n, bias, bias_dtype, compute_dtype, y, y_dtype);
    std::free(out);
    return 0;
}

// Rows [k0, k1) of W^T restricted to output features [n0, n1) into out ([k1 - k0, n1 - n0], row stride
// out_stride, dtype out_dtype): bit for bit decode_affine(...)[n0:n1, k0:k1].t(). Returns 0 on success.
int qc_affine_decode(const int32_t* qweight, const int32_t* qzeros, const uint16_t* zeros, const uint16_t* scales,
                     const int32_t* g_idx, const float* input_scale, int bits, int64_t groups, int64_t n, int64_t k,
                     int64_t n0, int64_t n1, void* out, int64_t out_stride, int out_dtype, int threads) {
    if (groups <= 0 || n0 < 0 || n1 > n || n0 > n1) return 1;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return 2;
    if ((qzeros == nullptr) == (zeros == nullptr)) return 3;
    if (!is_dtype(out_dtype)) return 5;
    for (int64_t i = 0; i < k; ++i)
        if (g_idx[i] < 0 || g_idx[i] >= groups) return 4;
    const Affine a{qweight, qzeros, zeros, scales, g_idx, bits, groups, n, k};
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, k / 32));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < parts; ++p) {
        // Whole 32-feature runs per part, so no part splits a 3-bit run's words.
        const int64_t k0 = std::min(k, (k / 32) * p / parts * 32), k1 = p == parts - 1 ? k : (k / 32) * (p + 1) / parts * 32;
        char* dst = static_cast<char*>(out) + k0 * out_stride * (out_dtype == F32 ? 4 : 2);
        switch (bits) {
            case 2: affine_decode_block<2>(a, input_scale, n0, n1, k0, k1, dst, out_stride, out_dtype); break;
            case 3: affine_decode_block<3>(a, input_scale, n0, n1, k0, k1, dst, out_stride, out_dtype); break;
            case 4: affine_decode_block<4>(a, input_scale, n0, n1, k0, k1, dst, out_stride, out_dtype); break;
            default: affine_decode_block<8>(a, input_scale, n0, n1, k0, k1, dst, out_stride, out_dtype); break;
        }
    }
    return 0;
}

}  // extern "C"
