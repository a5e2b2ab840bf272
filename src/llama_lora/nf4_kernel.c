/* NF4 dequantization on a CPU (llama_lora.quant): built once by the C compiler, loaded with ctypes.

   out[64 b + 2 i]     = levels[packed[32 b + i] >> 4] * scale[b]
   out[64 b + 2 i + 1] = levels[packed[32 b + i] & 15] * scale[b]

   each product in fp32, rounded once to the output: kind 0 fp32, 1 bf16 (round to nearest even, as torch), 2 fp16.
   A block's 16 levels times its scale make a table that one register holds (AVX-512: 16 fp32 lanes; AVX2: two
   halves of 8), and each code is a lane permutation of it: no gather, no memory lookups. The instruction set is the
   one torch dispatches to (quant._ISA_FLAGS); without one, plain C. Returns 0, or 1 for a kind not built (fp16
   without F16C), which the caller then computes with torch. */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline void block_plain(const uint8_t *p, float s, const float *levels, void *out, int64_t o, int kind) {
    float t[16], v[64];
    for (int k = 0; k < 16; ++k) t[k] = levels[k] * s;
    for (int i = 0; i < 32; ++i) {
        v[2 * i] = t[p[i] >> 4];
        v[2 * i + 1] = t[p[i] & 15];
    }
    if (kind == 0) memcpy((float *)out + o, v, sizeof v);
    else for (int i = 0; i < 64; ++i) ((uint16_t *)out)[o + i] = bf16_rne(v[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline __m256i bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

static void block_simd(const uint8_t *p, float s, const float *levels, void *out, int64_t o, int kind) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    __m512 table = _mm512_mul_ps(_mm512_loadu_ps(levels), _mm512_set1_ps(s));
    for (int h = 0; h < 2; ++h, o += 32) {  /* 16 bytes: 32 values */
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
        __m512i hi = _mm512_srli_epi32(bytes, 4), lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        __m512 v0 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table);
        __m512 v1 = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table);
        if (kind == 0) {
            _mm512_storeu_ps((float *)out + o, v0);
            _mm512_storeu_ps((float *)out + o + 16, v1);
        } else if (kind == 1) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + o), bf16x16(v0));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + 16), bf16x16(v1));
        } else {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + o), _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + 16), _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
        }
    }
}
#define HAVE_SIMD 1
#elif defined(__AVX2__) && defined(__F16C__)
static void block_simd(const uint8_t *p, float s, const float *levels, void *out, int64_t o, int kind) {
    __m256 scale = _mm256_set1_ps(s);
    __m256 low = _mm256_mul_ps(_mm256_loadu_ps(levels), scale), high = _mm256_mul_ps(_mm256_loadu_ps(levels + 8), scale);
    for (int h = 0; h < 4; ++h) {  /* 8 bytes: 16 values */
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
        __m256i hi = _mm256_srli_epi32(bytes, 4), lo = _mm256_and_si256(bytes, _mm256_set1_epi32(15));
        __m256i a = _mm256_unpacklo_epi32(hi, lo), b = _mm256_unpackhi_epi32(hi, lo);
        __m256i codes[2] = {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};
        for (int k = 0; k < 2; ++k, o += 8) {
            __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, codes[k]), _mm256_permutevar8x32_ps(high, codes[k]),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(codes[k], 28)));  /* code bit 3: high */
            if (kind == 0) {
                _mm256_storeu_ps((float *)out + o, v);
            } else if (kind == 1) {
                __m256i u = _mm256_castps_si256(v);
                __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
                _mm_storeu_si128((__m128i *)((uint16_t *)out + o),
                                 _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
            } else {
                _mm_storeu_si128((__m128i *)((uint16_t *)out + o), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
            }
        }
    }
}
#define HAVE_SIMD 1
#endif

int nf4_dequantize(const uint8_t *packed, const float *scale, const float *levels, void *out, int64_t n_blocks,
                   int kind, int threads) {
#ifndef HAVE_SIMD
    if (kind == 2) return 1;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
#ifdef HAVE_SIMD
        block_simd(packed + 32 * b, scale[b], levels, out, 64 * b, kind);
#else
        block_plain(packed + 32 * b, scale[b], levels, out, 64 * b, kind);
#endif
    }
    return 0;
}
