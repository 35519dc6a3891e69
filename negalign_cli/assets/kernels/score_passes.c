/* negalign's CPU passes over a chunk's matmul results, fused: every value is read once, and its
 * exp is summed where it is made (compute/native.py compiles this file with the system's C
 * compiler on first use and calls it through ctypes; without a compiler compute/scores.py runs
 * the same passes with torch operators).
 *
 * Determinism: sums run in LANES fixed accumulators (element j of a run goes to lane j % LANES),
 * reduced in a fixed tree, and the build passes -ffp-contract=off; the polynomials use explicit
 * fma. The results therefore do not depend on the vector width the compiler picks (SSE, AVX2,
 * AVX-512) or on how rows are split between threads.
 *
 * Accuracy (tested against float64 in tests/test_native_passes.py): exp2f below is within 2 ulp
 * of 2^x for -126 <= x < 128 (0 below -126: such a term is < 1.2e-38); exp2d within 2 ulp of
 * 2^x for x >= -1022 (0 below).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
#define LANES64 8

/* LANES-wide vectors (GCC and Clang vector extensions): the compiler maps them onto whatever
 * vector registers the target has, lane for lane, so the sums below keep their order everywhere */
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vfloat load_lanes(const float* p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static const vint LANE_INDEX = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vfloat select_lanes(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

/* the lanes rotated by s (lane l takes lane (l + s) % LANES), for the reductions below */
#if defined(__clang__)
#define ROTATE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define ROTATE(v, ...) __builtin_shuffle(v, (vint){__VA_ARGS__})
#endif

static inline vfloat rotate_lanes(vfloat v, int s) {
    switch (s) {
        case 8: return ROTATE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
        case 4: return ROTATE(v, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3);
        case 2: return ROTATE(v, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1);
        default: return ROTATE(v, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0);
    }
}

/* the lanes' sum and maximum in a fixed tree: lane 0 meets lane 8, then 4, 2 and 1 (lane l
 * holding l and l + 8 after the first step, and so on) */
static inline float sum_lanes(vfloat v) {
    for (int s = LANES / 2; s > 0; s /= 2) v += rotate_lanes(v, s);
    return v[0];
}

static inline float max_lanes(vfloat v) {
    for (int s = LANES / 2; s > 0; s /= 2) {
        vfloat w = rotate_lanes(v, s);
        v = select_lanes(w > v, w, v);
    }
    return v[0];
}

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline double bits_to_double(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static inline uint64_t double_to_bits(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

/* 2^x in float32: 2^n * p(r), n = rint(x), r = x - n in [-0.5, 0.5] (exact), p a degree-6
 * polynomial (Cephes' exp2f coefficients, S. L. Moshier). NaN stays NaN; x > 127 gives inf (also
 * below 2^128: the caller's sum then leaves the safe range and is computed again by torch's
 * shifted log-sum-exp); x < -126 gives 0. */
static inline float exp2f_fast(float x) {
    float c = x > -127.0f ? x : -127.0f; /* NaN becomes -127 here, and NaN again at the end */
    c = c < 127.0f ? c : 127.0f;
    float n = __builtin_rintf(c);
    float r = c - n;
    float p = 1.535336188319500e-4f;
    p = fmaf(p, r, 1.339887440266574e-3f);
    p = fmaf(p, r, 9.618437357674640e-3f);
    p = fmaf(p, r, 5.550332471162809e-2f);
    p = fmaf(p, r, 2.402264791363012e-1f);
    p = fmaf(p, r, 6.931472028550421e-1f);
    p = fmaf(p, r, 1.0f);
    float out = bits_to_float(float_to_bits(p) + ((uint32_t)(int32_t)n << 23));
    out = x < -126.0f ? 0.0f : out;
    out = x > 127.0f ? INFINITY : out;
    return x != x ? x : out;
}

/* 2^x in float64 for x <= 0 (the class terms): 2^n * e^(r ln 2), n = rint(x), r = x - n in
 * [-0.5, 0.5], the exponential by its Taylor series to degree 13 (the remainder is below 5e-18).
 * NaN stays NaN; x < -1022 gives 0. */
static inline double exp2d_nonpositive(double x) {
    double c = x > -1023.0 ? x : -1023.0; /* NaN becomes -1023 here, and NaN again at the end */
    double n = __builtin_rint(c);
    double y = (c - n) * 0.6931471805599453094;
    double p = 1.0 / 6227020800.0;
    p = fma(p, y, 1.0 / 479001600.0);
    p = fma(p, y, 1.0 / 39916800.0);
    p = fma(p, y, 1.0 / 3628800.0);
    p = fma(p, y, 1.0 / 362880.0);
    p = fma(p, y, 1.0 / 40320.0);
    p = fma(p, y, 1.0 / 5040.0);
    p = fma(p, y, 1.0 / 720.0);
    p = fma(p, y, 1.0 / 120.0);
    p = fma(p, y, 1.0 / 24.0);
    p = fma(p, y, 1.0 / 6.0);
    p = fma(p, y, 0.5);
    p = fma(p, y, 1.0);
    p = fma(p, y, 1.0);
    double out = bits_to_double(double_to_bits(p) + ((uint64_t)(int64_t)n << 52));
    out = x < -1022.0 ? 0.0 : out;
    return x != x ? x : out;
}

/* a ranks before b: the larger value, NaN first (as torch.topk), then the smaller index */
static inline int ranks_before(float a, int64_t ia, float b, int64_t ib) {
    if (a != a) return b == b || ia < ib;
    if (b != b) return 0;
    return a > b || (a == b && ia < ib);
}

/* insert (v, i) into the sorted top-k lists if it ranks among them */
static inline void top_insert(float v, int64_t i, int64_t k, float* values, int64_t* indices) {
    if (v < values[k - 1] || !ranks_before(v, i, values[k - 1], indices[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && ranks_before(v, i, values[p - 1], indices[p - 1])) {
        values[p] = values[p - 1];
        indices[p] = indices[p - 1];
        p--;
    }
    values[p] = v;
    indices[p] = i;
}

static inline void top_reset(int64_t k, float* values, int64_t* indices) {
    for (int64_t j = 0; j < k; j++) {
        values[j] = -INFINITY;
        indices[j] = INT64_MAX;
    }
}

/* any lane of v not below `least` (or NaN): a value of the run may enter the top k */
static inline int any_enters(vfloat v, float least) {
    vint enters = ~(v < least);
    int32_t lanes[LANES];
    memcpy(lanes, &enters, sizeof lanes);
    int32_t any = 0;
    for (int l = 0; l < LANES; l++) any |= lanes[l];
    return any != 0;
}

#define RUN (4 * LANES)

/* the top k of values[0..n) by ranks_before, into the sorted lists top/index (indices offset by
 * `offset`); runs of RUN values none of which can enter (the common case once the lists are
 * full: all below the least kept value) are passed over after one vector test */
static void top_k_of(const float* values, int64_t n, int64_t offset, int64_t k, float* top,
                     int64_t* index) {
    int64_t j = 0;
    for (; j + RUN <= n; j += RUN) {
        float least = top[k - 1];
        vfloat run = load_lanes(values + j);
        for (int q = 1; q < RUN / LANES; q++) { /* NaN-preserving: a NaN lane stays NaN */
            vfloat x = load_lanes(values + j + q * LANES);
            run = select_lanes((x > run) | (x != x), x, run);
        }
        if (!any_enters(run, least)) continue;
        for (int l = 0; l < RUN; l++) top_insert(values[j + l], offset + j + l, k, top, index);
    }
    for (; j < n; j++) top_insert(values[j], offset + j, k, top, index);
}

/* Σ e[0..w) in LANES lanes (element j in lane j % LANES), the lanes summed by sum_lanes; e must
 * stay readable for LANES floats past w (the exp buffers are padded) */
static float run_sum(const float* e, int64_t w) {
    vfloat acc = {0};
    int64_t j = 0;
    for (; j + LANES <= w; j += LANES) acc += load_lanes(e + j);
    if (j < w) acc += select_lanes(LANE_INDEX < (int32_t)(w - j), load_lanes(e + j), (vfloat){0});
    return sum_lanes(acc);
}

/* the maximum of v[0..w) (nothing past w is read), NaN ignored: the callers give NaN where the
 * matching sum is NaN, as torch.amax propagates it (a NaN value makes its exp and every sum over
 * it NaN) */
static float run_max(const float* v, int64_t w) {
    vfloat m = (vfloat){0} - INFINITY;
    int64_t j = 0;
    for (; j + LANES <= w; j += LANES) {
        vfloat x = load_lanes(v + j);
        m = select_lanes(x > m, x, m);
    }
    float out = max_lanes(m);
    for (; j < w; j++) out = v[j] > out ? v[j] : out;
    return out;
}

/* 1 when built with OpenMP: the passes then split their rows over the OpenMP threads (torch's
 * own pool when this library resolves to the libgomp torch loaded) */
int negalign_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#ifdef _OPENMP
/* threads for `rows` rows: at most `threads`, and at least 16 rows each */
static int team(int64_t rows, int threads) {
    int64_t most = rows / 16;
    if (threads < 1) threads = 1;
    return (int)(most < 1 ? 1 : (most < threads ? most : threads));
}
#endif

static void class_row(float* pair, int64_t i, int64_t K, float logit_scale, double scale_cos,
                      double scale_logit, float* maxima, double* sums, int64_t k, float* top_values,
                      int64_t* top_indices) {
    float* cos = pair + i * 2 * K;
    float* logit = cos + K;
    for (int64_t j = 0; j < K; j++) logit[j] = cos[j] * logit_scale;
    for (int t = 0; t < 2; t++) {
        const float* v = t == 0 ? cos : logit;
        double scale = t == 0 ? scale_cos : scale_logit;
        float m = run_max(v, K);
        double md = (double)m;
        double acc[LANES64] = {0};
        int64_t j = 0;
        for (; j + LANES64 <= K; j += LANES64)
            for (int l = 0; l < LANES64; l++) acc[l] += exp2d_nonpositive(((double)v[j + l] - md) * scale);
        for (int l = 0; j + l < K; l++) acc[l] += exp2d_nonpositive(((double)v[j + l] - md) * scale);
        for (int s = LANES64 / 2; s > 0; s /= 2)
            for (int l = 0; l < s; l++) acc[l] += acc[l + s];
        maxima[2 * i + t] = acc[0] == acc[0] ? m : NAN;
        sums[2 * i + t] = acc[0];
    }
    float* tv = top_values + i * k;
    int64_t* ti = top_indices + i * k;
    top_reset(k, tv, ti);
    top_k_of(logit, K, 0, k, tv, ti);
}

/* Class terms of rows [0, rows) of a (rows, 2, K) float32 buffer whose [i, 0, :] holds the
 * cosines: [i, 1, :] = logit_scale * cosine (as torch.mul); maxima (rows, 2) the largest cosine
 * and logit; sums (rows, 2) float64 Σ_k 2^((c_k - max c) * scales[0]) and Σ_k 2^((l_k - max l) *
 * scales[1]); the top k logits (values, class indices) by ranks_before (so [i, 0] is the largest
 * logit and the first class holding it). Up to `threads` OpenMP threads. Returns 0. */
int negalign_class_pass(float* pair, int64_t rows, int64_t K, float logit_scale, double scale_cos,
                        double scale_logit, float* maxima, double* sums, int64_t k, float* top_values,
                        int64_t* top_indices, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(team(rows, threads)) schedule(static)
    for (int64_t i = 0; i < rows; i++)
        class_row(pair, i, K, logit_scale, scale_cos, scale_logit, maxima, sums, k, top_values, top_indices);
    return 0;
}

/* one thread's buffers for the negative pass: a row's exp (padded), M2's gathered exp (padded),
 * the best groups */
struct negative_buffers {
    float *e, *gathered, *best;
    int64_t* best_group;
};

static void negative_row(const float* logits, int64_t i, int64_t ld, int64_t M, int64_t kept,
                         int64_t groups, float scale, const int64_t* star, int64_t n_star, float* maxes,
                         float* sums, float* star_sums, int64_t k, float* top_values,
                         int64_t* top_columns, struct negative_buffers* b) {
    int64_t width = kept / groups;
    int64_t star_width = n_star / groups;
    const float* v = logits + i * ld;
    float* mx = maxes + i * groups;
    float* sm = sums + i * groups;
    float* e = b->e;
    for (int64_t j = 0; j < M; j++) e[j] = exp2f_fast(v[j] * scale);
    for (int64_t g = 0; g < groups; g++) {
        sm[g] = run_sum(e + g * width, width);
        mx[g] = sm[g] == sm[g] ? run_max(v + g * width, width) : NAN;
    }
    if (star_sums && n_star > 0) {
        for (int64_t j = 0; j < n_star; j++) b->gathered[j] = e[star[j]];
        float* ss = star_sums + i * groups;
        for (int64_t g = 0; g < groups; g++) ss[g] = run_sum(b->gathered + g * star_width, star_width);
    }
    if (k > 0) {
        float* tv = top_values + i * k;
        int64_t* tc = top_columns + i * k;
        int64_t runs = k < groups ? k : groups;
        top_reset(runs, b->best, b->best_group);
        top_k_of(mx, groups, 0, runs, b->best, b->best_group);
        top_reset(k, tv, tc);
        for (int64_t r = 0; r < runs; r++) {
            int64_t g = b->best_group[r];
            top_k_of(v + g * width, width, g * width, k, tv, tc);
        }
        top_k_of(v + kept, M - kept, kept, k, tv, tc);
    }
}

/* Negative terms of rows [0, rows) of a (rows, ld) float32 buffer of negative logits (M columns
 * used, the first `kept` in `groups` runs of kept / groups): maxes (rows, groups) each run's
 * maximum; sums (rows, groups) each run's Σ 2^(l * scale); with star (n_star column indices, in
 * their group order), star_sums (rows, groups) the same sums over runs of n_star / groups of
 * those columns; with k > 0, the top k logits (values, columns) by ranks_before, found among the
 * k runs of largest maxima (ranks_before on the maxima) and the columns after `kept`. Up to
 * `threads` OpenMP threads. Returns 0, or -1 if memory ran out. */
int negalign_negative_pass(const float* logits, int64_t rows, int64_t ld, int64_t M, int64_t kept,
                           int64_t groups, float scale, const int64_t* star, int64_t n_star,
                           float* maxes, float* sums, float* star_sums, int64_t k, float* top_values,
                           int64_t* top_columns, int threads) {
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(team(rows, threads)) reduction(| : failed)
    {
        struct negative_buffers b;
        b.e = malloc(sizeof(float) * (size_t)(M + LANES));
        b.gathered = malloc(sizeof(float) * (size_t)(n_star + LANES));
        b.best = malloc(sizeof(float) * (size_t)(k > 0 ? k : 1));
        b.best_group = malloc(sizeof(int64_t) * (size_t)(k > 0 ? k : 1));
        int ok = b.e && b.gathered && b.best && b.best_group;
        if (ok)
            for (int l = 0; l < LANES; l++) b.e[M + l] = b.gathered[n_star + l] = 0.0f;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (!ok) {
                failed = 1;
                continue;
            }
            negative_row(logits, i, ld, M, kept, groups, scale, star, n_star, maxes, sums, star_sums, k,
                         top_values, top_columns, &b);
        }
        free(b.e);
        free(b.gathered);
        free(b.best);
        free(b.best_group);
    }
    return failed ? -1 : 0;
}
