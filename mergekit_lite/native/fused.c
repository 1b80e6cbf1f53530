/* mergekit_lite._fused: one pass per entry for the methods whose output is a fixed linear combination of their inputs
 * (task arithmetic, linear). The torch path makes a pass per operation per model (convert, check, subtract,
 * accumulate), each streaming float32 chunks through the caches; here every input is read once, from its stored
 * bytes, and each entry goes through the same float32 operations in the same order (products added with fused
 * multiply-add where torch's add(alpha=) does), so the bytes written are the torch path's. The Python side checks
 * that at run time on a sample before it uses this, and falls back to torch where they differ.
 * Also the float64 Gram matrix of stored inputs (slerp, Model Stock, Multi-SLERP), summed in its own fixed order, and
 * DARE: its keep draws (numpy's PCG64DXSM words and the tie words of ops/sparsify.dare_mask, bit for bit), the L1
 * norms of its first pass, and the masked, rescaled task vectors of its combination; and the one-pass bracket counts
 * of exact order statistics; SCE's variance across tasks (torch.var's float64 Welford updates, bit for bit).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#define HAVE_PREAD 1
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#else
#define HAVE_PREAD 0
#endif
/* a call's chunks on threads of its own (pthreads, where files are read with pread: Unix); elsewhere one by one */
#define HAVE_THREADS HAVE_PREAD
#define MAX_THREADS 64

enum { KIND_F32 = 0, KIND_BF16 = 1 };
/* x86-64 with GCC or clang: AVX2 + FMA versions beside the portable ones, chosen at run time */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86_DISPATCH 1
#include <immintrin.h>
#else
#define X86_DISPATCH 0
#endif
#define BLOCK 1024
#define MAX_INPUTS 4096

/* Entries [0, n) of one stored input as float32 into dst; nonzero when any of them is NaN or infinite. */
static inline __attribute__((always_inline)) int to_float(const void *src, int kind, Py_ssize_t n, float *dst) {
    uint32_t special = 0;
    if (kind == KIND_BF16) {
        const uint16_t *h = (const uint16_t *)src;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t u = (uint32_t)h[j] << 16;
            special |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
            memcpy(&dst[j], &u, 4);
        }
    } else {
        const uint32_t *w = (const uint32_t *)src;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t u = w[j];
            special |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
            memcpy(&dst[j], &u, 4);
        }
    }
    return special != 0;
}

/* float32 -> stored kind; bfloat16 rounds to nearest even (NaN stays a quiet NaN), as torch converts. */
static inline __attribute__((always_inline)) void store(const float *src, Py_ssize_t n, void *dst, int kind) {
    if (kind == KIND_BF16) {
        uint16_t *h = (uint16_t *)dst;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t u;
            memcpy(&u, &src[j], 4);
            uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
            h[j] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded);
        }
    } else {
        memcpy(dst, src, (size_t)n * 4);
    }
}

/* ---- DARE's draws: numpy's PCG64DXSM stream, 16-bit words, and the tie words (ops/sparsify.dare_mask) ---- */
#define DXSM_MULTIPLIER 0xda942042e4dd58b5ULL
typedef unsigned __int128 u128;

typedef struct {
    u128 state, inc; /* the generator's 128-bit state and increment, as numpy keeps them */
    uint64_t left;   /* words of the last output not handed out yet, lowest first */
    int nleft;
    u128 jump_mult, jump_plus; /* state -> jump_mult * state + jump_plus: JUMP outputs ahead */
} Stream;

/* a block of BLOCK words is drawn as four runs of JUMP outputs, each from the state JUMP outputs after the last's,
 * stepped side by side: four independent multiply chains instead of one (the same words, in the same places) */
#define JUMP (BLOCK / 16)

/* numpy's pcg_cm_random_r: the DXSM output of the state before the step, then the cheap-multiplier step */
static inline uint64_t dxsm_next(Stream *s) {
    uint64_t hi = (uint64_t)(s->state >> 64), lo = (uint64_t)s->state | 1u;
    hi ^= hi >> 32;
    hi *= DXSM_MULTIPLIER;
    hi ^= hi >> 48;
    hi *= lo;
    s->state = s->state * (u128)DXSM_MULTIPLIER + s->inc;
    return hi;
}

/* (mult, plus) with state -> mult * state + plus the step `delta` times (Brown's jump-ahead for an LCG, as numpy's
 * advance) */
static void dxsm_jump(u128 inc, uint64_t delta, u128 *mult, u128 *plus) {
    u128 acc_mult = 1, acc_plus = 0, cur_mult = DXSM_MULTIPLIER, cur_plus = inc;
    while (delta > 0) {
        if (delta & 1) {
            acc_mult *= cur_mult;
            acc_plus = acc_plus * cur_mult + cur_plus;
        }
        cur_plus = (cur_mult + 1) * cur_plus;
        cur_mult *= cur_mult;
        delta >>= 1;
    }
    *mult = acc_mult;
    *plus = acc_plus;
}

static u128 dxsm_advance(u128 state, u128 inc, uint64_t delta) {
    u128 mult, plus;
    dxsm_jump(inc, delta, &mult, &plus);
    return mult * state + plus;
}

static inline uint64_t dxsm_output(u128 state) {
    uint64_t hi = (uint64_t)(state >> 64), lo = (uint64_t)state | 1u;
    hi ^= hi >> 32;
    hi *= DXSM_MULTIPLIER;
    hi ^= hi >> 48;
    return hi * lo;
}

static inline void put_words(uint16_t *dst, uint64_t v) {
    dst[0] = (uint16_t)v;
    dst[1] = (uint16_t)(v >> 16);
    dst[2] = (uint16_t)(v >> 32);
    dst[3] = (uint16_t)(v >> 48);
}

/* BLOCK words from a stream at an output's start (no words left over): four runs of JUMP outputs side by side */
static inline void block_words(Stream *s, uint16_t *dst) {
    const u128 m = DXSM_MULTIPLIER, inc = s->inc;
    u128 s0 = s->state, s1 = s->jump_mult * s0 + s->jump_plus, s2 = s->jump_mult * s1 + s->jump_plus, s3 = s->jump_mult * s2 + s->jump_plus;
    for (int i = 0; i < JUMP; i++) {
        put_words(dst + 4 * i, dxsm_output(s0));
        put_words(dst + 4 * (JUMP + i), dxsm_output(s1));
        put_words(dst + 4 * (2 * JUMP + i), dxsm_output(s2));
        put_words(dst + 4 * (3 * JUMP + i), dxsm_output(s3));
        s0 = s0 * m + inc;
        s1 = s1 * m + inc;
        s2 = s2 * m + inc;
        s3 = s3 * m + inc;
    }
    s->state = s3;
}

/* the stream positioned at 16-bit word `first` (word j: bits 16 (j mod 4) up of output j / 4) */
static void stream_at(Stream *s, u128 state, u128 inc, uint64_t first) {
    s->state = dxsm_advance(state, inc, first / 4);
    s->inc = inc;
    dxsm_jump(inc, JUMP, &s->jump_mult, &s->jump_plus);
    s->nleft = 0;
    if (first % 4) {
        s->left = dxsm_next(s) >> (16 * (first % 4));
        s->nleft = (int)(4 - first % 4);
    }
}

static inline void next_words(Stream *s, uint16_t *dst, Py_ssize_t n) {
    if (n == BLOCK && s->nleft == 0) {
        block_words(s, dst);
        return;
    }
    Py_ssize_t j = 0;
    for (; s->nleft > 0 && j < n; s->nleft--, s->left >>= 16) dst[j++] = (uint16_t)s->left;
    for (; j + 4 <= n; j += 4) {
        uint64_t v = dxsm_next(s);
        dst[j] = (uint16_t)v;
        dst[j + 1] = (uint16_t)(v >> 16);
        dst[j + 2] = (uint16_t)(v >> 32);
        dst[j + 3] = (uint16_t)(v >> 48);
    }
    if (j < n) {
        s->left = dxsm_next(s);
        s->nleft = 4;
        for (; j < n; s->nleft--, s->left >>= 16) dst[j++] = (uint16_t)s->left;
    }
}

/* the low half of entry j's 32-bit uniform: SplitMix64 of key + (j + 1) * golden gamma, low 16 bits (tie_words) */
static inline uint32_t tie_word(uint64_t key, uint64_t j) {
    uint64_t z = (j + 1) * 0x9E3779B97F4A7C15ULL + key;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (uint32_t)(z & 0xFFFFu);
}

enum { SCALE_NONE = 0, SCALE_MUL = 1, SCALE_DIV = 2 };
typedef struct {
    int draws;         /* 0: every entry kept; else entry j kept iff its 32-bit uniform < ceiling */
    u128 state, inc;   /* the tensor's generator where its draws start (entry 0) */
    uint64_t key;      /* its tie key */
    uint64_t ceiling;  /* ceil(density * 2^32); above 2^32 - 1 every entry is kept */
    int scale;         /* SCALE_*: survivors multiplied or divided by `by` (float32), or left */
    float by;
    const uint8_t *bits_in; /* NULL, or the call's keep-mask, one bit per entry (LSB first), used instead of drawing */
    const float *gate;      /* NULL, or per entry of the call a float32 that keeps the entry where it is >= gate_min */
    float gate_min;
    uint8_t *bits_out;      /* NULL, or where the drawn keep-mask goes, as bits_in reads it */
    Stream stream;     /* working state: where the draws are */
} Keep;

/* keep[j] = 1.0f or 0.0f for the call's entries i0 .. i0 + m - 1 (flat index first + i0 + j in the tensor; the stream
 * there): read from bits_in, or drawn (then written to bits_out, where given). m is a multiple of 8 but in the last
 * block, and keep has room for m rounded up to LANES entries. */
/* the eight keep values of each mask byte (bit b: entry b), filled at module load */
static float keep_of_byte[256][8];

static void fill_keep_of_byte(void) {
    for (int v = 0; v < 256; v++)
        for (int bit = 0; bit < 8; bit++) keep_of_byte[v][bit] = (float)((v >> bit) & 1);
}

#if X86_DISPATCH
/* the whole bytes of pack_keep, eight entries per vector comparison */
__attribute__((target("avx2,fma"))) static Py_ssize_t pack_keep_avx2(const float *keep, Py_ssize_t m, uint8_t *dst) {
    Py_ssize_t byte = 0;
    for (; byte < m / 8; byte++)
        dst[byte] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(keep + 8 * byte), _mm256_setzero_ps(), _CMP_NEQ_OQ));
    return byte;
}
#endif

/* dst's bits (LSB first) = keep[0 .. m - 1] != 0 */
static inline __attribute__((always_inline)) void pack_keep(const float *keep, Py_ssize_t m, uint8_t *dst, int avx2) {
    Py_ssize_t byte = 0;
#if X86_DISPATCH
    if (avx2) byte = pack_keep_avx2(keep, m, dst);
#else
    (void)avx2;
#endif
    for (; byte < (m + 7) / 8; byte++) {
        unsigned v = 0;
        for (int bit = 0; bit < 8 && byte * 8 + bit < m; bit++) v |= (unsigned)(keep[byte * 8 + bit] != 0.0f) << bit;
        dst[byte] = (uint8_t)v;
    }
}

static inline __attribute__((always_inline)) void keep_block(Keep *k, Py_ssize_t first, Py_ssize_t i0, Py_ssize_t m, float *keep, int avx2) {
    if (k->gate != NULL) { /* Arcee Fusion: importance >= threshold (a NaN keeps nothing, as torch's comparison) */
        const float *g = k->gate + i0;
        for (Py_ssize_t j = 0; j < m; j++) keep[j] = g[j] >= k->gate_min ? 1.0f : 0.0f;
        return;
    }
    if (k->bits_in != NULL) {
        const uint8_t *src = k->bits_in + i0 / 8;
        Py_ssize_t whole = m / 8;
        for (Py_ssize_t byte = 0; byte < whole; byte++) memcpy(keep + 8 * byte, keep_of_byte[src[byte]], sizeof(keep_of_byte[0]));
        for (Py_ssize_t j = whole * 8; j < m; j++) keep[j] = (float)((src[j >> 3] >> (j & 7)) & 1u);
        return;
    }
    if (!k->draws || k->ceiling > 0xFFFFFFFFull) {
        for (Py_ssize_t j = 0; j < m; j++) keep[j] = 1.0f;
    } else {
        uint16_t h[BLOCK];
        next_words(&k->stream, h, m);
        const uint16_t high = (uint16_t)(k->ceiling >> 16), low = (uint16_t)(k->ceiling & 0xFFFFu);
        int ties = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            keep[j] = h[j] < high ? 1.0f : 0.0f;
            ties |= h[j] == high;
        }
        if (low && ties) /* about one block in 64: the low half decides where the high half is the threshold's */
            for (Py_ssize_t j = 0; j < m; j++)
                if (h[j] == high && tie_word(k->key, (uint64_t)(first + i0 + j)) < low) keep[j] = 1.0f;
    }
    if (k->bits_out != NULL) pack_keep(keep, m, k->bits_out + i0 / 8, avx2);
}

/* acc (t == 0: =, else fma) += w * rescaled(keep * (x - b)), as Kept.apply then the weighted sum; the constant
 * arguments make one loop per case */
static inline __attribute__((always_inline)) void masked_accumulate(const float *x, const float *b, const float *keep, int scale, float by,
                                                                    float w, int first_task, float *acc, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) {
        float v = (x[j] - b[j]) * keep[j];
        if (scale == SCALE_MUL) v = v * by;
        if (scale == SCALE_DIV) v = v / by;
        acc[j] = first_task ? v * w : fmaf(v, w, acc[j]);
    }
}

typedef struct {
    void *out;
    int out_kind;
    Py_ssize_t n;
    const void *base; /* NULL: the inputs are combined as they are (linear); else their differences from it */
    int base_kind;
    Py_ssize_t count;
    const void **inputs;
    const int *kinds;
    const float *weights;
    float divisor; /* 0: none */
    float lam;     /* with a base: out = base + lam * combination */
    int rounded;   /* weights only: each product rounded, then added (torch's mul_ then add_) instead of fma */
    Keep *keeps;   /* NULL, or per input (task vectors only): which entries survive and how they are rescaled */
    Py_ssize_t first; /* the flat index of entry 0 in the whole tensor (where the keeps' draws start) */
    int has_post;     /* the combination multiplied by post (rounded) before the base is added */
    float post;
    int given;        /* with a base: the inputs are task vectors already (a sum of them): the base is added, not taken off */
} Job;

/* -1 when every input entry is finite, else the first input (0 the base when there is one, then 1 + model) with a
 * NaN or infinite entry. */
static inline __attribute__((always_inline)) Py_ssize_t combine_body(const Job *job, int avx2) {
    float b[BLOCK], x[BLOCK], acc[BLOCK], keep[BLOCK];
    Py_ssize_t first_bad = -1;
    if (job->keeps != NULL)
        for (Py_ssize_t t = 0; t < job->count; t++)
            if (job->keeps[t].draws) stream_at(&job->keeps[t].stream, job->keeps[t].state, job->keeps[t].inc, (uint64_t)job->first);
    for (Py_ssize_t i0 = 0; i0 < job->n; i0 += BLOCK) {
        Py_ssize_t m = job->n - i0 < BLOCK ? job->n - i0 : BLOCK;
        if (job->base != NULL) {
            size_t size = job->base_kind == KIND_BF16 ? 2 : 4;
            if (to_float((const char *)job->base + (size_t)i0 * size, job->base_kind, m, b) && first_bad < 0)
                first_bad = 0;
        }
        for (Py_ssize_t t = 0; t < job->count; t++) {
            size_t size = job->kinds[t] == KIND_BF16 ? 2 : 4;
            if (to_float((const char *)job->inputs[t] + (size_t)i0 * size, job->kinds[t], m, x) && (first_bad < 0 || first_bad > t + 1))
                first_bad = t + 1;
            const float w = job->weights[t];
            if (job->keeps != NULL) {
                /* DARE: tau = x - base, times 1 or 0 (a dropped entry becomes +-0), then rescaled, as Kept.apply */
                Keep *k = &job->keeps[t];
                keep_block(k, job->first, i0, m, keep, avx2);
                switch (k->scale * 2 + (t == 0)) {
                case SCALE_NONE * 2: masked_accumulate(x, b, keep, SCALE_NONE, 0.0f, w, 0, acc, m); break;
                case SCALE_NONE * 2 + 1: masked_accumulate(x, b, keep, SCALE_NONE, 0.0f, w, 1, acc, m); break;
                case SCALE_MUL * 2: masked_accumulate(x, b, keep, SCALE_MUL, k->by, w, 0, acc, m); break;
                case SCALE_MUL * 2 + 1: masked_accumulate(x, b, keep, SCALE_MUL, k->by, w, 1, acc, m); break;
                case SCALE_DIV * 2: masked_accumulate(x, b, keep, SCALE_DIV, k->by, w, 0, acc, m); break;
                default: masked_accumulate(x, b, keep, SCALE_DIV, k->by, w, 1, acc, m); break;
                }
            } else if (job->base != NULL && job->given) {
                /* task vectors as they are: the first scaled (mul), the rest accumulated (fma) */
                if (t == 0)
                    for (Py_ssize_t j = 0; j < m; j++) acc[j] = x[j] * w;
                else
                    for (Py_ssize_t j = 0; j < m; j++) acc[j] = fmaf(x[j], w, acc[j]);
            } else if (job->base != NULL) {
                /* task vectors: tau = x - base; the first is scaled (mul), the rest accumulated (fma) */
                if (t == 0)
                    for (Py_ssize_t j = 0; j < m; j++) acc[j] = (x[j] - b[j]) * w;
                else
                    for (Py_ssize_t j = 0; j < m; j++) acc[j] = fmaf(x[j] - b[j], w, acc[j]);
            } else {
                if (job->rounded) {
                    /* weights, products rounded: x_0 w_0, then + x_t w_t */
                    if (t == 0)
                        for (Py_ssize_t j = 0; j < m; j++) acc[j] = x[j] * w;
                    else
                        for (Py_ssize_t j = 0; j < m; j++) acc[j] = acc[j] + x[j] * w;
                } else {
                    /* weights: a running sum from zero, each added with fma */
                    if (t == 0)
                        for (Py_ssize_t j = 0; j < m; j++) acc[j] = fmaf(x[j], w, 0.0f);
                    else
                        for (Py_ssize_t j = 0; j < m; j++) acc[j] = fmaf(x[j], w, acc[j]);
                }
            }
        }
        if (job->divisor != 0.0f)
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = acc[j] / job->divisor;
        if (job->has_post)
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = acc[j] * job->post;
        if (job->base != NULL)
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = fmaf(acc[j], job->lam, b[j]);
        store(acc, m, (char *)job->out + (size_t)i0 * (job->out_kind == KIND_BF16 ? 2 : 4), job->out_kind);
    }
    return first_bad;
}

static Py_ssize_t combine_generic(const Job *job) { return combine_body(job, 0); }

#if X86_DISPATCH
__attribute__((target("avx2,fma"))) static Py_ssize_t combine_avx2(const Job *job) { return combine_body(job, 1); }
static int has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

/* set by tests (_max_isa): 0 the portable versions, 1 at most AVX2, 2 (the default) the fastest the CPU has */
static int max_isa = 2;

/* whether to run the AVX2 + FMA versions (the CPU has them, tests have not asked for the portable ones) */
static int use_avx2(void) {
#if X86_DISPATCH
    static int avx2 = -1;
    if (avx2 < 0) avx2 = has_avx2_fma();
    return avx2 && max_isa >= 1;
#else
    return 0;
#endif
}

#if X86_DISPATCH
#define AVX512 "avx512f,avx512dq,avx512bw,avx2,fma"
/* whether to run the AVX-512 versions (F, DQ and BW, with the OS saving their registers: GCC's check includes it) */
static int use_avx512(void) {
    static int avx512 = -1;
    if (avx512 < 0) {
        __builtin_cpu_init();
        avx512 = has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    }
    return avx512 && max_isa >= 2;
}
#endif

static Py_ssize_t combine(const Job *job) {
#if X86_DISPATCH
    if (use_avx2()) return combine_avx2(job);
#endif
    return combine_generic(job);
}

typedef struct {
    Py_ssize_t n;
    const void *base; /* NULL: the inputs themselves; else their differences from it */
    int base_kind;
    Py_ssize_t count;
    const void **inputs;
    const int *kinds;
    double *scratch; /* count * BLOCK doubles (then count * count * LANES for gram_avx512) */
    double *gram;    /* count * count, added to */
    float *sum;     /* NULL, or where sum_t x_t goes (x_0, then + x_t in order: torch's copy_ then add_) */
    int diagonal;   /* only the squared norms (the diagonal; the rest stays 0) */
} GramJob;

/* gram[i][j] += sum over entries of x_i x_j (x the float32 inputs or their differences from the base), each product
 * exact in float64 and added with one rounding (fma), sixteen partial sums per pair per block: a fixed order.
 * Returns as combine_body does. */
#define LANES 16

/* sum_j a_j b_j over [0, padded) (a multiple of LANES): lane l adds the products of entries j = l mod LANES with fma,
 * then the lanes are added pairwise. The AVX2 version makes the same operations four lanes at a time. */
static inline double lanes_total(const double *lane) {
    double half[LANES / 2];
    for (int l = 0; l < LANES / 2; l++) half[l] = lane[l] + lane[l + LANES / 2];
    return ((half[0] + half[4]) + (half[2] + half[6])) + ((half[1] + half[5]) + (half[3] + half[7]));
}

static double dot_generic(const double *a, const double *b, Py_ssize_t padded) {
    double lane[LANES] = {0.0};
    for (Py_ssize_t j = 0; j < padded; j += LANES)
        for (int l = 0; l < LANES; l++) lane[l] = fma(a[j + l], b[j + l], lane[l]);
    return lanes_total(lane);
}

#if X86_DISPATCH
/* sixteen lanes from four vectors of four */
__attribute__((target("avx2,fma"))) static inline void store_lanes(double *lane, __m256d v0, __m256d v1, __m256d v2, __m256d v3) {
    _mm256_storeu_pd(lane, v0);
    _mm256_storeu_pd(lane + 4, v1);
    _mm256_storeu_pd(lane + 8, v2);
    _mm256_storeu_pd(lane + 12, v3);
}

__attribute__((target("avx2,fma"))) static double dot_avx2(const double *a, const double *b, Py_ssize_t padded) {
    __m256d v0 = _mm256_setzero_pd(), v1 = _mm256_setzero_pd(), v2 = _mm256_setzero_pd(), v3 = _mm256_setzero_pd();
    for (Py_ssize_t j = 0; j < padded; j += LANES) {
        v0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j), _mm256_loadu_pd(b + j), v0);
        v1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j + 4), _mm256_loadu_pd(b + j + 4), v1);
        v2 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j + 8), _mm256_loadu_pd(b + j + 8), v2);
        v3 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j + 12), _mm256_loadu_pd(b + j + 12), v3);
    }
    double lane[LANES];
    store_lanes(lane, v0, v1, v2, v3);
    return lanes_total(lane);
}

/* dot_avx2(a, b, ...) and dot_avx2(a, c, ...) at once: a's entries loaded once for both (the same operations) */
__attribute__((target("avx2,fma"))) static void dot2_avx2(const double *a, const double *b, const double *c, Py_ssize_t padded,
                                                         double *ab, double *ac) {
    __m256d b0 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd(), b2 = _mm256_setzero_pd(), b3 = _mm256_setzero_pd();
    __m256d c0 = _mm256_setzero_pd(), c1 = _mm256_setzero_pd(), c2 = _mm256_setzero_pd(), c3 = _mm256_setzero_pd();
    for (Py_ssize_t j = 0; j < padded; j += LANES) {
        __m256d a0 = _mm256_loadu_pd(a + j), a1 = _mm256_loadu_pd(a + j + 4);
        __m256d a2 = _mm256_loadu_pd(a + j + 8), a3 = _mm256_loadu_pd(a + j + 12);
        b0 = _mm256_fmadd_pd(a0, _mm256_loadu_pd(b + j), b0);
        b1 = _mm256_fmadd_pd(a1, _mm256_loadu_pd(b + j + 4), b1);
        b2 = _mm256_fmadd_pd(a2, _mm256_loadu_pd(b + j + 8), b2);
        b3 = _mm256_fmadd_pd(a3, _mm256_loadu_pd(b + j + 12), b3);
        c0 = _mm256_fmadd_pd(a0, _mm256_loadu_pd(c + j), c0);
        c1 = _mm256_fmadd_pd(a1, _mm256_loadu_pd(c + j + 4), c1);
        c2 = _mm256_fmadd_pd(a2, _mm256_loadu_pd(c + j + 8), c2);
        c3 = _mm256_fmadd_pd(a3, _mm256_loadu_pd(c + j + 12), c3);
    }
    double lane[LANES];
    store_lanes(lane, b0, b1, b2, b3);
    *ab = lanes_total(lane);
    store_lanes(lane, c0, c1, c2, c3);
    *ac = lanes_total(lane);
}
#endif

static inline __attribute__((always_inline)) Py_ssize_t gram_body(const GramJob *job, int avx2) {
    float b[BLOCK], x[BLOCK];
    Py_ssize_t first_bad = -1;
    const Py_ssize_t K = job->count;
    double *xd = job->scratch; /* K * BLOCK doubles: the block's vectors, converted once */
    for (Py_ssize_t i0 = 0; i0 < job->n; i0 += BLOCK) {
        Py_ssize_t m = job->n - i0 < BLOCK ? job->n - i0 : BLOCK;
        if (job->base != NULL) {
            size_t size = job->base_kind == KIND_BF16 ? 2 : 4;
            if (to_float((const char *)job->base + (size_t)i0 * size, job->base_kind, m, b) && first_bad < 0)
                first_bad = 0;
        }
        float *s = job->sum != NULL ? job->sum + i0 : NULL;
        for (Py_ssize_t t = 0; t < K; t++) {
            double *d = xd + (size_t)t * BLOCK;
            size_t size = job->kinds[t] == KIND_BF16 ? 2 : 4;
            if (to_float((const char *)job->inputs[t] + (size_t)i0 * size, job->kinds[t], m, x) && (first_bad < 0 || first_bad > t + 1))
                first_bad = t + 1;
            if (job->base != NULL)
                for (Py_ssize_t j = 0; j < m; j++) {
                    x[j] = x[j] - b[j];
                    d[j] = (double)x[j];
                }
            else
                for (Py_ssize_t j = 0; j < m; j++) d[j] = (double)x[j];
            for (Py_ssize_t j = m; j < (m + LANES - 1) / LANES * LANES; j++) d[j] = 0.0; /* the last lanes' padding */
            if (s != NULL) {
                if (t == 0)
                    memcpy(s, x, (size_t)m * sizeof(float));
                else
                    for (Py_ssize_t j = 0; j < m; j++) s[j] = s[j] + x[j];
            }
        }
        Py_ssize_t padded = (m + LANES - 1) / LANES * LANES;
        for (Py_ssize_t p = 0; p < K; p++) {
            const double *xp = xd + (size_t)p * BLOCK;
            const Py_ssize_t end = job->diagonal ? p + 1 : K; /* the pairs (p, q), q from p to end - 1 */
            Py_ssize_t q = p;
#if X86_DISPATCH
            if (avx2) {
                for (; q + 2 <= end; q += 2) {  /* two pairs per pass over x_p */
                    double first, second;
                    dot2_avx2(xp, xd + (size_t)q * BLOCK, xd + (size_t)(q + 1) * BLOCK, padded, &first, &second);
                    job->gram[p * K + q] += first;
                    job->gram[p * K + q + 1] += second;
                }
                for (; q < end; q++) job->gram[p * K + q] += dot_avx2(xp, xd + (size_t)q * BLOCK, padded);
            }
#else
            (void)avx2;
#endif
            for (; q < end; q++) job->gram[p * K + q] += dot_generic(xp, xd + (size_t)q * BLOCK, padded);
        }
    }
    for (Py_ssize_t p = 0; p < K; p++)
        for (Py_ssize_t q = 0; q < p; q++) job->gram[p * K + q] = job->gram[q * K + p];
    return first_bad;
}

static Py_ssize_t gram_generic(const GramJob *job) { return gram_body(job, 0); }

#if X86_DISPATCH
__attribute__((target("avx2,fma"))) static Py_ssize_t gram_avx2(const GramJob *job) { return gram_body(job, 1); }
#endif

#if X86_DISPATCH
/* gram_body with AVX-512: the same float32 operations in the conversion, and each pair's sixteen lanes in two
 * registers of eight, so that a tile of up to 3 x 4 pairs keeps its sums in registers and loads each operand once per
 * sixteen entries for the tile (gram_body's dot2_avx2 loads three per two products): the same sums, lane for lane. */
__attribute__((target(AVX512))) static inline __m512 bits_avx512(const void *src, int kind, Py_ssize_t j, __mmask16 *special) {
    __m512i u = kind == KIND_BF16 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + j))), 16)
                                  : _mm512_loadu_si512((const void *)((const float *)src + j));
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    *special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exponent), exponent);
    return _mm512_castsi512_ps(u);
}

/* the pairs (p0 + r, q0 + c), r < R, c < C: their sixteen lanes (lanes[pair * 16], pair = p * K + q) go on adding the
 * products of the stretch's padded entries, in order. upper (a tile on the diagonal, q0 == p0): only the pairs with
 * c >= r, the others being theirs mirrored (no product made twice) */
#define SKIPPED(r, c) (upper && (c) < (r))
__attribute__((target(AVX512))) static inline __attribute__((always_inline)) void tile_avx512(const float *xf, Py_ssize_t stride, Py_ssize_t K,
                                                                                            Py_ssize_t p0, int R, Py_ssize_t q0, int C, int upper,
                                                                                            Py_ssize_t padded, double *lanes) {
    __m512d acc[3][4][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            if (SKIPPED(r, c)) continue;
            const double *lane = lanes + (size_t)((p0 + r) * K + q0 + c) * LANES;
            acc[r][c][0] = _mm512_loadu_pd(lane);
            acc[r][c][1] = _mm512_loadu_pd(lane + 8);
        }
    for (Py_ssize_t j = 0; j < padded; j += LANES)
        for (int h = 0; h < 2; h++) {
            __m512d row[3];
            for (int r = 0; r < R; r++) row[r] = _mm512_cvtps_pd(_mm256_loadu_ps(xf + (size_t)(p0 + r) * stride + j + 8 * h));
            for (int c = 0; c < C; c++) {
                __m512d col = _mm512_cvtps_pd(_mm256_loadu_ps(xf + (size_t)(q0 + c) * stride + j + 8 * h));
                for (int r = 0; r < R; r++)
                    if (!SKIPPED(r, c)) acc[r][c][h] = _mm512_fmadd_pd(row[r], col, acc[r][c][h]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            if (SKIPPED(r, c)) continue;
            double *lane = lanes + (size_t)((p0 + r) * K + q0 + c) * LANES;
            _mm512_storeu_pd(lane, acc[r][c][0]);
            _mm512_storeu_pd(lane + 8, acc[r][c][1]);
        }
}

#undef SKIPPED
#define TILE_CASE(R, C, U) case (U) * 64 + (R) * 8 + (C): tile_avx512(xf, stride, K, p0, R, q0, C, U, padded, lanes); break;
#define TILE_CASES(U) TILE_CASE(1, 1, U) TILE_CASE(1, 2, U) TILE_CASE(1, 3, U) TILE_CASE(1, 4, U) \
                      TILE_CASE(2, 1, U) TILE_CASE(2, 2, U) TILE_CASE(2, 3, U) TILE_CASE(2, 4, U) \
                      TILE_CASE(3, 1, U) TILE_CASE(3, 2, U) TILE_CASE(3, 3, U) TILE_CASE(3, 4, U)

/* One stored input's entries [j0, j1) of the block (a multiple of 16 of them, or the block's last) as float32 (their
 * differences from the base b, the block's float32 base), into d, added into s (t > 0) or copied there;
 * nonzero when one is NaN or infinite */
__attribute__((target(AVX512))) static inline int convert_avx512(const void *src, int kind, const float *b, Py_ssize_t j0, Py_ssize_t j1,
                                                                float *d, float *s, int first) {
    __mmask16 special = 0;
    Py_ssize_t vector_end = j0 + (j1 - j0) / 16 * 16;
    for (Py_ssize_t j = j0; j < vector_end; j += 16) {
        __m512 x = bits_avx512(src, kind, j, &special);
        if (b != NULL) x = _mm512_sub_ps(x, _mm512_loadu_ps(b + j));
        _mm512_storeu_ps(d + (j - j0), x);
        if (s != NULL) _mm512_storeu_ps(s + j, first ? x : _mm512_add_ps(_mm512_loadu_ps(s + j), x));
    }
    int bad = special != 0;
    if (vector_end < j1) {
        float x[16];
        bad |= to_float((const char *)src + (size_t)vector_end * (kind == KIND_BF16 ? 2 : 4), kind, j1 - vector_end, x);
        for (Py_ssize_t j = vector_end; j < j1; j++) {
            float v = b != NULL ? x[j - vector_end] - b[j] : x[j - vector_end];
            d[j - j0] = v;
            if (s != NULL) s[j] = first ? v : s[j] + v;
        }
    }
    return bad;
}

/* gram_body in stretches of the block whose float32 vectors stay in the level-1 cache (K * stride * 4 bytes <= 16 KiB;
 * widened to float64 as the tiles load them, which measured faster than storing them widened: Model Stock K = 8 at
 * 250M 2.91-3.70 -> 2.58-3.39 s), each pair's lanes carried from stretch to stretch: the same sums, lane for lane.
 * job->scratch: K * BLOCK doubles, then K * K * 16 for the lanes */
__attribute__((target(AVX512))) static Py_ssize_t gram_avx512(const GramJob *job) {
    float b[BLOCK];
    Py_ssize_t first_bad = -1;
    const Py_ssize_t K = job->count;
    const int diagonal = job->diagonal;
    Py_ssize_t stride = 4096 / K / LANES * LANES;
    if (stride < LANES) stride = LANES;
    float *xf = (float *)job->scratch; /* K * stride floats: the stretch's vectors, widened as the tiles load them */
    double *lanes = job->scratch + (size_t)K * BLOCK;
    memset(lanes, 0, (size_t)(K * K * LANES) * sizeof(double));
    for (Py_ssize_t i0 = 0; i0 < job->n; i0 += BLOCK) {
        Py_ssize_t m = job->n - i0 < BLOCK ? job->n - i0 : BLOCK;
        const float *bb = NULL;
        if (job->base != NULL) {
            const char *src = (const char *)job->base + (size_t)i0 * (job->base_kind == KIND_BF16 ? 2 : 4);
            __mmask16 special = 0;
            Py_ssize_t vector_end = m / 16 * 16;
            for (Py_ssize_t j = 0; j < vector_end; j += 16) _mm512_storeu_ps(b + j, bits_avx512(src, job->base_kind, j, &special));
            int tail_bad = vector_end < m && to_float(src + (size_t)vector_end * (job->base_kind == KIND_BF16 ? 2 : 4), job->base_kind, m - vector_end, b + vector_end);
            if ((special || tail_bad) && first_bad < 0) first_bad = 0;
            bb = b;
        }
        float *s = job->sum != NULL ? job->sum + i0 : NULL;
        for (Py_ssize_t j0 = 0; j0 < m; j0 += stride) {
            Py_ssize_t j1 = m - j0 < stride ? m : j0 + stride;
            Py_ssize_t padded = (j1 - j0 + LANES - 1) / LANES * LANES;
            for (Py_ssize_t t = 0; t < K; t++) {
                float *d = xf + (size_t)t * stride;
                const char *src = (const char *)job->inputs[t] + (size_t)i0 * (job->kinds[t] == KIND_BF16 ? 2 : 4);
                if (convert_avx512(src, job->kinds[t], bb, j0, j1, d, s, t == 0) && (first_bad < 0 || first_bad > t + 1)) first_bad = t + 1;
                for (Py_ssize_t j = j1 - j0; j < padded; j++) d[j] = 0.0f; /* the block's last lanes' padding */
            }
            for (Py_ssize_t p0 = 0; p0 < K; p0 += diagonal ? 1 : 3) {
                int R = diagonal ? 1 : (K - p0 < 3 ? (int)(K - p0) : 3);
                for (Py_ssize_t q0 = p0; q0 < (diagonal ? p0 + 1 : K); q0 += 4) {
                    int C = diagonal ? 1 : (K - q0 < 4 ? (int)(K - q0) : 4);
                    switch ((q0 == p0) * 64 + R * 8 + C) {
                        TILE_CASES(0)
                        TILE_CASES(1)
                    }
                }
            }
        }
        for (Py_ssize_t p = 0; p < K; p++)
            for (Py_ssize_t q = p; q < (diagonal ? p + 1 : K); q++) {
                double *lane = lanes + (size_t)(p * K + q) * LANES;
                job->gram[p * K + q] += lanes_total(lane);
                memset(lane, 0, LANES * sizeof(double));
            }
    }
    for (Py_ssize_t p = 0; p < K; p++)
        for (Py_ssize_t q = 0; q < p; q++) job->gram[p * K + q] = job->gram[q * K + p];
    return first_bad;
}
#endif

static Py_ssize_t gram(const GramJob *job) {
#if X86_DISPATCH
    if (use_avx512()) return gram_avx512(job);
    if (use_avx2()) return gram_avx2(job);
#endif
    return gram_generic(job);
}

/* lane l (of LANES) += |tau_j| and |tau_j| * keep_j for the entries j = l mod LANES of [0, padded), in order, in float64 */
static inline __attribute__((always_inline)) void l1_lanes_generic(const float *x, const float *keep, Py_ssize_t padded, double *before, double *after) {
    for (Py_ssize_t j = 0; j < padded; j += LANES)
        for (int l = 0; l < LANES; l++) {
            before[l] += (double)x[j + l];
            after[l] += (double)(x[j + l] * keep[j + l]);
        }
}

#if X86_DISPATCH
/* the same additions, four lanes per vector */
__attribute__((target("avx2,fma"))) static void l1_lanes_avx2(const float *x, const float *keep, Py_ssize_t padded, double *before, double *after) {
    __m256d b0 = _mm256_loadu_pd(before), b1 = _mm256_loadu_pd(before + 4), b2 = _mm256_loadu_pd(before + 8), b3 = _mm256_loadu_pd(before + 12);
    __m256d a0 = _mm256_loadu_pd(after), a1 = _mm256_loadu_pd(after + 4), a2 = _mm256_loadu_pd(after + 8), a3 = _mm256_loadu_pd(after + 12);
    for (Py_ssize_t j = 0; j < padded; j += LANES) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        __m256 k0 = _mm256_mul_ps(x0, _mm256_loadu_ps(keep + j)), k1 = _mm256_mul_ps(x1, _mm256_loadu_ps(keep + j + 8));
        b0 = _mm256_add_pd(b0, _mm256_cvtps_pd(_mm256_castps256_ps128(x0)));
        b1 = _mm256_add_pd(b1, _mm256_cvtps_pd(_mm256_extractf128_ps(x0, 1)));
        b2 = _mm256_add_pd(b2, _mm256_cvtps_pd(_mm256_castps256_ps128(x1)));
        b3 = _mm256_add_pd(b3, _mm256_cvtps_pd(_mm256_extractf128_ps(x1, 1)));
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(k0)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(k0, 1)));
        a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(k1)));
        a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(k1, 1)));
    }
    store_lanes(before, b0, b1, b2, b3);
    store_lanes(after, a0, a1, a2, a3);
}
#endif

/* the m magnitudes x and keeps of a block, padded with zeros to a multiple of LANES (both buffers hold it), added to
 * the lanes: the one place the L1 norms' additions are made */
static inline __attribute__((always_inline)) void add_l1_lanes(float *x, float *keep, Py_ssize_t m, double *before, double *after, int avx2) {
    Py_ssize_t padded = (m + LANES - 1) / LANES * LANES;
    for (Py_ssize_t j = m; j < padded; j++) x[j] = keep[j] = 0.0f;
#if X86_DISPATCH
    if (avx2)
        l1_lanes_avx2(x, keep, padded, before, after);
    else
#endif
        l1_lanes_generic(x, keep, padded, before, after);
    (void)avx2;
}

/* DARE's first pass: per input, the L1 norms of tau = x - base before and after its keep draws (sum |tau| and
 * sum |tau| * keep), each |tau| exact in float64 and added in sixteen lanes (entry j to lane j mod 16, in order),
 * the lanes then added pairwise: a fixed order. lanes: 2 * LANES * count doubles of scratch; norms: 2 * count
 * doubles (before, after per input), added to. Returns as combine_body does. */
/* each input's sixteen lanes before and after its draws (lanes[2 * LANES * t ...]) go on adding the entries' |tau|
 * (zeroed and totalled by the caller: a call's stretches add to the same lanes, in order) */
static inline __attribute__((always_inline)) Py_ssize_t norms_body(const Job *job, double *lanes, int avx2) {
    float b[BLOCK], x[BLOCK], keep[BLOCK];
    Py_ssize_t first_bad = -1;
    for (Py_ssize_t t = 0; t < job->count; t++)
        if (job->keeps[t].draws) stream_at(&job->keeps[t].stream, job->keeps[t].state, job->keeps[t].inc, (uint64_t)job->first);
    for (Py_ssize_t i0 = 0; i0 < job->n; i0 += BLOCK) {
        Py_ssize_t m = job->n - i0 < BLOCK ? job->n - i0 : BLOCK;
        size_t bsize = job->base_kind == KIND_BF16 ? 2 : 4;
        if (to_float((const char *)job->base + (size_t)i0 * bsize, job->base_kind, m, b) && first_bad < 0) first_bad = 0;
        for (Py_ssize_t t = 0; t < job->count; t++) {
            size_t size = job->kinds[t] == KIND_BF16 ? 2 : 4;
            if (to_float((const char *)job->inputs[t] + (size_t)i0 * size, job->kinds[t], m, x) && (first_bad < 0 || first_bad > t + 1))
                first_bad = t + 1;
            keep_block(&job->keeps[t], job->first, i0, m, keep, avx2);
            for (Py_ssize_t j = 0; j < m; j++) x[j] = fabsf(x[j] - b[j]);
            double *before = lanes + 2 * LANES * t;
            add_l1_lanes(x, keep, m, before, before + LANES, avx2);
        }
    }
    return first_bad;
}

static Py_ssize_t norms_generic(const Job *job, double *lanes) { return norms_body(job, lanes, 0); }

#if X86_DISPATCH
__attribute__((target("avx2,fma"))) static Py_ssize_t norms_avx2(const Job *job, double *lanes) { return norms_body(job, lanes, 1); }
#endif

static Py_ssize_t dare_norms_of(const Job *job, double *lanes) {
#if X86_DISPATCH
    if (use_avx2()) return norms_avx2(job, lanes);
#endif
    return norms_generic(job, lanes);
}

/* sum |x_j| and sum |x_j| * keep_j of n float32 (keep: n bools, NULL: all kept) into sixteen lanes: the additions of
 * norms_body for a task vector already made, so the same lanes, and so the same totals, as dare_norms's */
static inline __attribute__((always_inline)) void abs_sums_body(const float *x, const unsigned char *keep, Py_ssize_t n, double *before,
                                                                double *after, int avx2) {
    float a[BLOCK], k[BLOCK];
    for (Py_ssize_t i0 = 0; i0 < n; i0 += BLOCK) {
        Py_ssize_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
        for (Py_ssize_t j = 0; j < m; j++) a[j] = fabsf(x[i0 + j]);
        if (keep == NULL)
            for (Py_ssize_t j = 0; j < m; j++) k[j] = 1.0f;
        else
            for (Py_ssize_t j = 0; j < m; j++) k[j] = keep[i0 + j] ? 1.0f : 0.0f;
        add_l1_lanes(a, k, m, before, after, avx2);
    }
}

static void abs_sums_generic(const float *x, const unsigned char *keep, Py_ssize_t n, double *before, double *after) {
    abs_sums_body(x, keep, n, before, after, 0);
}

#if X86_DISPATCH
__attribute__((target("avx2,fma"))) static void abs_sums_avx2(const float *x, const unsigned char *keep, Py_ssize_t n, double *before, double *after) {
    abs_sums_body(x, keep, n, before, after, 1);
}
#endif

PyDoc_STRVAR(abs_sums_doc,
    "abs_sums(x, n, keep) -> (float, float)\n\n"
    "For n float32 at address x: (sum |x_j|, sum |x_j| * keep_j), keep the address of n bools (0: every entry kept),\n"
    "each |x_j| exact in float64 and added in dare_norms's order (entry j to lane j mod 16, the lanes then pairwise):\n"
    "dare_norms's two floats for the same task vector. The GIL is released while it runs.");

static PyObject *abs_sums(PyObject *self, PyObject *args) {
    unsigned long long x_addr, keep_addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KnK", &x_addr, &n, &keep_addr)) return NULL;
    if (n < 0 || (n > 0 && x_addr == 0)) {
        PyErr_SetString(PyExc_ValueError, "a negative count, or no values");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)x_addr;
    const unsigned char *keep = (const unsigned char *)(uintptr_t)keep_addr;
    double before[LANES] = {0.0}, after[LANES] = {0.0};
    Py_BEGIN_ALLOW_THREADS
#if X86_DISPATCH
    if (use_avx2())
        abs_sums_avx2(x, keep, n, before, after);
    else
#endif
        abs_sums_generic(x, keep, n, before, after);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dd)", lanes_total(before), lanes_total(after));
}

/* SCE's variance across tasks (ops/sce.task_variance): for each of n entries, Welford's update in float64 over the
 * tasks' float32 values in order (mean = x_0, m2 = +0; then per task: step = x - mean, mean += step / count,
 * m2 += step * (x - mean), each product and quotient rounded on its own), then m2 / tasks rounded to float32: torch's
 * own operations in torch's order, so torch.var's numbers bit for bit. VARIANCE_BLOCK entries at a time, each task
 * through the block (the running means and sums stay in registers and the L1 cache). */
#define VARIANCE_BLOCK 512
static inline __attribute__((always_inline)) void variance_body(const float *const *x, Py_ssize_t tasks, Py_ssize_t n, float *out) {
    double mean[VARIANCE_BLOCK], m2[VARIANCE_BLOCK];
    for (Py_ssize_t i0 = 0; i0 < n; i0 += VARIANCE_BLOCK) {
        Py_ssize_t m = n - i0 < VARIANCE_BLOCK ? n - i0 : VARIANCE_BLOCK;
        const float *first = x[0] + i0;
        for (Py_ssize_t j = 0; j < m; j++) {
            mean[j] = (double)first[j];
            m2[j] = 0.0;
        }
        for (Py_ssize_t t = 1; t < tasks; t++) {
            const float *xt = x[t] + i0;
            const double count = (double)(t + 1);
            for (Py_ssize_t j = 0; j < m; j++) {
                double data = (double)xt[j];
                double step = data - mean[j];
                mean[j] = mean[j] + step / count;
                data = data - mean[j];
                m2[j] = m2[j] + step * data;
            }
        }
        const double divisor = (double)tasks;
        for (Py_ssize_t j = 0; j < m; j++) out[i0 + j] = (float)(m2[j] / divisor);
    }
}

static void variance_generic(const float *const *x, Py_ssize_t tasks, Py_ssize_t n, float *out) { variance_body(x, tasks, n, out); }

#if X86_DISPATCH
__attribute__((target("avx2,fma"))) static void variance_avx2(const float *const *x, Py_ssize_t tasks, Py_ssize_t n, float *out) {
    variance_body(x, tasks, n, out);
}
#endif

PyDoc_STRVAR(task_variance_doc,
    "task_variance(inputs, n, out)\n\n"
    "The population variance across tasks of each of n entries: inputs the addresses of the tasks' n float32 values,\n"
    "out the address of n float32 (see ops/sce.task_variance: torch.var's arithmetic, bit for bit). The GIL is\n"
    "released while it runs.");

static PyObject *task_variance(PyObject *self, PyObject *args) {
    PyObject *inputs_obj;
    Py_ssize_t n;
    unsigned long long out_addr;
    if (!PyArg_ParseTuple(args, "OnK", &inputs_obj, &n, &out_addr)) return NULL;
    PyObject *seq = PySequence_Fast(inputs_obj, "inputs must be a sequence of addresses");
    if (seq == NULL) return NULL;
    Py_ssize_t tasks = PySequence_Fast_GET_SIZE(seq);
    if (tasks < 1 || tasks > MAX_INPUTS || n < 0 || (n > 0 && out_addr == 0)) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "task_variance: 1 to 4096 inputs, n >= 0, an output");
        return NULL;
    }
    const float **x = PyMem_Malloc((size_t)tasks * sizeof(float *));
    if (x == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t t = 0; t < tasks; t++) {
        x[t] = (const float *)(uintptr_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, t));
        if (PyErr_Occurred() || (n > 0 && x[t] == NULL)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "task_variance: a null input");
            PyMem_Free(x);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    float *out = (float *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
#if X86_DISPATCH
    if (use_avx2())
        variance_avx2(x, tasks, n, out);
    else
#endif
        variance_generic(x, tasks, n, out);
    Py_END_ALLOW_THREADS
    PyMem_Free(x);
    Py_RETURN_NONE;
}

static int parse_kind(PyObject *value, int *kind) {
    long k = PyLong_AsLong(value);
    if (k == -1 && PyErr_Occurred()) return 0;
    if (k != KIND_F32 && k != KIND_BF16) {
        PyErr_SetString(PyExc_ValueError, "unknown storage kind");
        return 0;
    }
    *kind = (int)k;
    return 1;
}

/* [values[0], ..., values[count - 1]] as a Python list; NULL with an exception set */
static PyObject *doubles_list(const double *values, Py_ssize_t count) {
    PyObject *list = PyList_New(count);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = PyFloat_FromDouble(values[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* (bad, failed, err, [values[0], ..., values[count - 1]]) as Python objects; NULL with an exception set */
static PyObject *answer_with_doubles(Py_ssize_t bad, Py_ssize_t failed, int err, const double *values, Py_ssize_t count) {
    PyObject *list = doubles_list(values, count);
    return list == NULL ? NULL : Py_BuildValue("(nniN)", bad, failed, err, list);
}

/* ---- inputs in memory or in files: the kernel reads a file's stretches itself, small enough to stay in the level-2
 * cache, so that each stretch's bytes go from the page cache through the arithmetic while they are still there rather
 * than a whole chunk copied out to memory and read back. A multiple of BLOCK and of 8: the Gram matrix's blocks (and so
 * its sums) and the keep-masks' bytes are those of the whole call. ---- */
#define READ_STRETCH (16 * BLOCK)

typedef struct {
    const char *addr;   /* in memory: the bytes of entry 0; NULL: in a file */
    int fd;
    long long position; /* in a file: the byte position of entry 0 */
    int kind;
    char *buffer;       /* in a file: where each stretch of it is read (READ_STRETCH entries) */
} Source;

/* an address (an int) or a (file descriptor, position) pair; 0 with an exception set on a bad one */
static int parse_source(PyObject *item, int kind, Source *src) {
    memset(src, 0, sizeof(*src));
    src->kind = kind;
    if (PyTuple_Check(item)) {
        if (!PyArg_ParseTuple(item, "iL", &src->fd, &src->position)) return 0;
        if (src->fd < 0 || src->position < 0) {
            PyErr_SetString(PyExc_ValueError, "a file source is a descriptor and a position, neither negative");
            return 0;
        }
        return 1;
    }
    unsigned long long a = PyLong_AsUnsignedLongLong(item);
    if (PyErr_Occurred()) return 0;
    if (a == 0) {
        PyErr_SetString(PyExc_ValueError, "a source's address is 0");
        return 0;
    }
    src->addr = (const char *)(uintptr_t)a;
    return 1;
}

/* sources[t] from the sequences items and kinds; 0 with an exception set */
static int parse_sources(PyObject *items, PyObject *kinds, Py_ssize_t count, Source *sources) {
    for (Py_ssize_t t = 0; t < count; t++) {
        int kind;
        if (!parse_kind(PySequence_Fast_GET_ITEM(kinds, t), &kind) || !parse_source(PySequence_Fast_GET_ITEM(items, t), kind, &sources[t])) return 0;
    }
    return 1;
}

/* Whether a base is given: 0 (an int) for none; -1 with an exception set */
static int base_given(PyObject *base_obj) {
    if (!PyLong_Check(base_obj)) return 1;
    unsigned long long a = PyLong_AsUnsignedLongLong(base_obj);
    return PyErr_Occurred() ? -1 : a != 0;
}

/* keeps as they apply to the stretch from entry `start` of the call (a multiple of 8): each one's keep-masks and
 * gate from there */
static void keeps_from(const Keep *keeps, Py_ssize_t count, Py_ssize_t start, Keep *out) {
    for (Py_ssize_t t = 0; t < count; t++) {
        out[t] = keeps[t];
        if (keeps[t].bits_in != NULL) out[t].bits_in = keeps[t].bits_in + start / 8;
        if (keeps[t].bits_out != NULL) out[t].bits_out = keeps[t].bits_out + start / 8;
        if (keeps[t].gate != NULL) out[t].gate = keeps[t].gate + start;
    }
}

/* nbytes of the file from position into dst: 0, or errno of a failed read (-1: the file ended first) */
static int read_span(int fd, char *dst, size_t nbytes, long long position) {
#if HAVE_PREAD
    while (nbytes > 0) {
        ssize_t got = pread(fd, dst, nbytes, (off_t)position);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return errno != 0 ? errno : EIO;
        if (got == 0) return -1;
        dst += got;
        nbytes -= (size_t)got;
        position += got;
    }
    return 0;
#else
    (void)fd; (void)dst; (void)nbytes; (void)position;
    return ENOSYS;
#endif
}

/* at[t]: where each source's entries [first, first + m) are (a file's read into its buffer; m <= READ_STRETCH for a
 * file); -1, or the first source whose read failed (*err its errno, -1: the file ended) */
static Py_ssize_t stretch_at(const Source *sources, Py_ssize_t count, Py_ssize_t first, Py_ssize_t m, const void **at, int *err) {
    for (Py_ssize_t t = 0; t < count; t++) {
        size_t size = sources[t].kind == KIND_BF16 ? 2 : 4;
        if (sources[t].addr != NULL) {
            at[t] = sources[t].addr + (size_t)first * size;
            continue;
        }
        int e = read_span(sources[t].fd, sources[t].buffer, (size_t)m * size, sources[t].position + (long long)first * (long long)size);
        if (e != 0) {
            *err = e;
            return t;
        }
        at[t] = sources[t].buffer;
    }
    return -1;
}

/* keeps: a sequence of `count` tuples (draws, state_hi, state_lo, inc_hi, inc_lo, key, ceiling, scale, by[, bits_in,
 * bits_out, gate, gate_min]); NULL with an exception set on a bad one */
static Keep *parse_keeps(PyObject *keeps_obj, Py_ssize_t count) {
    PyObject *seq = PySequence_Fast(keeps_obj, "keeps must be a sequence");
    if (seq == NULL) return NULL;
    Keep *keeps = NULL;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        PyErr_SetString(PyExc_ValueError, "one keep per input");
        goto done;
    }
    keeps = PyMem_Calloc((size_t)count, sizeof(Keep));
    if (keeps == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        int draws, scale;
        unsigned long long state_hi, state_lo, inc_hi, inc_lo, key, ceiling, bits_in = 0, bits_out = 0, gate = 0;
        double by, gate_min = 0.0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, t), "pKKKKKKid|KKKd", &draws, &state_hi, &state_lo, &inc_hi, &inc_lo, &key, &ceiling,
                              &scale, &by, &bits_in, &bits_out, &gate, &gate_min)) {
            PyMem_Free(keeps);
            keeps = NULL;
            goto done;
        }
        if (scale != SCALE_NONE && scale != SCALE_MUL && scale != SCALE_DIV) {
            PyErr_SetString(PyExc_ValueError, "unknown rescale");
            PyMem_Free(keeps);
            keeps = NULL;
            goto done;
        }
        keeps[t].draws = draws;
        keeps[t].state = ((u128)state_hi << 64) | state_lo;
        keeps[t].inc = ((u128)inc_hi << 64) | inc_lo;
        keeps[t].key = key;
        keeps[t].ceiling = ceiling;
        keeps[t].scale = scale;
        keeps[t].by = (float)by;
        keeps[t].bits_in = (const uint8_t *)(uintptr_t)bits_in;
        keeps[t].bits_out = (uint8_t *)(uintptr_t)bits_out;
        keeps[t].gate = (const float *)(uintptr_t)gate;
        keeps[t].gate_min = (float)gate_min;
    }
done:
    Py_DECREF(seq);
    return keeps;
}

/* stretch_at for a base slot and `count` inputs (sources[0] and at[0] unused where !has_base): -1, or the failed
 * source numbered as a non-finite answer is (0 the base, 1 + t input t) */
static Py_ssize_t stretch_with_base(const Source *sources, Py_ssize_t count, int has_base, Py_ssize_t first, Py_ssize_t m,
                                    const void **at, int *err) {
    Py_ssize_t failed = stretch_at(sources + !has_base, count + has_base, first, m, at + !has_base, err);
    return failed >= 0 ? failed + !has_base : -1;
}

/* ---- a call's chunks on several threads: the threads (this one among them) take the next chunk whenever they are
 * free, with no Python and no interpreter lock between chunks (a chunk per Python call cost a thread hand-off and a
 * wait for the lock each: 0.1-0.6 ms on this project's VM). Each chunk's results are kept apart and put together in
 * chunk order afterwards: the same numbers on any thread count. ---- */
typedef struct Chunked Chunked;
struct Chunked {
    void (*run)(Chunked *job, int thread, Py_ssize_t chunk); /* one chunk, on thread `thread` (its buffers) */
    Py_ssize_t chunks;
    Py_ssize_t next; /* the next chunk to take (atomic) */
    int stop;        /* set (atomic) once a chunk's read failed: the threads end at their next chunk */
};

typedef struct {
    Chunked *job;
    int thread;
} ChunkWorker;

static void take_chunks(Chunked *job, int thread) {
    while (!__atomic_load_n(&job->stop, __ATOMIC_RELAXED)) {
        Py_ssize_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->chunks) return;
        job->run(job, thread, c);
    }
}

#if HAVE_THREADS
static void *chunk_worker(void *arg) {
    ChunkWorker *w = (ChunkWorker *)arg;
    take_chunks(w->job, w->thread);
    return NULL;
}
#endif

/* every chunk of job on up to `threads` threads (fewer where one cannot be started); no Python API */
static void run_chunks(Chunked *job, int threads) {
#if HAVE_THREADS
    pthread_t ids[MAX_THREADS];
    ChunkWorker workers[MAX_THREADS];
    int started = 0;
    for (int i = 1; i < threads && i < MAX_THREADS && i < job->chunks; i++) {
        workers[started] = (ChunkWorker){job, i};
        if (pthread_create(&ids[started], NULL, chunk_worker, &workers[started]) != 0) break;
        started++;
    }
    take_chunks(job, 0);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
#else
    (void)threads;
    take_chunks(job, 0);
#endif
}

/* bounds (a sequence of chunks + 1 increasing entry indices from 0 to n, or None: one chunk) into *out (PyMem); the
 * chunk count, or -1 with an exception set */
static Py_ssize_t parse_bounds(PyObject *bounds_obj, Py_ssize_t n, Py_ssize_t **out) {
    if (bounds_obj == Py_None) {
        *out = PyMem_Malloc(2 * sizeof(Py_ssize_t));
        if (*out == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        (*out)[0] = 0;
        (*out)[1] = n;
        return 1;
    }
    PyObject *seq = PySequence_Fast(bounds_obj, "chunk bounds must be a sequence");
    if (seq == NULL) return -1;
    Py_ssize_t size = PySequence_Fast_GET_SIZE(seq), chunks = size - 1;
    *out = PyMem_Malloc((size_t)(size > 0 ? size : 1) * sizeof(Py_ssize_t));
    if (*out == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        (*out)[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if ((*out)[i] == -1 && PyErr_Occurred()) chunks = -1;
    }
    Py_DECREF(seq);
    if (chunks < 0) return -1;
    int ok = chunks >= 1 && (*out)[0] == 0 && (*out)[chunks] == n;
    for (Py_ssize_t c = 0; ok && c < chunks; c++) ok = (*out)[c] < (*out)[c + 1];
    if (!ok && !(chunks == 1 && n == 0 && (*out)[0] == 0 && (*out)[1] == 0)) {
        PyErr_SetString(PyExc_ValueError, "chunk bounds: increasing from 0 to n");
        return -1;
    }
    return chunks;
}

/* The sources as thread `thread`'s copy: its own buffers for the file sources (READ_STRETCH * 4 bytes each, from
 * storage), the rest as given */
static void thread_sources(const Source *sources, Py_ssize_t count, char *storage, Py_ssize_t files, int thread, Source *out) {
    for (Py_ssize_t t = 0, f = 0; t < count; t++) {
        out[t] = sources[t];
        if (sources[t].addr == NULL) out[t].buffer = storage + ((size_t)thread * (size_t)files + (size_t)(f++)) * READ_STRETCH * 4;
    }
}

/* The chunks' answers together: the earliest chunk whose read failed (its source, errno and bounds) where one did;
 * the least non-finite answer of any chunk */
typedef struct {
    Py_ssize_t bad, failed, failed_start, failed_stop;
    int err;
} ChunkAnswers;

static ChunkAnswers chunk_answers(const Py_ssize_t *bad, const Py_ssize_t *failed, const int *err, const Py_ssize_t *bounds, Py_ssize_t chunks) {
    ChunkAnswers a = {-1, -1, 0, 0, 0};
    for (Py_ssize_t c = 0; c < chunks; c++) {
        if (failed[c] >= 0 && a.failed < 0) {
            a.failed = failed[c];
            a.err = err[c];
            a.failed_start = bounds[c];
            a.failed_stop = bounds[c + 1];
        }
        if (bad[c] >= 0 && (a.bad < 0 || bad[c] < a.bad)) a.bad = bad[c];
    }
    return a;
}

/* (bad, failed, err, failed_start, failed_stop, [values]) */
static PyObject *chunk_answer_with_doubles(ChunkAnswers a, const double *values, Py_ssize_t count) {
    PyObject *list = doubles_list(values, count);
    return list == NULL ? NULL : Py_BuildValue("(nninnN)", a.bad, a.failed, a.err, a.failed_start, a.failed_stop, list);
}

PyDoc_STRVAR(linear_combination_doc,
    "linear_combination(out, out_kind, n, base, base_kind, inputs, kinds, weights, divisor, lam, rounded[, keeps, first, post, given,\n"
    "bounds, threads]) -> (int, int, int, int, int)\n\n"
    "Entries [0, n) at address ``out`` from the inputs (kinds: 0 float32, 1 bfloat16), each an address in memory or a\n"
    "(file descriptor, byte position) pair of its entry 0, read by stretches. Without\n"
    "a base (0): sum_t w_t x_t; with one: base + lam * sum_t w_t (x_t - base). Divided by ``divisor`` before\n"
    "lam when it is not 0. rounded (no base): each product rounded before it is added, else fma.\n"
    "keeps (task vectors only; None: none): per input (draws, state_hi, state_lo, inc_hi, inc_lo, key, ceiling, scale,\n"
    "by): DARE's keep draws from a PCG64DXSM state (entry 0 of the tensor; ``first``: the flat index of entry 0 here)\n"
    "and survivors multiplied (scale 1) or divided (2) by ``by``. post (None: none): the combination, after the\n"
    "divisor, multiplied by it (rounded) before base + lam * .... given (with a base): the inputs are task vectors\n"
    "already, base + lam * sum_t w_t x_t. bounds (None: one chunk): chunks [bounds[c], bounds[c + 1]) taken by up to\n"
    "``threads`` threads of the kernel's (entrywise: the same bytes on any thread count; keep-masks need chunk starts\n"
    "at multiples of 8).\n"
    "Returns (bad, failed, err, failed_start, failed_stop): bad -1, or the first input with a NaN/Inf entry (0 the base,\n"
    "1 + t model t); failed -1, or the source whose read failed (numbered as bad; err its errno, -1 where the file\n"
    "ended; in the chunk [failed_start, failed_stop)): nothing else is to be used.\n"
    "The addresses are the caller's to keep valid; the GIL is released while it runs.");

/* A call's chunks over its sources (the base first, then the inputs), each chunk read stretch by stretch on the thread
 * that took it: what the Gram matrix and the combination share. stretch_work is the kernel on one stretch, the
 * sources' entries [first, first + m) of the call at `at`; it returns its non-finite answer. Per chunk: the least
 * non-finite answer, the source whose read failed (then every thread stops at its next chunk) and its errno. */
typedef struct ChunkedReads ChunkedReads;
struct ChunkedReads {
    Chunked chunked;
    Py_ssize_t (*stretch_work)(ChunkedReads *job, int thread, Py_ssize_t c, Py_ssize_t first, Py_ssize_t m, const void **at);
    const Py_ssize_t *bounds;
    Source *sources;  /* per thread: (count + 1) each, the base first (unused without one) */
    const void **at;  /* per thread: (count + 1) each */
    char *storage;    /* the file sources' buffers, every thread's */
    int has_base;
    Py_ssize_t count, stretch;
    Py_ssize_t *bad, *failed;
    int *err;
};

static void read_chunk(Chunked *chunked, int thread, Py_ssize_t c) {
    ChunkedReads *r = (ChunkedReads *)chunked;
    const Py_ssize_t start = r->bounds[c], n = r->bounds[c + 1] - start;
    const Source *sources = r->sources + (size_t)thread * (size_t)(r->count + 1);
    const void **at = r->at + (size_t)thread * (size_t)(r->count + 1);
    Py_ssize_t stretch = r->stretch > 0 ? r->stretch : (n > 0 ? n : 1);
    Py_ssize_t bad = -1, failed = -1;
    int err = 0;
    for (Py_ssize_t first = 0; first < n; first += stretch) {
        Py_ssize_t m = n - first < stretch ? n - first : stretch;
        if ((failed = stretch_with_base(sources, r->count, r->has_base, start + first, m, at, &err)) >= 0) {
            __atomic_store_n(&chunked->stop, 1, __ATOMIC_RELAXED);
            break;
        }
        Py_ssize_t b = r->stretch_work(r, thread, c, start + first, m, at);
        if (b >= 0 && (bad < 0 || b < bad)) bad = b;
    }
    r->bad[c] = bad;
    r->failed[c] = failed;
    r->err[c] = err;
}

/* r set up for `chunks` chunks (bounds) of the parsed sources (count + 1 slots, the base first where has_base) on
 * `threads` threads: each thread's copy of the sources with buffers of its own; 0 with MemoryError set (then
 * free_chunked_reads still frees what was made) */
static int chunked_reads(ChunkedReads *r, const Source *sources, int has_base, Py_ssize_t count, const Py_ssize_t *bounds, Py_ssize_t chunks,
                         int threads, Py_ssize_t (*stretch_work)(ChunkedReads *, int, Py_ssize_t, Py_ssize_t, Py_ssize_t, const void **)) {
    memset(r, 0, sizeof(*r));
    r->chunked = (Chunked){read_chunk, chunks, 0, 0};
    r->stretch_work = stretch_work;
    r->bounds = bounds;
    r->has_base = has_base;
    r->count = count;
    const size_t slots = (size_t)(count + 1);
    Py_ssize_t files = 0;
    for (Py_ssize_t t = !has_base; t < count + 1; t++) files += sources[t].addr == NULL;
    r->stretch = files > 0 ? READ_STRETCH : 0;
    r->sources = PyMem_Malloc((size_t)threads * slots * sizeof(*r->sources));
    r->at = PyMem_Malloc((size_t)threads * slots * sizeof(*r->at));
    r->bad = PyMem_Malloc((size_t)chunks * sizeof(*r->bad));
    r->failed = PyMem_Malloc((size_t)chunks * sizeof(*r->failed));
    r->err = PyMem_Malloc((size_t)chunks * sizeof(*r->err));
    if (files > 0) r->storage = PyMem_RawMalloc((size_t)threads * (size_t)files * READ_STRETCH * 4);
    if (r->sources == NULL || r->at == NULL || r->bad == NULL || r->failed == NULL || r->err == NULL || (files > 0 && r->storage == NULL)) {
        PyErr_NoMemory();
        return 0;
    }
    for (int h = 0; h < threads; h++)
        thread_sources(sources + !has_base, count + has_base, r->storage, files, h, r->sources + (size_t)h * slots + !has_base);
    for (Py_ssize_t c = 0; c < chunks; c++) r->bad[c] = r->failed[c] = -1, r->err[c] = 0;
    return 1;
}

static void free_chunked_reads(ChunkedReads *r) {
    PyMem_Free(r->sources);
    PyMem_Free(r->at);
    PyMem_RawFree(r->storage);
    PyMem_Free(r->bad);
    PyMem_Free(r->failed);
    PyMem_Free(r->err);
}

/* the chunks' answers once they have run */
static ChunkAnswers chunked_answers(const ChunkedReads *r) { return chunk_answers(r->bad, r->failed, r->err, r->bounds, r->chunked.chunks); }

typedef struct {
    ChunkedReads reads;
    const Keep *keeps;     /* NULL, or the call's (count), offset per stretch into stretch_keeps */
    Keep *stretch_keeps;   /* per thread: count each */
    char *out;
    int out_kind, base_kind, rounded, has_post, given;
    Py_ssize_t first;
    const int *input_kinds;
    const float *weights;
    float divisor, lam, post;
} CombineChunks;

static Py_ssize_t combine_stretch(ChunkedReads *reads, int thread, Py_ssize_t c, Py_ssize_t first, Py_ssize_t m, const void **at) {
    CombineChunks *g = (CombineChunks *)reads;
    const Py_ssize_t K = reads->count;
    (void)c;
    Keep *stretch_keeps = NULL;
    if (g->keeps != NULL) {
        stretch_keeps = g->stretch_keeps + (size_t)thread * (size_t)K;
        keeps_from(g->keeps, K, first, stretch_keeps);
    }
    Job job = {g->out + (size_t)first * (g->out_kind == KIND_BF16 ? 2 : 4), g->out_kind, m, reads->has_base ? at[0] : NULL, g->base_kind, K, at + 1,
               g->input_kinds, g->weights, g->divisor, g->lam, g->rounded, stretch_keeps, g->first + first, g->has_post, g->post, g->given};
    return combine(&job);
}

static PyObject *linear_combination(PyObject *self, PyObject *args) {
    unsigned long long out_addr;
    PyObject *base_obj;
    int out_kind, base_kind;
    Py_ssize_t n;
    PyObject *inputs_obj, *kinds_obj, *weights_obj;
    double divisor, lam;
    int rounded;
    PyObject *keeps_obj = Py_None;
    Py_ssize_t first = 0;
    PyObject *post_obj = Py_None;
    int given = 0;
    PyObject *bounds_obj = Py_None;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KinOiOOOddp|OnOpOi", &out_addr, &out_kind, &n, &base_obj, &base_kind, &inputs_obj, &kinds_obj,
                          &weights_obj, &divisor, &lam, &rounded, &keeps_obj, &first, &post_obj, &given, &bounds_obj, &threads))
        return NULL;
    int has_base = base_given(base_obj);
    if (has_base < 0) return NULL;
    double post = post_obj == Py_None ? 1.0 : PyFloat_AsDouble(post_obj);
    if (post == -1.0 && PyErr_Occurred()) return NULL;
    if ((keeps_obj != Py_None && (!has_base || rounded || first < 0 || given)) || (given && !has_base)) {
        PyErr_SetString(PyExc_ValueError, "keeps need a base, fused products, first >= 0 and inputs that are not given task vectors; given task vectors a base");
        return NULL;
    }
    if ((out_kind != KIND_F32 && out_kind != KIND_BF16) || (base_kind != KIND_F32 && base_kind != KIND_BF16) || n < 0) {
        PyErr_SetString(PyExc_ValueError, "unknown storage kind or negative count");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    PyObject *inputs = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    PyObject *kinds = inputs ? PySequence_Fast(kinds_obj, "kinds must be a sequence") : NULL;
    PyObject *weights = kinds ? PySequence_Fast(weights_obj, "weights must be a sequence") : NULL;
    PyObject *result = NULL;
    Source *sources = NULL;
    int *input_kinds = NULL;
    float *ws = NULL;
    Keep *keeps = NULL, *stretch_keeps = NULL;
    Py_ssize_t *bounds = NULL;
    CombineChunks job;
    memset(&job, 0, sizeof(job));
    if (weights == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
    if (count < 1 || count > MAX_INPUTS || PySequence_Fast_GET_SIZE(kinds) != count || PySequence_Fast_GET_SIZE(weights) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs, kinds and weights must have the same length (1 to 4096)");
        goto done;
    }
    Py_ssize_t chunks = parse_bounds(bounds_obj, n, &bounds);
    if (chunks < 0) goto done;
    if (threads > chunks) threads = (int)chunks;
    sources = PyMem_Malloc((size_t)(count + 1) * sizeof(*sources)); /* the base first (unused without one) */
    input_kinds = PyMem_Malloc((size_t)count * sizeof(*input_kinds));
    ws = PyMem_Malloc((size_t)count * sizeof(*ws));
    if (sources == NULL || input_kinds == NULL || ws == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (has_base && !parse_source(base_obj, base_kind, &sources[0])) goto done;
    if (!parse_sources(inputs, kinds, count, sources + 1)) goto done;
    for (Py_ssize_t t = 0; t < count; t++) {
        input_kinds[t] = sources[t + 1].kind;
        double w = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, t));
        if (w == -1.0 && PyErr_Occurred()) goto done;
        ws[t] = (float)w;
    }
    if (keeps_obj != Py_None) {
        if ((keeps = parse_keeps(keeps_obj, count)) == NULL) goto done;
        int bits = 0;
        for (Py_ssize_t t = 0; t < count; t++) bits |= keeps[t].bits_in != NULL || keeps[t].bits_out != NULL;
        for (Py_ssize_t c = 0; bits && c < chunks; c++)
            if (bounds[c] % 8 != 0) {
                PyErr_SetString(PyExc_ValueError, "keep-masks need chunks that start at multiples of 8");
                goto done;
            }
        if ((stretch_keeps = PyMem_Malloc((size_t)threads * (size_t)count * sizeof(*stretch_keeps))) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (!chunked_reads(&job.reads, sources, has_base, count, bounds, chunks, threads, combine_stretch)) goto done;
    job.keeps = keeps;
    job.stretch_keeps = stretch_keeps;
    job.out = (char *)(uintptr_t)out_addr;
    job.out_kind = out_kind;
    job.base_kind = base_kind;
    job.rounded = rounded;
    job.has_post = post_obj != Py_None;
    job.given = given;
    job.first = first;
    job.input_kinds = input_kinds;
    job.weights = ws;
    job.divisor = (float)divisor;
    job.lam = (float)lam;
    job.post = (float)post;
    Py_BEGIN_ALLOW_THREADS
    run_chunks(&job.reads.chunked, threads);
    Py_END_ALLOW_THREADS
    ChunkAnswers a = chunked_answers(&job.reads);
    result = Py_BuildValue("(nninn)", a.bad, a.failed, a.err, a.failed_start, a.failed_stop);
done:
    free_chunked_reads(&job.reads);
    PyMem_Free(sources);
    PyMem_Free(input_kinds);
    PyMem_Free(ws);
    PyMem_Free(keeps);
    PyMem_Free(stretch_keeps);
    PyMem_Free(bounds);
    Py_XDECREF(inputs);
    Py_XDECREF(kinds);
    Py_XDECREF(weights);
    return result;
}

PyDoc_STRVAR(dare_norms_doc,
    "dare_norms(n, base, base_kind, inputs, kinds, keeps, first) -> (int, int, int, list[float])\n\n"
    "Per input, the L1 norms of tau = x - base over entries [0, n) before and after its keep draws (as\n"
    "linear_combination's keeps; the scale is not applied): [before_0, after_0, before_1, ...], each |tau| exact in\n"
    "float64, summed in a fixed order. The base and inputs as linear_combination's (addresses or file spans). Returns\n"
    "(bad, failed, err, norms) as gram does. The GIL is released while it runs.");

/* dare_norms on the chunked reads: one chunk, one thread, each input's lanes carried across the stretches */
typedef struct {
    ChunkedReads reads;
    const Keep *keeps;
    Keep *stretch_keeps; /* count */
    int base_kind;
    const int *input_kinds;
    Py_ssize_t first;
    double *lanes;
} NormsChunk;

static Py_ssize_t norms_stretch(ChunkedReads *reads, int thread, Py_ssize_t c, Py_ssize_t first, Py_ssize_t m, const void **at) {
    NormsChunk *g = (NormsChunk *)reads;
    (void)thread;
    (void)c;
    keeps_from(g->keeps, reads->count, first, g->stretch_keeps);
    Job job = {NULL, KIND_F32, m, at[0], g->base_kind, reads->count, at + 1, g->input_kinds, NULL, 0.0f, 0.0f, 0, g->stretch_keeps, g->first + first,
               0, 1.0f, 0};
    return dare_norms_of(&job, g->lanes);
}

static PyObject *dare_norms(PyObject *self, PyObject *args) {
    PyObject *base_obj;
    int base_kind;
    Py_ssize_t n, first;
    PyObject *inputs_obj, *kinds_obj, *keeps_obj;
    if (!PyArg_ParseTuple(args, "nOiOOOn", &n, &base_obj, &base_kind, &inputs_obj, &kinds_obj, &keeps_obj, &first)) return NULL;
    if ((base_kind != KIND_F32 && base_kind != KIND_BF16) || n < 0 || first < 0) {
        PyErr_SetString(PyExc_ValueError, "unknown storage kind, negative count or first");
        return NULL;
    }
    PyObject *inputs = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    PyObject *kinds = inputs ? PySequence_Fast(kinds_obj, "kinds must be a sequence") : NULL;
    PyObject *result = NULL;
    Source *sources = NULL;
    int *input_kinds = NULL;
    Keep *keeps = NULL, *stretch_keeps = NULL;
    double *lanes = NULL, *norms = NULL;
    Py_ssize_t *bounds = NULL;
    NormsChunk job;
    memset(&job, 0, sizeof(job));
    if (kinds == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
    if (count < 1 || count > MAX_INPUTS || PySequence_Fast_GET_SIZE(kinds) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs and kinds must have the same length (1 to 4096)");
        goto done;
    }
    if (parse_bounds(Py_None, n, &bounds) < 0) goto done;
    sources = PyMem_Malloc((size_t)(count + 1) * sizeof(*sources)); /* the base first */
    input_kinds = PyMem_Malloc((size_t)count * sizeof(*input_kinds));
    stretch_keeps = PyMem_Malloc((size_t)count * sizeof(*stretch_keeps));
    lanes = PyMem_RawCalloc((size_t)count * 2 * LANES, sizeof(double));
    norms = PyMem_RawCalloc((size_t)count * 2, sizeof(double));
    if (sources == NULL || input_kinds == NULL || stretch_keeps == NULL || lanes == NULL || norms == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (!parse_source(base_obj, base_kind, &sources[0]) || !parse_sources(inputs, kinds, count, sources + 1)) goto done;
    for (Py_ssize_t t = 0; t < count; t++) input_kinds[t] = sources[t + 1].kind;
    if ((keeps = parse_keeps(keeps_obj, count)) == NULL) goto done;
    if (!chunked_reads(&job.reads, sources, 1, count, bounds, 1, 1, norms_stretch)) goto done;
    job.keeps = keeps;
    job.stretch_keeps = stretch_keeps;
    job.base_kind = base_kind;
    job.input_kinds = input_kinds;
    job.first = first;
    job.lanes = lanes;
    Py_BEGIN_ALLOW_THREADS
    run_chunks(&job.reads.chunked, 1);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < count; t++) {
        norms[2 * t] = lanes_total(lanes + 2 * LANES * t);
        norms[2 * t + 1] = lanes_total(lanes + 2 * LANES * t + LANES);
    }
    ChunkAnswers a = chunked_answers(&job.reads);
    result = answer_with_doubles(a.bad, a.failed, a.err, norms, count * 2);
done:
    free_chunked_reads(&job.reads);
    PyMem_Free(sources);
    PyMem_Free(input_kinds);
    PyMem_Free(keeps);
    PyMem_Free(stretch_keeps);
    PyMem_RawFree(lanes);
    PyMem_RawFree(norms);
    PyMem_Free(bounds);
    Py_XDECREF(inputs);
    Py_XDECREF(kinds);
    return result;
}

typedef struct {
    ChunkedReads reads;
    double *scratch;       /* per thread: scratch_size each */
    size_t scratch_size;
    int base_kind, diagonal;
    const int *input_kinds;
    float *sum;
    double *matrices;      /* per chunk: count * count, from 0 */
} GramChunks;

static Py_ssize_t gram_stretch(ChunkedReads *reads, int thread, Py_ssize_t c, Py_ssize_t first, Py_ssize_t m, const void **at) {
    GramChunks *g = (GramChunks *)reads;
    const Py_ssize_t K = reads->count;
    GramJob job = {m, reads->has_base ? at[0] : NULL, g->base_kind, K, at + 1, g->input_kinds, g->scratch + (size_t)thread * g->scratch_size,
                   g->matrices + (size_t)c * (size_t)(K * K), g->sum != NULL ? g->sum + first : NULL, g->diagonal};
    return gram(&job);
}

PyDoc_STRVAR(gram_doc,
    "gram(n, base, base_kind, inputs, kinds, sum, diagonal[, bounds, threads]) -> (int, int, int, int, int, list[float])\n\n"
    "The float64 Gram matrix (row-major, K * K) of the inputs' entries [0, n), or of their differences from the base\n"
    "(0: none), each product exact, added with fma in float64. Each input (and the base) is an address in memory or a\n"
    "(file descriptor, byte position) pair of its entry 0, read by stretches. sum (address 0: none): n float32 entries\n"
    "that receive x_0 + x_1 + ... in that order. diagonal: only the squared norms (the other entries 0).\n"
    "bounds (None: one chunk): chunk c is entries [bounds[c], bounds[c + 1]); each chunk's matrix is made on its own\n"
    "and the chunks' matrices added in chunk order, the chunks taken by up to `threads` threads: the same sums on any\n"
    "thread count. Returns (bad, failed, err, failed_start, failed_stop, values): bad -1, or the first input with a\n"
    "NaN/Inf entry (0 the base, 1 + t input t); failed -1, or the source whose read failed (numbered as bad; err its\n"
    "errno, -1 where the file ended; in the chunk [failed_start, failed_stop)), and then nothing else is to be used.\n"
    "The GIL is released while it runs.");

static PyObject *gram_matrix(PyObject *self, PyObject *args) {
    unsigned long long sum_addr;
    int base_kind;
    Py_ssize_t n;
    PyObject *base_obj, *inputs_obj, *kinds_obj;
    PyObject *bounds_obj = Py_None;
    int diagonal, threads = 1;
    if (!PyArg_ParseTuple(args, "nOiOOKp|Oi", &n, &base_obj, &base_kind, &inputs_obj, &kinds_obj, &sum_addr, &diagonal, &bounds_obj, &threads))
        return NULL;
    if ((base_kind != KIND_F32 && base_kind != KIND_BF16) || n < 0) {
        PyErr_SetString(PyExc_ValueError, "unknown storage kind or negative count");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    PyObject *inputs = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    PyObject *kinds = inputs ? PySequence_Fast(kinds_obj, "kinds must be a sequence") : NULL;
    PyObject *result = NULL;
    Source *sources = NULL;
    int *input_kinds = NULL;
    double *scratch = NULL, *matrices = NULL, *total = NULL;
    Py_ssize_t *bounds = NULL;
    GramChunks job;
    memset(&job, 0, sizeof(job));
    if (kinds == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
    if (count < 1 || count > 256 || PySequence_Fast_GET_SIZE(kinds) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs and kinds must have the same length (1 to 256)");
        goto done;
    }
    Py_ssize_t chunks = parse_bounds(bounds_obj, n, &bounds);
    if (chunks < 0) goto done;
    if (threads > chunks) threads = (int)chunks;
    const size_t scratch_size = (size_t)count * BLOCK + (size_t)(count * count) * LANES; /* + gram_avx512's lanes */
    sources = PyMem_Malloc((size_t)(count + 1) * sizeof(*sources)); /* the base first (unused without one) */
    input_kinds = PyMem_Malloc((size_t)count * sizeof(*input_kinds));
    scratch = PyMem_RawMalloc((size_t)threads * scratch_size * sizeof(double));
    matrices = PyMem_RawCalloc((size_t)chunks * (size_t)(count * count), sizeof(double));
    total = PyMem_RawCalloc((size_t)(count * count), sizeof(double));
    if (sources == NULL || input_kinds == NULL || scratch == NULL || matrices == NULL || total == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int has_base = base_given(base_obj);
    if (has_base < 0 || (has_base && !parse_source(base_obj, base_kind, &sources[0]))) goto done;
    if (!parse_sources(inputs, kinds, count, sources + 1)) goto done;
    for (Py_ssize_t t = 0; t < count; t++) input_kinds[t] = sources[t + 1].kind;
    if (!chunked_reads(&job.reads, sources, has_base, count, bounds, chunks, threads, gram_stretch)) goto done;
    job.scratch = scratch;
    job.scratch_size = scratch_size;
    job.base_kind = base_kind;
    job.diagonal = diagonal;
    job.input_kinds = input_kinds;
    job.sum = sum_addr != 0 ? (float *)(uintptr_t)sum_addr : NULL;
    job.matrices = matrices;
    Py_BEGIN_ALLOW_THREADS
    run_chunks(&job.reads.chunked, threads);
    for (Py_ssize_t c = 0; c < chunks; c++) /* in chunk order */
        for (Py_ssize_t i = 0; i < count * count; i++) total[i] += matrices[(size_t)c * (size_t)(count * count) + (size_t)i];
    Py_END_ALLOW_THREADS
    result = chunk_answer_with_doubles(chunked_answers(&job.reads), total, count * count);
done:
    free_chunked_reads(&job.reads);
    PyMem_Free(sources);
    PyMem_Free(input_kinds);
    PyMem_RawFree(scratch);
    PyMem_RawFree(matrices);
    PyMem_RawFree(total);
    PyMem_Free(bounds);
    Py_XDECREF(inputs);
    Py_XDECREF(kinds);
    return result;
}

/* For order statistics (ops/selection._ranked_in_brackets): per bracket [lo, hi], how many values are not >= lo
 * (below) and not <= hi (above) -- a NaN counts as both, so the totals give it away -- and the values inside, written
 * to that bracket's buffer in order while it has room (the count goes on past it; each buffer has one slot more than
 * its capacity, written over). One pass for every bracket. */
typedef struct {
    const void *values;
    int f64;
    Py_ssize_t n, count;
    const double *lo, *hi;
    void **out;
    const Py_ssize_t *capacity;
    Py_ssize_t *below, *above, *inside;
} BracketJob;

/* entries [from, to) one at a time, without branches on the values (the stores go to a spare slot once full) */
#define BRACKET_SCALAR(T, from, to)                                                      \
    do {                                                                                 \
        const T *v = (const T *)job->values;                                             \
        for (Py_ssize_t i = 0; i < job->count; i++) {                                    \
            const T lo = (T)job->lo[i], hi = (T)job->hi[i];                              \
            T *out = (T *)job->out[i];                                                   \
            Py_ssize_t below = 0, above = 0, inside = job->inside[i], cap = job->capacity[i]; \
            for (Py_ssize_t j = (from); j < (to); j++) {                                 \
                const T x = v[j];                                                        \
                const int at_least = x >= lo, not_above = x <= hi;                       \
                below += !at_least;                                                      \
                above += !not_above;                                                     \
                out[inside < cap ? inside : cap] = x;                                    \
                inside += at_least & not_above;                                          \
            }                                                                            \
            job->below[i] += below;                                                      \
            job->above[i] += above;                                                      \
            job->inside[i] = inside;                                                     \
        }                                                                                \
    } while (0)

static void bracket_generic(BracketJob *job) {
    if (job->f64)
        BRACKET_SCALAR(double, 0, job->n);
    else
        BRACKET_SCALAR(float, 0, job->n);
}

#if X86_DISPATCH
/* float32, eight values per comparison: the counts from the comparison masks, the inside values stored where a
 * group has any (about one group in ten per bracket at the quartiles' widths) */
__attribute__((target("avx2,fma"))) static void bracket_avx2_f32(BracketJob *job) {
    const float *v = (const float *)job->values;
    const Py_ssize_t whole = job->n / 8 * 8;
    for (Py_ssize_t i = 0; i < job->count; i++) {
        const float lo_s = (float)job->lo[i], hi_s = (float)job->hi[i];
        const __m256 lo = _mm256_set1_ps(lo_s), hi = _mm256_set1_ps(hi_s);
        float *out = (float *)job->out[i];
        Py_ssize_t at_least_total = 0, not_above_total = 0, inside = job->inside[i], cap = job->capacity[i];
        for (Py_ssize_t j0 = 0; j0 < whole;) {
            /* counts in 32-bit lanes, flushed every 2^20 groups */
            Py_ssize_t stop = j0 + ((Py_ssize_t)8 << 20) < whole ? j0 + ((Py_ssize_t)8 << 20) : whole;
            __m256i ge_count = _mm256_setzero_si256(), le_count = _mm256_setzero_si256();
            for (; j0 < stop; j0 += 8) {
                __m256 x = _mm256_loadu_ps(v + j0);
                __m256 ge = _mm256_cmp_ps(x, lo, _CMP_GE_OQ), le = _mm256_cmp_ps(x, hi, _CMP_LE_OQ);
                ge_count = _mm256_sub_epi32(ge_count, _mm256_castps_si256(ge)); /* a true lane is -1 */
                le_count = _mm256_sub_epi32(le_count, _mm256_castps_si256(le));
                unsigned in = (unsigned)_mm256_movemask_ps(_mm256_and_ps(ge, le));
                while (in) {
                    int l = __builtin_ctz(in);
                    out[inside < cap ? inside : cap] = v[j0 + l];
                    inside++;
                    in &= in - 1;
                }
            }
            int lanes_ge[8], lanes_le[8];
            _mm256_storeu_si256((__m256i *)lanes_ge, ge_count);
            _mm256_storeu_si256((__m256i *)lanes_le, le_count);
            for (int l = 0; l < 8; l++) {
                at_least_total += lanes_ge[l];
                not_above_total += lanes_le[l];
            }
        }
        job->below[i] += whole - at_least_total;
        job->above[i] += whole - not_above_total;
        job->inside[i] = inside;
    }
    BRACKET_SCALAR(float, whole, job->n); /* the last few values */
}
#endif

static void bracket_run(BracketJob *job) {
    for (Py_ssize_t i = 0; i < job->count; i++) job->below[i] = job->above[i] = job->inside[i] = 0;
#if X86_DISPATCH
    if (!job->f64 && use_avx2()) {
        bracket_avx2_f32(job);
        return;
    }
#endif
    bracket_generic(job);
}

PyDoc_STRVAR(bracket_counts_doc,
    "bracket_counts(values, n, f64, brackets, outs, capacities) -> list[(below, above, inside)]\n\n"
    "For n float32 (f64: float64) values at address ``values`` and each bracket (lo, hi) (its bounds as the values'\n"
    "type): how many are not >= lo, not <= hi (a NaN counts in both), and inside [lo, hi]; the inside values go to the\n"
    "bracket's buffer at outs[i] in order, up to capacities[i] of them (each buffer must hold one more: a spare slot\n"
    "written over once it is full). The GIL is released while it runs.");

static PyObject *bracket_counts(PyObject *self, PyObject *args) {
    unsigned long long values_addr;
    Py_ssize_t n;
    int f64;
    PyObject *brackets_obj, *outs_obj, *caps_obj;
    if (!PyArg_ParseTuple(args, "KnpOOO", &values_addr, &n, &f64, &brackets_obj, &outs_obj, &caps_obj)) return NULL;
    PyObject *brackets = PySequence_Fast(brackets_obj, "brackets must be a sequence");
    PyObject *outs = brackets ? PySequence_Fast(outs_obj, "outs must be a sequence") : NULL;
    PyObject *caps = outs ? PySequence_Fast(caps_obj, "capacities must be a sequence") : NULL;
    PyObject *result = NULL;
    double *bounds = NULL;
    void **out = NULL;
    Py_ssize_t *counts = NULL;
    if (caps == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(brackets);
    if (n < 0 || count < 1 || count > 64 || PySequence_Fast_GET_SIZE(outs) != count || PySequence_Fast_GET_SIZE(caps) != count) {
        PyErr_SetString(PyExc_ValueError, "1 to 64 brackets, one buffer and capacity each, n >= 0");
        goto done;
    }
    bounds = PyMem_Malloc((size_t)count * 2 * sizeof(double));
    out = PyMem_Malloc((size_t)count * sizeof(void *));
    counts = PyMem_Malloc((size_t)count * 4 * sizeof(Py_ssize_t));
    if (bounds == NULL || out == NULL || counts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(brackets, i), "dd", &bounds[i], &bounds[count + i])) goto done;
        out[i] = (void *)(uintptr_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(outs, i));
        counts[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(caps, i));
        if (PyErr_Occurred()) goto done;
        if (counts[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative capacity");
            goto done;
        }
    }
    BracketJob job = {(const void *)(uintptr_t)values_addr, f64, n, count, bounds, bounds + count, out, counts,
                      counts + count, counts + 2 * count, counts + 3 * count};
    Py_BEGIN_ALLOW_THREADS
    bracket_run(&job);
    Py_END_ALLOW_THREADS
    result = PyList_New(count);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = Py_BuildValue("(nnn)", job.below[i], job.above[i], job.inside[i]);
        if (item == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    PyMem_Free(bounds);
    PyMem_Free(out);
    PyMem_Free(counts);
    Py_XDECREF(brackets);
    Py_XDECREF(outs);
    Py_XDECREF(caps);
    return result;
}

static PyObject *set_max_isa(PyObject *self, PyObject *arg) {
    long level = PyLong_AsLong(arg);
    if (level == -1 && PyErr_Occurred()) return NULL;
    if (level < 0 || level > 2) {
        PyErr_SetString(PyExc_ValueError, "0 (portable), 1 (AVX2 at most) or 2 (the fastest)");
        return NULL;
    }
    max_isa = (int)level;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"_max_isa", set_max_isa, METH_O, "For tests: 0 the portable code paths only, 1 AVX2 at most, 2 the fastest the CPU has."},
    {"linear_combination", linear_combination, METH_VARARGS, linear_combination_doc},
    {"gram", gram_matrix, METH_VARARGS, gram_doc},
    {"dare_norms", dare_norms, METH_VARARGS, dare_norms_doc},
    {"abs_sums", abs_sums, METH_VARARGS, abs_sums_doc},
    {"bracket_counts", bracket_counts, METH_VARARGS, bracket_counts_doc},
    {"task_variance", task_variance, METH_VARARGS, task_variance_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused entrywise kernels (see fused.c).", -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
    fill_keep_of_byte();
    PyObject *m = PyModule_Create(&module);
    /* whether file sources can be read here (pread); without it only inputs in memory */
    if (m != NULL && PyModule_AddIntConstant(m, "READS_FILES", HAVE_PREAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
