/* Weight-only int4 / int8 x bf16 activation matmuls with 16-bit integer dot products, for x86 CPUs with AVX2 and FMA
 * (built and loaded by built_kernels.py three ways: AVX2; -DJANUS_AVX_VNNI for AVX-VNNI; -DJANUS_AVX512_VNNI for
 * AVX512-VNNI, in 512-bit vectors).
 *
 * Same weight layouts and per-group formulas as int_bf16_matmul.c (see its header):
 *   int4: y[m][n] = sum_g s[g][n] * sum_{k in g} x[m][k] (q[n][k] - 8)  +  z[g][n] * sum_{k in g} x[m][k]
 *   int8: y[m][n] = s[n] * sum_g sum_{k in g} x[m][k] q[n][k]       (g: runs of `group` inputs)
 * AVX2 has no bf16 dot product, but a 16-bit integer one: vpmaddwd multiplies int16 pairs and adds each pair into an
 * int32 lane, twice the multiply rate of float32 FMAs (vpdpwssd also adds them to the accumulator), and takes the
 * 0..15 or -127..127 weights as they are. So each run of `group` inputs of a row is written as int16 integers times a
 * power of two:
 *   xi[k] = round(x[k] / d),  d = 2^(E - 15),  2^(E - 1) <= max |x| of the run < 2^E
 * A bf16 value has 8 significant bits, so every value within a factor 2^8 of the run's largest one is exact; smaller
 * ones are rounded to a multiple of d (error <= d / 2 < 2^-15 of the run's largest |x|). A run whose largest |x| is
 * below 2^-100 counts as zero; one with an inf or NaN makes its row's outputs NaN. Then per group, exactly in int32
 * (|a| < 2^31 for runs of up to 256 inputs):
 *   a[m][n] = sum_k xi[k] q[n][k],  c[m] = sum_k xi[k]
 * and in float32 (s d and c d are exact: d is a power of two):
 *   int4: sums[m][n] += (a - 8 c) * (s d)  +  z * (c d)
 *   int8: sums[m][n] += a * (s d)
 * Every output is this same sequence of operations whatever the number of rows, the tile or the thread, so a row's
 * result does not depend on the other rows.
 *
 * Work: x is converted first (all runs, shared among the threads), then blocks of 32 outputs are shared among OpenMP
 * threads (torch's runtime). A block's bytes per input pair widen to VECS int16 operands of LANES outputs x 2 inputs
 * (256 bits: four of 8 outputs; int4, 32 bytes: low nibbles of bytes 0..15 / 16..31 are outputs 0..7 / 8..15, high
 * nibbles 16..23 / 24..31; int8, 64 bytes: bytes 16v..16v+15 are outputs 8v..8v+7. 512 bits: two of 16 outputs,
 * likewise). Up to ROW_TILE rows go in a register tile (VECS int32 accumulators per row); with one tile the operands
 * are widened in registers as they are used, with more a group of the block is widened into an L1 buffer once and
 * read by every tile.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define ROW_CHUNK 64  /* rows per pass over a block (its float32 sums stay in L1) */
#define MAX_PAIRS 128 /* largest group / 2 */
#define TINY_EXPONENT 27 /* bf16 exponent field of 2^-100: smaller runs count as zero */

/* The vector width: 512 bits (-DJANUS_AVX512_VNNI: 16 outputs per operand, 2 per block, vpdpwssd on zmm) or 256
 * (8 outputs per operand, 4 per block; vpdpwssd with -DJANUS_AVX_VNNI, else vpmaddwd + vpaddd). */
#ifdef JANUS_AVX512_VNNI
#define LANES 16
#define ROW_TILE 6 /* rows per register tile: 12 int32 accumulators (of 32 registers) */
#define MORE_CASES(DIRECT) CASE(3, DIRECT) CASE(4, DIRECT) CASE(5, DIRECT)
typedef __m512i vint;
typedef __m512 vfloat;
#define V_ZERO() _mm512_setzero_si512()
#define V_SET1(v) _mm512_set1_epi32(v)
#define V_SET1_16(v) _mm512_set1_epi16(v)
#define V_DOT(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))
#define V_WIDEN_U8(p) _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define V_WIDEN_S8(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define V_AND(a, b) _mm512_and_si512((a), (b))
#define V_SRLI16(a, n) _mm512_srli_epi16((a), (n))
#define V_SUB32(a, b) _mm512_sub_epi32((a), (b))
#define V_TO_PS(a) _mm512_cvtepi32_ps(a)
#define V_FMADD(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_MUL(a, b) _mm512_mul_ps((a), (b))
#define V_LOADU_PS(p) _mm512_loadu_ps(p)
#define V_STOREU_PS(p, v) _mm512_storeu_ps((p), (v))
#define V_SET1_PS(v) _mm512_set1_ps(v)
#define V_ZERO_PS() _mm512_setzero_ps()
#define V_LOAD(p) _mm512_load_si512(p)

static inline vfloat bf16_to_ps(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* float32 -> bf16, rounded to nearest even (NaN stays NaN) */
static inline void store_bf16(uint16_t *out, vfloat v)
{
    const __m512i f = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(f, 16), _mm512_set1_epi32(1));
    __m512i r16 = _mm512_srli_epi32(_mm512_add_epi32(f, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r16 = _mm512_mask_mov_epi32(r16, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(r16));
}
#else
#define LANES 8
#define ROW_TILE 3 /* rows per register tile: 12 int32 accumulators (of 16 registers) */
#define MORE_CASES(DIRECT)
typedef __m256i vint;
typedef __m256 vfloat;
#define V_ZERO() _mm256_setzero_si256()
#define V_SET1(v) _mm256_set1_epi32(v)
#define V_SET1_16(v) _mm256_set1_epi16(v)
#ifdef JANUS_AVX_VNNI
#define V_DOT(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#else
#define V_DOT(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#endif
#define V_WIDEN_U8(p) _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define V_WIDEN_S8(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define V_AND(a, b) _mm256_and_si256((a), (b))
#define V_SRLI16(a, n) _mm256_srli_epi16((a), (n))
#define V_SUB32(a, b) _mm256_sub_epi32((a), (b))
#define V_TO_PS(a) _mm256_cvtepi32_ps(a)
#define V_FMADD(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_MUL(a, b) _mm256_mul_ps((a), (b))
#define V_LOADU_PS(p) _mm256_loadu_ps(p)
#define V_STOREU_PS(p, v) _mm256_storeu_ps((p), (v))
#define V_SET1_PS(v) _mm256_set1_ps(v)
#define V_ZERO_PS() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_load_si256(p)

static inline vfloat bf16_to_ps(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* float32 -> bf16, rounded to nearest even (NaN stays NaN) */
static inline void store_bf16(uint16_t *out, vfloat v)
{
    const __m256i f = _mm256_castps_si256(v);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(f, 16), _mm256_set1_epi32(1));
    __m256i r16 = _mm256_srli_epi32(_mm256_add_epi32(f, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    r16 = _mm256_blendv_epi8(r16, _mm256_set1_epi32(0x7FC0), nan);
    _mm_storeu_si128((__m128i *)out, _mm_packus_epi32(_mm256_castsi256_si128(r16), _mm256_extracti128_si256(r16, 1)));
}
#endif
#define VECS (32 / LANES) /* operands per block and input pair */

/* x's run [m][g] -> xi (int16, same place in an [M][K] array), d[m][g] and c d[m][g] (float32), 8 c[m][g] (int32). */
static void convert_run(const uint16_t *x, int64_t group, int16_t *xi, float *d, float *cd, int32_t *c8)
{
    __m256i top = _mm256_setzero_si256();
    for (int64_t k = 0; k < group; k += 16)
        top = _mm256_max_epu16(top, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + k)),
                                                      _mm256_set1_epi16(0x7FFF)));
    __m128i t = _mm_max_epu16(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    t = _mm_max_epu16(t, _mm_srli_si128(t, 8));
    t = _mm_max_epu16(t, _mm_srli_si128(t, 4));
    t = _mm_max_epu16(t, _mm_srli_si128(t, 2));
    const int exponent = _mm_extract_epi16(t, 0) >> 7; /* biased: 2^(exponent - 127) <= max|x| < 2^(exponent - 126) */
    if (exponent == 0xFF || exponent < TINY_EXPONENT) {
        for (int64_t k = 0; k < group; k++)
            xi[k] = 0;
        *d = exponent == 0xFF ? NAN : 0.f;
        *cd = 0.f;
        *c8 = 0;
        return;
    }
    /* 2^E = 2^(exponent - 126), so d = 2^(exponent - 141) and x / d = x * 2^(141 - exponent) */
    union { uint32_t u; float f; } inv = {(uint32_t)(268 - exponent) << 23}; /* 2^(141 - exponent), a normal float */
    const __m256 scale = _mm256_set1_ps(inv.f);
    __m256i count = _mm256_setzero_si256();
    for (int64_t k = 0; k < group; k += 16) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(x + k));
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
        const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(lo, scale)); /* exact product, rounded to nearest even */
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(hi, scale));
        count = _mm256_add_epi32(count, _mm256_add_epi32(a, b));
        /* packs works per 128-bit lane: [a0-3 b0-3 a4-7 b4-7] -> [a0-7 b0-7] */
        _mm256_storeu_si256((__m256i *)(xi + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(count), _mm256_extracti128_si256(count, 1));
    s = _mm_add_epi32(s, _mm_srli_si128(s, 8));
    s = _mm_add_epi32(s, _mm_srli_si128(s, 4));
    const int32_t c = _mm_cvtsi128_si32(s);
    union { uint32_t u; float f; } step = {(uint32_t)(exponent - 14) << 23}; /* 2^(exponent - 141), normal */
    *d = step.f;
    *cd = (float)c * step.f;
    *c8 = 8 * c;
}

/* The VECS int16 operands of one input pair's packed bytes (see the header). */
static inline __attribute__((always_inline)) void unpack_pair(const int int8, const uint8_t *bytes, vint *w)
{
    if (int8) {
        for (int v = 0; v < VECS; v++)
            w[v] = V_WIDEN_S8(bytes + 2 * LANES * v);
        return;
    }
    for (int h = 0; h < VECS / 2; h++) {
        const vint b = V_WIDEN_U8(bytes + 2 * LANES * h);
        w[h] = V_AND(b, V_SET1_16(0x0F));
        w[h + VECS / 2] = V_SRLI16(b, 4);
    }
}

/* One group of `rows` rows x one block: the int32 sums of xi * q, then folded into the float32 sums (see the
 * header). Operands come from `unpacked` (VECS per pair) or, when `direct`, straight from the packed bytes. */
static inline __attribute__((always_inline)) void group_tile(
    const int int8, const int rows, const int direct, const int32_t *xi_pairs, int64_t row_pairs, int64_t pairs,
    const vint *unpacked, const uint8_t *bytes, const uint16_t *scale_zero, const float *d, const float *cd,
    const int32_t *c8, int64_t groups, float *sums)
{
    vint acc[ROW_TILE][VECS];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECS; v++)
            acc[r][v] = V_ZERO();
    for (int64_t p = 0; p < pairs; p++) {
        vint w[VECS];
        if (direct)
            unpack_pair(int8, bytes + p * (int8 ? 64 : 32), w);
        for (int r = 0; r < rows; r++) {
            const vint xb = V_SET1(xi_pairs[r * row_pairs + p]);
            for (int v = 0; v < VECS; v++)
                acc[r][v] = V_DOT(acc[r][v], direct ? w[v] : V_LOAD(unpacked + VECS * p + v), xb);
        }
    }
    vfloat s[VECS], z[VECS];
    for (int v = 0; v < VECS; v++) {
        s[v] = bf16_to_ps(scale_zero + LANES * v);
        z[v] = int8 ? V_ZERO_PS() : bf16_to_ps(scale_zero + 32 + LANES * v);
    }
    for (int r = 0; r < rows; r++) {
        const vfloat step = V_SET1_PS(d[r * groups]), zero_term = V_SET1_PS(cd[r * groups]);
        const vint eight_c = V_SET1(c8[r * groups]);
        for (int v = 0; v < VECS; v++) {
            float *out = sums + r * 32 + v * LANES;
            if (int8) {
                V_STOREU_PS(out, V_FMADD(V_TO_PS(acc[r][v]), V_MUL(s[v], step), V_LOADU_PS(out)));
                continue;
            }
            const vfloat a = V_TO_PS(V_SUB32(acc[r][v], eight_c));
            const vfloat o = V_FMADD(z[v], zero_term, V_LOADU_PS(out));
            V_STOREU_PS(out, V_FMADD(a, V_MUL(s[v], step), o));
        }
    }
}

#define TILE_ARGS(DIRECT) DIRECT, xi_pairs + (m0 + r0) * row_pairs + g * pairs, row_pairs, pairs, unpacked, bytes, \
                          sz, d + (m0 + r0) * groups + g, cd + (m0 + r0) * groups + g, c8 + (m0 + r0) * groups + g, \
                          groups, sums + r0 * 32
#define CASE(n, DIRECT) case n: group_tile(int8, n, TILE_ARGS(DIRECT)); break;
#define TILES(DIRECT) \
    switch (rows) { CASE(1, DIRECT) CASE(2, DIRECT) MORE_CASES(DIRECT) default: group_tile(int8, ROW_TILE, TILE_ARGS(DIRECT)); break; }

static inline __attribute__((always_inline)) void matmul(
    const int int8, const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed, const uint16_t *scales,
    int64_t n_out, int64_t group, void *scratch, uint16_t *y)
{
    const int64_t width = int8 ? 64 : 32; /* packed bytes per input pair of a block */
    const int64_t row_pairs = k_in / 2, pairs = group / 2, groups = k_in / group, blocks = n_out / 32;
    int16_t *xi = (int16_t *)scratch;
    float *d = (float *)(xi + m_rows * k_in), *cd = d + m_rows * groups;
    int32_t *c8 = (int32_t *)(cd + m_rows * groups);
    const int32_t *xi_pairs = (const int32_t *)xi;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_rows * groups; i++)
            convert_run(x + i * group, group, xi + i * group, d + i, cd + i, c8 + i);
        vint unpacked[VECS * MAX_PAIRS] __attribute__((aligned(64)));
        float sums[ROW_CHUNK * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_CHUNK) {
                const int64_t chunk = m_rows - m0 < ROW_CHUNK ? m_rows - m0 : ROW_CHUNK;
                const int direct = chunk <= ROW_TILE; /* one register tile: unpack in registers as used */
                for (int64_t i = 0; i < chunk * 32; i++)
                    sums[i] = 0.f;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *bytes = packed + (b * row_pairs + g * pairs) * width;
                    const uint16_t *sz = int8 ? scales + b * 32 : scales + (b * groups + g) * 64;
                    if (!direct)
                        for (int64_t p = 0; p < pairs; p++)
                            unpack_pair(int8, bytes + p * width, unpacked + VECS * p);
                    for (int64_t r0 = 0; r0 < chunk; r0 += ROW_TILE) {
                        const int rows = chunk - r0 < ROW_TILE ? (int)(chunk - r0) : ROW_TILE;
                        if (direct) {
                            TILES(1)
                        } else {
                            TILES(0)
                        }
                    }
                }
                for (int64_t r = 0; r < chunk; r++)
                    for (int v = 0; v < VECS; v++)
                        store_bf16(y + (m0 + r) * n_out + b * 32 + v * LANES, V_LOADU_PS(sums + r * 32 + v * LANES));
            }
        }
    }
}

/* x [M][K] bf16, packed and scales in int_bf16_matmul.c's layouts, scratch of M * K * 2 + M * (K / group) * 12
 * bytes (64-byte aligned), y [M][N] bf16 (rounded to nearest even). Require N % 32 == 0, K % group == 0, group a
 * multiple of 16 and <= 2 * MAX_PAIRS (checked by the caller). */
void janus_int4_int16_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                             const uint16_t *scales, int64_t n_out, int64_t group, void *scratch, uint16_t *y)
{
    matmul(0, x, m_rows, k_in, packed, scales, n_out, group, scratch, y);
}

void janus_int8_int16_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                             const uint16_t *scales, int64_t n_out, int64_t group, void *scratch, uint16_t *y)
{
    matmul(1, x, m_rows, k_in, packed, scales, n_out, group, scratch, y);
}
