# cython: language_level=3
"""Compiled parsing core of alephsmtp.

The CONTRACT is the docstring of :mod:`alephsmtp._parser_py`, the pure-Python twin, which is
also the type source; both give the same results to the byte (the tests compare them).

Input is read in place through the buffer protocol (no copy); output is written straight into
a new ``bytes`` object, sized at the end. There is one crossing into Python per ``feed`` call
(creating the result), never one per line or byte, except for the error instances, made once
per broken rule.

DataReader's common case, lines that end in CRLF and have no bare CR, goes through a C kernel
(below) that checks and copies 64 bytes per step (SSE2, NEON, AVX2 or AVX-512, or 8 in
portable C) and drops stuffed dots in the same pass; the exact line-by-line scan takes what
it leaves: the end mark, the lines with a bare CR or LF or near the line limit, the last line
of a read. LineReader finds a line's CRLF, and that it has no other CR, in one pass.

``scan_path`` reads the common MAIL/RCPT argument in one pass over a character-class table and
creates its three results only when the argument has the simple form.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.string cimport memchr, memcpy

import operator

from alephsmtp.errors import BareCarriageReturn, BareLineFeed, LineTooLong, MessageTooLarge

__all__ = ["BdatReader", "BufferPool", "DataReader", "LineReader", "scan_path", "split_command"]

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1
    void Py_SET_SIZE(object o, Py_ssize_t size)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_1BYTE_DATA(object o)

cdef bytes EMPTY = b""

cdef enum:
    CR = 13
    LF = 10
    DOT = 46
    SP = 32

# DataReader line-start states: nothing of the line seen yet / a dot / a dot and a CR (both
# held, not output yet) / inside a line (output as it comes).
cdef enum:
    ST_START = 0
    ST_DOT = 1
    ST_DOTCR = 2
    ST_MID = 3

# DataReader error kinds, in their order of precedence at one byte.
cdef enum:
    E_NONE = 0
    E_BARE_CR = 1
    E_TOO_LONG = 2
    E_BARE_LF = 3
    E_TOO_LARGE = 4


cdef extern from *:
    """
    /* DataReader's bulk kernel: the clean part of a read, copied to the output in blocks.
     *
     * Clean means: every CR is followed by LF, every LF is preceded by CR, and a line that
     * starts with a dot has a byte other than CR or LF after it (so the dot is a stuffed one, to
     * drop). Per block of W bytes at p + i, with a = p[i:i+W] and b = p[i+1:i+W+1] (the same
     * bytes, one further on): bad = (a == CR) ^ (b == LF) flags a bare CR at i+k or a bare LF at
     * i+k+1; dot = (a == LF) & (b == '.') flags a line-start dot at i+k+1. A block with neither
     * is stored as it is. A dot is dropped by storing what follows it one byte lower: for a lone
     * dot, one more copy of W bytes; else the blocks go on from the byte after the dot.
     *
     * aleph_data_fast(p, start, lim, out, &o, limit): start is a line start after a real CRLF
     * and p[start] is neither '.' nor LF; reads stay below lim; p[start] goes to out[o]; writes
     * stay below out + lim + 2. Returns the line start L where the exact scan must go on (the
     * line with something that is not clean, a line that may be too long, or the last line in
     * reach) and sets o to where p[L] goes. The bytes before L are output; none of them breaks a
     * rule, and every line that they end is ended by a real CRLF. limit 0: no line length
     * accounting at all; else every line ended before L is at most limit bytes, CRLF included.
     *
     * Variants: portable C (SWAR: 8 bytes in a uint64), SSE2 (every x86-64), NEON (every
     * AArch64), and, chosen at run time with GCC or Clang on x86-64, AVX2 and AVX-512 (VBMI2's
     * byte compress drops any number of dots per 64 bytes without a branch). For their tests,
     * ALEPH_FORCE at compile time picks the portable one (1), SSE2 (2) or at most AVX2 (3). */
    #include <stdint.h>
    #include <string.h>

    #if defined(__GNUC__) || defined(__clang__)
    #  define ALEPH_INLINE static inline __attribute__((always_inline))
    #  define ALEPH_CTZ(x) ((int)__builtin_ctzll(x))
    #  define ALEPH_MSB(x) (63 - (int)__builtin_clzll(x))
    #elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64))
    #  include <intrin.h>
    #  define ALEPH_INLINE static __forceinline
    ALEPH_INLINE int aleph_ctz(uint64_t x) {
        unsigned long k;
        _BitScanForward64(&k, x);
        return (int)k;
    }
    ALEPH_INLINE int aleph_msb(uint64_t x) {
        unsigned long k;
        _BitScanReverse64(&k, x);
        return (int)k;
    }
    #  define ALEPH_CTZ(x) aleph_ctz(x)
    #  define ALEPH_MSB(x) aleph_msb(x)
    #else
    #  define ALEPH_INLINE static
    static int aleph_ctz(uint64_t x) { int k = 0; while (!(x & 1)) { x >>= 1; k++; } return k; }
    static int aleph_msb(uint64_t x) { int k = -1; while (x) { x >>= 1; k++; } return k; }
    #  define ALEPH_CTZ(x) aleph_ctz(x)
    #  define ALEPH_MSB(x) aleph_msb(x)
    #endif

    #ifndef ALEPH_FORCE
    #  define ALEPH_FORCE 0
    #endif
    #if ALEPH_FORCE != 1 && (defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64))
    #  include <emmintrin.h>
    #  define ALEPH_SSE2 1
    #  if ALEPH_FORCE != 2 && defined(__x86_64__) \
            && (defined(__clang__) ? __clang_major__ >= 11 : defined(__GNUC__) && __GNUC__ >= 8)
    #    include <immintrin.h>
    #    include <cpuid.h>
    #    define ALEPH_X86_RUNTIME 1
    #  endif
    #elif ALEPH_FORCE != 1 && (defined(__aarch64__) || defined(_M_ARM64))
    #  include <arm_neon.h>
    #  define ALEPH_NEON 1
    #endif

    /* Software prefetch, ahead of the blocks but never past the read (lim): a read that was not
     * just received (so not in the cache already) streams at about twice the speed with it. */
    #if defined(__GNUC__) || defined(__clang__)
    #  define ALEPH_PREFETCH(a) __builtin_prefetch(a)
    #elif ALEPH_SSE2
    #  define ALEPH_PREFETCH(a) _mm_prefetch((const char *)(a), _MM_HINT_T0)
    #else
    #  define ALEPH_PREFETCH(a) ((void)0)
    #endif
    #define ALEPH_AHEAD(start, lim) ((lim) - (start) < 32768 ? ((lim) - (start)) >> 2 : 8192)

    typedef Py_ssize_t (*aleph_fast_fn)(const unsigned char *, Py_ssize_t, Py_ssize_t,
                                        unsigned char *, Py_ssize_t *, Py_ssize_t);

    /* The start of the line that holds p[pos] (start is a line start, start <= pos). */
    ALEPH_INLINE Py_ssize_t aleph_line_start(const unsigned char *p, Py_ssize_t start,
                                             Py_ssize_t pos) {
        while (pos > start && p[pos - 1] != 10) {
            pos--;
        }
        return pos;
    }

    /* A kernel from a block function: BLOCK(s, d, track, &bad, &dot, &lfs) stores W bytes of s
     * at d and returns nonzero when bad or dot has a bit (else they are not set); lfs (when
     * track) gets the LF bits of a. A mask has 1 << SHIFT bits per byte: LANE is byte 0's.
     * COPY(s, d) copies W bytes. */
    #define ALEPH_KERNEL(NAME, ATTR, W, SHIFT, LANE, BLOCK, COPY, TRACK)                     \
    ATTR static Py_ssize_t NAME(const unsigned char *p, Py_ssize_t start, Py_ssize_t lim,     \
                                unsigned char *out, Py_ssize_t *po, Py_ssize_t limit) {       \
        Py_ssize_t i = start, delta = *po - start, dot_at = -1, last_lf = start - 1, line, d; \
        Py_ssize_t ahead = ALEPH_AHEAD(start, lim);                                           \
        uint64_t bad, dot, lfs = 0;                                                           \
        int kb, kd;                                                                           \
        (void)limit;                                                                          \
        while (i + (W) + 2 <= lim) {                                                          \
            if (TRACK && i + (W) - 1 - last_lf > limit) {                                     \
                break; /* an LF in this block could end a line that is too long */            \
            }                                                                                 \
            if ((W) >= 16) {                                                                  \
                ALEPH_PREFETCH(p + (i + ahead < lim ? i + ahead : lim - 1));                  \
            }                                                                                 \
            if (!BLOCK(p + i, out + i + delta, TRACK, &bad, &dot, &lfs)) {                    \
                if (TRACK) {                                                                  \
                    last_lf = lfs ? i + (ALEPH_MSB(lfs | 1) >> (SHIFT)) : last_lf;            \
                }                                                                             \
                i += (W);                                                                     \
                continue;                                                                     \
            }                                                                                 \
            kb = bad ? ALEPH_CTZ(bad) >> (SHIFT) : (W);                                       \
            kd = dot ? ALEPH_CTZ(dot) >> (SHIFT) : (W);                                       \
            if (kd >= kb) {                                                                   \
                /* A bare CR at i + kb or a bare LF at i + kb + 1: the exact scan's. */       \
                line = aleph_line_start(p, start, i + kb + 1);                                \
                goto done;                                                                    \
            }                                                                                 \
            d = i + kd + 1; /* a line-start dot */                                            \
            if (p[d + 1] == 13 || p[d + 1] == 10) {                                           \
                line = d; /* perhaps the end mark: the exact scan decides */                  \
                goto done;                                                                    \
            }                                                                                 \
            dot_at = d;                                                                       \
            delta--;                                                                          \
            if (!bad && (dot >> (kd << (SHIFT))) == (LANE) && kd < (W) - 1                    \
                    && i + 2 * (W) + 1 <= lim) {                                              \
                /* The only thing in the block: the rest of it, one byte lower. */            \
                COPY(p + d + 1, out + d + 1 + delta);                                         \
                if (TRACK) {                                                                  \
                    last_lf = i + (ALEPH_MSB(lfs) >> (SHIFT));                                \
                }                                                                             \
                i += (W);                                                                     \
            } else {                                                                          \
                last_lf = d - 1;                                                              \
                i = d + 1;                                                                    \
            }                                                                                 \
        }                                                                                     \
        line = TRACK ? last_lf + 1 : aleph_line_start(p, start, i);                           \
    done:                                                                                     \
        *po = line + delta + (line == dot_at);                                                \
        return line;                                                                          \
    }

    /* Portable: 8 bytes per step in a uint64 (SWAR); 0x80 in each byte lane that matches. */
    #define ALEPH_ONES 0x0101010101010101ULL
    #define ALEPH_LOW7 0x7f7f7f7f7f7f7f7fULL

    ALEPH_INLINE uint64_t aleph_word(const unsigned char *s) {
        /* Byte k in lane k whatever the byte order (compilers make it one load). */
        return (uint64_t)s[0] | (uint64_t)s[1] << 8 | (uint64_t)s[2] << 16
            | (uint64_t)s[3] << 24 | (uint64_t)s[4] << 32 | (uint64_t)s[5] << 40
            | (uint64_t)s[6] << 48 | (uint64_t)s[7] << 56;
    }

    ALEPH_INLINE uint64_t aleph_eq(uint64_t x, uint64_t c) {
        uint64_t y = x ^ (c * ALEPH_ONES);
        return ~(((y & ALEPH_LOW7) + ALEPH_LOW7) | y | ALEPH_LOW7);
    }

    ALEPH_INLINE int aleph_block_swar(const unsigned char *s, unsigned char *d, int track,
                                      uint64_t *bad, uint64_t *dot, uint64_t *lfs) {
        uint64_t a = aleph_word(s), b = aleph_word(s + 1), lf = aleph_eq(a, 10);
        memcpy(d, s, 8);
        *bad = aleph_eq(a, 13) ^ aleph_eq(b, 10);
        *dot = lf & aleph_eq(b, 46);
        if (track) {
            *lfs = lf;
        }
        return (*bad | *dot) != 0;
    }

    ALEPH_INLINE void aleph_copy_swar(const unsigned char *s, unsigned char *d) {
        memcpy(d, s, 8);
    }

    ALEPH_KERNEL(aleph_fast_swar, , 8, 3, 0x80, aleph_block_swar, aleph_copy_swar, 0)
    ALEPH_KERNEL(aleph_fast_swar_track, , 8, 3, 0x80, aleph_block_swar, aleph_copy_swar, 1)

    #if ALEPH_SSE2
    /* SSE2 (every x86-64): 32 bytes per step, in two halves. */
    ALEPH_INLINE int aleph_block_sse2(const unsigned char *s, unsigned char *d, int track,
                                      uint64_t *bad, uint64_t *dot, uint64_t *lfs) {
        const __m128i cr = _mm_set1_epi8(13), lf = _mm_set1_epi8(10), dt = _mm_set1_epi8(46);
        __m128i a0 = _mm_loadu_si128((const __m128i *)s);
        __m128i a1 = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i b0 = _mm_loadu_si128((const __m128i *)(s + 1));
        __m128i b1 = _mm_loadu_si128((const __m128i *)(s + 17));
        __m128i l0 = _mm_cmpeq_epi8(a0, lf), l1 = _mm_cmpeq_epi8(a1, lf);
        __m128i x0 = _mm_xor_si128(_mm_cmpeq_epi8(a0, cr), _mm_cmpeq_epi8(b0, lf));
        __m128i x1 = _mm_xor_si128(_mm_cmpeq_epi8(a1, cr), _mm_cmpeq_epi8(b1, lf));
        __m128i t0 = _mm_and_si128(l0, _mm_cmpeq_epi8(b0, dt));
        __m128i t1 = _mm_and_si128(l1, _mm_cmpeq_epi8(b1, dt));
        _mm_storeu_si128((__m128i *)d, a0);
        _mm_storeu_si128((__m128i *)(d + 16), a1);
        if (track) {
            *lfs = (uint64_t)(unsigned)_mm_movemask_epi8(l0)
                | (uint64_t)(unsigned)_mm_movemask_epi8(l1) << 16;
        }
        if (!_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(x0, x1), _mm_or_si128(t0, t1)))) {
            return 0;
        }
        *bad = (uint64_t)(unsigned)_mm_movemask_epi8(x0)
            | (uint64_t)(unsigned)_mm_movemask_epi8(x1) << 16;
        *dot = (uint64_t)(unsigned)_mm_movemask_epi8(t0)
            | (uint64_t)(unsigned)_mm_movemask_epi8(t1) << 16;
        return 1;
    }

    ALEPH_INLINE void aleph_copy_sse2(const unsigned char *s, unsigned char *d) {
        __m128i x = _mm_loadu_si128((const __m128i *)s);
        __m128i y = _mm_loadu_si128((const __m128i *)(s + 16));
        _mm_storeu_si128((__m128i *)d, x);
        _mm_storeu_si128((__m128i *)(d + 16), y);
    }

    ALEPH_KERNEL(aleph_fast_sse2, , 32, 0, 1, aleph_block_sse2, aleph_copy_sse2, 0)
    ALEPH_KERNEL(aleph_fast_sse2_track, , 32, 0, 1, aleph_block_sse2, aleph_copy_sse2, 1)
    #endif

    #if ALEPH_X86_RUNTIME
    /* AVX2: 64 bytes per step, in two halves. */
    #define ALEPH_AVX2 __attribute__((target("avx2")))

    ALEPH_AVX2 ALEPH_INLINE int aleph_block_avx2(const unsigned char *s, unsigned char *d,
                                                 int track, uint64_t *bad, uint64_t *dot,
                                                 uint64_t *lfs) {
        const __m256i cr = _mm256_set1_epi8(13), lf = _mm256_set1_epi8(10);
        const __m256i dt = _mm256_set1_epi8(46);
        __m256i a0 = _mm256_loadu_si256((const __m256i *)s);
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(s + 1));
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(s + 33));
        __m256i l0 = _mm256_cmpeq_epi8(a0, lf), l1 = _mm256_cmpeq_epi8(a1, lf);
        __m256i x0 = _mm256_xor_si256(_mm256_cmpeq_epi8(a0, cr), _mm256_cmpeq_epi8(b0, lf));
        __m256i x1 = _mm256_xor_si256(_mm256_cmpeq_epi8(a1, cr), _mm256_cmpeq_epi8(b1, lf));
        __m256i t0 = _mm256_and_si256(l0, _mm256_cmpeq_epi8(b0, dt));
        __m256i t1 = _mm256_and_si256(l1, _mm256_cmpeq_epi8(b1, dt));
        __m256i any = _mm256_or_si256(_mm256_or_si256(x0, x1), _mm256_or_si256(t0, t1));
        _mm256_storeu_si256((__m256i *)d, a0);
        _mm256_storeu_si256((__m256i *)(d + 32), a1);
        if (track) {
            *lfs = (uint64_t)(unsigned)_mm256_movemask_epi8(l0)
                | (uint64_t)(unsigned)_mm256_movemask_epi8(l1) << 32;
        }
        if (_mm256_testz_si256(any, any)) {
            return 0;
        }
        *bad = (uint64_t)(unsigned)_mm256_movemask_epi8(x0)
            | (uint64_t)(unsigned)_mm256_movemask_epi8(x1) << 32;
        *dot = (uint64_t)(unsigned)_mm256_movemask_epi8(t0)
            | (uint64_t)(unsigned)_mm256_movemask_epi8(t1) << 32;
        return 1;
    }

    ALEPH_AVX2 ALEPH_INLINE void aleph_copy_avx2(const unsigned char *s, unsigned char *d) {
        __m256i x = _mm256_loadu_si256((const __m256i *)s);
        __m256i y = _mm256_loadu_si256((const __m256i *)(s + 32));
        _mm256_storeu_si256((__m256i *)d, x);
        _mm256_storeu_si256((__m256i *)(d + 32), y);
    }

    ALEPH_KERNEL(aleph_fast_avx2, ALEPH_AVX2, 64, 0, 1, aleph_block_avx2, aleph_copy_avx2, 0)
    ALEPH_KERNEL(aleph_fast_avx2_track, ALEPH_AVX2, 64, 0, 1, aleph_block_avx2, aleph_copy_avx2,
                 1)

    /* AVX-512 with VBMI2: 64 bytes per step, the tests in mask registers. A block with
     * line-start dots is output by one compress that drops them all (a dot at i + 64 is carried
     * into the next block). Where dots are many (two within 16 blocks), every block goes that
     * way, with no branch per dot; after 64 blocks without one, plain stores again (a compress
     * costs more than a plain store). */
    #define ALEPH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))
    #define ALEPH_KERNEL_AVX512(NAME, TRACK)                                                  \
    ALEPH_AVX512 static Py_ssize_t NAME(const unsigned char *p, Py_ssize_t start,             \
                                        Py_ssize_t lim, unsigned char *out, Py_ssize_t *po,   \
                                        Py_ssize_t limit) {                                   \
        const __m512i cr = _mm512_set1_epi8(13), lf = _mm512_set1_epi8(10);                   \
        const __m512i dt = _mm512_set1_epi8(46);                                              \
        Py_ssize_t i = start, o = *po, last_lf = start - 1, last_drop = start - 4096, line;   \
        Py_ssize_t ahead = ALEPH_AHEAD(start, lim);                                           \
        uint64_t carry = 0; /* p[i] is a line-start dot, to drop */                           \
        uint64_t drop, brk, carry2;                                                           \
        __mmask64 lfa, lfb, bad, dot;                                                         \
        int dense = 0; /* blocks to compress whatever they hold */                            \
        int held = 0; /* dense, or a carried dot */                                           \
        int got;                                                                              \
        __m512i a, b;                                                                         \
        (void)limit;                                                                          \
        while (i + 66 <= lim) {                                                               \
            if (TRACK && i + 63 - last_lf > limit) {                                          \
                break; /* an LF in this block could end a line that is too long */            \
            }                                                                                 \
            ALEPH_PREFETCH(p + (i + ahead < lim ? i + ahead : lim - 1));                      \
            a = _mm512_loadu_si512((const void *)(p + i));                                    \
            b = _mm512_loadu_si512((const void *)(p + i + 1));                                \
            lfa = _mm512_cmpeq_epi8_mask(a, lf);                                              \
            lfb = _mm512_cmpeq_epi8_mask(b, lf);                                              \
            bad = _kxor_mask64(_mm512_cmpeq_epi8_mask(a, cr), lfb);                           \
            dot = _mm512_mask_cmpeq_epi8_mask(lfa, b, dt);                                    \
            if (!held && _kortestz_mask64_u8(bad, dot)) {                                     \
                _mm512_storeu_si512((void *)(out + o), a); /* nothing to drop */             \
                o += 64;                                                                      \
            } else {                                                                          \
                brk = _cvtmask64_u64(lfb) | _cvtmask64_u64(_mm512_cmpeq_epi8_mask(b, cr));    \
                drop = _cvtmask64_u64(dot);                                                   \
                if (_cvtmask64_u64(bad) | (drop & (brk >> 1)) | (carry & brk)) {              \
                    break; /* a bare CR or LF, or a dot line that may be the end mark */      \
                }                                                                             \
                carry2 = drop >> 63;                                                          \
                drop = (drop << 1) | carry;                                                   \
                carry = carry2;                                                               \
                if (dense) {                                                                  \
                    got = -(int)(drop != 0); /* no branch on it: dots come as they come */    \
                    dense = ((dense - 1) & ~got) | (64 & got);                                \
                } else {                                                                      \
                    dense = i - last_drop < 1024 ? 64 : 0;                                    \
                    last_drop = i;                                                            \
                }                                                                             \
                held = dense | (int)carry;                                                    \
                _mm512_storeu_si512((void *)(out + o),                                        \
                                    _mm512_maskz_compress_epi8(_cvtu64_mask64(~drop), a));    \
                o += 64 - (Py_ssize_t)_mm_popcnt_u64(drop);                                   \
            }                                                                                 \
            if (TRACK) {                                                                      \
                drop = _cvtmask64_u64(lfa);                                                   \
                last_lf = drop ? i + ALEPH_MSB(drop | 1) : last_lf;                           \
            }                                                                                 \
            i += 64;                                                                          \
        }                                                                                     \
        line = TRACK ? last_lf + 1 : aleph_line_start(p, start, i);                           \
        /* Every line-start dot before i was dropped but a carried one (which is at i). */    \
        *po = o - (i - line) + (line < i && p[line] == 46);                                   \
        return line;                                                                          \
    }

    ALEPH_KERNEL_AVX512(aleph_fast_avx512, 0)
    ALEPH_KERNEL_AVX512(aleph_fast_avx512_track, 1)

    /* 2: AVX2, 3: AVX-512 with BW and VBMI2 (each with the OS saving its registers), else 0. */
    static int aleph_x86_level(void) {
        unsigned a, b, c, d, lo, hi, level = 0;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)) || !(c & (1u << 28))) {
            return 0; /* no OSXSAVE or no AVX */
        }
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & 6) != 6 || __get_cpuid_max(0, NULL) < 7) {
            return 0; /* the OS does not save the YMM registers */
        }
        __cpuid_count(7, 0, a, b, c, d);
        if (b & (1u << 5)) {
            level = 2;
            if ((lo & 0xe0) == 0xe0 && (b & (1u << 16)) && (b & (1u << 30)) && (c & (1u << 6))) {
                level = 3;
            }
        }
        return (int)level;
    }
    #endif

    #if ALEPH_NEON
    /* NEON (every AArch64): 16 bytes per step; masks have 4 bits per byte. */
    #define ALEPH_NEON_MASK(v) vget_lane_u64(vreinterpret_u64_u8(                             \
        vshrn_n_u16(vreinterpretq_u16_u8(v), 4)), 0)
    ALEPH_INLINE int aleph_block_neon(const unsigned char *s, unsigned char *d, int track,
                                      uint64_t *bad, uint64_t *dot, uint64_t *lfs) {
        uint8x16_t a = vld1q_u8(s), b = vld1q_u8(s + 1);
        uint8x16_t l = vceqq_u8(a, vdupq_n_u8(10));
        uint8x16_t x = veorq_u8(vceqq_u8(a, vdupq_n_u8(13)), vceqq_u8(b, vdupq_n_u8(10)));
        uint8x16_t t = vandq_u8(l, vceqq_u8(b, vdupq_n_u8(46)));
        vst1q_u8(d, a);
        if (track) {
            *lfs = ALEPH_NEON_MASK(l);
        }
        if (!vmaxvq_u8(vorrq_u8(x, t))) {
            return 0;
        }
        *bad = ALEPH_NEON_MASK(x);
        *dot = ALEPH_NEON_MASK(t);
        return 1;
    }

    ALEPH_INLINE void aleph_copy_neon(const unsigned char *s, unsigned char *d) {
        vst1q_u8(d, vld1q_u8(s));
    }

    ALEPH_KERNEL(aleph_fast_neon, , 16, 2, 0xf, aleph_block_neon, aleph_copy_neon, 0)
    ALEPH_KERNEL(aleph_fast_neon_track, , 16, 2, 0xf, aleph_block_neon, aleph_copy_neon, 1)
    #endif

    static aleph_fast_fn aleph_fast = aleph_fast_swar;
    static aleph_fast_fn aleph_fast_track = aleph_fast_swar_track;

    static void aleph_pick(void) {
    #if ALEPH_SSE2
        aleph_fast = aleph_fast_sse2;
        aleph_fast_track = aleph_fast_sse2_track;
    #endif
    #if ALEPH_X86_RUNTIME
        switch (ALEPH_FORCE == 3 && aleph_x86_level() == 3 ? 2 : aleph_x86_level()) {
        case 3:
            aleph_fast = aleph_fast_avx512;
            aleph_fast_track = aleph_fast_avx512_track;
            break;
        case 2:
            aleph_fast = aleph_fast_avx2;
            aleph_fast_track = aleph_fast_avx2_track;
            break;
        default:
            break;
        }
    #endif
    #if ALEPH_NEON
        aleph_fast = aleph_fast_neon;
        aleph_fast_track = aleph_fast_neon_track;
    #endif
    }

    /* The kernel; then, if it stopped short of lim only because its blocks read ahead, once
     * more on a copy of the last bytes padded with zeros (neither CR, LF nor a dot), so that the
     * exact scan gets the last line only, not the last block and more. */
    #define ALEPH_TAIL 192
    static Py_ssize_t aleph_data_fast(const unsigned char *p, Py_ssize_t start, Py_ssize_t lim,
                                      unsigned char *out, Py_ssize_t *po, Py_ssize_t limit) {
        aleph_fast_fn fast = limit ? aleph_fast_track : aleph_fast;
        unsigned char tail[ALEPH_TAIL + 128], tail_out[ALEPH_TAIL + 128];
        Py_ssize_t line = fast(p, start, lim, out, po, limit), m = lim - line, o = 0;
        if (m <= 0 || m > ALEPH_TAIL || p[line] == 46 || p[line] == 10) {
            return line;
        }
        memcpy(tail, p + line, m);
        memset(tail + m, 0, sizeof(tail) - m);
        m = fast(tail, 0, m + 126, tail_out, &o, limit);
        memcpy(out + *po, tail_out, o);
        *po += o;
        return line + m;
    }

    /* LineReader: the first CR or LF in p[pos:n], or n when there is none. */
    ALEPH_INLINE Py_ssize_t aleph_find_crlf(const unsigned char *p, Py_ssize_t pos,
                                            Py_ssize_t n) {
    #if ALEPH_SSE2
        const __m128i cr = _mm_set1_epi8(13), lf = _mm_set1_epi8(10);
        __m128i v;
        unsigned m;
        for (; pos + 16 <= n; pos += 16) {
            v = _mm_loadu_si128((const __m128i *)(p + pos));
            m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, cr),
                                                         _mm_cmpeq_epi8(v, lf)));
            if (m) {
                return pos + ALEPH_CTZ(m);
            }
        }
    #elif ALEPH_NEON
        uint8x16_t v;
        uint64_t m;
        for (; pos + 16 <= n; pos += 16) {
            v = vld1q_u8(p + pos);
            m = ALEPH_NEON_MASK(vorrq_u8(vceqq_u8(v, vdupq_n_u8(13)), vceqq_u8(v, vdupq_n_u8(10))));
            if (m) {
                return pos + (ALEPH_CTZ(m) >> 2);
            }
        }
    #else
        uint64_t w, m;
        for (; pos + 8 <= n; pos += 8) {
            w = aleph_word(p + pos);
            m = aleph_eq(w, 13) | aleph_eq(w, 10);
            if (m) {
                return pos + (ALEPH_CTZ(m) >> 3);
            }
        }
    #endif
        while (pos < n && p[pos] != 13 && p[pos] != 10) {
            pos++;
        }
        return pos;
    }
    """
    void aleph_pick() nogil
    Py_ssize_t aleph_data_fast(
        const unsigned char* p, Py_ssize_t start, Py_ssize_t lim, unsigned char* out,
        Py_ssize_t* po, Py_ssize_t limit
    ) nogil
    Py_ssize_t aleph_find_crlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) nogil

aleph_pick()

# The kernel needs this many bytes to be worth a call, and a line limit (if any) of at least
# this much (with a smaller one, the blocks are longer than a line may be). After a run of
# fewer than FAST_BACKOFF bytes, the exact scan takes the next FAST_BACKOFF bytes.
cdef enum:
    FAST_MIN = 160
    FAST_MIN_LIMIT = 128
    FAST_BACKOFF = 256


cdef Py_ssize_t _check_size(object value, str name) except -1:
    # Checked as a Python int first: a size past what a Py_ssize_t holds (a BDAT chunk of
    # 2**63 octets) is a ValueError here as in the twin, never an OverflowError.
    cdef object number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > PY_SSIZE_T_MAX:
        raise ValueError(f"{name} must be at most {PY_SSIZE_T_MAX}, got {number}")
    return number


cdef bint _check_policy(object bare_newline) except -1:
    if bare_newline == "reject":
        return False
    if bare_newline == "normalize":
        return True
    raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")


cdef object _new_error(int kind):
    if kind == E_BARE_CR:
        return BareCarriageReturn()
    if kind == E_TOO_LONG:
        return LineTooLong()
    if kind == E_BARE_LF:
        return BareLineFeed()
    return MessageTooLarge()


cdef int _get_buffer(object data, Py_buffer* view) except -1:
    """Borrow ``data``'s bytes in place; a non-contiguous buffer is copied first."""
    try:
        PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    except BufferError:
        PyObject_GetBuffer(memoryview(data).tobytes(), view, PyBUF_SIMPLE)
    return 0


cdef inline bint _stops(const unsigned char* s, Py_ssize_t n) noexcept:
    """The STOP RULE: a line that starts with DATA, BDAT or STARTTLS, in any case."""
    # (c | 0x20) == lowercase letter holds exactly for that letter in either case.
    if n < 4:
        return False
    if (s[0] | 0x20) == b"d" and (s[1] | 0x20) == b"a" and (s[2] | 0x20) == b"t" \
            and (s[3] | 0x20) == b"a":
        return True
    if (s[0] | 0x20) == b"b" and (s[1] | 0x20) == b"d" and (s[2] | 0x20) == b"a" \
            and (s[3] | 0x20) == b"t":
        return True
    return (
        n >= 8 and (s[0] | 0x20) == b"s" and (s[1] | 0x20) == b"t" and (s[2] | 0x20) == b"a"
        and (s[3] | 0x20) == b"r" and (s[4] | 0x20) == b"t" and (s[5] | 0x20) == b"t"
        and (s[6] | 0x20) == b"l" and (s[7] | 0x20) == b"s"
    )


cdef class BufferPool:
    """A free list of reusable ``bytearray`` read buffers of one size."""

    cdef Py_ssize_t _buffer_size
    cdef Py_ssize_t _max_free
    cdef Py_ssize_t _allocated
    cdef Py_ssize_t _in_use
    cdef list _free

    def __cinit__(self, *args, **kwargs):
        self._free = []

    def __init__(self, buffer_size=16384, max_free=64):
        cdef Py_ssize_t size = _check_size(buffer_size, "buffer_size")
        if size == 0:
            raise ValueError("buffer_size must be at least 1")
        self._buffer_size = size
        self._max_free = _check_size(max_free, "max_free")

    @property
    def buffer_size(self):
        """The size of every buffer of this pool."""
        return self._buffer_size

    @property
    def max_free(self):
        """How many released buffers are kept for reuse at most."""
        return self._max_free

    @property
    def allocated(self):
        """Buffers created and not dropped: ``in_use + free``."""
        return self._allocated

    @property
    def in_use(self):
        """Buffers acquired and not yet released."""
        return self._in_use

    @property
    def free(self):
        """Buffers on the free list."""
        return len(self._free)

    def acquire(self):
        """Return a free buffer, or a new one when none is free."""
        cdef bytearray buf
        if self._free:
            buf = self._free.pop()
        else:
            buf = bytearray(self._buffer_size)
            self._allocated += 1
        self._in_use += 1
        return buf

    def release(self, buf):
        """Give ``buf`` back: kept while fewer than ``max_free`` are free, else dropped."""
        if not isinstance(buf, bytearray):
            raise TypeError(f"release() needs a bytearray, not {type(buf).__name__}")
        if len(buf) != self._buffer_size:
            raise ValueError(
                f"release() of a {len(buf)}-byte buffer to a pool of "
                f"{self._buffer_size}-byte ones"
            )
        if self._in_use <= 0:
            raise ValueError("release() without a matching acquire()")
        self._in_use -= 1
        if len(self._free) < self._max_free:
            self._free.append(buf)
        else:
            self._allocated -= 1

    def __repr__(self):
        return (
            f"<BufferPool buffer_size={self._buffer_size} allocated={self._allocated} "
            f"in_use={self._in_use} free={len(self._free)}>"
        )


cdef class LineReader:
    """Incremental CRLF line scanner for the command phase."""

    cdef Py_ssize_t _limit
    cdef bint _normalize
    cdef bint _discard
    cdef bytearray _held

    def __cinit__(self, *args, **kwargs):
        self._held = bytearray()

    def __init__(self, max_line_length=512, bare_newline="reject"):
        self._normalize = _check_policy(bare_newline)
        self._limit = _check_size(max_line_length, "max_line_length")

    @property
    def max_line_length(self):
        """The longest line accepted, terminator included; 0 means no limit."""
        return self._limit

    @property
    def bare_newline(self):
        """The bare-newline policy: ``"reject"`` or ``"normalize"``."""
        return "normalize" if self._normalize else "reject"

    @property
    def pending(self):
        """How many bytes are held (unscanned bytes and the incomplete last line)."""
        return PyByteArray_GET_SIZE(self._held)

    def take_pending(self):
        """Return every held byte, exactly as received, and forget them."""
        cdef bytes held = EMPTY
        if PyByteArray_GET_SIZE(self._held):
            held = PyBytes_FromStringAndSize(
                PyByteArray_AS_STRING(self._held), PyByteArray_GET_SIZE(self._held)
            )
            self._held = bytearray()
        self._discard = False
        return held

    def feed(self, data):
        """Scan the held bytes plus ``data``; return the complete lines and errors in order."""
        cdef Py_buffer view
        cdef Py_ssize_t old
        _get_buffer(data, &view)
        try:
            old = PyByteArray_GET_SIZE(self._held)
            if old == 0:
                return self._scan(<const unsigned char*>view.buf, view.len, False)
            if view.len:
                PyByteArray_Resize(self._held, old + view.len)
                memcpy(PyByteArray_AS_STRING(self._held) + old, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return self._scan(
            <const unsigned char*>PyByteArray_AS_STRING(self._held),
            PyByteArray_GET_SIZE(self._held),
            True,
        )

    cdef list _scan(self, const unsigned char* p, Py_ssize_t n, bint from_held):
        """Scan ``p[:n]`` (the held bytes themselves when ``from_held``)."""
        cdef list out = []
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t start, lf, line_end, k
        cdef Py_ssize_t limit = self._limit
        cdef bint normalize = self._normalize
        cdef bint stopped = False
        cdef const unsigned char* q
        if self._discard:
            q = <const unsigned char*>memchr(p, LF, n)
            if q == NULL:
                self._held = bytearray()
                return out
            out.append(LineTooLong())
            self._discard = False
            pos = q - p + 1
        while pos < n:
            start = pos
            k = aleph_find_crlf(p, pos, n)
            if k + 1 < n and p[k] == CR and p[k + 1] == LF:
                # The common case, in one pass: the line's first CR or LF is its CRLF.
                line_end = k
                pos = k + 2
                if limit and pos - start > limit:
                    out.append(LineTooLong())
                    continue
            else:
                # No LF yet, or a bare LF or CR on the way: the first LF ends the line.
                if k < n and p[k] == LF:
                    lf = k
                else:
                    q = <const unsigned char*>memchr(p + k, LF, n - k) if k < n else NULL
                    if q == NULL:
                        break
                    lf = q - p
                pos = lf + 1
                if limit and pos - start > limit:
                    out.append(LineTooLong())
                    continue
                if lf > start and p[lf - 1] == CR:
                    line_end = lf - 1
                elif normalize:
                    line_end = lf
                else:
                    out.append(BareLineFeed())
                    continue
                if not normalize and line_end > start \
                        and memchr(p + start, CR, line_end - start) != NULL:
                    out.append(BareCarriageReturn())
                    continue
            out.append(PyBytes_FromStringAndSize(<const char*>p + start, line_end - start))
            if _stops(p + start, line_end - start):
                stopped = True
                break
        if not stopped and limit and n - pos >= limit:
            self._discard = True
            self._held = bytearray()
        elif pos == n:
            if from_held or PyByteArray_GET_SIZE(self._held):
                self._held = bytearray()
        elif pos or not from_held:
            # A copy: p is the caller's buffer, or the held bytes being replaced.
            self._held = PyByteArray_FromStringAndSize(<const char*>p + pos, n - pos)
        return out

    def __repr__(self):
        return (
            f"<LineReader max_line_length={self._limit} bare_newline={self.bare_newline!r} "
            f"pending={PyByteArray_GET_SIZE(self._held)}>"
        )


cdef class DataReader:
    """The DATA phase: finds the end mark, unstuffs dots and enforces the message rules."""

    cdef long long _max_size
    cdef Py_ssize_t _limit
    cdef bint _normalize
    cdef int _state
    cdef bint _cr  # inside a line, its last byte so far is a CR (already output)
    cdef bint _eligible  # the current line follows a real CRLF (or is the first)
    cdef bint _done
    cdef Py_ssize_t _line_len  # the current line so far, unstuffed (held bytes not counted)
    cdef long long _size
    cdef object _error
    cdef bytes _trailing

    def __cinit__(self, *args, **kwargs):
        self._state = ST_START
        self._eligible = True
        self._trailing = EMPTY

    def __init__(self, max_size=0, max_line_length=0, bare_newline="reject"):
        self._max_size = _check_size(max_size, "max_size")
        self._limit = _check_size(max_line_length, "max_line_length")
        self._normalize = _check_policy(bare_newline)

    @property
    def max_size(self):
        """The size limit; 0 means none."""
        return self._max_size

    @property
    def max_line_length(self):
        """The text line limit, terminator included; 0 means none."""
        return self._limit

    @property
    def bare_newline(self):
        """The bare-newline policy: ``"reject"`` or ``"normalize"``."""
        return "normalize" if self._normalize else "reject"

    @property
    def size(self):
        """The message bytes so far, as they come out (unstuffed, normalized)."""
        return self._size

    @property
    def error(self):
        """The first rule the message broke, or None."""
        return self._error

    @property
    def done(self):
        """True once the end mark was seen."""
        return self._done

    @property
    def trailing(self):
        """The bytes after the end mark in the call that found it."""
        return self._trailing

    def feed(self, data):
        """Scan ``data``; return the message bytes it completed (``b""`` for none)."""
        cdef Py_buffer view
        if self._done:
            raise RuntimeError("DataReader.feed() after the end of the data")
        _get_buffer(data, &view)
        try:
            return self._feed(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef object _feed(self, const unsigned char* p, Py_ssize_t n):
        cdef object result
        cdef PyObject* raw
        cdef Py_ssize_t cap, length
        if n == 0:
            return EMPTY
        # Output <= input + a held dot and CR (+ one CR per bare LF in normalize mode).
        cap = n + 2 + (n if self._normalize else 0)
        result = PyBytes_FromStringAndSize(NULL, cap)
        if self._error is not None:
            # Only the end mark and the size matter now, but the output goes somewhere all
            # the same, so that the bulk kernel can do the scanning.
            self._scan(p, n, <unsigned char*>PyBytes_AS_STRING(result))
            return EMPTY
        length = self._scan(p, n, <unsigned char*>PyBytes_AS_STRING(result))
        if self._error is not None or length == 0:
            return EMPTY
        if cap - length <= 64 or cap - length <= cap >> 5:
            # A little slack is not worth a realloc (which splits the block and leaves a
            # sliver for malloc to consolidate at the next read): the object is new and ours.
            Py_SET_SIZE(result, length)
            PyBytes_AS_STRING(result)[length] = 0
        else:
            # Shrink in place: the only reference must be the one the resize owns.
            raw = <PyObject*>result
            Py_INCREF(result)
            result = None
            _PyBytes_Resize(&raw, length)
            result = <object>raw
            Py_DECREF(result)
        return result

    cdef Py_ssize_t _scan(
        self, const unsigned char* p, Py_ssize_t n, unsigned char* out
    ) except -1:
        """One pass over ``p[:n]``; writes the output to ``out`` (unless NULL), returns its
        length. Output stops (``out`` becomes NULL) when a rule is found broken."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t run = 0  # p[run:pos] is output not yet copied
        cdef Py_ssize_t o = 0
        cdef Py_ssize_t end, best, j, o0, lim
        cdef Py_ssize_t fast_from = 0  # where the kernel may be tried again
        cdef long long rem
        cdef const unsigned char* q
        cdef const unsigned char* r
        cdef unsigned char c
        cdef int state = self._state
        cdef int kind
        cdef bint cr = self._cr
        cdef bint eligible = self._eligible
        cdef bint normalize = self._normalize
        cdef bint ok = self._error is None
        cdef bint bare
        cdef Py_ssize_t line_len = self._line_len
        cdef Py_ssize_t limit = self._limit
        cdef long long size = self._size
        cdef long long max_size = self._max_size
        cdef bint fast = limit == 0 or limit >= FAST_MIN_LIMIT
        while pos < n:
            if state == ST_START and out != NULL and fast and eligible and pos >= fast_from \
                    and n - pos >= FAST_MIN and p[pos] != DOT and p[pos] != LF:
                # The bulk kernel, up to a line it cannot take (or the last line of the read);
                # it never reads or takes bytes whose output could take size past max_size.
                lim = n
                if ok and max_size and max_size - size < n - pos:
                    lim = pos + <Py_ssize_t>(max_size - size)
                memcpy(out + o, p + run, pos - run)
                o += pos - run
                o0 = o
                j = pos
                pos = aleph_data_fast(p, pos, lim, out, &o, limit)
                size += o - o0
                run = pos
                # The line at pos is this loop's; after a short run (bare CRs or LFs here and
                # there, in normalize mode), the next FAST_BACKOFF bytes too.
                fast_from = pos + 1 if pos - j >= FAST_BACKOFF else pos + FAST_BACKOFF
                continue
            if state != ST_MID:
                c = p[pos]
                if state == ST_START:
                    if c == DOT:
                        if out != NULL:
                            memcpy(out + o, p + run, pos - run)
                            o += pos - run
                        state = ST_DOT
                        pos += 1
                        run = pos
                        continue
                    state = ST_MID
                elif state == ST_DOT:
                    if c == CR:
                        state = ST_DOTCR
                        pos += 1
                        run = pos
                        continue
                    state = ST_MID
                    if c == LF:  # ".<LF>": the dot is content
                        if out != NULL:
                            out[o] = DOT
                            o += 1
                        line_len = 1
                        size += 1
                    # else: a stuffed dot, dropped
                else:  # ST_DOTCR
                    if c == LF:
                        if eligible:  # the end mark
                            self._done = True
                            if pos + 1 < n:
                                self._trailing = PyBytes_FromStringAndSize(
                                    <const char*>p + pos + 1, n - pos - 1
                                )
                            break
                        if out != NULL:
                            out[o] = DOT
                            out[o + 1] = CR
                            o += 2
                        line_len = 3
                        size += 3
                        if ok:
                            kind = E_NONE
                            if limit and line_len > limit:
                                kind = E_TOO_LONG
                            elif max_size and size > max_size:
                                kind = E_TOO_LARGE
                            if kind != E_NONE:
                                self._error = _new_error(kind)
                                ok = False
                                out = NULL
                        state = ST_START
                        eligible = True
                        line_len = 0
                        pos += 1
                        continue
                    # ".<CR>x": a stuffed dot, then a bare CR
                    if out != NULL:
                        out[o] = CR
                        o += 1
                    line_len = 1
                    size += 1
                    if ok and not normalize:
                        self._error = BareCarriageReturn()
                        ok = False
                        out = NULL
                    state = ST_MID
            # Inside a line, at pos.
            if cr:
                cr = False
                if p[pos] == LF:
                    line_len += 1
                    size += 1
                    if ok:
                        kind = E_NONE
                        if limit and line_len > limit:
                            kind = E_TOO_LONG
                        elif max_size and size > max_size:
                            kind = E_TOO_LARGE
                        if kind != E_NONE:
                            self._error = _new_error(kind)
                            ok = False
                            out = NULL
                    state = ST_START
                    eligible = True
                    line_len = 0
                    pos += 1
                    continue
                if ok and not normalize:
                    self._error = BareCarriageReturn()
                    ok = False
                    out = NULL
            q = <const unsigned char*>memchr(p + pos, LF, n - pos)
            end = q - p if q != NULL else n
            bare = q != NULL and not (end > pos and p[end - 1] == CR)
            if ok:
                # The first rule this line breaks, if any: the earliest byte, then the kind.
                best = n + 1
                kind = E_NONE
                if not normalize and end - 1 > pos:
                    r = <const unsigned char*>memchr(p + pos, CR, end - 1 - pos)
                    if r != NULL:
                        best = r - p + 1
                        kind = E_BARE_CR
                if limit:
                    rem = limit - line_len
                    if rem <= (end if q != NULL else n - 1) - pos:
                        j = pos + <Py_ssize_t>rem if rem > 0 else pos
                        if j < best:
                            best = j
                            kind = E_TOO_LONG
                if bare and not normalize and end < best:
                    best = end
                    kind = E_BARE_LF
                if max_size:
                    rem = max_size - size
                    if rem < end - pos:
                        j = pos + <Py_ssize_t>rem if rem > 0 else pos
                        if j < best:
                            best = j
                            kind = E_TOO_LARGE
                    elif q != NULL and rem < end - pos + (2 if bare and normalize else 1):
                        if end < best:
                            best = end
                            kind = E_TOO_LARGE
                if kind != E_NONE:
                    self._error = _new_error(kind)
                    ok = False
                    out = NULL
            line_len += end - pos
            size += end - pos
            if q == NULL:
                cr = p[n - 1] == CR
                pos = n
                break
            if bare:
                eligible = False
                if normalize:
                    size += 2
                    if out != NULL:
                        memcpy(out + o, p + run, end - run)
                        o += end - run
                        out[o] = CR
                        o += 1
                        run = end
                else:
                    size += 1
            else:
                eligible = True
                size += 1
            state = ST_START
            line_len = 0
            pos = end + 1
        if out != NULL:
            memcpy(out + o, p + run, pos - run)
            o += pos - run
        self._state = state
        self._cr = cr
        self._eligible = eligible
        self._line_len = line_len
        self._size = size
        return o

    def __repr__(self):
        return (
            f"<DataReader size={self._size} error={self._error!r} done={self._done} "
            f"bare_newline={self.bare_newline!r}>"
        )


cdef class BdatReader:
    """One BDAT chunk (RFC 3030): exactly ``size`` bytes, taken as they are."""

    cdef long long _remaining
    cdef long long _max_size
    cdef long long _size
    cdef object _error
    cdef bint _done
    cdef bytes _trailing

    def __cinit__(self, *args, **kwargs):
        self._trailing = EMPTY

    def __init__(self, size, max_size=0, received=0):
        self._remaining = _check_size(size, "size")
        self._max_size = _check_size(max_size, "max_size")
        self._size = _check_size(received, "received")
        if self._max_size and self._size > self._max_size:
            self._error = MessageTooLarge()
        self._done = self._remaining == 0

    @property
    def max_size(self):
        """The message size limit; 0 means none."""
        return self._max_size

    @property
    def remaining(self):
        """Chunk bytes still owed."""
        return self._remaining

    @property
    def size(self):
        """The message size: ``received`` plus the chunk bytes read so far (at most 2**63 - 1)."""
        return self._size

    @property
    def error(self):
        """``MessageTooLarge()`` once ``size`` passed a non-zero ``max_size``, else None."""
        return self._error

    @property
    def done(self):
        """True once the whole chunk was read."""
        return self._done

    @property
    def trailing(self):
        """The bytes after the chunk in the call that completed it."""
        return self._trailing

    def feed(self, data):
        """Take up to ``remaining`` bytes of ``data``; return them (``b""`` after an error)."""
        cdef Py_buffer view
        cdef Py_ssize_t take
        cdef const char* p
        if self._done:
            raise RuntimeError("BdatReader.feed() after the end of the chunk")
        _get_buffer(data, &view)
        try:
            p = <const char*>view.buf
            take = view.len
            if take >= self._remaining:
                take = <Py_ssize_t>self._remaining
                self._done = True
                if view.len > take:
                    self._trailing = PyBytes_FromStringAndSize(p + take, view.len - take)
            self._remaining -= take
            # Saturating, as in the twin: ``received`` may be anything up to 2**63 - 1.
            if take > PY_SSIZE_T_MAX - self._size:
                self._size = PY_SSIZE_T_MAX
            else:
                self._size += take
            if self._error is None and self._max_size and self._size > self._max_size:
                self._error = MessageTooLarge()
            if self._error is not None or take == 0:
                return EMPTY
            if take == view.len and type(data) is bytes:
                return data  # all of it, and immutable: no copy
            return PyBytes_FromStringAndSize(p, take)
        finally:
            PyBuffer_Release(&view)

    def __repr__(self):
        return (
            f"<BdatReader remaining={self._remaining} size={self._size} "
            f"error={self._error!r} done={self._done}>"
        )


def split_command(line):
    """Split a command line into its ASCII-uppercased verb and its space-stripped argument."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef const unsigned char* q
    cdef unsigned char* v
    cdef Py_ssize_t n, i, k, verb_end, a, b
    cdef unsigned char c
    cdef bytes verb
    _get_buffer(line, &view)
    try:
        p = <const unsigned char*>view.buf
        n = view.len
        i = 0
        while i < n and p[i] == SP:
            i += 1
        q = <const unsigned char*>memchr(p + i, SP, n - i)
        verb_end = q - p if q != NULL else n
        verb = PyBytes_FromStringAndSize(NULL, verb_end - i)
        v = <unsigned char*>PyBytes_AS_STRING(verb)
        for k in range(verb_end - i):
            c = p[i + k]
            v[k] = c - 32 if b"a" <= c <= b"z" else c
        a = verb_end + 1 if q != NULL else n
        while a < n and p[a] == SP:
            a += 1
        b = n
        while b > a and p[b - 1] == SP:
            b -= 1
        return verb, PyBytes_FromStringAndSize(<const char*>p + a, b - a)
    finally:
        PyBuffer_Release(&view)


# scan_path's character classes (RFC 5321 4.1.2): atext (RFC 5322 3.2.3) makes the local part's
# atoms; Let-dig starts and ends a domain label, Ldh-str (letters, digits, hyphens) fills it.
cdef enum:
    C_ATEXT = 1
    C_LET_DIG = 2
    C_LDH = 4

# RFC 5321 4.5.3.1.1 and 4.5.3.1.3: the local part; the path with "<", "@" and ">". RFC 1035
# 2.3.4: a label.
cdef enum:
    MAX_LOCAL_PART = 64
    MAX_PATH = 256
    MAX_LABEL = 63

cdef unsigned char PATH_CLASS[256]


cdef void _fill_path_class() noexcept:
    cdef unsigned char c
    cdef int i
    for i in range(256):
        PATH_CLASS[i] = 0
    for c in b"!#$%&'*+/=?^_`{|}~":
        PATH_CLASS[c] = C_ATEXT
    PATH_CLASS[b"-"] = C_ATEXT | C_LDH
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
        PATH_CLASS[c] = C_ATEXT | C_LET_DIG | C_LDH


_fill_path_class()


cdef inline object _ascii_str(const unsigned char* p, Py_ssize_t n):
    """A new ``str`` of ``n`` bytes known to be ASCII: copied, not decoded."""
    cdef object text = PyUnicode_New(n, 127)
    memcpy(PyUnicode_1BYTE_DATA(text), p, n)
    return text


cdef inline unsigned char _lower(unsigned char c) noexcept:
    """ASCII letters in lower case; every other byte as it is (as ``bytes.lower()``)."""
    return c + 32 if b"A" <= c <= b"Z" else c


def scan_path(argument, keyword):
    """The simple ``keyword<local@domain>`` MAIL/RCPT argument as its parts, else None."""
    cdef Py_buffer view
    if type(keyword) is not bytes:
        raise TypeError(f"scan_path() keyword must be bytes, not {type(keyword).__name__}")
    if type(argument) is bytes:
        # split_command's result: read in place, without the buffer protocol (which was about
        # a third of the instructions of a call that declines).
        return _scan_path(
            <const unsigned char*>PyBytes_AS_STRING(argument), PyBytes_GET_SIZE(argument), keyword
        )
    _get_buffer(argument, &view)
    try:
        return _scan_path(<const unsigned char*>view.buf, view.len, keyword)
    finally:
        PyBuffer_Release(&view)


cdef object _scan_path(const unsigned char* p, Py_ssize_t n, bytes keyword):
    """scan_path over ``p[:n]``: one pass, the results made only for a simple path."""
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(keyword)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(keyword)
    cdef Py_ssize_t i, local, at, close, label
    if n < size:
        return None
    for i in range(size):
        if p[i] != k[i] and _lower(p[i]) != _lower(k[i]):  # (mostly the same case)
            return None
    i = size
    while i < n and p[i] == SP:
        i += 1
    if i == n or p[i] != b"<":
        return None
    i += 1
    local = i
    while True:  # Dot-string = Atom *("." Atom)
        if i == n or not PATH_CLASS[p[i]] & C_ATEXT:
            return None
        i += 1
        while i < n and PATH_CLASS[p[i]] & C_ATEXT:
            i += 1
        if i == n or p[i] != DOT:
            break
        i += 1
    if i == n or p[i] != b"@":
        return None
    at = i
    i += 1
    while True:  # Domain = sub-domain *("." sub-domain)
        label = i
        if i == n or not PATH_CLASS[p[i]] & C_LET_DIG:
            return None
        i += 1
        while i < n and PATH_CLASS[p[i]] & C_LDH:
            i += 1
        if p[i - 1] == b"-" or i - label > MAX_LABEL:
            return None
        if i == n or p[i] != DOT:
            break
        i += 1
    if i == n or p[i] != b">":
        return None
    close = i
    if at - local > MAX_LOCAL_PART or close - local + 2 > MAX_PATH:
        return None
    i += 1
    if i < n:  # RFC 5321 4.1.2: the parameters follow the path after SP
        if p[i] != SP:
            return None
        i += 1
        while i < n and p[i] == SP:
            i += 1
    return (
        _ascii_str(p + local, at - local),
        _ascii_str(p + at + 1, close - at - 1),
        PyBytes_FromStringAndSize(<const char*>p + i, n - i) if i < n else EMPTY,
    )
