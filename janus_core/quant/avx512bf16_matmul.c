/* Weight-only int4 / int8 x bf16 activation matmuls for x86 CPUs with AVX512-BF16 (built and loaded by
 * native_bf16.py).
 *
 * int4: y[m][n] = sum_k x[m][k] * ((q[n][k] - 8) * s[g][n] + z[g][n]),  g = k / group
 *               = sum_g s[g][n] * sum_{k in g} x[m][k] (q[n][k] - 8)  +  z[g][n] * sum_{k in g} x[m][k]
 * int8: y[m][n] = sum_k x[m][k] * q[n][k] * s[n]  = sum_g s[n] * sum_{k in g} x[m][k] q[n][k]
 *       (g: chunks of `group` inputs, only to keep the float32 sums short; z = 0)
 *
 * The inner sums multiply bf16 activations by small integers (q - 8 in -8..7, or q in -127..127: exact in
 * bf16) with vdpbf16ps: exact products, float32 sums; the scales (and zeros) are applied once per group.
 *
 * Weight layouts (packed by native_bf16.pack): blocks of 32 outputs, for each pair of inputs (k = 2p, 2p + 1):
 * - int4: 32 bytes; byte 2j + e holds q[32b + j][2p + e] in its low nibble and q[32b + 16 + j][2p + e] in its
 *   high one. Widened to 16-bit lanes, the low nibbles index a 16-entry table of bf16 values (q - 8) giving the
 *   dot-product operand of outputs 32b..32b+15 directly (lanes 2j, 2j + 1 = inputs 2p, 2p + 1 of output j); the
 *   high nibbles, shifted down, the one of outputs 32b+16..32b+31. Scales: [N / 32][K / group][2][32] bf16
 *   (scale then zero of the block's 32 outputs).
 * - int8: 64 bytes; byte 2j + e holds q[32b + j][2p + e], byte 32 + 2j + e holds q[32b + 16 + j][2p + e];
 *   converted to bf16 through float32. Scales: [N] bf16.
 *
 * Work: units of two blocks (64 outputs) shared among OpenMP threads (the runtime torch already loaded, so
 * torch.set_num_threads applies). Rows go in register tiles of ROW_TILE_PAIR rows x 64 outputs (24 accumulators:
 * enough independent sums to hide the dot product's latency even for one or two rows). When one tile holds all
 * rows, the weights are unpacked in registers as they are used; with more rows, a group of both blocks is
 * unpacked into an L1 buffer once and read by every tile. A unit's odd last block uses tiles of ROW_TILE rows x 32.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROW_TILE 12   /* rows per register tile of one block (2 vectors): 24 accumulators */
#define ROW_TILE_PAIR 6 /* rows per register tile of two blocks (4 vectors): 24 accumulators */
#define ROW_CHUNK 64  /* rows per pass over a unit of outputs (its float32 sums stay in L1) */
#define MAX_PAIRS 128 /* largest group / 2 */

static inline __m512 bf16x16_to_ps(const uint16_t *p)
{
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* The two dot-product operands (outputs 0..15 and 16..31 of a block) of one input pair's 32 packed bytes. */
static inline void unpack_pair(const uint8_t *bytes, __m512i table, __m512i *low, __m512i *high)
{
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));
    *low = _mm512_permutexvar_epi16(b, table); /* uses the low 5 bits: table repeats every 16 */
    *high = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
}

/* The two operands of one input pair's 64 int8 bytes (see unpack_pair). */
static inline void unpack_pair8(const uint8_t *bytes, __m512i table, __m512i *low, __m512i *high)
{
    (void)table;
    for (int h = 0; h < 2; h++) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 32 * h))));
        const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 32 * h + 16))));
        *(h ? high : low) = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low lanes */
    }
}

/* One group of `rows` rows x `vecs` * 16 outputs (one block: 2, two blocks: 4): the integer-weight sums, then
 * sums += scale * them + zero * x-sum (int8: scale * them). Operands come from `unpacked` (`vecs` per pair) or,
 * when `direct`, straight from the packed bytes of each block. */
static inline __attribute__((always_inline)) void group_tile(
    const int rows, const int vecs, const int direct, const int bits, const uint32_t *x_pairs, int64_t row_pairs,
    int64_t first_pair,
    int64_t pairs, const __m512i *unpacked, const uint8_t *const *packed, __m512i table, const uint16_t *const *scale_zero,
    const float *x_sums, int64_t groups, int64_t g, float *sums)
{
    __m512 acc[ROW_TILE][4];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < vecs; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512i b[4];
        if (direct) {
            for (int v = 0; v < vecs; v += 2) {
                if (bits == 4)
                    unpack_pair(packed[v / 2] + p * 32, table, &b[v], &b[v + 1]);
                else
                    unpack_pair8(packed[v / 2] + p * 64, table, &b[v], &b[v + 1]);
            }
        } else {
            for (int v = 0; v < vecs; v++)
                b[v] = unpacked[vecs * p + v];
        }
        for (int r = 0; r < rows; r++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x_pairs[r * row_pairs + first_pair + p]);
            for (int v = 0; v < vecs; v++)
                acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, (__m512bh)b[v]);
        }
    }
    __m512 s[4], z[4];
    for (int v = 0; v < vecs; v++) {
        s[v] = bf16x16_to_ps(scale_zero[v / 2] + (v % 2) * 16);
        if (bits == 4)
            z[v] = bf16x16_to_ps(scale_zero[v / 2] + 32 + (v % 2) * 16);
    }
    for (int r = 0; r < rows; r++) {
        const __m512 x_sum = _mm512_set1_ps(bits == 4 ? x_sums[r * groups + g] : 0.f);
        for (int v = 0; v < vecs; v++) {
            float *out = sums + r * 64 + v * 16;
            __m512 o = _mm512_loadu_ps(out);
            if (bits == 4)
                o = _mm512_fmadd_ps(z[v], x_sum, o);
            _mm512_storeu_ps(out, _mm512_fmadd_ps(s[v], acc[r][v], o));
        }
    }
}

#define CASE(n, VECS, DIRECT) case n: group_tile(n, VECS, DIRECT, bits, TILE_ARGS); break;
#define ONE_BLOCK_TILES(DIRECT)                                                                               \
    switch (rows) {                                                                                           \
        CASE(1, 2, DIRECT) CASE(2, 2, DIRECT) CASE(3, 2, DIRECT) CASE(4, 2, DIRECT) CASE(5, 2, DIRECT)        \
        CASE(6, 2, DIRECT) CASE(7, 2, DIRECT) CASE(8, 2, DIRECT) CASE(9, 2, DIRECT) CASE(10, 2, DIRECT)       \
        CASE(11, 2, DIRECT) default: group_tile(12, 2, DIRECT, bits, TILE_ARGS); break;                       \
    }
#define TWO_BLOCK_TILES(DIRECT)                                                                               \
    switch (rows) {                                                                                           \
        CASE(1, 4, DIRECT) CASE(2, 4, DIRECT) CASE(3, 4, DIRECT) CASE(4, 4, DIRECT) CASE(5, 4, DIRECT)        \
        default: group_tile(6, 4, DIRECT, bits, TILE_ARGS); break;                                            \
    }

/* x [M][K] bf16, packed and scales as the file's header says, x_sums [M][K / group] float32 scratch (int4),
 * y [M][N] bf16 (rounded to nearest even). Requires N % 32 == 0, K % group == 0, group even and
 * <= 2 * MAX_PAIRS (checked by the caller). Every output is the same sequence of float32 operations whatever M,
 * the tile or the thread: a row's result does not depend on the other rows. */
static inline __attribute__((always_inline)) void matmul(
    const int bits, const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
    const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums, uint16_t *y)
{
    const int64_t row_pairs = k_in / 2, pairs = group / 2, groups = k_in / group, blocks = n_out / 32;
    const int64_t pair_bytes = bits * 8; /* per pair of a block */
    const uint32_t *x_pairs = (const uint32_t *)x;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (bits == 4 ? m_rows * groups : 0); i++) {
            const uint16_t *xi = x + i * group;
            float s = 0.f;
            for (int64_t k = 0; k < group; k++) {
                union { uint32_t u; float f; } v = {(uint32_t)xi[k] << 16};
                s += v.f;
            }
            x_sums[i] = s;
        }
        /* bf16 bit patterns of q - 8 for q = 0..15, twice (element 0 last) */
        const __m512i table = _mm512_set_epi16(
            0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0, (short)0xBF80, (short)0xC000, (short)0xC040,
            (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
            0x4040, 0x4000, 0x3F80, 0, (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0,
            (short)0xC0C0, (short)0xC0E0, (short)0xC100);
        __m512i unpacked[4 * MAX_PAIRS] __attribute__((aligned(64)));
        float sums[ROW_CHUNK * 64] __attribute__((aligned(64)));
        /* units of two blocks (64 outputs); the last one may hold one block */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < (blocks + 1) / 2; u++) {
            const int64_t first = 2 * u, count = first + 1 < blocks ? 2 : 1;
            for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_CHUNK) {
                const int64_t chunk = m_rows - m0 < ROW_CHUNK ? m_rows - m0 : ROW_CHUNK;
                /* few rows (one register tile): unpacked in registers as used; else through the buffer */
                const int direct = chunk <= (count == 2 ? ROW_TILE_PAIR : ROW_TILE);
                const int vecs = 2 * (int)count;
                for (int64_t i = 0; i < chunk * 64; i++)
                    sums[i] = 0.f;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *bytes[2];
                    const uint16_t *sz[2];
                    for (int64_t c = 0; c < count; c++) {
                        bytes[c] = packed + ((first + c) * row_pairs + g * pairs) * pair_bytes;
                        sz[c] = bits == 4 ? scales + ((first + c) * groups + g) * 64 : scales + (first + c) * 32;
                    }
                    if (!direct)
                        for (int64_t p = 0; p < pairs; p++)
                            for (int64_t c = 0; c < count; c++) {
                                __m512i *out = &unpacked[vecs * p + 2 * c];
                                if (bits == 4)
                                    unpack_pair(bytes[c] + p * pair_bytes, table, out, out + 1);
                                else
                                    unpack_pair8(bytes[c] + p * pair_bytes, table, out, out + 1);
                            }
                    const int tile = vecs == 4 ? ROW_TILE_PAIR : ROW_TILE;
                    for (int64_t r0 = 0; r0 < chunk; r0 += tile) {
                        const int rows = chunk - r0 < tile ? (int)(chunk - r0) : tile;
#define TILE_ARGS x_pairs + (m0 + r0) * row_pairs, row_pairs, g * pairs, pairs, unpacked, bytes, table, sz, \
                  x_sums + (m0 + r0) * groups, groups, g, sums + r0 * 64
                        if (vecs == 4) {
                            if (direct) {
                                TWO_BLOCK_TILES(1)
                            } else {
                                TWO_BLOCK_TILES(0)
                            }
                        } else if (direct) {
                            ONE_BLOCK_TILES(1)
                        } else {
                            ONE_BLOCK_TILES(0)
                        }
#undef TILE_ARGS
                    }
                }
                for (int64_t r = 0; r < chunk; r++)
                    for (int64_t v = 0; v < 2 * count; v++)
                        _mm256_storeu_si256((__m256i *)(y + (m0 + r) * n_out + first * 32 + v * 16),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sums + r * 64 + v * 16)));
            }
        }
    }
}

void janus_int4_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                            const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums, uint16_t *y)
{
    matmul(4, x, m_rows, k_in, packed, scales, n_out, group, x_sums, y);
}

void janus_int8_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                            const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums, uint16_t *y)
{
    matmul(8, x, m_rows, k_in, packed, scales, n_out, group, x_sums, y);
}
