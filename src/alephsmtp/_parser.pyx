# cython: language_level=3
"""Compiled parsing core of alephsmtp.

The CONTRACT is the docstring of :mod:`alephsmtp._parser_py`, the pure-Python twin, which is
also the type source; both give the same results to the byte (the tests compare them).

Input is read in place through the buffer protocol (no copy); output is written straight into
a new ``bytes`` object, shrunk to size at the end. There is one crossing into Python per
``feed`` call (creating the result), never one per line or byte, except for the error
instances, made once per broken rule.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.string cimport memchr, memcpy

import operator

from alephsmtp.errors import BareCarriageReturn, BareLineFeed, LineTooLong, MessageTooLarge

__all__ = ["BdatReader", "BufferPool", "DataReader", "LineReader", "split_command"]

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1

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


cdef Py_ssize_t _check_size(object value, str name) except -1:
    cdef object number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
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

    @max_line_length.setter
    def max_line_length(self, value):
        self._limit = _check_size(value, "max_line_length")

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
        cdef Py_ssize_t start, lf, line_end
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
            q = <const unsigned char*>memchr(p + pos, LF, n - pos)
            if q == NULL:
                break
            lf = q - p
            start = pos
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
        if self._error is not None:
            self._scan(p, n, NULL)
            return EMPTY
        # Output <= input + a held dot and CR (+ one CR per bare LF in normalize mode).
        cap = n + 2 + (n if self._normalize else 0)
        result = PyBytes_FromStringAndSize(NULL, cap)
        length = self._scan(p, n, <unsigned char*>PyBytes_AS_STRING(result))
        if self._error is not None or length == 0:
            return EMPTY
        if length < cap:
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
        cdef Py_ssize_t end, best, j
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
        while pos < n:
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
        """The message size: ``received`` plus the chunk bytes read so far."""
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
            self._size += take
            if self._error is None and self._max_size and self._size > self._max_size:
                self._error = MessageTooLarge()
            if self._error is not None or take == 0:
                return EMPTY
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
