/* bf16 matrix-vector product (m = 1) read patterns against the plain read probe, in one
 * process: 256 MiB of bf16 weights (k = 2048), 2 OpenMP threads, best of 5 per variant.
 * Used for BENCHMARKS.md ("bf16 decode as one stream").
 *
 *   gcc -O2 -march=x86-64-v4 -mavx512bf16 -fopenmp tools/probes/gemv_streams.c -o /tmp/gs
 *   /tmp/gs huge    # weights advised for transparent huge pages
 *   /tmp/gs 4k      # 4 KiB pages (where THP is "madvise")
 *
 * Variants:
 *   read        sum of the weights as f32 (tools/probes/read_bandwidth.c's loop)
 *   rows8-cvt   8 rows side by side, bf16 widened to f32, FMA (flexgen-rs before 2026-12-06)
 *   row-cvt     one row at a time, bf16 widened to f32, 4 accumulators
 *   row-dot     one row at a time, x rounded to bf16, vdpbf16ps (flexgen-rs's decode GEMV)
 *   panel-dot   32-row panels of bf16 pairs read in one pass, vdpbf16ps (prepacked layout) */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline __m512 widen(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512bh bh(__m512i v) { return (__m512bh)v; }

static float read_f32(const uint16_t *w, size_t k, size_t r0, size_t r1) {
    const float *a = (const float *)(w + r0 * k);
    size_t n = (r1 - r0) * k / 2;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (size_t i = 0; i < n; i += 32) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

static void rows8_cvt(const uint16_t *w, const float *x, size_t k, float *o, size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; r += 8) {
        __m512 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
        for (size_t p = 0; p < k; p += 16) {
            __m512 xv = _mm512_loadu_ps(x + p);
            for (int i = 0; i < 8; i++) a[i] = _mm512_fmadd_ps(widen(w + (r + i) * k + p), xv, a[i]);
        }
        for (int i = 0; i < 8; i++) o[r + i] = _mm512_reduce_add_ps(a[i]);
    }
}

static void row_cvt(const uint16_t *w, const float *x, size_t k, float *o, size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t p = 0; p < k; p += 64) {
            a0 = _mm512_fmadd_ps(widen(wr + p), _mm512_loadu_ps(x + p), a0);
            a1 = _mm512_fmadd_ps(widen(wr + p + 16), _mm512_loadu_ps(x + p + 16), a1);
            a2 = _mm512_fmadd_ps(widen(wr + p + 32), _mm512_loadu_ps(x + p + 32), a2);
            a3 = _mm512_fmadd_ps(widen(wr + p + 48), _mm512_loadu_ps(x + p + 48), a3);
        }
        o[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}

static void row_dot(const uint16_t *w, const uint16_t *xb, size_t k, float *o, size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (size_t p = 0; p < k; p += 64) {
            a0 = _mm512_dpbf16_ps(a0, bh(_mm512_loadu_si512(wr + p)), bh(_mm512_loadu_si512(xb + p)));
            a1 = _mm512_dpbf16_ps(a1, bh(_mm512_loadu_si512(wr + p + 32)),
                                  bh(_mm512_loadu_si512(xb + p + 32)));
        }
        o[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* Panels of 32 rows: for each pair index j < k/2, 32 words (w[r][2j], w[r][2j+1]). The
 * weights are not repacked here (the timing does not depend on the values). */
static void panel_dot(const uint32_t *w, const uint32_t *xpairs, size_t k, float *o, size_t r0,
                      size_t r1) {
    size_t kp = k / 2;
    for (size_t r = r0; r < r1; r += 32) {
        const uint32_t *pw = w + r * kp;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (size_t j = 0; j < kp; j++) {
            __m512bh xv = bh(_mm512_set1_epi32(xpairs[j]));
            a0 = _mm512_dpbf16_ps(a0, bh(_mm512_loadu_si512(pw + j * 32)), xv);
            a1 = _mm512_dpbf16_ps(a1, bh(_mm512_loadu_si512(pw + j * 32 + 16)), xv);
        }
        _mm512_storeu_ps(o + r, a0);
        _mm512_storeu_ps(o + r + 16, a1);
    }
}

int main(int argc, char **argv) {
    int huge = argc > 1 && strcmp(argv[1], "huge") == 0;
    size_t k = 2048, n = ((size_t)256 << 20) / 2 / k, bytes = n * k * 2;
    uint16_t *w = aligned_alloc(1 << 21, bytes);
    float *x = aligned_alloc(64, k * 4), *o = aligned_alloc(64, n * 4);
    uint16_t *xb = aligned_alloc(64, k * 2);
    if (!w || !x || !o || !xb) return 1;
    if (huge && madvise(w, bytes, MADV_HUGEPAGE) != 0) perror("madvise");
#pragma omp parallel for
    for (size_t i = 0; i < n * k; i++) w[i] = 0x3f80 + (i & 7);
    for (size_t i = 0; i < k; i++) {
        uint32_t u;
        x[i] = 1e-3f * i;
        memcpy(&u, &x[i], 4);
        xb[i] = u >> 16;
    }
    const char *names[] = {"read", "rows8-cvt", "row-cvt", "row-dot", "panel-dot"};
    printf("%s pages:", huge ? "huge" : "4 KiB");
    for (int v = 0; v < 5; v++) {
        double best = 1e9;
        for (int rep = 0; rep < 5; rep++) {
            double t0 = now();
#pragma omp parallel for num_threads(2) schedule(static)
            for (size_t c = 0; c < n; c += 64) {
                size_t e = c + 64 < n ? c + 64 : n;
                switch (v) {
                case 0: o[c] = read_f32(w, k, c, e); break;
                case 1: rows8_cvt(w, x, k, o, c, e); break;
                case 2: row_cvt(w, x, k, o, c, e); break;
                case 3: row_dot(w, xb, k, o, c, e); break;
                default: panel_dot((const uint32_t *)w, (const uint32_t *)xb, k, o, c, e);
                }
            }
            double dt = now() - t0;
            if (dt < best) best = dt;
        }
        printf("  %s %.1f GB/s", names[v], bytes / best / 1e9);
    }
    printf("  (%g)\n", o[n / 2]);
    return 0;
}
