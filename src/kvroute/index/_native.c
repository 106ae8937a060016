/* kvroute.index._native: the compiled core of the prefix index (docs/design.md §12).
 *
 * Three parts, all written for this project:
 *   1. xxh3-64 with a seed, from the published XXH3 specification (docs/notes/
 *      issue-12-research.md §B lists the paths and the test vectors tests/unit/index/
 *      test_native.py checks), and our chained block hash over big-endian token ids
 *      (index/hashing.py is the reference).
 *   2. NativeMap: an insertion-ordered map of u64 -> u64 in flat arrays (a dense entry array
 *      in store order plus an open-addressing slot array), so 10^7 blocks are two arrays and
 *      not 10^7 Python objects. Keys or values that are not u64 ints (tuples for non-GPU
 *      media, bytes hashes, holder masks past bit 63) are kept as object references in the
 *      same entry, so the map keeps exact dict semantics for every key the index uses.
 *   3. The hot loops of index/native_index.py: the common store and remove of `apply`, the
 *      match walk, clearing and evicting a source. Each mirrors a loop of
 *      index/prefix_index.py (the reference model) and hands anything unusual back to it.
 *
 * Events arrive decoded by msgspec (events/wire.py) and are read here as Python objects of
 * known types, with one exception: a BlockStored's token ids may arrive as the msgpack bytes
 * of their array, which `tok_scan` reads (bounds-checked, fuzzed under ASan).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;
typedef unsigned __int128 u128;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define HOST_BIG_ENDIAN 1
#else
#define HOST_BIG_ENDIAN 0
#endif

/* Start loading the cache line at p. Not __builtin_prefetch(p) for reads: GCC 12 at -O2 (the
 * extension's build) deletes a read prefetch that follows an early return, as in prefetch_slot,
 * and so every prefetch of the apply loop was compiled out (objdump found none in apply_run;
 * docs/notes/issue-12-next.md). An asm volatile statement is never deleted. */
#if defined(__x86_64__) || defined(__i386__)
static inline void prefetch(const void *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p)); }
#else
static inline void prefetch(const void *p) { prefetch(p, 1, 3); }
#endif

/* ===================================================================== xxh3-64 (spec) */

#define P32_1 0x9E3779B1U
#define P32_2 0x85EBCA77U
#define P32_3 0xC2B2AE3DU
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL
#define PMX1 0x165667919E3779F9ULL
#define PMX2 0x9FB21C651E98DF25ULL
#define SECRET_LEN 192

/* The default secret, as printed in the specification's "Seed and Secret" section. */
static const u8 k_secret[SECRET_LEN] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* The specification reads input and secret words little-endian. */
static inline u64 rd64(const u8 *p) {
    u64 v;
    memcpy(&v, p, 8);
#if HOST_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline u32 rd32(const u8 *p) {
    u32 v;
    memcpy(&v, p, 4);
#if HOST_BIG_ENDIAN
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline void wr64(u8 *p, u64 v) {
#if HOST_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

static inline u64 avalanche(u64 x) {
    x ^= x >> 37;
    x *= PMX1;
    return x ^ (x >> 32);
}

static inline u64 avalanche_xxh64(u64 x) {
    x ^= x >> 33;
    x *= P64_2;
    x ^= x >> 29;
    x *= P64_3;
    return x ^ (x >> 32);
}

/* The 128-bit product of a and b, its halves xor-ed. */
static inline u64 fold128(u64 a, u64 b) {
    u128 m = (u128)a * b;
    return (u64)m ^ (u64)(m >> 64);
}

static inline u64 mix16(const u8 *in, const u8 *sec, u64 seed) {
    return fold128(rd64(in) ^ (rd64(sec) + seed), rd64(in + 8) ^ (rd64(sec + 8) - seed));
}

static u64 xxh3_0to16(const u8 *in, size_t len, u64 seed) {
    const u8 *s = k_secret;
    if (len > 8) {
        u64 lo = ((rd64(s + 24) ^ rd64(s + 32)) + seed) ^ rd64(in);
        u64 hi = ((rd64(s + 40) ^ rd64(s + 48)) - seed) ^ rd64(in + len - 8);
        return avalanche(len + __builtin_bswap64(lo) + hi + fold128(lo, hi));
    }
    if (len >= 4) {
        u64 seed2 = seed ^ ((u64)__builtin_bswap32((u32)seed) << 32);
        u64 comb = (u64)rd32(in + len - 4) | ((u64)rd32(in) << 32);
        u64 v = ((rd64(s + 8) ^ rd64(s + 16)) - seed2) ^ comb;
        v ^= rotl64(v, 49) ^ rotl64(v, 24);
        v *= PMX2;
        v ^= (v >> 35) + len;
        v *= PMX2;
        return v ^ (v >> 28);
    }
    if (len > 0) {
        u32 c = (u32)in[len - 1] | ((u32)len << 8) | ((u32)in[0] << 16) | ((u32)in[len >> 1] << 24);
        u64 v = ((u64)(rd32(s) ^ rd32(s + 4)) + seed) ^ (u64)c;
        return avalanche_xxh64(v);
    }
    return avalanche_xxh64(seed ^ rd64(s + 56) ^ rd64(s + 64));
}

static u64 xxh3_17to240(const u8 *in, size_t len, u64 seed) {
    const u8 *s = k_secret;
    u64 acc = (u64)len * P64_1;
    if (len <= 128) {
        size_t rounds = ((len - 1) >> 5) + 1;
        for (size_t r = rounds; r-- > 0;) {
            acc += mix16(in + 16 * r, s + 32 * r, seed);
            acc += mix16(in + len - 16 - 16 * r, s + 32 * r + 16, seed);
        }
        return avalanche(acc);
    }
    size_t chunks = len >> 4;
    for (size_t i = 0; i < 8; i++) acc += mix16(in + 16 * i, s + 16 * i, seed);
    acc = avalanche(acc);
    for (size_t i = 8; i < chunks; i++) acc += mix16(in + 16 * i, s + 16 * (i - 8) + 3, seed);
    acc += mix16(in + len - 16, s + 119, seed);
    return avalanche(acc);
}

#if defined(__SSE2__) && !HOST_BIG_ENDIAN
/* The same stripe step two lanes at a time (SSE2 is part of x86-64): the specification's
 * per-lane operations, a 32x32->64 multiply of each lane's halves and the neighbour's input
 * added, map onto _mm_mul_epu32 and a swap of the two 64-bit halves. A 100-token block (400
 * bytes) takes this path: xxh3_long was ~13 % of the AIBrix apply (docs/notes/issue-12-next.md,
 * seventh session). */
static inline void accumulate(u64 *acc, const u8 *stripe, const u8 *sec) {
    for (int j = 0; j < 4; j++) {
        __m128i a = _mm_loadu_si128((const __m128i *)(acc + 2 * j));
        __m128i d = _mm_loadu_si128((const __m128i *)(stripe + 16 * j));
        __m128i k = _mm_xor_si128(d, _mm_loadu_si128((const __m128i *)(sec + 16 * j)));
        __m128i product = _mm_mul_epu32(k, _mm_srli_epi64(k, 32));
        __m128i swapped = _mm_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
        a = _mm_add_epi64(a, _mm_add_epi64(product, swapped));
        _mm_storeu_si128((__m128i *)(acc + 2 * j), a);
    }
}
#else
static inline void accumulate(u64 *acc, const u8 *stripe, const u8 *sec) {
    for (int i = 0; i < 8; i++) {
        u64 d = rd64(stripe + 8 * i);
        u64 k = d ^ rd64(sec + 8 * i);
        acc[i ^ 1] += d;
        acc[i] += (k & 0xffffffffULL) * (k >> 32);
    }
}
#endif

static u64 xxh3_long(const u8 *in, size_t len, const u8 *sec) {
    u64 acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    const size_t stripes = (SECRET_LEN - 64) / 8, block = 64 * stripes;
    size_t full = (len - 1) / block; /* the last block is kept for the end, even when full */
    for (size_t b = 0; b < full; b++) {
        for (size_t n = 0; n < stripes; n++) accumulate(acc, in + b * block + n * 64, sec + n * 8);
        for (int i = 0; i < 8; i++) {
            u64 a = acc[i];
            a ^= a >> 47;
            a ^= rd64(sec + SECRET_LEN - 64 + 8 * i);
            acc[i] = a * P32_1;
        }
    }
    const u8 *last = in + full * block;
    size_t rest = len - full * block;
    for (size_t n = 0; n < (rest - 1) / 64; n++) accumulate(acc, last + n * 64, sec + n * 8);
    accumulate(acc, in + len - 64, sec + SECRET_LEN - 64 - 7);
    u64 r = (u64)len * P64_1;
    for (int i = 0; i < 4; i++)
        r += fold128(acc[2 * i] ^ rd64(sec + 11 + 16 * i), acc[2 * i + 1] ^ rd64(sec + 19 + 16 * i));
    return avalanche(r);
}

static u64 xxh3_64(const u8 *in, size_t len, u64 seed) {
    if (len <= 16) return xxh3_0to16(in, len, seed);
    if (len <= 240) return xxh3_17to240(in, len, seed);
    if (seed == 0) return xxh3_long(in, len, k_secret);
    u8 sec[SECRET_LEN]; /* past 240 bytes a seed derives its own secret */
    for (int i = 0; i < SECRET_LEN / 16; i++) {
        wr64(sec + 16 * i, rd64(k_secret + 16 * i) + seed);
        wr64(sec + 16 * i + 8, rd64(k_secret + 16 * i + 8) - seed);
    }
    return xxh3_long(in, len, sec);
}

/* ============================================================ ints in and out */

/* A token id: 0 ok; -1 not an int; -2 out of [0, 2**32). No exception is left set. */
static inline int read_token(PyObject *o, u32 *out) {
    if (PyLong_CheckExact(o)) {
#if PY_VERSION_HEX >= 0x030C0000
        if (PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
            if (v < 0 || v > 0xFFFFFFFFL) return -2;
            *out = (u32)v;
            return 0;
        }
#else
        Py_ssize_t size = Py_SIZE(o);
        if (size == 0) {
            *out = 0;
            return 0;
        }
        if (size == 1) {
            *out = (u32)((PyLongObject *)o)->ob_digit[0];
            return 0;
        }
#endif
    } else if (!PyLong_Check(o)) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -2;
    }
    if (v > 0xFFFFFFFFULL) return -2;
    *out = (u32)v;
    return 0;
}

/* 1 if `o` is an int in [0, 2**64) (stored in *out), 0 if not, -1 on error. */
static inline int as_u64(PyObject *o, u64 *out) {
    if (!PyLong_Check(o)) return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact((PyLongObject *)o)) {
        Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
        if (v < 0) return 0;
        *out = (u64)v;
        return 1;
    }
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size < 0) return 0;
    if (size == 0) {
        *out = 0;
        return 1;
    }
#if PyLong_SHIFT == 30
    /* Engine hashes are random u64s: two or three 30-bit digits, read here directly. */
    if (size <= 3) {
        const digit *d = ((PyLongObject *)o)->ob_digit;
        u64 v = (u64)d[0];
        if (size >= 2) v |= (u64)d[1] << 30;
        if (size == 3) {
            if (d[2] >> 4) return 0; /* 2**64 or more */
            v |= (u64)d[2] << 60;
        }
        *out = v;
        return 1;
    }
#else
    if (size == 1) {
        *out = (u64)((PyLongObject *)o)->ob_digit[0];
        return 1;
    }
#endif
#endif
    if (_PyLong_Sign(o) < 0) return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return 0;
    }
    *out = (u64)v;
    return 1;
}

/* Raised for token ids that are not uint32 (kvroute.errors.IndexStateError, set by configure). */
static PyObject *g_index_error = NULL;

/* Pack `count` token ids from `seq` (a list or tuple) big-endian into buf.
 * 0 ok; -1 with an exception set when `raise`, else -1 with none. */
static int pack_tokens_be(PyObject **items, Py_ssize_t count, u8 *buf, int raise) {
    for (Py_ssize_t i = 0; i < count; i++) {
        u32 t;
        if (read_token(items[i], &t) != 0) {
            if (raise) {
                PyObject *r = PyObject_Repr(items[i]);
                if (r == NULL) return -1;
                PyErr_Format(g_index_error ? g_index_error : PyExc_ValueError,
                             "token_ids: expected ints in [0, 2**32), got %.40U", r);
                Py_DECREF(r);
            }
            return -1;
        }
        u32 be = t;
#if !HOST_BIG_ENDIAN
        be = __builtin_bswap32(t);
#endif
        memcpy(buf + 4 * i, &be, 4);
    }
    return 0;
}

/* A scratch buffer for packed tokens: on the stack for common sizes. */
#define STACK_TOKENS 4096
typedef struct {
    u8 stack[STACK_TOKENS * 4];
    u8 *heap;
} scratch_t;

static u8 *scratch_get(scratch_t *s, Py_ssize_t tokens) {
    s->heap = NULL;
    if (tokens <= STACK_TOKENS) return s->stack;
    s->heap = PyMem_Malloc((size_t)tokens * 4);
    if (s->heap == NULL) PyErr_NoMemory();
    return s->heap;
}

static void scratch_free(scratch_t *s) {
    if (s->heap) PyMem_Free(s->heap);
}

/* ============================================================ msgpack token arrays */

/* The one place native code reads untrusted bytes. events/wire.py decodes a BlockStored's
 * `token_ids` as msgspec.Raw (the bytes of one msgpack object) when the index is native, so
 * no Python int is made per token; this reads them. Every read is bounds-checked against
 * `len`; tests/native_asan.sh fuzzes it under AddressSanitizer against msgspec's own decode
 * (tests/unit/index/test_native_tokens.py). Accepted: nil, or an array (fix, 16, 32) of
 * msgpack ints (fixints, uint8..64, int8..64), exactly what msgspec decodes as
 * `list[int] | None`. */
enum { TOK_BAD = -1, TOK_U32 = 0, TOK_NIL = 1, TOK_WIDE = 2 };

static inline u64 be_read(const u8 *p, int n) {
    u64 v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* One msgpack int at p[*pos] (< len): 1 and *v, *neg on success, 0 if not an int or cut.
 * Each width is spelled out: token ids are mostly fixints and uint16/uint32 (a generic
 * width loop cost ~4 ns per token). */
static inline int tok_int(const u8 *p, size_t len, size_t *pos, u64 *v, int *neg) {
    const u8 *q = p + *pos;
    size_t left = len - *pos - 1; /* bytes after the type byte */
    u8 b = q[0];
    *neg = 0;
    if (b <= 0x7f) {
        *v = b;
        *pos += 1;
        return 1;
    }
    if (b >= 0xe0) {
        *v = (u64)(int64_t)(int8_t)b;
        *neg = 1;
        *pos += 1;
        return 1;
    }
    int64_t s;
    switch (b) {
    case 0xcd:
        if (left < 2) return 0;
        *v = ((u64)q[1] << 8) | q[2];
        *pos += 3;
        return 1;
    case 0xce:
        if (left < 4) return 0;
        *v = ((u64)q[1] << 24) | ((u64)q[2] << 16) | ((u64)q[3] << 8) | q[4];
        *pos += 5;
        return 1;
    case 0xcc:
        if (left < 1) return 0;
        *v = q[1];
        *pos += 2;
        return 1;
    case 0xcf:
        if (left < 8) return 0;
        *v = be_read(q + 1, 8);
        *pos += 9;
        return 1;
    case 0xd0:
        if (left < 1) return 0;
        s = (int8_t)q[1];
        *pos += 2;
        break;
    case 0xd1:
        if (left < 2) return 0;
        s = (int16_t)(uint16_t)(((unsigned)q[1] << 8) | q[2]);
        *pos += 3;
        break;
    case 0xd2:
        if (left < 4) return 0;
        s = (int32_t)(u32)be_read(q + 1, 4);
        *pos += 5;
        break;
    case 0xd3:
        if (left < 8) return 0;
        s = (int64_t)be_read(q + 1, 8);
        *pos += 9;
        break;
    default:
        return 0;
    }
    *v = (u64)s;
    *neg = s < 0;
    return 1;
}

/* 1 if the 8 bytes at p[pos] are all there and all positive fixints: eight whole ids of one
 * byte each, tested with one load. The loops below test it only at an id that is itself a
 * fixint, so streams of other encodings pay nothing; runs of small ids (a small vocabulary,
 * the AIBrix apply workload in bench/index_bench.py) then take one step for eight ids instead
 * of eight of ~1-2 ns. */
static inline int fixint8(const u8 *p, size_t len, size_t pos, size_t ids_left, u64 *w) {
    if (ids_left < 8 || pos > len || len - pos < 8) return 0;
    memcpy(w, p + pos, 8);
    return (*w & 0x8080808080808080ULL) == 0;
}

/* tok_scan's loop when the ids are not written out (the verdict's pass, events/wire.py): of
 * the usual encodings (fixint, uint8/16/32) only the type byte is read, the value's bytes only
 * counted, their end checked against len by the next type byte's read or the final check. */
static int tok_check(const u8 *p, size_t len, size_t pos, size_t n, Py_ssize_t *count) {
    int wide = 0;
    for (size_t i = 0; i < n; i++) {
        if (pos >= len) return TOK_BAD;
        u8 b = p[pos];
        if (b <= 0x7f) {
            u64 w;
            if (fixint8(p, len, pos, n - i, &w)) {
                pos += 8;
                i += 7;
                continue;
            }
            pos += 1;
        } else if (b == 0xcd) {
            pos += 3;
        } else if (b == 0xce) {
            pos += 5;
        } else if (b == 0xcc) {
            pos += 2;
        } else {
            u64 v;
            int neg;
            if (!tok_int(p, len, &pos, &v, &neg)) return TOK_BAD;
            if (neg || v > 0xFFFFFFFFULL) wide = 1;
        }
    }
    if (pos != len) return TOK_BAD;
    *count = (Py_ssize_t)n;
    return wide ? TOK_WIDE : TOK_U32;
}

/* The 8 fixints fixint8 read (w: the bytes as loaded) as 8 big-endian u32s at out. */
static inline void put_fixint8(u8 *out, u64 w) {
#if defined(__SSE2__) && !HOST_BIG_ENDIAN
    /* each byte after three zero bytes: two unpacks with zeros */
    __m128i z = _mm_setzero_si128();
    __m128i h = _mm_unpacklo_epi8(z, _mm_cvtsi64_si128((long long)w));
    _mm_storeu_si128((__m128i *)out, _mm_unpacklo_epi16(z, h));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_unpackhi_epi16(z, h));
#else
    u8 bytes[8];
    memcpy(bytes, &w, 8);
    for (int k = 0; k < 8; k++) {
        u8 be[4] = {0, 0, 0, bytes[k]};
        memcpy(out + 4 * k, be, 4);
    }
#endif
}

/* Scan one msgpack object. TOK_U32: an array of ints in [0, 2**32), *count of them, written
 * big-endian to `out` when *count <= cap (out may be NULL); TOK_NIL: nil; TOK_WIDE: an array
 * of ints some of which are outside [0, 2**32) (msgspec takes them, the index counts the store
 * malformed); TOK_BAD: anything else, including trailing bytes. */
static int tok_scan(const u8 *p, size_t len, u8 *out, Py_ssize_t cap, Py_ssize_t *count) {
    *count = 0;
    if (len == 0) return TOK_BAD;
    u8 b = p[0];
    size_t pos, n;
    if (b == 0xc0) return len == 1 ? TOK_NIL : TOK_BAD;
    if (b >= 0x90 && b <= 0x9f) {
        n = b & 0x0f;
        pos = 1;
    } else if (b == 0xdc && len >= 3) {
        n = (size_t)be_read(p + 1, 2);
        pos = 3;
    } else if (b == 0xdd && len >= 5) {
        n = (size_t)be_read(p + 1, 4);
        pos = 5;
    } else {
        return TOK_BAD;
    }
    if (n > len - pos) return TOK_BAD; /* every int takes at least a byte */
    if (out == NULL || (Py_ssize_t)n > cap) return tok_check(p, len, pos, n, count);
    int wide = 0;
    for (size_t i = 0; i < n; i++) {
        if (pos >= len) return TOK_BAD;
        /* The usual encodings inline (as in tok_check), each value's bytes bounds-checked;
         * anything else through tok_int. */
        const u8 *q = p + pos;
        size_t left = len - pos;
        u64 v;
        if (q[0] <= 0x7f) {
            u64 w;
            if (fixint8(p, len, pos, n - i, &w)) {
                put_fixint8(out + 4 * i, w);
                pos += 8;
                i += 7;
                continue;
            }
            v = q[0];
            pos += 1;
        } else if (q[0] == 0xcd && left >= 3) {
            v = ((u64)q[1] << 8) | q[2];
            pos += 3;
        } else if (q[0] == 0xce && left >= 5) {
            v = ((u64)q[1] << 24) | ((u64)q[2] << 16) | ((u64)q[3] << 8) | q[4];
            pos += 5;
        } else {
            int neg;
            if (!tok_int(p, len, &pos, &v, &neg)) return TOK_BAD;
            if (neg || v > 0xFFFFFFFFULL) {
                wide = 1; /* out is left partly written: the caller reads it only for TOK_U32 */
                continue;
            }
        }
        u32 be = (u32)v;
#if !HOST_BIG_ENDIAN
        be = __builtin_bswap32(be);
#endif
        memcpy(out + 4 * i, &be, 4);
    }
    if (pos != len) return TOK_BAD;
    *count = (Py_ssize_t)n;
    return wide ? TOK_WIDE : TOK_U32;
}

/* token_scan(raw) -> (status, count): tok_scan over a bytes-like object, for the tests. */
static PyObject *py_token_scan(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t count;
    int status = tok_scan(view.buf, (size_t)view.len, NULL, 0, &count);
    PyBuffer_Release(&view);
    return Py_BuildValue("(in)", status, count);
}

/* token_pack(raw) -> bytes | None: the big-endian u32 packing the apply hashes, for an array
 * tok_scan calls TOK_U32; None for anything else. For the tests and benchmarks. */
static PyObject *py_token_pack(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n;
    PyObject *out = NULL;
    if (tok_scan(view.buf, (size_t)view.len, NULL, 0, &n) != TOK_U32) {
        out = Py_NewRef(Py_None);
    } else if ((out = PyBytes_FromStringAndSize(NULL, 4 * n)) != NULL) {
        Py_ssize_t again;
        u8 *buf = (u8 *)PyBytes_AS_STRING(out);
        if (tok_scan(view.buf, (size_t)view.len, buf, n, &again) != TOK_U32 || again != n) {
            Py_SETREF(out, NULL);
            PyErr_SetString(PyExc_AssertionError, "token_pack: the two scans disagree");
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* token_list(raw) -> list[int] | None: msgspec's `list[int] | None` of the same bytes, for the
 * paths that read token ids as Python ints (the reference model's branches). ValueError when
 * the bytes are not that. */
static PyObject *py_token_list(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const u8 *p = view.buf;
    size_t len = (size_t)view.len;
    Py_ssize_t n;
    PyObject *out = NULL;
    int status = tok_scan(p, len, NULL, 0, &n);
    if (status == TOK_NIL) {
        out = Py_NewRef(Py_None);
    } else if (status == TOK_BAD) {
        PyErr_SetString(PyExc_ValueError, "token_ids: expected a msgpack array of ints or nil");
    } else if ((out = PyList_New(n)) != NULL) {
        size_t pos = p[0] <= 0x9f ? 1 : p[0] == 0xdc ? 3 : 5;
        for (Py_ssize_t i = 0; i < n; i++) {
            u64 v;
            int neg;
            tok_int(p, len, &pos, &v, &neg); /* validated by tok_scan */
            PyObject *o = neg ? PyLong_FromLongLong((long long)v) : PyLong_FromUnsignedLongLong(v);
            if (o == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, o);
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* Arrays of a map: big ones straight from mmap, so growth is an mremap (no copy, no second
 * resident copy) and a freed table goes back to the system at once; small ones from PyMem. */
#define BIG_ARRAY ((size_t)1 << 18)

#define HUGE_ARRAY ((size_t)4 << 20)

/* Huge pages for the big tables: 512x fewer page-table entries, which is what a fork copies.
 * The snapshot writer forks (persist/writer.py): at 10^7 blocks the loop's pause fell from
 * 34 ms to 5.5 ms (docs/design.md §14). Advice only; ignored where THP is off. */
static void advise_huge(void *p, size_t size) {
    if (size >= HUGE_ARRAY) madvise(p, size, MADV_HUGEPAGE);
}

/* `lazy`: no huge-page advice yet (a growing slot table, faulted in 4 KB at a time: prefault). */
static void *arr_alloc_as(size_t size, int lazy) {
    if (size < BIG_ARRAY) return PyMem_Malloc(size ? size : 1);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    if (!lazy) advise_huge(p, size);
    return p;
}

static void *arr_alloc(size_t size) { return arr_alloc_as(size, 0); }

static void arr_free(void *p, size_t size) {
    if (p == NULL) return;
    if (size < BIG_ARRAY)
        PyMem_Free(p);
    else
        munmap(p, size);
}

static void *arr_realloc(void *p, size_t old, size_t size) {
    if (p == NULL) return arr_alloc(size);
    if ((old >= BIG_ARRAY) == (size >= BIG_ARRAY)) { /* same allocator on both sides */
        if (old < BIG_ARRAY) return PyMem_Realloc(p, size);
        void *q = mremap(p, old, size, MREMAP_MAYMOVE);
        return q == MAP_FAILED ? NULL : q;
    }
    void *q = arr_alloc(size); /* across the threshold: a fresh block of the other kind */
    if (q != NULL) {
        memcpy(q, p, old < size ? old : size);
        arr_free(p, old);
    }
    return q;
}

/* ==================================================================== NativeMap */

#define F_LIVE 1u
#define F_OKEY 2u /* k holds a PyObject* (a key that is not a u64 int) */
#define F_OVAL 4u /* v holds a PyObject* (a value that is not a u64 int) */
/* The flags are a nibble per entry, two entries to a byte: half a byte per entry and map less
 * than a byte array (RSS per (block, source) at 10^6 blocks with one source 48.5 -> 47.5 B;
 * docs/notes/issue-12-next.md, eighth session). `fcap` counts entries, the array has
 * FLAG_BYTES(fcap) bytes. */
#define FLAG_BYTES(n) (((size_t)(n) + 1) / 2)
static inline unsigned flag_of(const u8 *flags, Py_ssize_t ix) {
    return (unsigned)(flags[ix >> 1] >> ((ix & 1) << 2)) & 15u;
}
static inline void flag_put(u8 *flags, Py_ssize_t ix, unsigned f) {
    u8 *p = &flags[ix >> 1];
    unsigned shift = (unsigned)(ix & 1) << 2;
    *p = (u8)((*p & ~(15u << shift)) | (f << shift));
}
#define FLAG(m, ix) flag_of((m)->flags, (ix))
/* A slot is 0 when empty (so a new table is zero pages, mapped lazily: no memset, no stall),
 * -1 when its entry was deleted, else ((entry index + 1) << TAG_BITS) | tag, the tag being low
 * bits of the key's slot hash: a probe reads an entry (a cache miss) only when tags agree. */
#define SLOT_EMPTY 0
#define SLOT_DUMMY (-1)
#define TAG_BITS 5
#define TAG_MASK ((1 << TAG_BITS) - 1)
#define MAX_ENTRIES (((Py_ssize_t)1 << (31 - TAG_BITS)) - 2)
#define SLOT_OF(ix, h) ((int32_t)((((int32_t)(ix) + 1) << TAG_BITS) | (int32_t)((h) & TAG_MASK)))
#define SLOT_IX(s) (((s) >> TAG_BITS) - 1)
#define MIN_SLOTS 16
/* Entries moved per insert while a table grows (at least). 32, not 8: the whole migration
 * costs the same, but it ends 4x sooner, and while it runs every key the new table lacks (every
 * new block) is looked for in the old table too, and the old table's memory is held: decode +
 * apply of the ingest workload 2.97 -> 2.75 us per event, RSS per entry at 10^6 blocks 58.7 ->
 * 48.6 B (docs/notes/issue-12-next.md). */
#define MIGRATE_STEP 32

typedef struct {
    u64 k, v;
} entry_t;

/* Entries an append may use: both arrays hold them. */
#define CAP(m) ((m)->ecap < (m)->fcap ? (m)->ecap : (m)->fcap)

/* Layout (docs/design.md §12): a dense entry array in store order (dead entries stay until a
 * compaction) and a slot table of entry indices, open addressing with linear probing, filled
 * to at most 3/4. A full table grows *incrementally*: the new table takes every insert and each
 * insert moves MIGRATE_STEP entries into it, so no insert rehashes the whole map; the router
 * moves more while idle (`migrate_some`, from PrefixIndex.maintain). Entries move in store
 * order, [old_pos, old_end): a sequential read, where walking the old table's slots read each
 * slot's entry at random (a cache miss per entry, ~40% of `migrate`). The old table is left as
 * it is until it is freed, so its slots of moved entries go stale: a probe of the old table
 * (only after the current one missed) takes a slot's entry only when it is live, and a live
 * entry it finds was not moved yet (a moved one is in the current table, probed first).
 * A slot position >= nslots names position (slot - nslots) of the old table. */
typedef struct {
    PyObject_HEAD
    entry_t *entries;
    u8 *flags;              /* per entry a nibble: F_LIVE | F_OKEY | F_OVAL, 0 when dead */
    Py_ssize_t ecap;        /* entries allocated */
    Py_ssize_t fcap;        /* entries the flags cover (= ecap, unless a resize failed half-way) */
    Py_ssize_t used;        /* entries written (live and dead) */
    Py_ssize_t live;
    Py_ssize_t first;       /* no live entry before this index */
    Py_ssize_t objects;     /* live entries holding an object key or value */
    int32_t *slots;         /* the current table: entry index, EMPTY or DUMMY */
    Py_ssize_t nslots;      /* any size (see home), or 0 before the first insert */
    Py_ssize_t filled;      /* non-EMPTY slots of the current table */
    int32_t *next;          /* the table the next growth takes, faulted in ahead, or NULL */
    Py_ssize_t next_nslots;
    Py_ssize_t next_fault;  /* its slots from here on are not faulted in yet (prefault) */
    Py_ssize_t fault_credit; /* inserts' worth of prefault not spent yet */
    u8 *retired;            /* a migrated-from table given back a piece at a time, or NULL */
    size_t retired_size, retired_pos;
    int32_t *old;           /* the table being migrated from, or NULL */
    Py_ssize_t old_nslots;
    Py_ssize_t old_pos;     /* the next entry to move into the current table ... */
    Py_ssize_t old_end;     /* ... up to this one (entries from here on were never in `old`) */
    int npend;              /* entries taken from [old_pos..) but not placed yet (migrate) */
    int32_t pend_ix[MIGRATE_STEP];
    u64 pend_h[MIGRATE_STEP];
    u64 version;            /* bumped on every insert and delete, for iterators */
} NativeMap;

static PyTypeObject NativeMapType;
static u64 g_hash_seed; /* per process, so engines cannot aim keys at one probe chain */

static inline u64 mix_u64(u64 k) {
    k ^= g_hash_seed;
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    return k ^ (k >> 33);
}

static inline u64 obj_slot_hash(Py_hash_t h) { return mix_u64((u64)h ^ 0x5bd1e9955bd1e995ULL); }

/* A hash's home slot in a table of n slots (any n: tables grow by half, not double). */
static inline size_t home(u64 h, size_t n) { return (size_t)(((u128)h * n) >> 64); }

static inline int32_t *slot_ptr(NativeMap *m, Py_ssize_t slot) {
    return slot < m->nslots ? &m->slots[slot] : &m->old[slot - m->nslots];
}

/* The entry index of int key k, or -1; *slot gets its slot, or when absent the first free
 * slot of the current table (-1 before the first insert). */
static inline Py_ssize_t find_int(NativeMap *m, u64 k, Py_ssize_t *slot) {
    if (m->nslots == 0) {
        *slot = -1;
        return -1;
    }
    u64 h = mix_u64(k);
    int32_t tag = (int32_t)(h & TAG_MASK);
    size_t n = (size_t)m->nslots, i = home(h, n);
    Py_ssize_t free_slot = -1;
    for (;;) {
        int32_t s = m->slots[i];
        if (s == SLOT_EMPTY) break;
        if (s == SLOT_DUMMY) {
            if (free_slot < 0) free_slot = (Py_ssize_t)i;
        } else if ((s & TAG_MASK) == tag) {
            int32_t ix = SLOT_IX(s);
            if (m->entries[ix].k == k && (FLAG(m, ix) & F_OKEY) == 0) {
                *slot = (Py_ssize_t)i;
                return ix;
            }
        }
        if (++i == n) i = 0;
    }
    if (free_slot < 0) free_slot = (Py_ssize_t)i;
    if (m->old) {
        size_t on = (size_t)m->old_nslots, j = home(h, on);
        for (;;) {
            int32_t s = m->old[j];
            if (s == SLOT_EMPTY) break;
            if (s > 0 && (s & TAG_MASK) == tag) {
                int32_t ix = SLOT_IX(s);
                /* F_LIVE: the slot of an entry moved and deleted since is stale (see above) */
                if (m->entries[ix].k == k && (FLAG(m, ix) & (F_LIVE | F_OKEY)) == F_LIVE) {
                    *slot = m->nslots + (Py_ssize_t)j;
                    return ix;
                }
            }
            if (++j == on) j = 0;
        }
    }
    *slot = free_slot;
    return -1;
}

/* Probe one table for an object key; -2 on a comparison error, -3 if the map changed during
 * a comparison (it calls Python: the caller starts over). */
static Py_ssize_t probe_obj(NativeMap *m, int32_t *table, Py_ssize_t n, PyObject *key, Py_hash_t h,
                            Py_ssize_t *found, Py_ssize_t *free_slot) {
    u64 sh = obj_slot_hash(h);
    int32_t tag = (int32_t)(sh & TAG_MASK);
    size_t i = home(sh, (size_t)n);
    for (;;) {
        int32_t s = table[i];
        int32_t ix = SLOT_IX(s);
        if (s == SLOT_EMPTY) {
            if (free_slot && *free_slot < 0) *free_slot = (Py_ssize_t)i;
            return -1;
        }
        if (s == SLOT_DUMMY) {
            if (free_slot && *free_slot < 0) *free_slot = (Py_ssize_t)i;
        } else if ((s & TAG_MASK) == tag && (FLAG(m, ix) & F_OKEY)) {
            PyObject *other = (PyObject *)(uintptr_t)m->entries[ix].k;
            int eq = other == key;
            if (!eq && PyObject_Hash(other) == h) {
                u64 version = m->version;
                Py_INCREF(other);
                eq = PyObject_RichCompareBool(other, key, Py_EQ);
                Py_DECREF(other);
                if (eq < 0) return -2;
                if (m->version != version) return -3;
            }
            if (eq) {
                *found = (Py_ssize_t)i;
                return ix;
            }
        }
        if (++i == (size_t)n) i = 0;
    }
}

static Py_ssize_t find_obj(NativeMap *m, PyObject *key, Py_hash_t h, Py_ssize_t *slot) {
    for (;;) {
        if (m->nslots == 0) {
            *slot = -1;
            return -1;
        }
        Py_ssize_t found = -1, free_slot = -1;
        Py_ssize_t ix = probe_obj(m, m->slots, m->nslots, key, h, &found, &free_slot);
        if (ix == -3) continue;
        if (ix == -2) return -2;
        if (ix >= 0) {
            *slot = found;
            return ix;
        }
        if (m->old) {
            ix = probe_obj(m, m->old, m->old_nslots, key, h, &found, NULL);
            if (ix == -3) continue;
            if (ix == -2) return -2;
            if (ix >= 0) {
                *slot = m->nslots + found;
                return ix;
            }
        }
        *slot = free_slot;
        return -1;
    }
}

/* A key as the map sees it: an int in [0, 2**64) or an object with its hash. */
typedef struct {
    int is_obj;
    u64 k;
    PyObject *obj;
    Py_hash_t hash;
} mkey_t;

static int make_key(PyObject *key, mkey_t *out) {
    int r = as_u64(key, &out->k);
    if (r < 0) return -1;
    out->obj = key;
    if (r == 1) {
        out->is_obj = 0;
        return 0;
    }
    out->is_obj = 1;
    out->hash = PyObject_Hash(key);
    return out->hash == -1 && PyErr_Occurred() ? -1 : 0;
}

static inline Py_ssize_t find_key(NativeMap *m, mkey_t *key, Py_ssize_t *slot) {
    return key->is_obj ? find_obj(m, key->obj, key->hash, slot) : find_int(m, key->k, slot);
}

static inline u64 entry_slot_hash(NativeMap *m, Py_ssize_t ix) {
    if (FLAG(m, ix) & F_OKEY) {
        /* The hash of a stored key cannot fail: it was computed once on insert. */
        return obj_slot_hash(PyObject_Hash((PyObject *)(uintptr_t)m->entries[ix].k));
    }
    return mix_u64(m->entries[ix].k);
}

static PyObject *value_of(NativeMap *m, Py_ssize_t ix) {
    if (FLAG(m, ix) & F_OVAL) {
        PyObject *v = (PyObject *)(uintptr_t)m->entries[ix].v;
        Py_INCREF(v);
        return v;
    }
    return PyLong_FromUnsignedLongLong(m->entries[ix].v);
}

static PyObject *key_of(NativeMap *m, Py_ssize_t ix) {
    if (FLAG(m, ix) & F_OKEY) {
        PyObject *k = (PyObject *)(uintptr_t)m->entries[ix].k;
        Py_INCREF(k);
        return k;
    }
    return PyLong_FromUnsignedLongLong(m->entries[ix].k);
}

/* An all-empty table: big ones are fresh mmap zero pages, touched only as slots fill; `lazy`
 * as in arr_alloc_as. */
static int32_t *new_table(Py_ssize_t n, int lazy) {
    size_t size = (size_t)n * sizeof(int32_t);
    int32_t *t = size < BIG_ARRAY ? PyMem_Calloc((size_t)n, sizeof(int32_t))
                                  : arr_alloc_as(size, lazy);
    if (t == NULL) PyErr_NoMemory();
    return t;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels refuse it and prefault touches */
#endif
#define FAULT_ENTRIES 4 /* a page of the next table faulted in per this many inserts */
#define NEXT_AT 73      /* % full when the next table is made (a growth comes at 75) */
#define PAGE_SLOTS ((Py_ssize_t)(4096 / sizeof(int32_t)))

/* The next slot table, made ahead of a growth and faulted in a page at a time while the
 * current table still takes the inserts (from NEXT_AT % full to the 3/4 that grows it). A table
 * made at the growth itself was filled at once: migration and new keys write random slots, so
 * the first inserts faulted in nearly every page of fresh zero memory, 5-30 ms in one apply for
 * a 10 MB table (huge pages are zeroed 2 MB a fault, and this VM's first touch of memory is
 * slow); that was the ingest latency's p99 tail (docs/notes/issue-12-next.md, seventh session).
 * `n` inserts' worth buys n / FAULT_ENTRIES pages of 4 KB (one per 4 inserts, 32 per idle
 * `maintain` slice); the table gets its huge-page advice once it is in (khugepaged may merge it
 * later; the fork of a snapshot copies fewer page-table entries then). */
static void prefault(NativeMap *m, Py_ssize_t n) {
    if (m->next == NULL || m->next_fault >= m->next_nslots) return;
    m->fault_credit += n;
    Py_ssize_t start = m->next_fault, pages = m->fault_credit / FAULT_ENTRIES;
    if (pages == 0) return;
    m->fault_credit -= pages * FAULT_ENTRIES;
    Py_ssize_t left = (m->next_nslots - start + PAGE_SLOTS - 1) / PAGE_SLOTS;
    Py_ssize_t end = pages < left ? start + pages * PAGE_SLOTS : m->next_nslots;
    size_t bytes = (size_t)(end - start) * sizeof(int32_t);
    if (madvise(m->next + start, bytes, MADV_POPULATE_WRITE)) /* all zero: write them */
        for (Py_ssize_t i = start; i < end; i += PAGE_SLOTS) m->next[i] = SLOT_EMPTY;
    m->next_fault = end;
    if (end == m->next_nslots) advise_huge(m->next, (size_t)m->next_nslots * sizeof(int32_t));
}

/* A migrated table is given back RETIRE_BYTES per RETIRE_EVERY inserts, or RETIRE_IDLE per
 * idle `maintain` slice: unmapping a 10 MB table of 4 KB pages at once took ~0.8 ms (perf:
 * unmap_page_range, freeing 2,500 pages), in one insert or one upkeep slice that a message
 * arriving meanwhile waited for. */
#define RETIRE_BYTES ((size_t)256 << 10)
#define RETIRE_EVERY 64
#define RETIRE_IDLE ((size_t)2 << 20)

static void retire_some(NativeMap *m, size_t bytes) {
    if (m->retired == NULL) return;
    size_t left = m->retired_size - m->retired_pos;
    if (bytes >= left) {
        munmap(m->retired + m->retired_pos, left);
        m->retired = NULL;
        m->retired_size = m->retired_pos = 0;
        return;
    }
    munmap(m->retired + m->retired_pos, bytes);
    m->retired_pos += bytes;
}

/* Free a migrated-from table: small ones at once, big (mmap) ones a piece at a time. */
static void retire_table(NativeMap *m, int32_t *table, Py_ssize_t nslots) {
    size_t size = (size_t)nslots * sizeof(int32_t);
    if (size < BIG_ARRAY) {
        arr_free(table, size);
        return;
    }
    retire_some(m, SIZE_MAX); /* the one before, if any, goes now */
    m->retired = (u8 *)table;
    m->retired_size = size;
    m->retired_pos = 0;
}

static void drop_next(NativeMap *m) {
    arr_free(m->next, (size_t)m->next_nslots * sizeof(int32_t));
    m->next = NULL;
    m->next_nslots = m->next_fault = m->fault_credit = 0;
}

static inline void place_hashed(NativeMap *m, Py_ssize_t ix, u64 h) {
    size_t n = (size_t)m->nslots, i = home(h, n);
    while (m->slots[i] > 0)
        if (++i == n) i = 0;
    if (m->slots[i] == SLOT_EMPTY) m->filled++;
    m->slots[i] = SLOT_OF(ix, h);
}

static inline void place(NativeMap *m, Py_ssize_t ix) { place_hashed(m, ix, entry_slot_hash(m, ix)); }

/* Place the entries `migrate` took last time (their slots were prefetched then). One deleted
 * since is skipped; until placed, an entry is still found through its old slot. */
static inline void place_pending(NativeMap *m) {
    for (int j = 0; j < m->npend; j++)
        if (FLAG(m, m->pend_ix[j])) place_hashed(m, m->pend_ix[j], m->pend_h[j]);
    m->npend = 0;
}

/* Move up to `n` entries of the old table into the current one, in store order. The entries
 * are read in order (no cache miss), but each lands on a random slot of the new table (one
 * miss each): a step hashes MIGRATE_STEP entries and prefetches their new slots, and places
 * them only at the next step (the next insert, usually), by when the slots have arrived. */
static void migrate(NativeMap *m, Py_ssize_t n) {
    while (m->old && n > 0) {
        if (m->old_pos < m->first) m->old_pos = m->first;
        Py_ssize_t end = m->old_pos + (n < MIGRATE_STEP ? n : MIGRATE_STEP);
        if (end > m->old_end) end = m->old_end;
        u64 hs[MIGRATE_STEP];
        int32_t ixs[MIGRATE_STEP];
        int k = 0;
        size_t ns = (size_t)m->nslots;
        for (Py_ssize_t ix = m->old_pos; ix < end; ix++) {
            if (!FLAG(m, ix)) continue; /* dead: its old slot (if any) is DUMMY or stale */
            ixs[k] = (int32_t)ix;
            hs[k] = entry_slot_hash(m, ix);
            prefetch(&m->slots[home(hs[k], ns)]);
            k++;
        }
        /* The next step's entries: read in order, but an insert's own misses come between. */
        if (end + MIGRATE_STEP < m->old_end) {
            for (int q = 0; q < MIGRATE_STEP; q += 4) prefetch(&m->entries[end + q]);
            prefetch(&m->flags[end >> 1]);
        }
        place_pending(m);
        memcpy(m->pend_ix, ixs, sizeof(int32_t) * (size_t)k);
        memcpy(m->pend_h, hs, sizeof(u64) * (size_t)k);
        m->npend = k;
        n -= end > m->old_pos ? end - m->old_pos : 1;
        m->old_pos = end;
        if (m->old_pos >= m->old_end) {
            place_pending(m);
            retire_table(m, m->old, m->old_nslots);
            m->old = NULL;
            m->old_nslots = m->old_pos = m->old_end = 0;
        }
    }
}

/* Slots for `live` entries, sized so a table starts a little over half full and is grown at
 * 3/4 (fuller costs probes, emptier costs memory; docs/design.md §12), and so a migration from
 * an old table of `old` slots ends before the new one is 3/4 full (it moves MIGRATE_STEP
 * entries per insert, and a table holds fewer live entries than slots; dead ones cost only a
 * flag read, and map_reserve finishes a late migration anyway). */
static Py_ssize_t table_size_for(Py_ssize_t live, Py_ssize_t old) {
    Py_ssize_t n = live + live / 4 * 3 + old / 8;
    return n < MIN_SLOTS ? MIN_SLOTS : n;
}

/* Resize the entry array and the flag array to `ecap` entries. Two arrays, so that a growth is
 * an mremap of each and nothing moves: with the flags after the entries in one block, each
 * growth moved the flags up, writing ~1 B per entry into fresh pages in one insert (a 1.5-2.4 ms
 * stall at 1.5-2.5 M entries; docs/notes/issue-12-next.md, seventh session). 0, or -1 with
 * MemoryError and the map as it was. */
static int entries_resize(NativeMap *m, Py_ssize_t ecap) {
    if (m->ecap != ecap) {
        entry_t *e = arr_realloc(m->entries, (size_t)m->ecap * sizeof(entry_t),
                                 (size_t)ecap * sizeof(entry_t));
        if (e == NULL) goto fail;
        m->entries = e;
        m->ecap = ecap;
    }
    if (m->fcap != ecap) { /* on failure the map keeps working on min(ecap, fcap) entries */
        u8 *f = arr_realloc(m->flags, FLAG_BYTES(m->fcap), FLAG_BYTES(ecap));
        if (f == NULL) goto fail;
        m->flags = f;
        m->fcap = ecap;
    }
    return 0;
fail:
    PyErr_NoMemory();
    return -1;
}

/* Compact: live entries to the front in order, a fresh table (O(live), the one full pass; it
 * runs when dead entries outnumber live ones, see map_reserve). */
static int map_compact(NativeMap *m) {
    Py_ssize_t nslots = table_size_for(m->live + 1, 0);
    if (nslots > ((Py_ssize_t)1 << 31)) {
        PyErr_SetString(PyExc_MemoryError, "NativeMap: more than 2**31 slots");
        return -1;
    }
    int32_t *slots = new_table(nslots, 0);
    if (slots == NULL) return -1;
    drop_next(m);
    Py_ssize_t n = 0;
    for (Py_ssize_t ix = m->first; ix < m->used; ix++) {
        unsigned f = FLAG(m, ix);
        if (!f) continue;
        m->entries[n] = m->entries[ix];
        flag_put(m->flags, n, f);
        n++;
    }
    arr_free(m->slots, (size_t)m->nslots * sizeof(int32_t));
    arr_free(m->old, (size_t)m->old_nslots * sizeof(int32_t)); /* all are placed again below */
    m->old = NULL;
    m->old_nslots = m->old_pos = m->old_end = 0;
    m->npend = 0;
    m->slots = slots;
    m->nslots = nslots;
    m->filled = 0;
    m->used = n;
    m->first = 0;
    for (Py_ssize_t ix = 0; ix < n; ix++) place(m, ix);
    m->version++;
    /* Give back what a shrunken map no longer needs (a source evicted or reset to a fraction). */
    Py_ssize_t fit = n + n / 2 + 16;
    if (CAP(m) > 2 * fit && entries_resize(m, fit) < 0) PyErr_Clear(); /* keep the bigger */
    return 0;
}

/* Room for one more entry and one more filled slot. Returns 1 if slots moved (the caller's
 * free slot is stale), 0 if not, -1 on error. */
static int map_reserve(NativeMap *m) {
    int moved = 0;
    if (m->used >= CAP(m)) {
        Py_ssize_t dead = m->used - m->live;
        if (dead > m->live && dead > 64) {
            if (map_compact(m) < 0) return -1;
            moved = 1;
        }
        if (m->used >= CAP(m)) {
            Py_ssize_t ecap = CAP(m) < 16 ? 16 : CAP(m) + CAP(m) / 2;
            if (ecap > MAX_ENTRIES) ecap = MAX_ENTRIES;
            if (m->used >= ecap) {
                PyErr_SetString(PyExc_MemoryError, "NativeMap: more than 2**26 entries");
                return -1;
            }
            if (entries_resize(m, ecap) < 0) return -1;
        }
    }
    if (m->nslots == 0 || (m->filled + m->npend + 1) * 4 > m->nslots * 3) {
        migrate(m, PY_SSIZE_T_MAX); /* finishes in time by construction; this is a guard */
        Py_ssize_t nslots = table_size_for(m->live + 1, m->nslots);
        if (nslots > ((Py_ssize_t)1 << 31)) {
            PyErr_SetString(PyExc_MemoryError, "NativeMap: more than 2**31 slots");
            return -1;
        }
        int32_t *t = m->next;
        if (t != NULL && m->next_nslots >= nslots - nslots / 8) { /* made ahead (prefault) */
            nslots = m->next_nslots;
            advise_huge(t, (size_t)nslots * sizeof(int32_t)); /* if not all in yet */
            m->next = NULL;
        } else if ((t = new_table(nslots, 0)) == NULL) {
            return -1;
        }
        drop_next(m);
        if (m->nslots && m->live) {
            m->old = m->slots;
            m->old_nslots = m->nslots;
            m->old_pos = m->first;
            m->old_end = m->used; /* the entry being added goes into the new table */
        } else {
            arr_free(m->slots, (size_t)m->nslots * sizeof(int32_t));
        }
        m->slots = t;
        m->nslots = nslots;
        m->filled = 0;
        moved = 1;
    }
    return moved;
}

/* Room for `extra` more entries at once: the entry array and a slot table sized for them,
 * rehashed now (one pass) instead of grown step by step. For bulk loads before serving
 * (restore_pairs): 10^7 restored blocks took 18 s through incremental growth. */
static int map_presize(NativeMap *m, Py_ssize_t extra) {
    if (extra <= 0 || m->used + extra > MAX_ENTRIES) return 0; /* the normal path decides */
    Py_ssize_t want = m->used + extra;
    if (want > CAP(m) && entries_resize(m, want) < 0) return -1;
    if (m->nslots && (m->filled + extra + 1) * 4 <= m->nslots * 3) return 0;
    migrate(m, PY_SSIZE_T_MAX);
    Py_ssize_t nslots = table_size_for(m->live + extra + 1, 0);
    if (nslots > ((Py_ssize_t)1 << 31)) return 0;
    int32_t *t = new_table(nslots, 0);
    if (t == NULL) return -1;
    drop_next(m);
    arr_free(m->slots, (size_t)m->nslots * sizeof(int32_t));
    m->slots = t;
    m->nslots = nslots;
    m->filled = 0;
    for (Py_ssize_t ix = m->first; ix < m->used; ix++)
        if (FLAG(m, ix)) place(m, ix);
    m->version++;
    return 0;
}

/* Start loading the home slot of int key k: the hot loops ask for it before they need it. */
static inline void prefetch_slot(NativeMap *m, u64 k) {
    if (m->nslots == 0) return;
    u64 h = mix_u64(k);
    prefetch(&m->slots[home(h, (size_t)m->nslots)]);
    /* A key not in the new table is looked for in the old one too (new blocks always are). */
    if (m->old) prefetch(&m->old[home(h, (size_t)m->old_nslots)]);
}

/* A free slot of the current table for a key with slot hash h (known absent). */
static inline Py_ssize_t free_slot_for(NativeMap *m, u64 h) {
    size_t n = (size_t)m->nslots, i = home(h, n);
    while (m->slots[i] > 0)
        if (++i == n) i = 0;
    return (Py_ssize_t)i;
}

/* Tables from this size on get their successor made ahead (prefault); smaller ones are
 * calloc'ed at the growth, a few hundred KB at most. */
#define NEXT_MIN_SLOTS ((Py_ssize_t)(BIG_ARRAY / sizeof(int32_t)))

/* Make the next table, sized for the entries the map will hold when it grows (every insert
 * until then new), unless memory is short: the growth then makes it as before. */
static void make_next(NativeMap *m) {
    Py_ssize_t n = table_size_for(m->live + m->nslots * 3 / 4 - m->filled, m->nslots);
    if (n > ((Py_ssize_t)1 << 31)) return;
    m->next = new_table(n, 1);
    if (m->next == NULL) {
        PyErr_Clear();
        return;
    }
    m->next_nslots = n;
    m->next_fault = m->fault_credit = 0;
}

/* Append a new entry (the key is known absent; `slot` from find_*). Object keys and values
 * are increfed here. */
static int map_append(NativeMap *m, mkey_t *key, Py_ssize_t slot, u64 v, PyObject *vobj) {
    int moved = map_reserve(m);
    if (moved < 0) return -1;
    u64 h = key->is_obj ? obj_slot_hash(key->hash) : mix_u64(key->k);
    if (moved || slot < 0) slot = free_slot_for(m, h);
    Py_ssize_t ix = m->used++;
    u8 f = F_LIVE;
    if (key->is_obj) {
        Py_INCREF(key->obj);
        m->entries[ix].k = (u64)(uintptr_t)key->obj;
        f |= F_OKEY;
    } else {
        m->entries[ix].k = key->k;
    }
    if (vobj) {
        Py_INCREF(vobj);
        m->entries[ix].v = (u64)(uintptr_t)vobj;
        f |= F_OVAL;
    } else {
        m->entries[ix].v = v;
    }
    flag_put(m->flags, ix, f);
    if (f & (F_OKEY | F_OVAL)) m->objects++;
    if (m->slots[slot] == SLOT_EMPTY) m->filled++;
    m->slots[slot] = SLOT_OF(ix, h);
    m->live++;
    m->version++;
    if (m->retired && m->used % RETIRE_EVERY == 0) retire_some(m, RETIRE_BYTES);
    if (m->old)
        migrate(m, MIGRATE_STEP);
    else if (m->next)
        prefault(m, 1);
    else if (m->nslots >= NEXT_MIN_SLOTS && (m->filled + 1) * 100 > m->nslots * NEXT_AT)
        make_next(m);
    return 0;
}

/* The insert of the hot loops: int key known absent, int value. */
static inline int map_append_int(NativeMap *m, u64 k, u64 v, Py_ssize_t slot) {
    mkey_t key = {0, k, NULL, 0};
    return map_append(m, &key, slot, v, NULL);
}

/* Drop entry ix found at slot: its references go at the end (a decref may run Python). */
static void map_delete(NativeMap *m, Py_ssize_t ix, Py_ssize_t slot) {
    unsigned f = FLAG(m, ix);
    PyObject *kobj = (f & F_OKEY) ? (PyObject *)(uintptr_t)m->entries[ix].k : NULL;
    PyObject *vobj = (f & F_OVAL) ? (PyObject *)(uintptr_t)m->entries[ix].v : NULL;
    flag_put(m->flags, ix, 0);
    *slot_ptr(m, slot) = SLOT_DUMMY;
    m->live--;
    if (kobj || vobj) m->objects--;
    m->version++;
    if (ix == m->first) {
        while (m->first < m->used && !FLAG(m, m->first)) m->first++;
    }
    if (m->live == 0) { /* start over: nothing to skip or probe past, no memory kept */
        m->used = m->first = 0;
        arr_free(m->entries, (size_t)m->ecap * sizeof(entry_t));
        arr_free(m->flags, FLAG_BYTES(m->fcap));
        m->entries = NULL;
        m->flags = NULL;
        m->ecap = m->fcap = 0;
        arr_free(m->old, (size_t)m->old_nslots * sizeof(int32_t));
        m->old = NULL;
        m->old_nslots = m->old_pos = m->old_end = 0;
    m->npend = 0;
        arr_free(m->slots, (size_t)m->nslots * sizeof(int32_t)); /* the next insert sizes anew */
        m->slots = NULL;
        m->nslots = m->filled = 0;
        drop_next(m);
        retire_some(m, SIZE_MAX);
    }
    Py_XDECREF(kobj);
    Py_XDECREF(vobj);
}

/* Set the value of live entry ix. */
static int map_set_value(NativeMap *m, Py_ssize_t ix, PyObject *value) {
    u64 v;
    int r = as_u64(value, &v);
    if (r < 0) return -1;
    unsigned f = FLAG(m, ix);
    PyObject *old = (f & F_OVAL) ? (PyObject *)(uintptr_t)m->entries[ix].v : NULL;
    int had_obj = (f & (F_OKEY | F_OVAL)) != 0;
    if (r == 1) {
        m->entries[ix].v = v;
        f &= ~F_OVAL;
    } else {
        Py_INCREF(value);
        m->entries[ix].v = (u64)(uintptr_t)value;
        f |= F_OVAL;
    }
    flag_put(m->flags, ix, f);
    int has_obj = (f & (F_OKEY | F_OVAL)) != 0;
    m->objects += has_obj - had_obj;
    Py_XDECREF(old);
    return 0;
}

static int map_setitem(NativeMap *m, PyObject *key, PyObject *value) {
    mkey_t k;
    if (make_key(key, &k) < 0) return -1;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return -1;
    if (ix >= 0) return map_set_value(m, ix, value);
    u64 v = 0;
    int r = as_u64(value, &v);
    if (r < 0) return -1;
    return map_append(m, &k, slot, v, r == 1 ? NULL : value);
}

static void map_clear(NativeMap *m) {
    entry_t *entries = m->entries;
    u8 *flags = m->flags;
    Py_ssize_t used = m->used, first = m->first, objects = m->objects, ecap = m->ecap;
    Py_ssize_t fcap = m->fcap;
    arr_free(m->slots, (size_t)m->nslots * sizeof(int32_t));
    arr_free(m->old, (size_t)m->old_nslots * sizeof(int32_t));
    m->entries = NULL;
    m->flags = NULL;
    m->slots = m->old = NULL;
    m->ecap = m->fcap = m->nslots = m->filled = m->used = m->live = m->first = m->objects = 0;
    drop_next(m);
    retire_some(m, SIZE_MAX);
    m->old_nslots = m->old_pos = m->old_end = 0;
    m->npend = 0;
    m->version++;
    if (objects) {
        for (Py_ssize_t ix = first; ix < used; ix++) {
            if (flag_of(flags, ix) & F_OKEY) Py_DECREF((PyObject *)(uintptr_t)entries[ix].k);
            if (flag_of(flags, ix) & F_OVAL) Py_DECREF((PyObject *)(uintptr_t)entries[ix].v);
        }
    }
    arr_free(entries, (size_t)ecap * sizeof(entry_t));
    arr_free(flags, FLAG_BYTES(fcap));
}

static PyObject *NativeMap_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if ((kwds && PyDict_GET_SIZE(kwds)) || PyTuple_GET_SIZE(args)) {
        PyErr_SetString(PyExc_TypeError, "NativeMap() takes no arguments");
        return NULL;
    }
    NativeMap *m = (NativeMap *)type->tp_alloc(type, 0);
    return (PyObject *)m;
}

static void NativeMap_dealloc(NativeMap *m) {
    map_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t NativeMap_len(NativeMap *m) { return m->live; }

static PyObject *NativeMap_getitem(NativeMap *m, PyObject *key) {
    mkey_t k;
    if (make_key(key, &k) < 0) return NULL;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return NULL;
    if (ix < 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return value_of(m, ix);
}

static int NativeMap_ass_sub(NativeMap *m, PyObject *key, PyObject *value) {
    if (value != NULL) return map_setitem(m, key, value);
    mkey_t k;
    if (make_key(key, &k) < 0) return -1;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return -1;
    if (ix < 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    map_delete(m, ix, slot);
    return 0;
}

static int NativeMap_contains(NativeMap *m, PyObject *key) {
    mkey_t k;
    if (make_key(key, &k) < 0) return -1;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    return ix == -2 ? -1 : ix >= 0;
}

static PyObject *NativeMap_get(NativeMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get expected 1 or 2 arguments");
        return NULL;
    }
    mkey_t k;
    if (make_key(args[0], &k) < 0) return NULL;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return NULL;
    if (ix >= 0) return value_of(m, ix);
    PyObject *d = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(d);
    return d;
}

/* As dict.setdefault: on insert the default object itself is returned (prefix_index.py's
 * fast path tells a new hash by identity). */
static PyObject *NativeMap_setdefault(NativeMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "setdefault expected 1 or 2 arguments");
        return NULL;
    }
    PyObject *d = nargs == 2 ? args[1] : Py_None;
    mkey_t k;
    if (make_key(args[0], &k) < 0) return NULL;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return NULL;
    if (ix >= 0) return value_of(m, ix);
    if (map_setitem(m, args[0], d) < 0) return NULL;
    Py_INCREF(d);
    return d;
}

static PyObject *NativeMap_pop(NativeMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop expected 1 or 2 arguments");
        return NULL;
    }
    mkey_t k;
    if (make_key(args[0], &k) < 0) return NULL;
    Py_ssize_t slot, ix = find_key(m, &k, &slot);
    if (ix == -2) return NULL;
    if (ix < 0) {
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *v = value_of(m, ix);
    if (v == NULL) return NULL;
    map_delete(m, ix, slot);
    return v;
}

/* migrate_some(n) -> bool: move up to n entries of a growing table; True while some remain. */
static PyObject *NativeMap_migrate_some(NativeMap *m, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    migrate(m, n);
    if (m->old == NULL) prefault(m, n / 32); /* 4,096: 32 pages, ~0.1 ms */
    if (m->retired && n > 0) retire_some(m, RETIRE_IDLE);
    return PyBool_FromLong(m->old != NULL || m->retired ||
                           (m->next && m->next_fault < m->next_nslots));
}

static PyObject *NativeMap_clear_method(NativeMap *m, PyObject *unused) {
    map_clear(m);
    Py_RETURN_NONE;
}

/* reserve(n): room for n entries in all, the slot table sized for them (one rehash of what
 * is there now) instead of grown step by step as they come. For a cleared source's map, sized
 * from its size before the clear (native_index.py `_clear_source`): an engine that resets its
 * cache fills it again. */
static PyObject *NativeMap_reserve(NativeMap *m, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n > m->used && map_presize(m, n - m->used) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *NativeMap_nbytes(NativeMap *m, PyObject *unused) {
    size_t n = sizeof(NativeMap) + (size_t)m->ecap * sizeof(entry_t) + FLAG_BYTES(m->fcap) +
               (size_t)(m->nslots + m->old_nslots + m->next_nslots) * sizeof(int32_t) +
               (m->retired ? m->retired_size - m->retired_pos : 0);
    return PyLong_FromSize_t(n);
}

static PyObject *NativeMap_objects(NativeMap *m, PyObject *unused) {
    return PyLong_FromSsize_t(m->objects);
}

/* --- iteration: keys, values or items, in store order -------------------------------- */

enum { IT_KEYS, IT_VALUES, IT_ITEMS };

typedef struct {
    PyObject_HEAD
    NativeMap *map;
    Py_ssize_t pos;
    u64 version;
    int kind;
} MapIter;

static PyTypeObject MapIterType;

static PyObject *make_iter(NativeMap *m, int kind) {
    MapIter *it = PyObject_New(MapIter, &MapIterType);
    if (it == NULL) return NULL;
    Py_INCREF(m);
    it->map = m;
    it->pos = m->first;
    it->version = m->version;
    it->kind = kind;
    return (PyObject *)it;
}

static void MapIter_dealloc(MapIter *it) {
    Py_XDECREF(it->map);
    PyObject_Free(it);
}

static PyObject *MapIter_next(MapIter *it) {
    NativeMap *m = it->map;
    if (m == NULL) return NULL;
    if (m->version != it->version) {
        PyErr_SetString(PyExc_RuntimeError, "NativeMap changed during iteration");
        return NULL;
    }
    while (it->pos < m->used && !FLAG(m, it->pos)) it->pos++;
    if (it->pos >= m->used) {
        it->map = NULL;
        Py_DECREF(m);
        return NULL;
    }
    Py_ssize_t ix = it->pos++;
    if (it->kind == IT_KEYS) return key_of(m, ix);
    if (it->kind == IT_VALUES) return value_of(m, ix);
    PyObject *k = key_of(m, ix);
    if (k == NULL) return NULL;
    PyObject *v = value_of(m, ix);
    if (v == NULL) {
        Py_DECREF(k);
        return NULL;
    }
    PyObject *t = PyTuple_Pack(2, k, v);
    Py_DECREF(k);
    Py_DECREF(v);
    return t;
}

static PyObject *MapIter_length_hint(MapIter *it, PyObject *unused) {
    return PyLong_FromSsize_t(it->map ? it->map->live : 0);
}

static PyMethodDef MapIter_methods[] = {
    {"__length_hint__", (PyCFunction)MapIter_length_hint, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MapIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvroute.index._native.MapIter",
    .tp_basicsize = sizeof(MapIter),
    .tp_dealloc = (destructor)MapIter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)MapIter_next,
    .tp_methods = MapIter_methods,
};

static PyObject *NativeMap_iter(NativeMap *m) { return make_iter(m, IT_KEYS); }
static PyObject *NativeMap_keys(NativeMap *m, PyObject *u) { return make_iter(m, IT_KEYS); }
static PyObject *NativeMap_values(NativeMap *m, PyObject *u) { return make_iter(m, IT_VALUES); }
static PyObject *NativeMap_items(NativeMap *m, PyObject *u) { return make_iter(m, IT_ITEMS); }

static PyObject *NativeMap_to_dict(NativeMap *m) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (Py_ssize_t ix = m->first; ix < m->used; ix++) {
        if (!FLAG(m, ix)) continue;
        PyObject *k = key_of(m, ix), *v = k ? value_of(m, ix) : NULL;
        int bad = v == NULL || PyDict_SetItem(d, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *NativeMap_richcompare(NativeMap *m, PyObject *other, int op) {
    if ((op != Py_EQ && op != Py_NE) ||
        !(PyDict_Check(other) || Py_IS_TYPE(other, &NativeMapType)))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *a = NativeMap_to_dict(m);
    if (a == NULL) return NULL;
    PyObject *b = other;
    if (Py_IS_TYPE(other, &NativeMapType)) {
        b = NativeMap_to_dict((NativeMap *)other);
        if (b == NULL) {
            Py_DECREF(a);
            return NULL;
        }
    } else {
        Py_INCREF(b);
    }
    PyObject *r = PyObject_RichCompare(a, b, op);
    Py_DECREF(a);
    Py_DECREF(b);
    return r;
}

static PyObject *NativeMap_repr(NativeMap *m) {
    PyObject *d = NativeMap_to_dict(m);
    if (d == NULL) return NULL;
    PyObject *r = PyUnicode_FromFormat("NativeMap(%R)", d);
    Py_DECREF(d);
    return r;
}

static PyMethodDef NativeMap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))NativeMap_get, METH_FASTCALL, NULL},
    {"setdefault", (PyCFunction)(void (*)(void))NativeMap_setdefault, METH_FASTCALL, NULL},
    {"pop", (PyCFunction)(void (*)(void))NativeMap_pop, METH_FASTCALL, NULL},
    {"keys", (PyCFunction)NativeMap_keys, METH_NOARGS, NULL},
    {"values", (PyCFunction)NativeMap_values, METH_NOARGS, NULL},
    {"items", (PyCFunction)NativeMap_items, METH_NOARGS, NULL},
    {"clear", (PyCFunction)NativeMap_clear_method, METH_NOARGS, NULL},
    {"migrate_some", (PyCFunction)NativeMap_migrate_some, METH_O,
     "Move up to n entries of a growing table; True while some remain."},
    {"reserve", (PyCFunction)NativeMap_reserve, METH_O,
     "reserve(n): room for n entries in all, so the next inserts up to n do not grow it."},
    {"nbytes", (PyCFunction)NativeMap_nbytes, METH_NOARGS,
     "Bytes allocated for the map's arrays (what its memory budget counts)."},
    {"objects", (PyCFunction)NativeMap_objects, METH_NOARGS,
     "Live entries holding an object key or value (not a u64 int)."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods NativeMap_as_mapping = {
    (lenfunc)NativeMap_len,
    (binaryfunc)NativeMap_getitem,
    (objobjargproc)NativeMap_ass_sub,
};

static PySequenceMethods NativeMap_as_sequence = {
    .sq_contains = (objobjproc)NativeMap_contains,
};

static PyTypeObject NativeMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvroute.index._native.NativeMap",
    .tp_doc = "An insertion-ordered map of u64 ints in flat arrays, with dict semantics.",
    .tp_basicsize = sizeof(NativeMap),
    .tp_dealloc = (destructor)NativeMap_dealloc,
    .tp_repr = (reprfunc)NativeMap_repr,
    .tp_as_sequence = &NativeMap_as_sequence,
    .tp_as_mapping = &NativeMap_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_richcompare = (richcmpfunc)NativeMap_richcompare,
    .tp_iter = (getiterfunc)NativeMap_iter,
    .tp_methods = NativeMap_methods,
    .tp_new = NativeMap_new,
};

/* ================================================================= chained hashing */

/* chain_hashes(parent, token_ids, block_size) -> list[int]: index/hashing.py's chain_hashes. */
static PyObject *py_chain_hashes(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "chain_hashes(parent, token_ids, block_size)");
        return NULL;
    }
    u64 h;
    if (as_u64(args[0], &h) != 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_OverflowError, "parent: not a u64 int");
        return NULL;
    }
    Py_ssize_t bs = PyLong_AsSsize_t(args[2]);
    if (bs == -1 && PyErr_Occurred()) return NULL;
    if (bs <= 0) {
        return PyErr_Format(g_index_error ? g_index_error : PyExc_ValueError,
                            "block_size: expected a positive int, got %zd", bs);
    }
    PyObject *seq = PySequence_Fast(args[1], "token_ids: expected a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq) / bs;
    PyObject *out = PyList_New(n);
    scratch_t sc;
    u8 *buf = out ? scratch_get(&sc, n * bs) : NULL;
    if (buf == NULL || pack_tokens_be(PySequence_Fast_ITEMS(seq), n * bs, buf, 1) < 0) {
        if (buf) scratch_free(&sc);
        Py_XDECREF(out);
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        h = xxh3_64(buf + 4 * bs * i, (size_t)(4 * bs), h);
        PyObject *v = PyLong_FromUnsignedLongLong(h);
        if (v == NULL) {
            scratch_free(&sc);
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    scratch_free(&sc);
    Py_DECREF(seq);
    return out;
}

static PyObject *py_xxh3_64(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "xxh3_64(data, seed=0)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    u64 seed = 0;
    if (nargs == 2 && as_u64(args[1], &seed) != 1) {
        PyBuffer_Release(&view);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_OverflowError, "seed: not a u64 int");
        return NULL;
    }
    u64 h = xxh3_64(view.buf, (size_t)view.len, seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

/* =========================================================== the index's hot loops */

/* Set once by configure(): the event classes, their field offsets, method names. */
static PyTypeObject *g_stored_type, *g_removed_type;
static Py_ssize_t off_hashes, off_parent, off_tokens, off_bsize, off_lora, off_medium, off_group,
    off_salt, off_r_hashes, off_r_medium, off_r_group;
/* ... and the index's per-source state (index/holders.py SourceState, __slots__). */
static PyTypeObject *g_state_type;
static PyObject *g_result_type; /* core.MatchResult, built by match_results */
static PyTypeObject *g_raw_type;  /* msgspec.Raw: token ids as msgpack bytes (events/wire.py) */
static Py_ssize_t off_s_last_size, off_s_last_lora, off_s_seeds, off_s_dups, off_s_aliases,
    off_s_media;
static PyObject *s_gpu, *s_store_again, *s_hold_again, *s_release, *s_unknown_block, *s_hm,
    *s_blocks;

static int member_offset(PyTypeObject *tp, const char *name, Py_ssize_t *out) {
    PyObject *descr = PyObject_GetAttrString((PyObject *)tp, name);
    if (descr == NULL) return -1;
    int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
    if (ok) *out = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    if (!ok) PyErr_Format(PyExc_TypeError, "%s.%s: not an object slot", tp->tp_name, name);
    return ok ? 0 : -1;
}

#define FIELD(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static PyObject *py_configure(PyObject *mod, PyObject *args) {
    PyObject *stored, *removed, *err, *state, *result, *raw;
    if (!PyArg_ParseTuple(args, "O!O!OO!O!O!", &PyType_Type, &stored, &PyType_Type, &removed,
                          &err, &PyType_Type, &state, &PyType_Type, &result, &PyType_Type, &raw))
        return NULL;
    PyTypeObject *st = (PyTypeObject *)stored, *rt = (PyTypeObject *)removed;
    PyTypeObject *ss = (PyTypeObject *)state;
    if (member_offset(ss, "last_size", &off_s_last_size) < 0 ||
        member_offset(ss, "last_lora", &off_s_last_lora) < 0 ||
        member_offset(ss, "seeds", &off_s_seeds) < 0 ||
        member_offset(ss, "dups", &off_s_dups) < 0 ||
        member_offset(ss, "aliases", &off_s_aliases) < 0 ||
        member_offset(ss, "media", &off_s_media) < 0)
        return NULL;
    if (member_offset(st, "block_hashes", &off_hashes) < 0 ||
        member_offset(st, "parent_block_hash", &off_parent) < 0 ||
        member_offset(st, "token_ids", &off_tokens) < 0 ||
        member_offset(st, "block_size", &off_bsize) < 0 ||
        member_offset(st, "lora_name", &off_lora) < 0 ||
        member_offset(st, "medium", &off_medium) < 0 ||
        member_offset(st, "group_idx", &off_group) < 0 ||
        member_offset(st, "cache_salt", &off_salt) < 0 ||
        member_offset(rt, "block_hashes", &off_r_hashes) < 0 ||
        member_offset(rt, "medium", &off_r_medium) < 0 ||
        member_offset(rt, "group_idx", &off_r_group) < 0)
        return NULL;
    Py_INCREF(stored);
    Py_INCREF(removed);
    Py_INCREF(err);
    Py_XSETREF(g_stored_type, st);
    Py_XSETREF(g_removed_type, rt);
    Py_XSETREF(g_index_error, err);
    Py_INCREF(state);
    Py_XSETREF(g_state_type, ss);
    Py_INCREF(result);
    Py_XSETREF(g_result_type, result);
    Py_INCREF(raw);
    Py_XSETREF(g_raw_type, (PyTypeObject *)raw);
    Py_RETURN_NONE;
}

static inline int is_gpu(PyObject *medium) {
    if (medium == Py_None || medium == s_gpu) return 1;
    return PyUnicode_CheckExact(medium) && PyUnicode_Compare(medium, s_gpu) == 0;
}

/* 1 if `group` is None or the indexed group. */
static inline int is_group(PyObject *group, long group0) {
    if (group == Py_None) return 1;
    if (!PyLong_CheckExact(group)) return 0;
    int overflow;
    long g = PyLong_AsLongAndOverflow(group, &overflow);
    return !overflow && g == group0;
}

/* 1 if `lora` equals the source's last LoRA (both None or equal strings). */
static inline int same_lora(PyObject *lora, PyObject *last) {
    if (lora == last) return 1;
    if (lora == Py_None || last == Py_None) return 0;
    if (!PyUnicode_CheckExact(lora) || !PyUnicode_CheckExact(last)) return 0;
    return PyUnicode_Compare(lora, last) == 0;
}

/* True if every item of a list is an int in [0, 2**64). */
static int all_u64(PyObject *list) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        u64 k;
        int r = as_u64(PyList_GET_ITEM(list, i), &k);
        if (r != 1) {
            if (r < 0) PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

/* Per call state of apply_run, read from the source (SourceState) at the start. */
typedef struct {
    PyObject *index, *src, *hm, *dups; /* dups: borrowed from src */
    NativeMap *blocks, *holders;
    u64 bit;
    int plain; /* no aliases and no other media: release is one holder bit */
    int pend;  /* a store's last block waits for its holder step: pend_local (flush_holder) */
    u64 pend_local;
} run_t;

static int refresh_plain(run_t *r) {
    PyObject *aliases = FIELD(r->src, off_s_aliases), *media = FIELD(r->src, off_s_media);
    if (!aliases || !media || !PyDict_Check(aliases) || !PyAnySet_Check(media)) {
        PyErr_SetString(PyExc_TypeError, "apply_run: bad source state (aliases, media)");
        return -1;
    }
    r->plain = PyDict_GET_SIZE(aliases) == 0 && PySet_GET_SIZE(media) == 0;
    return 0;
}

/* The index's Holders (`_hm`), fetched on the first slow-path call that needs it. */
static PyObject *get_hm(run_t *r) {
    if (r->hm == NULL) r->hm = PyObject_GetAttr(r->index, s_hm);
    return r->hm;
}

/* Drop `bit` from holders[local]; 1 if the hash is now held by nobody, -1 on error. */
static inline int release_bit(NativeMap *holders, u64 local, u64 bit) {
    Py_ssize_t slot, ix = find_int(holders, local, &slot);
    if (ix < 0 || (FLAG(holders, ix) & F_OVAL)) {
        PyErr_SetString(PyExc_RuntimeError, "NativeMap: a held block has no holder entry");
        return -1;
    }
    u64 m = holders->entries[ix].v & ~bit;
    if (m) {
        holders->entries[ix].v = m;
        return 0;
    }
    map_delete(holders, ix, slot);
    return 1;
}

static PyObject *call_method_long(PyObject *obj, PyObject *name, PyObject *a, PyObject *b,
                                  PyObject *c, long *out) {
    PyObject *res = c ? PyObject_CallMethodObjArgs(obj, name, a, b, c, NULL)
                      : (b ? PyObject_CallMethodObjArgs(obj, name, a, b, NULL)
                           : PyObject_CallMethodObjArgs(obj, name, a, NULL));
    if (res == NULL) return NULL;
    if (out) {
        *out = PyLong_AsLong(res);
        if (*out == -1 && PyErr_Occurred()) {
            Py_DECREF(res);
            return NULL;
        }
    }
    return res;
}

/* One block's holder: this source's bit set on its local hash. 1 if the hash is new to the
 * index, 0 if not, -1 on error. */
static long holder_step(run_t *r, u64 local) {
    NativeMap *hold = r->holders;
    Py_ssize_t slot, ix = find_int(hold, local, &slot);
    if (ix < 0) {
        if (map_append_int(hold, local, r->bit, slot) < 0) return -1;
        return 1;
    }
    if (FLAG(hold, ix) & F_OVAL) {
        PyErr_SetString(PyExc_RuntimeError, "apply_run: a holder mask past bit 63");
        return -1;
    }
    if (!(hold->entries[ix].v & r->bit)) {
        hold->entries[ix].v |= r->bit;
        return 0;
    }
    /* held already under another key or in another medium */
    PyObject *lo = PyLong_FromUnsignedLongLong(local);
    PyObject *hm = lo ? get_hm(r) : NULL;
    PyObject *res = hm ? call_method_long(hm, s_hold_again, r->src, lo, NULL, NULL) : NULL;
    Py_XDECREF(lo);
    if (res == NULL) return -1;
    Py_DECREF(res);
    return refresh_plain(r) < 0 ? -1 : 0;
}

/* The holder step a store left pending (its last block's), taken now. A store's last holder
 * slot was asked for (prefetch) only a hash before its read, and its miss was ~half of
 * `find_int`'s time; it now waits until the next store's tokens are scanned and hashed. Only
 * pure C runs between (the next event's checks, its parent's and blocks' slots in the block
 * map, packing, hashing): every other step, and every call into Python, takes it first. */
static long flush_holder(run_t *r) {
    if (!r->pend) return 0;
    r->pend = 0;
    return holder_step(r, r->pend_local);
}

/* One common BlockStored (the checks of prefix_index.py's inline path hold): store its blocks.
 * Returns the number of new hashes, or -1 on error. */
#define STORE_CHUNK 16
static long store_blocks(run_t *r, PyObject *hashes, const u8 *buf, Py_ssize_t n,
                         Py_ssize_t step, u64 h, PyObject *spec) {
    long new_hashes = 0;
    u64 locals[STORE_CHUNK];
    for (Py_ssize_t j = 0; j < n; j++) {
        /* The chain of a chunk first, its holder slots asked for together (their cache misses
         * overlap), then the chunk's blocks. */
        if (j % STORE_CHUNK == 0) {
            for (Py_ssize_t k = j; k < n && k < j + STORE_CHUNK; k++) {
                locals[k - j] = h = xxh3_64(buf + step * k, (size_t)step, h);
                prefetch_slot(r->holders, h);
            }
            if (j == 0) {
                long got = flush_holder(r); /* the store before's last block */
                if (got < 0) return -1;
                new_hashes += got;
            }
        }
        u64 local = locals[j % STORE_CHUNK];
        PyObject *eh_obj = PyList_GET_ITEM(hashes, j);
        u64 eh;
        if (as_u64(eh_obj, &eh) != 1) { /* checked before: the list cannot change under us */
            PyErr_SetString(PyExc_RuntimeError, "apply_run: block hash changed type");
            return -1;
        }
        if (spec != NULL && PyDict_GET_SIZE(spec)) {
            PyObject *lo = PyLong_FromUnsignedLongLong(local);
            if (lo == NULL) return -1;
            if (PyDict_DelItem(spec, lo) < 0) {
                if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                    Py_DECREF(lo);
                    return -1;
                }
                PyErr_Clear();
            }
            Py_DECREF(lo);
        }
        Py_ssize_t slot, ix = find_int(r->blocks, eh, &slot);
        if (ix >= 0) { /* stored again: the reference model's rule */
            PyObject *lo = PyLong_FromUnsignedLongLong(local);
            long got;
            PyObject *res = lo ? call_method_long(r->index, s_store_again, r->src, eh_obj, lo, &got)
                               : NULL;
            Py_XDECREF(lo);
            if (res == NULL) return -1;
            Py_DECREF(res);
            new_hashes += got;
            if (refresh_plain(r) < 0) return -1;
            continue;
        }
        if (map_append_int(r->blocks, eh, local, slot) < 0) return -1;
        if (j == n - 1) { /* its holder slot is read once the next store is hashed */
            r->pend = 1;
            r->pend_local = local;
            continue;
        }
        long got = holder_step(r, local);
        if (got < 0) return -1;
        new_hashes += got;
    }
    return new_hashes;
}

/* One common BlockRemoved (GPU, the indexed group, u64 hashes). Returns 1 if it counts as
 * applied, 0 if not, -1 on error; *gone counts hashes nobody holds any more. */
static int remove_blocks(run_t *r, PyObject *hashes, long *gone) {
    Py_ssize_t n = PyList_GET_SIZE(hashes), known = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *eh_obj = PyList_GET_ITEM(hashes, j);
        u64 eh;
        if (as_u64(eh_obj, &eh) != 1) {
            PyErr_SetString(PyExc_RuntimeError, "apply_run: block hash changed type");
            return -1;
        }
        Py_ssize_t slot, ix = find_int(r->blocks, eh, &slot);
        if (ix < 0) {
            PyObject *res = PyObject_CallMethodObjArgs(r->index, s_unknown_block, r->src, NULL);
            if (res == NULL) return -1;
            Py_DECREF(res);
            continue;
        }
        known++;
        if (PyDict_GET_SIZE(r->dups)) {
            PyObject *cnt = PyDict_GetItemWithError(r->dups, eh_obj);
            if (cnt != NULL) { /* another physical copy is still resident */
                long c = PyLong_AsLong(cnt);
                if (c == -1 && PyErr_Occurred()) return -1;
                int rc;
                if (c > 1) {
                    PyObject *less = PyLong_FromLong(c - 1);
                    rc = less ? PyDict_SetItem(r->dups, eh_obj, less) : -1;
                    Py_XDECREF(less);
                } else {
                    rc = PyDict_DelItem(r->dups, eh_obj);
                }
                if (rc < 0) return -1;
                continue;
            }
            if (PyErr_Occurred()) return -1;
        }
        u64 local = r->blocks->entries[ix].v;
        map_delete(r->blocks, ix, slot);
        if (r->plain) {
            int g = release_bit(r->holders, local, r->bit);
            if (g < 0) return -1;
            *gone += g;
        } else {
            PyObject *lo = PyLong_FromUnsignedLongLong(local);
            PyObject *hm = lo ? get_hm(r) : NULL;
            PyObject *res =
                hm ? PyObject_CallMethodObjArgs(hm, s_release, r->src, s_gpu, lo, NULL) : NULL;
            Py_XDECREF(lo);
            if (res == NULL) return -1;
            Py_DECREF(res);
            if (refresh_plain(r) < 0) return -1;
        }
    }
    return known > 0 || n == 0;
}

/* Ask for the block-map slots of the next event's hashes while this one is applied. */
static inline void prefetch_event(NativeMap *blocks, PyObject *ev) {
    PyObject *hashes;
    if (PyObject_TypeCheck(ev, g_stored_type))
        hashes = FIELD(ev, off_hashes);
    else if (PyObject_TypeCheck(ev, g_removed_type))
        hashes = FIELD(ev, off_r_hashes);
    else
        return;
    if (hashes == NULL || !PyList_CheckExact(hashes)) return;
    if (PyObject_TypeCheck(ev, g_stored_type)) { /* its parent is looked up first */
        PyObject *parent = FIELD(ev, off_parent);
        if (parent != NULL && PyLong_CheckExact(parent))
            prefetch_slot(blocks, PyLong_AsUnsignedLongLongMask(parent));
    }
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(hashes) && j < STORE_CHUNK; j++) {
        PyObject *o = PyList_GET_ITEM(hashes, j);
        if (PyLong_CheckExact(o)) {
            u64 k = PyLong_AsUnsignedLongLongMask(o);
            prefetch_slot(blocks, k);
        }
    }
}

/* int_pairs(blocks) -> bytes: the (key, value) pairs of a map whose key and value are both u64
 * ints, in store order, as little-endian u64s (index/snapshot.py; a snapshot may hold less than
 * the index, never more, so entries with object keys or values are left out). */
static PyObject *py_int_pairs(PyObject *mod, PyObject *arg) {
    if (!Py_IS_TYPE(arg, &NativeMapType)) {
        PyErr_SetString(PyExc_TypeError, "int_pairs: expected a NativeMap");
        return NULL;
    }
    NativeMap *m = (NativeMap *)arg;
    PyObject *out = PyBytes_FromStringAndSize(NULL, m->live * 16);
    if (out == NULL) return NULL;
    u8 *w = (u8 *)PyBytes_AS_STRING(out);
    Py_ssize_t n = 0;
    for (Py_ssize_t ix = m->first; ix < m->used; ix++) {
        if (FLAG(m, ix) != F_LIVE) continue; /* dead, or an object key or value */
        u64 kv[2] = {m->entries[ix].k, m->entries[ix].v};
#if HOST_BIG_ENDIAN
        kv[0] = __builtin_bswap64(kv[0]);
        kv[1] = __builtin_bswap64(kv[1]);
#endif
        memcpy(w + 16 * n, kv, 16);
        n++;
    }
    if (n != m->live && _PyBytes_Resize(&out, n * 16) < 0) return NULL;
    return out;
}

/* restore_pairs(blocks, holders, bit, pairs) -> (stored, new_hashes): int_pairs' bytes back into
 * an empty GPU-only source (index/native_index.py `restore_source`). A key already stored, or a
 * local hash the source already holds under another key, is skipped (an alias the snapshot
 * cannot describe: smaller than the truth, never larger). */
static PyObject *py_restore_pairs(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !Py_IS_TYPE(args[0], &NativeMapType) ||
        !Py_IS_TYPE(args[1], &NativeMapType)) {
        PyErr_SetString(PyExc_TypeError, "restore_pairs(blocks, holders, bit, pairs)");
        return NULL;
    }
    NativeMap *blocks = (NativeMap *)args[0], *holders = (NativeMap *)args[1];
    u64 bit;
    if (as_u64(args[2], &bit) != 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_OverflowError, "restore_pairs: bit past 63");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[3], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (view.len % 16) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "restore_pairs: not a whole number of u64 pairs");
        return NULL;
    }
    const u8 *p = view.buf;
    Py_ssize_t total = view.len / 16;
    long stored = 0, new_hashes = 0;
    if (map_presize(blocks, total) < 0 || map_presize(holders, total) < 0) goto fail;
    for (Py_ssize_t i = 0; i < total; i++) {
        u64 kv[2];
        if (i + 8 < total) { /* both lookups of a pair ahead, so the misses overlap */
            memcpy(kv, p + 16 * (i + 8), 16);
#if HOST_BIG_ENDIAN
            kv[0] = __builtin_bswap64(kv[0]);
            kv[1] = __builtin_bswap64(kv[1]);
#endif
            prefetch_slot(blocks, kv[0]);
            prefetch_slot(holders, kv[1]);
        }
        memcpy(kv, p + 16 * i, 16);
#if HOST_BIG_ENDIAN
        kv[0] = __builtin_bswap64(kv[0]);
        kv[1] = __builtin_bswap64(kv[1]);
#endif
        Py_ssize_t bslot, hslot;
        if (find_int(blocks, kv[0], &bslot) >= 0) continue;
        Py_ssize_t hx = find_int(holders, kv[1], &hslot);
        if (hx >= 0 && ((FLAG(holders, hx) & F_OVAL) || (holders->entries[hx].v & bit)))
            continue;
        if (map_append_int(blocks, kv[0], kv[1], bslot) < 0) goto fail;
        if (hx >= 0) {
            holders->entries[hx].v |= bit;
        } else {
            /* the blocks insert may have grown only its own map: the holder slot still holds */
            if (map_append_int(holders, kv[1], bit, hslot) < 0) goto fail;
            new_hashes++;
        }
        stored++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(ll)", stored, new_hashes);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

#define TOK_ERROR (-2) /* a Python error is set */

/* tok_scan's status of one msgpack `Raw` of token ids, without writing them out. */
static int raw_status(PyObject *tokens) {
    Py_buffer view;
    Py_ssize_t count;
    if (PyObject_GetBuffer(tokens, &view, PyBUF_SIMPLE) < 0) return TOK_ERROR;
    int status = tok_scan(view.buf, (size_t)view.len, NULL, 0, &count);
    PyBuffer_Release(&view);
    return status;
}

/* token_verdict(events) -> int: over the BlockStored events whose `token_ids` are msgpack
 * bytes, TOK_BAD if any is not `list[int] | None`, else TOK_WIDE if any holds nil or an int
 * outside [0, 2**32), else TOK_U32 (events/wire.py's raw decode). */
static PyObject *py_token_verdict(PyObject *mod, PyObject *events) {
    if (!PyList_CheckExact(events) || g_stored_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "token_verdict: expected a list, after configure()");
        return NULL;
    }
    int worst = TOK_U32;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (!PyObject_TypeCheck(ev, g_stored_type)) continue;
        PyObject *tokens = FIELD(ev, off_tokens);
        if (tokens == NULL || !Py_IS_TYPE(tokens, g_raw_type)) continue;
        int status = raw_status(tokens);
        if (status == TOK_ERROR) return NULL;
        if (status == TOK_BAD) return PyLong_FromLong(TOK_BAD);
        if (status != TOK_U32) worst = TOK_WIDE;
    }
    return PyLong_FromLong(worst);
}

/* The raw decode's store type (events/wire.py _RawMapBlockStored) and the vLLM fields its
 * "plain" test reads, set by configure_plain. */
static PyTypeObject *g_plain_stored;
static Py_ssize_t off_p_lora_id, off_p_extra, off_p_lookahead;

static PyObject *py_configure_plain(PyObject *mod, PyObject *arg) {
    if (!PyType_Check(arg) || g_stored_type == NULL ||
        !PyType_IsSubtype((PyTypeObject *)arg, g_stored_type)) {
        PyErr_SetString(PyExc_TypeError, "configure_plain: expected a BlockStored subclass");
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)arg;
    Py_ssize_t tokens, medium, salt;
    if (member_offset(tp, "lora_id", &off_p_lora_id) < 0 ||
        member_offset(tp, "extra_keys", &off_p_extra) < 0 ||
        member_offset(tp, "lookahead_token_ids", &off_p_lookahead) < 0 ||
        member_offset(tp, "token_ids", &tokens) < 0 || member_offset(tp, "medium", &medium) < 0 ||
        member_offset(tp, "cache_salt", &salt) < 0)
        return NULL;
    if (tokens != off_tokens || medium != off_medium || salt != off_salt) {
        PyErr_SetString(PyExc_TypeError, "configure_plain: base fields moved in the subclass");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(g_plain_stored, tp);
    Py_RETURN_NONE;
}

/* 1 when `medium` passes wire.py's test `medium is None or medium == GPU or medium.isupper()`
 * for sure; 0 when it fails or C cannot tell cheaply (a non-ASCII string): the caller's
 * Python test then decides. */
static int plain_medium(PyObject *medium) {
    if (medium == Py_None || medium == s_gpu) return 1;
    if (!PyUnicode_CheckExact(medium) || !PyUnicode_IS_ASCII(medium)) return 0;
    const char *c = (const char *)PyUnicode_DATA(medium);
    Py_ssize_t n = PyUnicode_GET_LENGTH(medium);
    int cased = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (c[i] >= 'a' && c[i] <= 'z') return 0;
        if (c[i] >= 'A' && c[i] <= 'Z') cased = 1;
    }
    return cased;
}

/* 1 when a store of the raw type needs nothing of normalise_events (wire.py _map_batch). */
static int plain_store(PyObject *ev) {
    PyObject *keys = FIELD(ev, off_p_extra), *ahead = FIELD(ev, off_p_lookahead);
    if (FIELD(ev, off_p_lora_id) != Py_None || FIELD(ev, off_salt) != Py_None || !keys ||
        !ahead || !plain_medium(FIELD(ev, off_medium)))
        return 0;
    if (ahead != Py_None && !(PyList_CheckExact(ahead) && PyList_GET_SIZE(ahead) == 0)) return 0;
    if (keys == Py_None) return 1;
    if (!PyList_CheckExact(keys)) return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++)
        if (PyList_GET_ITEM(keys, i) != Py_None) return 0;
    return 1;
}

/* batch_verdict(events) -> int: token_verdict's TOK_BAD and TOK_WIDE (as 2), else TOK_PLAIN
 * (3) when every event is plain in the sense of wire.py's `_map_batch` (the batch goes to the
 * index as decoded), else TOK_U32. One C pass instead of two Python ones (design §12). */
static PyObject *py_batch_verdict(PyObject *mod, PyObject *events) {
    if (!PyList_CheckExact(events) || g_plain_stored == NULL) {
        PyErr_SetString(PyExc_TypeError, "batch_verdict: expected a list, after configure_plain()");
        return NULL;
    }
    int worst = TOK_U32, plain = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (Py_IS_TYPE(ev, g_plain_stored)) {
            plain = plain && plain_store(ev);
            PyObject *tokens = FIELD(ev, off_tokens);
            if (tokens == NULL || !Py_IS_TYPE(tokens, g_raw_type)) {
                plain = 0;
                continue;
            }
            int status = raw_status(tokens);
            if (status == TOK_ERROR) return NULL;
            if (status == TOK_BAD) return PyLong_FromLong(TOK_BAD);
            if (status != TOK_U32) worst = TOK_WIDE;
        } else if (Py_IS_TYPE(ev, g_removed_type)) {
            plain = plain && plain_medium(FIELD(ev, off_r_medium));
        } else if (PyObject_TypeCheck(ev, g_stored_type)) {
            plain = 0; /* another store type: its tokens are not msgpack bytes */
        }
    }
    if (worst != TOK_U32) return PyLong_FromLong(worst);
    return PyLong_FromLong(plain ? 3 : TOK_U32);
}

/* apply_run(index, src, blocks, holders, bit, events, start, cap, group0, spec, out) -> next,
 *   out[:] = [unhandled, stored, removed, new_hashes, gone_hashes]
 *
 * Applies events[start:] while they take the common paths of PrefixIndex.apply. It stops
 * after a store that takes the source past `cap` (unhandled False: the caller evicts), or at
 * an event it leaves to the reference model (unhandled True: events[next]). */
static PyObject *py_apply_run(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11 || !PyList_CheckExact(args[10]) || PyList_GET_SIZE(args[10]) != 5) {
        PyErr_SetString(PyExc_TypeError, "apply_run expects 11 arguments, the last a list of 5");
        return NULL;
    }
    run_t r;
    r.index = args[0];
    r.src = args[1];
    if (!Py_IS_TYPE(args[2], &NativeMapType) || !Py_IS_TYPE(args[3], &NativeMapType) ||
        !PyList_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "apply_run: blocks, holders must be NativeMaps");
        return NULL;
    }
    r.blocks = (NativeMap *)args[2];
    r.holders = (NativeMap *)args[3];
    if (as_u64(args[4], &r.bit) != 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_OverflowError, "apply_run: bit past 63");
        return NULL;
    }
    PyObject *events = args[5];
    Py_ssize_t i = PyLong_AsSsize_t(args[6]), cap = PyLong_AsSsize_t(args[7]);
    long group0 = PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    PyObject *spec = args[9] == Py_None ? NULL : args[9];
    if (spec != NULL && !PyDict_CheckExact(spec)) {
        PyErr_SetString(PyExc_TypeError, "apply_run: spec must be a dict or None");
        return NULL;
    }
    PyObject *last_size_obj = NULL, *last_lora = NULL, *seeds = NULL, *dups = NULL;
    PyObject *result = NULL;
    scratch_t sc;
    sc.heap = NULL;
    long stored = 0, removed = 0, new_hashes = 0, gone = 0;
    int unhandled = 0;
    r.hm = NULL;
    r.pend = 0;
    if (!PyObject_TypeCheck(r.src, g_state_type)) {
        PyErr_SetString(PyExc_TypeError, "apply_run: src must be a SourceState");
        return NULL;
    }
    /* Borrowed from the source's slots, held for the call (a callback may rebind them). */
    last_size_obj = FIELD(r.src, off_s_last_size);
    last_lora = FIELD(r.src, off_s_last_lora);
    seeds = FIELD(r.src, off_s_seeds);
    dups = FIELD(r.src, off_s_dups);
    Py_XINCREF(last_size_obj);
    Py_XINCREF(last_lora);
    Py_XINCREF(seeds);
    Py_XINCREF(dups);
    if (!last_size_obj || !last_lora || !seeds || !dups || !PyDict_CheckExact(seeds) ||
        !PyDict_CheckExact(dups)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "apply_run: bad source state");
        goto done;
    }
    r.dups = dups;
    if (refresh_plain(&r) < 0) goto done;
    Py_ssize_t last_size = PyLong_AsSsize_t(last_size_obj);
    if (last_size == -1 && PyErr_Occurred()) goto done;
    Py_ssize_t nevents = PyList_GET_SIZE(events);
    for (; i < nevents; i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (i + 1 < nevents) prefetch_event(r.blocks, PyList_GET_ITEM(events, i + 1));
        if (PyObject_TypeCheck(ev, g_stored_type)) {
            PyObject *tokens = FIELD(ev, off_tokens), *bs_obj = FIELD(ev, off_bsize);
            PyObject *hashes = FIELD(ev, off_hashes), *parent = FIELD(ev, off_parent);
            PyObject *lora = FIELD(ev, off_lora);
            int listed = tokens && PyList_CheckExact(tokens);
            if (!tokens || !bs_obj || !hashes || !parent || !lora || !FIELD(ev, off_medium) ||
                !FIELD(ev, off_group) || !FIELD(ev, off_salt) || last_size <= 0 ||
                (!listed && !Py_IS_TYPE(tokens, g_raw_type)) || !PyList_CheckExact(hashes) ||
                !PyLong_CheckExact(bs_obj) || FIELD(ev, off_salt) != Py_None ||
                !is_gpu(FIELD(ev, off_medium)) || !is_group(FIELD(ev, off_group), group0) ||
                !same_lora(lora, last_lora)) {
                unhandled = 1;
                break;
            }
            Py_ssize_t bs = PyLong_AsSsize_t(bs_obj);
            if (bs == -1 && PyErr_Occurred()) PyErr_Clear();
            Py_ssize_t n = PyList_GET_SIZE(hashes);
            if (bs != last_size || n == 0 || (listed && PyList_GET_SIZE(tokens) != n * bs) ||
                !all_u64(hashes)) {
                unhandled = 1;
                break;
            }
            u64 start;
            if (parent == Py_None) {
                PyObject *seed = PyDict_GetItemWithError(seeds, lora);
                if (seed == NULL) {
                    if (PyErr_Occurred()) goto done;
                    unhandled = 1;
                    break;
                }
                if (as_u64(seed, &start) != 1) {
                    PyErr_Clear();
                    unhandled = 1;
                    break;
                }
            } else {
                u64 p;
                Py_ssize_t slot, ix;
                if (as_u64(parent, &p) != 1 || (ix = find_int(r.blocks, p, &slot)) < 0) {
                    PyErr_Clear();
                    unhandled = 1; /* orphans and parents in other media: the reference */
                    break;
                }
                start = r.blocks->entries[ix].v;
            }
            for (Py_ssize_t j = 0; j < n; j++) { /* hidden behind packing and hashing */
                u64 eh;
                if (as_u64(PyList_GET_ITEM(hashes, j), &eh) == 1) prefetch_slot(r.blocks, eh);
            }
            u8 *buf = scratch_get(&sc, n * bs);
            if (buf == NULL) goto done;
            int packed;
            if (listed) {
                packed = pack_tokens_be(PySequence_Fast_ITEMS(tokens), n * bs, buf, 0) == 0;
            } else { /* msgpack bytes (events/wire.py): read straight into the packing */
                Py_buffer view;
                Py_ssize_t count;
                if (PyObject_GetBuffer(tokens, &view, PyBUF_SIMPLE) < 0) {
                    scratch_free(&sc);
                    goto done;
                }
                packed = tok_scan(view.buf, (size_t)view.len, buf, n * bs, &count) == TOK_U32 &&
                         count == n * bs;
                PyBuffer_Release(&view);
            }
            if (!packed) {
                scratch_free(&sc);
                sc.heap = NULL;
                unhandled = 1; /* misaligned or malformed: counted by the reference */
                break;
            }
            long got = store_blocks(&r, hashes, buf, n, 4 * bs, start, spec);
            scratch_free(&sc);
            sc.heap = NULL;
            if (got < 0) goto done;
            new_hashes += got;
            stored++;
            if (r.blocks->live > cap) {
                i++;
                break;
            }
            continue;
        }
        if (PyObject_TypeCheck(ev, g_removed_type)) {
            PyObject *hashes = FIELD(ev, off_r_hashes), *medium = FIELD(ev, off_r_medium);
            PyObject *group = FIELD(ev, off_r_group);
            if (!hashes || !medium || !group || !PyList_CheckExact(hashes) || !is_gpu(medium) ||
                !is_group(group, group0) || !all_u64(hashes)) {
                unhandled = 1;
                break;
            }
            long got = flush_holder(&r);
            if (got < 0) goto done;
            new_hashes += got;
            int ok = remove_blocks(&r, hashes, &gone);
            if (ok < 0) goto done;
            removed += ok;
            continue;
        }
        unhandled = 1;
        break;
    }
    long got = flush_holder(&r); /* before the caller, or the reference model, reads anything */
    if (got < 0) goto done;
    new_hashes += got;
    /* The counts go into the caller's list, the next index is the result: no tuple per call
     * (a tuple is tracked by the GC, and a collection inside apply would walk every young
     * object of the process). */
    long counts[5] = {unhandled, stored, removed, new_hashes, gone};
    for (int k = 0; k < 5; k++) {
        PyObject *v = PyLong_FromLong(counts[k]);
        if (v == NULL) goto done;
        PyObject *old = PyList_GET_ITEM(args[10], k);
        PyList_SET_ITEM(args[10], k, v);
        Py_DECREF(old);
    }
    result = PyLong_FromSsize_t(i);
done:
    if (r.pend) { /* an error after a store: its holder step still belongs to the index */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (flush_holder(&r) < 0) PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(r.hm);
    Py_XDECREF(last_size_obj);
    Py_XDECREF(last_lora);
    Py_XDECREF(seeds);
    Py_XDECREF(dups);
    return result;
}

/* release_all(blocks, holders, bit) -> gone: drop `bit` from the holders of every block of a
 * GPU-only source without aliases (prefix_index.py's _clear_source fast branch). */
static PyObject *py_release_all(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    u64 bit;
    if (nargs != 3 || !Py_IS_TYPE(args[0], &NativeMapType) ||
        !Py_IS_TYPE(args[1], &NativeMapType) || as_u64(args[2], &bit) != 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "release_all(blocks, holders, bit)");
        return NULL;
    }
    NativeMap *blocks = (NativeMap *)args[0], *holders = (NativeMap *)args[1];
    long gone = 0;
    for (Py_ssize_t ix = blocks->first; ix < blocks->used; ix++) {
        if (!FLAG(blocks, ix)) continue;
        int g = release_bit(holders, blocks->entries[ix].v, bit);
        if (g < 0) return NULL;
        gone += g;
    }
    return PyLong_FromLong(gone);
}

/* evict_oldest(blocks, holders, bit, n, dups) -> (evicted, gone): drop the n least recently
 * stored blocks of a source without aliases or other media (prefix_index.py's _evict). */
static PyObject *py_evict_oldest(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    u64 bit;
    if (nargs != 5 || !Py_IS_TYPE(args[0], &NativeMapType) ||
        !Py_IS_TYPE(args[1], &NativeMapType) || as_u64(args[2], &bit) != 1 ||
        !PyDict_CheckExact(args[4])) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "evict_oldest(blocks, holders, bit, n, dups)");
        return NULL;
    }
    NativeMap *blocks = (NativeMap *)args[0], *holders = (NativeMap *)args[1];
    PyObject *dups = args[4];
    Py_ssize_t n = PyLong_AsSsize_t(args[3]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    long evicted = 0, gone = 0;
    while (evicted < n && blocks->live > 0) {
        Py_ssize_t ix = blocks->first;
        while (!FLAG(blocks, ix)) ix++;
        int okey = (FLAG(blocks, ix) & F_OKEY) != 0;
        u64 local = blocks->entries[ix].v;
        Py_ssize_t slot = -1;
        if (okey || PyDict_GET_SIZE(dups)) {
            PyObject *ko = key_of(blocks, ix);
            if (ko == NULL) return NULL;
            if (PyDict_GET_SIZE(dups) && PyDict_DelItem(dups, ko) < 0) {
                if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                    Py_DECREF(ko);
                    return NULL;
                }
                PyErr_Clear();
            }
            mkey_t mk;
            Py_ssize_t found = make_key(ko, &mk) < 0 ? -2 : find_key(blocks, &mk, &slot);
            Py_DECREF(ko);
            if (found != ix) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_RuntimeError, "evict_oldest: the oldest key moved");
                return NULL;
            }
        } else {
            find_int(blocks, blocks->entries[ix].k, &slot);
        }
        map_delete(blocks, ix, slot);
        int g = release_bit(holders, local, bit);
        if (g < 0) return NULL;
        gone += g;
        evicted++;
    }
    return Py_BuildValue("(ll)", evicted, gone);
}

/* The walk of a prompt's blocks over GPU holders: blocks[pos] = the leading blocks held by the
 * source of bit `pos` (for the bits in `alive`). 0 ok, -1 with an exception set. */
/* The first `count` token ids of `obj` packed big-endian into `*out` (from `sc`): `obj` is a
 * sequence of ints, or an array('I') of native u32, as gateway/prompt_worker.py hands a long
 * prompt over (no Python int per token). 0 ok, -1 with an exception set. */
static int pack_prompt(PyObject *obj, Py_ssize_t count, scratch_t *sc, u8 **out) {
    if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj)) {
        Py_buffer v;
        if (PyObject_GetBuffer(obj, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
        const char *f = v.format;
        int u32s = v.itemsize == 4 && f != NULL &&
                   (strcmp(f, "I") == 0 || strcmp(f, "=I") == 0 || strcmp(f, "@I") == 0);
        if (!u32s || v.len / 4 < count) {
            PyBuffer_Release(&v);
            PyErr_SetString(PyExc_ValueError,
                            u32s ? "match: fewer tokens than n * size"
                                 : "token_ids: expected a sequence of ints or an array('I')");
            return -1;
        }
        u8 *buf = scratch_get(sc, count);
        if (buf == NULL) {
            PyBuffer_Release(&v);
            return -1;
        }
        const u8 *src = (const u8 *)v.buf;
        for (Py_ssize_t i = 0; i < count; i++) {
            u32 t;
            memcpy(&t, src + 4 * i, 4);
#if !HOST_BIG_ENDIAN
            t = __builtin_bswap32(t);
#endif
            memcpy(buf + 4 * i, &t, 4);
        }
        PyBuffer_Release(&v);
        *out = buf;
        return 0;
    }
    PyObject *seq = PySequence_Fast(obj, "token_ids: expected a sequence");
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) < count) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "match: fewer tokens than n * size");
        return -1;
    }
    u8 *buf = scratch_get(sc, count);
    if (buf == NULL || pack_tokens_be(PySequence_Fast_ITEMS(seq), count, buf, 1) < 0) {
        if (buf) scratch_free(sc);
        Py_DECREF(seq);
        return -1;
    }
    Py_DECREF(seq);
    *out = buf;
    return 0;
}

static int match_walk(NativeMap *holders, PyObject *tokens_obj, Py_ssize_t n, Py_ssize_t size,
                      u64 seed, u64 alive, Py_ssize_t *blocks) {
    scratch_t sc;
    u8 *buf;
    if (pack_prompt(tokens_obj, n * size, &sc, &buf) < 0) return -1;
    /* All hashes first (the chain is sequential, the lookups need not be): then each lookup
     * has its slot asked for 8 blocks ahead and its entry 4 ahead, so cache misses overlap. */
    u64 stack_hashes[512], *hashes = n <= 512 ? stack_hashes : PyMem_Malloc((size_t)n * 8);
    if (hashes == NULL) {
        scratch_free(&sc);
        PyErr_NoMemory();
        return -1;
    }
    u64 h = seed;
    Py_ssize_t step = 4 * size, i;
    for (i = 0; i < n; i++) hashes[i] = h = xxh3_64(buf + step * i, (size_t)step, h);
    scratch_free(&sc);
    size_t ns = (size_t)holders->nslots;
    int rc = 0;
    for (i = 0; i < n && alive; i++) {
        if (ns && i + 8 < n) prefetch(&holders->slots[home(mix_u64(hashes[i + 8]), ns)]);
        if (ns && i + 4 < n) {
            int32_t s4 = holders->slots[home(mix_u64(hashes[i + 4]), ns)];
            if (s4 > 0) prefetch(&holders->entries[SLOT_IX(s4)]);
        }
        Py_ssize_t slot, ix = find_int(holders, hashes[i], &slot);
        if (ix >= 0 && (FLAG(holders, ix) & F_OVAL)) {
            PyErr_SetString(PyExc_RuntimeError, "match: a holder mask past bit 63");
            rc = -1;
            break;
        }
        u64 m = ix >= 0 ? alive & holders->entries[ix].v : 0;
        for (u64 ended = alive ^ m; ended; ended &= ended - 1) blocks[__builtin_ctzll(ended)] = i;
        alive = m;
    }
    for (; alive; alive &= alive - 1) blocks[__builtin_ctzll(alive)] = n;
    if (hashes != stack_hashes) PyMem_Free(hashes);
    return rc;
}

/* match_results(holders, token_ids, n, size, seed, alive, engines) -> {engine: MatchResult}:
 * index/matching.py match_size for GPU-only holders without speculative entries, whole:
 * engines[pos] names the engine of source bit `pos`; per engine the DP rank with the most
 * blocks (equal lengths give equal results here, so matching.py's tie rule is moot). */
static PyObject *py_match_results(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    u64 seed, alive;
    if (nargs != 7 || !Py_IS_TYPE(args[0], &NativeMapType) || as_u64(args[4], &seed) != 1 ||
        as_u64(args[5], &alive) != 1 || !PyList_CheckExact(args[6]) ||
        PyList_GET_SIZE(args[6]) != 64 || g_result_type == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError,
                            "match_results(holders, tokens, n, size, seed, alive, engines[64])");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[2]), size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    PyObject *out = PyDict_New();
    if (out == NULL || !alive || n <= 0) return out;
    Py_ssize_t blocks[64];
    if (match_walk((NativeMap *)args[0], args[1], n, size, seed, alive, blocks) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    /* Per engine the longest; bits in ascending order, so a tie keeps the lower bit. */
    Py_ssize_t best[64];
    PyObject *engine_of[64];
    Py_hash_t engine_hash[64]; /* str hashes are cached: compared before the strings */
    int count = 0;
    for (u64 bits = alive; bits; bits &= bits - 1) {
        int pos = __builtin_ctzll(bits);
        if (blocks[pos] == 0) continue;
        PyObject *engine = PyList_GET_ITEM(args[6], pos);
        if (!PyUnicode_CheckExact(engine)) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_TypeError, "match_results: a live bit without an engine");
            return NULL;
        }
        Py_hash_t eh = PyObject_Hash(engine);
        int k;
        for (k = 0; k < count; k++)
            if (engine_of[k] == engine ||
                (engine_hash[k] == eh && PyUnicode_Compare(engine_of[k], engine) == 0))
                break;
        if (k == count) {
            engine_of[count] = engine;
            engine_hash[count] = eh;
            best[count++] = blocks[pos];
        } else if (blocks[pos] > best[k]) {
            best[k] = blocks[pos];
        }
    }
    for (int k = 0; k < count; k++) {
        PyObject *by_medium = PyDict_New(), *nb = PyLong_FromSsize_t(best[k]);
        PyObject *tokens = PyLong_FromSsize_t(best[k] * size), *zero = PyLong_FromLong(0);
        PyObject *sz = PyLong_FromSsize_t(size), *res = NULL;
        if (by_medium && nb && tokens && zero && sz && PyDict_SetItem(by_medium, s_gpu, nb) == 0) {
            PyObject *argv[5] = {nb, tokens, by_medium, zero, sz};
            res = PyObject_Vectorcall(g_result_type, argv, 5, NULL);
        }
        Py_XDECREF(by_medium);
        Py_XDECREF(nb);
        Py_XDECREF(tokens);
        Py_XDECREF(zero);
        Py_XDECREF(sz);
        if (res == NULL || PyDict_SetItem(out, engine_of[k], res) < 0) {
            Py_XDECREF(res);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(res);
    }
    return out;
}

/* spec_extend(hashes, n, spec_by_engine, out, now) -> {engine: blocks}: matching.py
 * match_size's speculative part, counting only: per engine with entries, the leading blocks of
 * the prompt (`hashes`, its chained block hashes) that its confirmed result in `out` covers or
 * that were routed there and have not expired at `now`; engines with none are left out. */
static PyObject *py_spec_extend(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_CheckExact(args[0]) || !PyDict_Check(args[2]) ||
        !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "spec_extend(hashes, n, spec_by_engine, out, now)");
        return NULL;
    }
    PyObject *hashes = args[0], *spec = args[2], *out = args[3];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    double now = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (n > PyList_GET_SIZE(hashes)) n = PyList_GET_SIZE(hashes);
    PyObject *result = PyDict_New();
    if (result == NULL) return NULL;
    Py_ssize_t pos = 0;
    PyObject *engine, *entries;
    while (PyDict_Next(spec, &pos, &engine, &entries)) {
        if (!PyDict_Check(entries) || PyDict_GET_SIZE(entries) == 0) continue;
        Py_ssize_t j = 0;
        PyObject *confirmed = PyDict_GetItemWithError(out, engine);
        if (confirmed != NULL) {
            PyObject *blocks = PyObject_GetAttr(confirmed, s_blocks);
            j = blocks ? PyLong_AsSsize_t(blocks) : -1;
            Py_XDECREF(blocks);
        }
        if (PyErr_Occurred()) goto fail;
        while (j < n) { /* entries are read only: nothing here runs Python code */
            PyObject *at = PyDict_GetItemWithError(entries, PyList_GET_ITEM(hashes, j));
            if (at == NULL) {
                if (PyErr_Occurred()) goto fail;
                break;
            }
            double expiry = PyFloat_AsDouble(at);
            if (expiry == -1.0 && PyErr_Occurred()) goto fail;
            if (!(expiry > now)) break;
            j++;
        }
        if (j > 0) {
            PyObject *v = PyLong_FromSsize_t(j);
            int bad = v == NULL || PyDict_SetItem(result, engine, v) < 0;
            Py_XDECREF(v);
            if (bad) goto fail;
        }
    }
    return result;
fail:
    Py_DECREF(result);
    return NULL;
}

/* ===================================================================== the module */

static PyMethodDef module_methods[] = {
    {"xxh3_64", (PyCFunction)(void (*)(void))py_xxh3_64, METH_FASTCALL,
     "xxh3_64(data, seed=0) -> int: XXH3 64-bit of a bytes-like object."},
    {"chain_hashes", (PyCFunction)(void (*)(void))py_chain_hashes, METH_FASTCALL,
     "chain_hashes(parent, token_ids, block_size) -> list[int] (index/hashing.py)."},
    {"configure", py_configure, METH_VARARGS,
     "configure(BlockStored, BlockRemoved, IndexStateError, SourceState, MatchResult, Raw)."},
    {"apply_run", (PyCFunction)(void (*)(void))py_apply_run, METH_FASTCALL, NULL},
    {"release_all", (PyCFunction)(void (*)(void))py_release_all, METH_FASTCALL, NULL},
    {"evict_oldest", (PyCFunction)(void (*)(void))py_evict_oldest, METH_FASTCALL, NULL},
    {"match_results", (PyCFunction)(void (*)(void))py_match_results, METH_FASTCALL, NULL},
    {"spec_extend", (PyCFunction)(void (*)(void))py_spec_extend, METH_FASTCALL, NULL},
    {"token_scan", py_token_scan, METH_O, "token_scan(raw) -> (status, count)."},
    {"int_pairs", py_int_pairs, METH_O, "int_pairs(map) -> bytes of LE u64 (key, value)."},
    {"restore_pairs", (PyCFunction)(void (*)(void))py_restore_pairs, METH_FASTCALL, NULL},
    {"token_pack", py_token_pack, METH_O, "token_pack(raw) -> bytes | None."},
    {"token_list", py_token_list, METH_O, "token_list(raw) -> list[int] | None."},
    {"token_verdict", py_token_verdict, METH_O, "token_verdict(events) -> status."},
    {"configure_plain", py_configure_plain, METH_O, "configure_plain(raw_stored_type)."},
    {"batch_verdict", py_batch_verdict, METH_O, "batch_verdict(events) -> status."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "kvroute.index._native",
    "The compiled core of kvroute's prefix index (docs/design.md §12).", -1, module_methods,
};

static int intern(PyObject **slot, const char *s) {
    *slot = PyUnicode_InternFromString(s);
    return *slot ? 0 : -1;
}

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&NativeMapType) < 0 || PyType_Ready(&MapIterType) < 0) return NULL;
    if (intern(&s_gpu, "GPU") || intern(&s_store_again, "_store_again_gpu") ||
        intern(&s_hold_again, "hold_again_gpu") || intern(&s_release, "release") ||
        intern(&s_unknown_block, "_unknown_block") || intern(&s_hm, "_hm") ||
        intern(&s_blocks, "blocks"))
        return NULL;
    /* A per-process seed for slot hashing: not secret from the process, unknown to engines. */
    PyObject *os = PyImport_ImportModule("os");
    PyObject *rnd = os ? PyObject_CallMethod(os, "urandom", "i", 8) : NULL;
    Py_XDECREF(os);
    if (rnd == NULL) return NULL;
    memcpy(&g_hash_seed, PyBytes_AS_STRING(rnd), 8);
    Py_DECREF(rnd);
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_ENTRIES", (long)MAX_ENTRIES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&NativeMapType);
    if (PyModule_AddObject(m, "NativeMap", (PyObject *)&NativeMapType) < 0) {
        Py_DECREF(&NativeMapType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
