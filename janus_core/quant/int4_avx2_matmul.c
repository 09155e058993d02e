/* Weight-only int4 x bf16 activation matmul for x86 CPUs with AVX2 and FMA, no bf16 dot products (built and loaded
 * by native_bf16.py; built a second time with -DJANUS_AVX_VNNI for CPUs with AVX-VNNI).
 *
 * Same weight layout and per-group formula as int_bf16_matmul.c (see its header):
 *   y[m][n] = sum_g s[g][n] * sum_{k in g} x[m][k] (q[n][k] - 8)  +  z[g][n] * sum_{k in g} x[m][k]
 * AVX2 has no bf16 dot product, but a 16-bit integer one: vpmaddwd multiplies int16 pairs and adds each pair into an
 * int32 lane, twice the multiply rate of float32 FMAs, and takes the 0..15 weights as they are. So each run of
 * `group` inputs of a row (its inputs of one group) is written as int16 integers times a power of two:
 *   xi[k] = round(x[k] / d),  d = 2^(E - 15),  2^(E - 1) <= max |x| of the run < 2^E
 * A bf16 value has 8 significant bits, so every value within a factor 2^8 of the run's largest one is exact; smaller
 * ones are rounded to a multiple of d (error <= d / 2 < 2^-15 of the run's largest |x|). A run whose largest |x| is
 * below 2^-100 counts as zero; one with an inf or NaN makes its row's outputs NaN. Then per group, exactly in int32:
 *   a[m][n] = sum_k xi[k] q[n][k],  c[m] = sum_k xi[k]
 * and in float32:  sums[m][n] += (a - 8 c) * (s d)  +  z * (c d)     (s d and c d exact: d is a power of two).
 * Every output is this same sequence of operations whatever the number of rows, the tile or the thread, so a row's
 * result does not depend on the other rows.
 *
 * Work: x is converted first (all runs, shared among the threads), then blocks of 32 outputs are shared among OpenMP
 * threads (torch's runtime). A block's 32 bytes per input pair widen to four int16 operands of 8 outputs x 2 inputs
 * (low nibbles of bytes 0..15 / 16..31: outputs 0..7 / 8..15; high nibbles: 16..23 / 24..31). Up to ROW_TILE rows
 * go in a register tile (4 int32 accumulators per row); with one tile the operands are unpacked in registers as they
 * are used, with more a group of the block is unpacked into an L1 buffer once and read by every tile.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define ROW_TILE 3    /* rows per register tile: 12 int32 accumulators */
#define ROW_CHUNK 64  /* rows per pass over a block (its float32 sums stay in L1) */
#define MAX_PAIRS 128 /* largest group / 2 */
#define TINY_EXPONENT 27 /* bf16 exponent field of 2^-100: smaller runs count as zero */

#ifdef JANUS_AVX_VNNI
#define DOT(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#else
#define DOT(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#endif

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
    const int bits = _mm_extract_epi16(t, 0), exponent = bits >> 7; /* biased: 2^(exponent-127) <= max < 2^(E - 1 + 1) */
    if (exponent == 0xFF || exponent < TINY_EXPONENT) {
        for (int64_t k = 0; k < group; k++)
            xi[k] = 0;
        *d = exponent == 0xFF ? NAN : 0.f;
        *cd = 0.f;
        *c8 = 0;
        return;
    }
    /* max < 2^(exponent - 126) = 2^E, so d = 2^(exponent - 141) and x / d = x * 2^(141 - exponent) */
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

/* The four int16 operands of one input pair's 32 packed bytes (see the header). */
static inline __attribute__((always_inline)) void unpack_pair(const uint8_t *bytes, __m256i *w)
{
    const __m256i mask = _mm256_set1_epi16(0x0F);
    const __m256i first = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)bytes));
    const __m256i second = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(bytes + 16)));
    w[0] = _mm256_and_si256(first, mask);
    w[1] = _mm256_and_si256(second, mask);
    w[2] = _mm256_srli_epi16(first, 4);
    w[3] = _mm256_srli_epi16(second, 4);
}

/* One group of `rows` rows x one block: the int32 sums of xi * q, then folded into the float32 sums (see the
 * header). Operands come from `unpacked` (4 per pair) or, when `direct`, straight from the packed bytes. */
static inline __attribute__((always_inline)) void group_tile(
    const int rows, const int direct, const int32_t *xi_pairs, int64_t row_pairs, int64_t pairs,
    const __m256i *unpacked, const uint8_t *bytes, const uint16_t *scale_zero, const float *d, const float *cd,
    const int32_t *c8, int64_t groups, float *sums)
{
    __m256i acc[ROW_TILE][4];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 4; v++)
            acc[r][v] = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; p++) {
        __m256i w[4];
        if (direct)
            unpack_pair(bytes + p * 32, w);
        for (int r = 0; r < rows; r++) {
            const __m256i xb = _mm256_set1_epi32(xi_pairs[r * row_pairs + p]);
            for (int v = 0; v < 4; v++)
                acc[r][v] = DOT(acc[r][v], direct ? w[v] : _mm256_load_si256(unpacked + 4 * p + v), xb);
        }
    }
    __m256 s[4], z[4];
    for (int v = 0; v < 4; v++) {
        const __m128i sv = _mm_loadu_si128((const __m128i *)(scale_zero + 8 * v));
        const __m128i zv = _mm_loadu_si128((const __m128i *)(scale_zero + 32 + 8 * v));
        s[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(sv), 16));
        z[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(zv), 16));
    }
    for (int r = 0; r < rows; r++) {
        const __m256 step = _mm256_set1_ps(d[r * groups]), zero_term = _mm256_set1_ps(cd[r * groups]);
        const __m256i eight_c = _mm256_set1_epi32(c8[r * groups]);
        for (int v = 0; v < 4; v++) {
            float *out = sums + r * 32 + v * 8;
            const __m256 a = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], eight_c));
            const __m256 o = _mm256_fmadd_ps(z[v], zero_term, _mm256_loadu_ps(out));
            _mm256_storeu_ps(out, _mm256_fmadd_ps(a, _mm256_mul_ps(s[v], step), o));
        }
    }
}

#define TILE_ARGS(DIRECT) DIRECT, xi_pairs + (m0 + r0) * row_pairs + g * pairs, row_pairs, pairs, unpacked, bytes, \
                          sz, d + (m0 + r0) * groups + g, cd + (m0 + r0) * groups + g, c8 + (m0 + r0) * groups + g, \
                          groups, sums + r0 * 32
#define TILES(DIRECT)                                                                                         \
    switch (rows) {                                                                                           \
        case 1: group_tile(1, TILE_ARGS(DIRECT)); break;                                                      \
        case 2: group_tile(2, TILE_ARGS(DIRECT)); break;                                                      \
        default: group_tile(3, TILE_ARGS(DIRECT)); break;                                                     \
    }

/* x [M][K] bf16, packed and scales in int_bf16_matmul.c's int4 layout, scratch of M * K * 2 + M * (K / group) * 12
 * bytes (64-byte aligned), y [M][N] bf16 (rounded to nearest even). Requires N % 32 == 0, K % group == 0, group a
 * multiple of 16 and <= 2 * MAX_PAIRS (checked by the caller). */
void janus_int4_avx2_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                            const uint16_t *scales, int64_t n_out, int64_t group, void *scratch, uint16_t *y)
{
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
        __m256i unpacked[4 * MAX_PAIRS] __attribute__((aligned(32)));
        float sums[ROW_CHUNK * 32] __attribute__((aligned(32)));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_CHUNK) {
                const int64_t chunk = m_rows - m0 < ROW_CHUNK ? m_rows - m0 : ROW_CHUNK;
                const int direct = chunk <= ROW_TILE; /* one register tile: unpack in registers as used */
                for (int64_t i = 0; i < chunk * 32; i++)
                    sums[i] = 0.f;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *bytes = packed + (b * row_pairs + g * pairs) * 32;
                    const uint16_t *sz = scales + (b * groups + g) * 64;
                    if (!direct)
                        for (int64_t p = 0; p < pairs; p++)
                            unpack_pair(bytes + p * 32, unpacked + 4 * p);
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
                    for (int v = 0; v < 4; v++) {
                        /* float32 -> bf16, rounded to nearest even (NaN stays NaN) */
                        __m256i f = _mm256_castps_si256(_mm256_loadu_ps(sums + r * 32 + v * 8));
                        const __m256i nan = _mm256_castps_si256(
                            _mm256_cmp_ps(_mm256_castsi256_ps(f), _mm256_castsi256_ps(f), _CMP_UNORD_Q));
                        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(f, 16), _mm256_set1_epi32(1));
                        __m256i r16 = _mm256_srli_epi32(
                            _mm256_add_epi32(f, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
                        r16 = _mm256_blendv_epi8(r16, _mm256_set1_epi32(0x7FC0), nan);
                        const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r16), _mm256_extracti128_si256(r16, 1));
                        _mm_storeu_si128((__m128i *)(y + (m0 + r) * n_out + b * 32 + v * 8), h);
                    }
            }
        }
    }
}
