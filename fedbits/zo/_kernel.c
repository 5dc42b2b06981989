/* fedbits zeroth-order kernels: counter-based directions, fused perturb/update, replay.
 *
 * The direction for a 64-bit key (k0 = low 32 bits, k1 = high 32 bits) gives element i
 * the value TABLE[idx(i)], where, with g = i / 16 and j = i % 16,
 *   c   = g*8 + j%8                         (uint32 counter: 8 hashes per 16 elements)
 *   h   = fmix32(fmix32(c*0x9E3779B9 + k0) ^ k1)          (murmur3's finalizer, twice)
 *   idx = j < 8 ? (h >> 4) & 0xFFF : h >> 20             (two 12-bit indices per hash)
 * Only integer operations decide which of the 4096 table entries an element gets, so
 * every device, dtype and parameter order gives the same direction. fedbits/zo/generator.py
 * holds the same definition in torch operations; the tests check that the two agree.
 *
 * Every kernel works on the flat range [start, start + n) of one parameter, so callers
 * may split a tensor into row chunks or thread slices freely. Compiled with
 * -ffp-contract=off: the float arithmetic is exactly what is written.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 1024 /* elements per working block: its buffers stay in L1 */

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

#ifdef __AVX2__
/* The 8 hashes of group g, as 8 x 32-bit lanes. */
static inline __m256i hash8(uint32_t k0, uint32_t k1, int64_t g) {
    __m256i c = _mm256_add_epi32(_mm256_set1_epi32((int)((uint32_t)g * 8u)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h = _mm256_add_epi32(_mm256_mullo_epi32(c, _mm256_set1_epi32((int)0x9E3779B9u)),
                                 _mm256_set1_epi32((int)k0));
    for (int round = 0; round < 2; round++) {
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
        h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        if (round == 0) h = _mm256_xor_si256(h, _mm256_set1_epi32((int)k1));
    }
    return h;
}

/* Values of elements 0-7 and 8-15 of group g. */
static inline void values16(uint32_t k0, uint32_t k1, int64_t g, const float *table, __m256 *lo, __m256 *hi) {
    __m256i h = hash8(k0, k1, g);
    *lo = _mm256_i32gather_ps(table, _mm256_and_si256(_mm256_srli_epi32(h, 4), _mm256_set1_epi32(0xFFF)), 4);
    *hi = _mm256_i32gather_ps(table, _mm256_srli_epi32(h, 20), 4);
}
#endif

/* The 16 values of group g. */
static inline void gen16(uint32_t k0, uint32_t k1, int64_t g, const float *table, float *out) {
#ifdef __AVX2__
    __m256 lo, hi;
    values16(k0, k1, g, table, &lo, &hi);
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
#else
    uint32_t base = (uint32_t)g * 8u;
    for (int j = 0; j < 8; j++) {
        uint32_t h = fmix32(fmix32((base + (uint32_t)j) * 0x9E3779B9u + k0) ^ k1);
        out[j] = table[(h >> 4) & 0xFFF];
        out[j + 8] = table[h >> 20];
    }
#endif
}

/* out[0..n) = values of elements start..start+n. */
static void gen(uint64_t key, int64_t start, int64_t n, const float *table, float *out) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    float tmp[16];
    int64_t i = 0;
    while (i < n) {
        int64_t e = start + i, off = e & 15;
        if (off == 0 && n - i >= 16) {
            gen16(k0, k1, e >> 4, table, out + i);
            i += 16;
        } else {
            int64_t m = 16 - off < n - i ? 16 - off : n - i;
            gen16(k0, k1, e >> 4, table, tmp);
            memcpy(out + i, tmp + off, (size_t)m * sizeof(float));
            i += m;
        }
    }
}

#ifdef __AVX2__
/* Widen 16 float values to 4 x 4 doubles. */
static inline void widen16(__m256 lo, __m256 hi, __m256d v[4]) {
    v[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(lo));
    v[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1));
    v[2] = _mm256_cvtps_pd(_mm256_castps256_ps128(hi));
    v[3] = _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1));
}
#endif

/* part[0..m) += sum_k coefs[k] * z_k over elements e..e+m for nkeys <= SEEDS_PER_PASS
 * keys, exactly: every product is an integer-valued double and the caller bounds every
 * partial sum below 2^53. Several keys per visit cut the traffic on part[]. */
#define SEEDS_PER_PASS 4
static inline void accumulate(int nkeys, const uint64_t *keys, const double *coefs, int64_t e,
                              int64_t m, const float *table, double *part, float *z) {
    int64_t i = 0;
#ifdef __AVX2__
    if ((e & 15) == 0) {
        for (; i + 16 <= m; i += 16) {
            double *dst = part + i;
            __m256d sum[4] = {_mm256_loadu_pd(dst), _mm256_loadu_pd(dst + 4), _mm256_loadu_pd(dst + 8),
                              _mm256_loadu_pd(dst + 12)};
            for (int k = 0; k < nkeys; k++) {
                __m256 lo, hi;
                __m256d v[4], c = _mm256_set1_pd(coefs[k]);
                values16((uint32_t)keys[k], (uint32_t)(keys[k] >> 32), (e + i) >> 4, table, &lo, &hi);
                widen16(lo, hi, v);
                for (int q = 0; q < 4; q++) sum[q] = _mm256_add_pd(sum[q], _mm256_mul_pd(c, v[q]));
            }
            for (int q = 0; q < 4; q++) _mm256_storeu_pd(dst + 4 * q, sum[q]);
        }
    }
#endif
    for (int k = 0; k < nkeys && i < m; k++) {
        gen(keys[k], e + i, m - i, table, z);
        for (int64_t j = 0; j < m - i; j++) part[i + j] += coefs[k] * (double)z[j];
    }
}

/* Blocks are independent: split them over torch's own OpenMP threads (the .so links
 * the libgomp torch already loaded, so the two never compete for cores). */
#define FOR_BLOCKS(body)                                                      \
    _Pragma("omp parallel for schedule(static) if (n > 4 * BLOCK)")          \
    for (int64_t b = 0; b < n; b += BLOCK) {                                  \
        int64_t m = n - b < BLOCK ? n - b : BLOCK;                            \
        float z[BLOCK];                                                       \
        body                                                                  \
    }

/* out = z */
void zo_fill(uint64_t key, int64_t start, int64_t n, const float *table, float *out) {
    FOR_BLOCKS({
        (void)z;
        gen(key, start + b, m, table, out + b);
    })
}

/* plus = w + eps*z, minus = w - eps*z; w is only read. */
void zo_perturb_pair(uint64_t key, int64_t start, int64_t n, const float *table, float eps,
                     const float *w, float *plus, float *minus) {
    FOR_BLOCKS({
        gen(key, start + b, m, table, z);
        for (int64_t i = 0; i < m; i++) {
            float ez = eps * z[i];
            plus[b + i] = w[b + i] + ez;
            minus[b + i] = w[b + i] - ez;
        }
    })
}

/* w = w - lr*(g*z + wd*w): one SGD step along z, with weight decay. */
void zo_update(uint64_t key, int64_t start, int64_t n, const float *table, float lr, float g,
               float wd, float *w) {
    FOR_BLOCKS({
        gen(key, start + b, m, table, z);
        for (int64_t i = 0; i < m; i++) w[b + i] = w[b + i] - lr * (g * z[i] + wd * w[b + i]);
    })
}

/* zo_update with key_u, then zo_perturb_pair with key_p, in one pass over w. */
void zo_update_perturb(uint64_t key_u, float lr, float g, float wd, uint64_t key_p, float eps,
                       int64_t start, int64_t n, const float *table, float *w, float *plus,
                       float *minus) {
    FOR_BLOCKS({
        float zp[BLOCK];
        gen(key_u, start + b, m, table, z);
        gen(key_p, start + b, m, table, zp);
        for (int64_t i = 0; i < m; i++) {
            float x = w[b + i] - lr * (g * z[i] + wd * w[b + i]);
            float ez = eps * zp[i];
            w[b + i] = x;
            plus[b + i] = x + ez;
            minus[b + i] = x - ez;
        }
    })
}

/* acc += sum_s coefs[s] * 4096 * z_s, exactly. Table values are multiples of 1/4096, so
 * every product is an integer; they are summed in doubles in groups whose total stays
 * below 2^53 (exact), and each group's sum is added to the int64 accumulator. Exact
 * integer arithmetic makes the result independent of seed order and of how the range is
 * split. Each block of acc is read and written once for all seeds. Caller guarantees
 * |coefs[s]| * max|table| * 4096 < 2^53 and passes group_end[] (exclusive seed index where
 * each group ends, ngroups entries). */
void zo_replay(int64_t nseeds, const uint64_t *keys, const int64_t *coefs, int64_t ngroups,
               const int64_t *group_end, int64_t start, int64_t n, const float *table,
               int64_t *acc) {
    (void)nseeds;
    FOR_BLOCKS({
        double part[BLOCK];
        double scaled[SEEDS_PER_PASS];
        uint64_t batch[SEEDS_PER_PASS];
        int64_t s = 0;
        for (int64_t grp = 0; grp < ngroups; grp++) {
            for (int64_t i = 0; i < m; i++) part[i] = 0.0;
            while (s < group_end[grp]) {
                int k = 0;
                for (; k < SEEDS_PER_PASS && s < group_end[grp]; k++, s++) {
                    batch[k] = keys[s];
                    scaled[k] = (double)coefs[s] * 4096.0;
                }
                accumulate(k, batch, scaled, start + b, m, table, part, z);
            }
            for (int64_t i = 0; i < m; i++) acc[b + i] += (int64_t)part[i];
        }
    })
}

/* out = (float)((double)w0 - scale*(double)acc): the one rounding step of a replay. */
void zo_apply(int64_t n, const float *w0, const int64_t *acc, double scale, float *out) {
    FOR_BLOCKS({
        (void)z;
        for (int64_t i = b; i < b + m; i++) {
            double d = scale * (double)acc[i];
            out[i] = (float)((double)w0[i] - d);
        }
    })
}
