/* Weight-only int4 / int8 x bf16 activation matmuls for x86 CPUs with bf16 dot products (built and loaded by
 * native_bf16.py): int4 with AVX512-BF16 (janus_int4_bf16_matmul), int4 and int8 with AMX tiles (below).
 *
 * int4: y[m][n] = sum_k x[m][k] * ((q[n][k] - 8) * s[g][n] + z[g][n]),  g = k / group
 *               = sum_g s[g][n] * sum_{k in g} x[m][k] (q[n][k] - 8)  +  z[g][n] * sum_{k in g} x[m][k]
 * int8: y[m][n] = sum_k x[m][k] * q[n][k] * s[n]  = sum_g s[n] * sum_{k in g} x[m][k] q[n][k]
 *       (g: chunks of `group` inputs, only to keep the float32 sums short; z = 0)
 *
 * The inner sums multiply bf16 activations by small integers (q - 8 in -8..7, or q in -127..127: exact in
 * bf16) with vdpbf16ps or tdpbf16ps: exact products, float32 sums; the scales (and zeros) are applied once per
 * group.
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
 * AVX512-BF16 int4 work: units of two blocks (64 outputs) shared among OpenMP threads (the runtime torch already loaded, so
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
static inline void unpack_pair8(const uint8_t *bytes, __m512i *low, __m512i *high)
{
    for (int h = 0; h < 2; h++) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 32 * h))));
        const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 32 * h + 16))));
        *(h ? high : low) = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low lanes */
    }
}

/* bf16 bit patterns of q - 8 for q = 0..15, twice (element 0 last): the table of unpack_pair. */
static inline __m512i int4_table(void)
{
    return _mm512_set_epi16(
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0, (short)0xBF80, (short)0xC000, (short)0xC040,
        (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
        0x4040, 0x4000, 0x3F80, 0, (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0,
        (short)0xC0C0, (short)0xC0E0, (short)0xC100);
}

/* x_sums[i] = the float32 sum of x's i-th run of `group` inputs, i < count (shared among the threads of the
 * enclosing parallel region, in input order: the same for every row count). */
static inline void group_sums(const uint16_t *x, int64_t count, int64_t group, float *x_sums)
{
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        const uint16_t *xi = x + i * group;
        float s = 0.f;
        for (int64_t k = 0; k < group; k++) {
            union { uint32_t u; float f; } v = {(uint32_t)xi[k] << 16};
            s += v.f;
        }
        x_sums[i] = s;
    }
}

/* One group of `rows` rows x `vecs` * 16 outputs (one block: 2, two blocks: 4): the integer-weight sums, then
 * sums += scale * them + zero * x-sum (int8: scale * them). Operands come from `unpacked` (`vecs` per pair) or,
 * when `direct`, straight from the packed bytes of each block. */
static inline __attribute__((always_inline)) void group_tile(
    const int rows, const int vecs, const int direct, const uint32_t *x_pairs, int64_t row_pairs,
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
            for (int v = 0; v < vecs; v += 2)
                unpack_pair(packed[v / 2] + p * 32, table, &b[v], &b[v + 1]);
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
        z[v] = bf16x16_to_ps(scale_zero[v / 2] + 32 + (v % 2) * 16);
    }
    for (int r = 0; r < rows; r++) {
        const __m512 x_sum = _mm512_set1_ps(x_sums[r * groups + g]);
        for (int v = 0; v < vecs; v++) {
            float *out = sums + r * 64 + v * 16;
            const __m512 o = _mm512_fmadd_ps(z[v], x_sum, _mm512_loadu_ps(out));
            _mm512_storeu_ps(out, _mm512_fmadd_ps(s[v], acc[r][v], o));
        }
    }
}

#define CASE(n, VECS, DIRECT) case n: group_tile(n, VECS, DIRECT, TILE_ARGS); break;
#define ONE_BLOCK_TILES(DIRECT)                                                                               \
    switch (rows) {                                                                                           \
        CASE(1, 2, DIRECT) CASE(2, 2, DIRECT) CASE(3, 2, DIRECT) CASE(4, 2, DIRECT) CASE(5, 2, DIRECT)        \
        CASE(6, 2, DIRECT) CASE(7, 2, DIRECT) CASE(8, 2, DIRECT) CASE(9, 2, DIRECT) CASE(10, 2, DIRECT)       \
        CASE(11, 2, DIRECT) default: group_tile(12, 2, DIRECT, TILE_ARGS); break;                             \
    }
#define TWO_BLOCK_TILES(DIRECT)                                                                               \
    switch (rows) {                                                                                           \
        CASE(1, 4, DIRECT) CASE(2, 4, DIRECT) CASE(3, 4, DIRECT) CASE(4, 4, DIRECT) CASE(5, 4, DIRECT)        \
        default: group_tile(6, 4, DIRECT, TILE_ARGS); break;                                                  \
    }

/* int4 with vdpbf16ps. x [M][K] bf16, packed and scales as the file's header says, x_sums [M][K / group] float32
 * scratch, y [M][N] bf16 (rounded to nearest even). Requires N % 32 == 0, K % group == 0, group even and
 * <= 2 * MAX_PAIRS (checked by the caller). Every output is the same sequence of float32 operations whatever M,
 * the tile or the thread: a row's result does not depend on the other rows. */
void janus_int4_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                            const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums, uint16_t *y)
{
    const int64_t row_pairs = k_in / 2, pairs = group / 2, groups = k_in / group, blocks = n_out / 32;
    const uint32_t *x_pairs = (const uint32_t *)x;
#pragma omp parallel
    {
        group_sums(x, m_rows * groups, group, x_sums);
        const __m512i table = int4_table();
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
                        bytes[c] = packed + ((first + c) * row_pairs + g * pairs) * 32;
                        sz[c] = scales + ((first + c) * groups + g) * 64;
                    }
                    if (!direct)
                        for (int64_t p = 0; p < pairs; p++)
                            for (int64_t c = 0; c < count; c++) {
                                __m512i *out = &unpacked[vecs * p + 2 * c];
                                unpack_pair(bytes[c] + p * 32, table, out, out + 1);
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

/* ---- AMX variant (Intel Sapphire Rapids and later) ------------------------------------------------------------
 * The same layouts and the same arithmetic per group: the integer-weight sums of a group come from AMX tiles
 * (tdpbf16ps: bf16 products, float32 sums) instead of vdpbf16ps; scale (and zero) are folded in per group with
 * AVX-512 as above. A block's 16-pair step of weights is unpacked into two 16 x 64-byte B tiles (outputs 0..15 and
 * 16..31; a tile row is one input pair of 16 outputs, the pair layout tdpbf16ps reads); x rows go in A tiles of up
 * to 16 rows x 32 inputs, read straight from x. Each row is computed the same way whatever the number of rows.
 * The tile state is process-wide permission (janus_amx_request) and per-thread configuration: every call saves the
 * thread's configuration, loads its own and restores (or releases) it at the end, so torch's and oneDNN's AMX
 * kernels find the state they left. Needs a compiler that knows AMX (gcc 11 / clang 12); without it the symbols
 * are absent and native_bf16.py says so. */
#if defined(__has_include)
#if __has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>)
#define JANUS_HAVE_AMX 1
#endif
#endif

#ifdef JANUS_HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX_PAIRS 16  /* input pairs per tile step (B tile rows) */
#define AMX_ROWS 16   /* rows per A / C tile */

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* 0 when this process may use AMX tile data (asks Linux for it: arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA),
 * else the error number. */
int janus_amx_request(void)
{
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : -1;
}

/* Tiles 0-3: sums of rows 0..15 / 16..31 x outputs 0..15 / 16..31; 4, 5: x of those rows; 6, 7: weights. */
static AMX_TARGET void amx_configure(struct tile_config *cfg, int rows0, int rows1)
{
    for (int i = 0; i < 64; i++)
        ((uint8_t *)cfg)[i] = 0;
    cfg->palette = 1;
    const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, AMX_PAIRS, AMX_PAIRS};
    for (int t = 0; t < 8; t++)
        if (rows[t]) {
            cfg->rows[t] = (uint8_t)rows[t];
            cfg->bytes_per_row[t] = 64;
        }
    _tile_loadconfig(cfg);
}

static inline AMX_TARGET void amx_matmul(
    const int bits, const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
    const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums, uint16_t *y)
{
    const int64_t pairs = group / 2, groups = k_in / group, blocks = n_out / 32, row_pairs = k_in / 2;
    const int64_t pair_bytes = bits * 8, x_stride = k_in * 2;
#pragma omp parallel
    {
        if (bits == 4)
            group_sums(x, m_rows * groups, group, x_sums);
        const __m512i table = int4_table();
        uint16_t weights[2][AMX_PAIRS][32] __attribute__((aligned(64)));
        float tiles[2 * AMX_ROWS][32] __attribute__((aligned(64)));
        float sums[2 * AMX_ROWS][32] __attribute__((aligned(64)));
        struct tile_config saved __attribute__((aligned(64))), cfg __attribute__((aligned(64)));
        _tile_storeconfig(&saved);
        int shape = -1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t m0 = 0; m0 < m_rows; m0 += 2 * AMX_ROWS) {
                const int chunk = (int)(m_rows - m0 < 2 * AMX_ROWS ? m_rows - m0 : 2 * AMX_ROWS);
                const int rows0 = chunk < AMX_ROWS ? chunk : AMX_ROWS, rows1 = chunk - rows0;
                if (shape != chunk) {
                    amx_configure(&cfg, rows0, rows1);
                    shape = chunk;
                }
                for (int r = 0; r < chunk; r++)
                    for (int v = 0; v < 2; v++)
                        _mm512_store_ps(&sums[r][16 * v], _mm512_setzero_ps());
                const uint16_t *x0 = x + m0 * k_in, *x1 = x0 + AMX_ROWS * k_in;
                for (int64_t g = 0; g < groups; g++) {
                    _tile_zero(0);
                    _tile_zero(1);
                    if (rows1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    for (int64_t p0 = g * pairs; p0 < (g + 1) * pairs; p0 += AMX_PAIRS) {
                        const uint8_t *bytes = packed + (b * row_pairs + p0) * pair_bytes;
                        for (int p = 0; p < AMX_PAIRS; p++) {
                            __m512i low, high;
                            if (bits == 4)
                                unpack_pair(bytes + p * pair_bytes, table, &low, &high);
                            else
                                unpack_pair8(bytes + p * pair_bytes, &low, &high);
                            _mm512_store_si512((__m512i *)weights[0][p], low);
                            _mm512_store_si512((__m512i *)weights[1][p], high);
                        }
                        _tile_loadd(6, weights[0], 64);
                        _tile_loadd(7, weights[1], 64);
                        _tile_loadd(4, x0 + 2 * p0, x_stride);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (rows1) {
                            _tile_loadd(5, x1 + 2 * p0, x_stride);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, &tiles[0][0], 128);
                    _tile_stored(1, &tiles[0][16], 128);
                    if (rows1) {
                        _tile_stored(2, &tiles[AMX_ROWS][0], 128);
                        _tile_stored(3, &tiles[AMX_ROWS][16], 128);
                    }
                    const uint16_t *sz = bits == 4 ? scales + (b * groups + g) * 64 : scales + b * 32;
                    for (int v = 0; v < 2; v++) {
                        const __m512 s = bf16x16_to_ps(sz + 16 * v);
                        const __m512 z = bits == 4 ? bf16x16_to_ps(sz + 32 + 16 * v) : _mm512_setzero_ps();
                        for (int r = 0; r < chunk; r++) {
                            __m512 o = _mm512_load_ps(&sums[r][16 * v]);
                            if (bits == 4)
                                o = _mm512_fmadd_ps(z, _mm512_set1_ps(x_sums[(m0 + r) * groups + g]), o);
                            _mm512_store_ps(&sums[r][16 * v], _mm512_fmadd_ps(s, _mm512_load_ps(&tiles[r][16 * v]), o));
                        }
                    }
                }
                for (int r = 0; r < chunk; r++)
                    for (int v = 0; v < 2; v++)
                        _mm256_storeu_si256((__m256i *)(y + (m0 + r) * n_out + b * 32 + v * 16),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(&sums[r][16 * v])));
            }
        }
        if (saved.palette)
            _tile_loadconfig(&saved);
        else
            _tile_release();
    }
}

AMX_TARGET void janus_int4_amx_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                                      const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums,
                                      uint16_t *y)
{
    amx_matmul(4, x, m_rows, k_in, packed, scales, n_out, group, x_sums, y);
}

AMX_TARGET void janus_int8_amx_matmul(const uint16_t *x, int64_t m_rows, int64_t k_in, const uint8_t *packed,
                                      const uint16_t *scales, int64_t n_out, int64_t group, float *x_sums,
                                      uint16_t *y)
{
    amx_matmul(8, x, m_rows, k_in, packed, scales, n_out, group, x_sums, y);
}
#endif
