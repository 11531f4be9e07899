# Batch frames: BatchEncoder/encode_batch write canonical msgpack straight into a
# growable C buffer; decode_batch is a strict msgpack reader for exactly the record
# shape. Included by _speedups_c.pyx; the spec is statefun_mesh/_speedups_py.py.
#
#   frame  = 0x01 (version) | 0x01 (KIND_BATCH) | array header | records
#   record = [str, str, str, str, str, bin, uint, uint]

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.string cimport memset

from statefun_mesh.memory import RECORD_OVERHEAD as _RECORD_OVERHEAD_PY

# memory.RECORD_OVERHEAD, read once (the twin, memory.records_bytes, uses it directly)
cdef Py_ssize_t _RECORD_OVERHEAD = _RECORD_OVERHEAD_PY

cdef enum:
    _FRAME_VERSION = 1
    _KIND_BATCH = 0x01
    _RECORD_FIELDS = 8
    # Smallest valid record: 0x98, five empty fixstr, bin8 of 0 bytes (2), two fixints.
    # A declared record count above remaining_bytes // 10 is a truncated frame.
    _MIN_RECORD_SIZE = 10
    # Largest headers a record can need: fixarray + 5 x str32 + bin32 + 2 x uint64.
    _MAX_RECORD_OVERHEAD = 1 + 5 * 5 + 5 + 2 * 9
    # flush() keeps the buffer for the next batch unless it grew beyond this.
    _KEEP_CAPACITY = 1 << 20
    _MIN_CAPACITY = 256


# ---------------------------------------------------------------- encoding

cdef inline unsigned char* _put_be(unsigned char* p, uint64_t v, int size) noexcept nogil:
    """Write the low `size` bytes of v, big-endian (msgpack's byte order)."""
    cdef int i
    for i in range(size):
        p[i] = <unsigned char>(v >> (8 * (size - 1 - i)))
    return p + size


cdef inline unsigned char* _put_sized(unsigned char* p, unsigned char code8,
                                      const char* s, Py_ssize_t n) noexcept nogil:
    # The smallest of the 8/16/32-bit length headers (type bytes code8, code8 + 1,
    # code8 + 2: str8/16/32 = 0xd9.., bin8/16/32 = 0xc4..), then the payload.
    if n < 0x100:
        p[0] = code8
        p = _put_be(p + 1, <uint64_t>n, 1)
    elif n < 0x10000:
        p[0] = code8 + 1
        p = _put_be(p + 1, <uint64_t>n, 2)
    else:
        p[0] = code8 + 2
        p = _put_be(p + 1, <uint64_t>n, 4)
    if n:
        memcpy(p, s, <size_t>n)
    return p + n


cdef inline unsigned char* _put_str(unsigned char* p, const char* s, Py_ssize_t n) noexcept nogil:
    # fixstr, else str8/16/32: what msgpack.packb(use_bin_type=True) writes.
    if n < 32:
        p[0] = <unsigned char>(0xa0 | n)
        if n:
            memcpy(p + 1, s, <size_t>n)
        return p + 1 + n
    return _put_sized(p, 0xd9, s, n)


cdef inline unsigned char* _put_uint(unsigned char* p, uint64_t v) noexcept nogil:
    # positive fixint, else uint8/16/32/64 (0xcc..0xcf).
    if v < 0x80:
        p[0] = <unsigned char>v
        return p + 1
    if v < 0x100:
        p[0] = 0xcc
        return _put_be(p + 1, v, 1)
    if v < 0x10000:
        p[0] = 0xcd
        return _put_be(p + 1, v, 2)
    if v <= 0xFFFFFFFFu:
        p[0] = 0xce
        return _put_be(p + 1, v, 4)
    p[0] = 0xcf
    return _put_be(p + 1, v, 8)


cdef inline uint64_t _str_size(Py_ssize_t n) noexcept nogil:
    # header + payload of what _put_str writes
    if n < 32:
        return 1 + <uint64_t>n
    return _bin_size(n)


cdef inline uint64_t _bin_size(Py_ssize_t n) noexcept nogil:
    # header + payload of what _put_sized writes (bin8/16/32, and str8/16/32)
    if n < 0x100:
        return 2 + <uint64_t>n
    if n < 0x10000:
        return 3 + <uint64_t>n
    return 5 + <uint64_t>n


cdef inline uint64_t _uint_size(uint64_t v) noexcept nogil:
    if v < 0x80:
        return 1
    if v < 0x100:
        return 2
    if v < 0x10000:
        return 3
    if v <= 0xFFFFFFFFu:
        return 5
    return 9


cdef inline Py_ssize_t _array_head_size(Py_ssize_t n) noexcept nogil:
    # fixarray / array16 / array32 header of a batch of n records
    if n < 16:
        return 1
    if n < 0x10000:
        return 3
    return 5


cdef inline uint64_t _record_uint(object v, Py_ssize_t i) except? 0xFFFFFFFFFFFFFFFFu:
    # The twin: `type(v) is not int or v < 0 or v > 2**64 - 1` is a TypeError.
    cdef uint64_t x
    if type(v) is int:
        x = SFM_PyLong_AsULL(v)
        if x != <uint64_t>-1 or not PyErr_Occurred():
            return x
        PyErr_Clear()  # OverflowError: negative or >= 2**64
    raise TypeError(f"record field {i} must be an int in [0, 2**64), got {v!r}")


cdef class BatchEncoder:
    """Accumulates records and produces one batch frame.

    ``append`` validates and encodes a record at once, so a bad record fails at the
    call that added it and never poisons a frame.
    """

    cdef unsigned char* _buf    # encoded records (no frame header), PyMem-allocated
    cdef Py_ssize_t _len        # bytes used in _buf
    cdef Py_ssize_t _cap        # bytes allocated for _buf
    cdef Py_ssize_t _count      # records in _buf

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self._count = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    cdef int _reserve(self, uint64_t extra) except -1:
        """Make room for `extra` more bytes (amortised doubling)."""
        cdef Py_ssize_t need, cap
        cdef void* buf
        if extra <= <uint64_t>(self._cap - self._len):
            return 0
        if extra > <uint64_t>(PY_SSIZE_T_MAX - self._len):
            raise MemoryError("batch too large")
        need = self._len + <Py_ssize_t>extra
        cap = self._cap * 2 if self._cap <= PY_SSIZE_T_MAX // 2 else PY_SSIZE_T_MAX
        if cap < need:
            cap = need
        if cap < _MIN_CAPACITY:
            cap = _MIN_CAPACITY
        buf = PyMem_Realloc(self._buf, <size_t>cap)
        if buf == NULL:
            raise MemoryError("cannot grow the batch buffer")
        self._buf = <unsigned char*>buf
        self._cap = cap
        return 0

    @cython.boundscheck(False)  # audited: `rec` is an exact tuple of exactly 8 items
    @cython.wraparound(False)
    cdef int _append(self, object record, Py_ssize_t max_bytes=0) except -1:
        """Encode one record; with ``max_bytes`` > 0, only if the frame stays within it.

        Returns 1 if the record was appended, 0 if it would not fit (nothing written).
        """
        cdef tuple rec
        cdef const char* text[5]
        cdef Py_ssize_t text_len[5]
        cdef uint64_t reply_peer, request_id, need
        cdef Py_ssize_t i, value_len
        cdef unsigned char* p
        # Validation first, in the twin's order and with its messages; nothing is
        # written until the whole record is known to encode.
        if type(record) is not tuple or PyTuple_GET_SIZE(record) != _RECORD_FIELDS:
            raise TypeError(f"a record must be a tuple of {_RECORD_FIELDS} fields, got {record!r:.80}")
        rec = <tuple>record
        for i in range(5):
            if type(rec[i]) is not str:
                raise TypeError(f"record field {i} must be str, got {type(rec[i]).__name__}")
        value = rec[5]
        if type(value) is not bytes:
            raise TypeError(f"record field 5 (value) must be bytes, got {type(value).__name__}")
        reply_peer = _record_uint(rec[6], 6)
        request_id = _record_uint(rec[7], 7)
        # What msgpack.packb raises next: UnicodeEncodeError (lone surrogates), or
        # ValueError for a str/bin beyond the 32-bit length of str32/bin32.
        value_len = PyBytes_GET_SIZE(value)
        for i in range(5):
            text[i] = PyUnicode_AsUTF8AndSize(rec[i], &text_len[i])
            if <uint64_t>text_len[i] > SFM_ITEM_LIMIT:
                raise ValueError("unicode string is too large")
        if <uint64_t>value_len > SFM_ITEM_LIMIT:
            raise ValueError("bytes object is too large")
        # The exact encoded size: what the writers below produce.
        need = 1 + _bin_size(value_len) + _uint_size(reply_peer) + _uint_size(request_id)
        for i in range(5):
            need += _str_size(text_len[i])
        if max_bytes > 0 and (
            <uint64_t>(2 + _array_head_size(self._count + 1) + self._len) + need > <uint64_t>max_bytes
        ):
            return 0
        # The UTF-8 pointers stay valid: they are cached in the str objects, which
        # `rec` keeps alive; _reserve() moves only our own buffer.
        self._reserve(need)
        p = self._buf + self._len
        p[0] = 0x90 | _RECORD_FIELDS
        p += 1
        for i in range(5):
            p = _put_str(p, text[i], text_len[i])
        p = _put_sized(p, 0xc4, PyBytes_AS_STRING(value), value_len)  # bin8/16/32
        p = _put_uint(p, reply_peer)
        p = _put_uint(p, request_id)
        self._len = p - self._buf
        self._count += 1
        return 1

    def append(self, record):
        """Encode one record into the pending batch."""
        self._append(record)

    def extend(self, records):
        """Append every record, in order."""
        for rec in records:
            self._append(rec)

    def fill(self, records, Py_ssize_t start=0, Py_ssize_t max_bytes=0, Py_ssize_t max_records=0):
        """Append ``records[start:]``, in order, while the frame stays within limits.

        Stops before the first record that would make the frame (header included)
        larger than ``max_bytes`` or hold more than ``max_records`` records (0: no
        limit). Returns the index of the first record not appended (``len(records)``
        when all were). A record that does not fit even an empty frame is not
        appended either: the caller sees the index unchanged on an empty encoder.
        """
        cdef Py_ssize_t i, n
        if start < 0 or max_bytes < 0 or max_records < 0:
            raise ValueError("start, max_bytes and max_records must be >= 0")
        n = len(records)
        if start > n:
            raise ValueError(f"start ({start}) is past the end of the records ({n})")
        i = start
        while i < n:
            if max_records > 0 and self._count >= max_records:
                break
            if not self._append(records[i], max_bytes):
                break
            i += 1
        return i

    def __len__(self):
        return self._count

    @property
    def nbytes(self):
        """Encoded size of the pending records, without the frame header."""
        return self._len

    @property
    def frame_size(self):
        """Size of the frame :meth:`flush` would return now (header included)."""
        return 2 + _array_head_size(self._count) + self._len

    cdef Py_ssize_t _head(self, unsigned char* head) except -1:
        """Write the frame's header (version, kind, array header) into head[0:7]; its length."""
        cdef Py_ssize_t n = self._count
        cdef unsigned char* p = head
        p[0] = _FRAME_VERSION
        p[1] = _KIND_BATCH
        p += 2
        if n < 16:
            p[0] = <unsigned char>(0x90 | n)
            p += 1
        elif n < 0x10000:
            p[0] = 0xdc
            p = _put_be(p + 1, <uint64_t>n, 2)
        elif <uint64_t>n <= SFM_ITEM_LIMIT:
            p[0] = 0xdd
            p = _put_be(p + 1, <uint64_t>n, 4)
        else:
            raise OverflowError(f"a batch frame holds at most 2**32 - 1 records, got {n}")
        return p - head

    cdef void _emptied(self) noexcept:
        self._len = 0
        self._count = 0
        if self._cap > _KEEP_CAPACITY:
            PyMem_Free(self._buf)
            self._buf = NULL
            self._cap = 0

    def flush(self):
        """Return the frame for the pending records and start a new, empty batch."""
        cdef unsigned char head[7]
        cdef Py_ssize_t head_len = self._head(head)
        frame = PyBytes_FromStringAndSize(NULL, head_len + self._len)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(frame)
        memcpy(p, head, <size_t>head_len)
        if self._len:
            memcpy(p + head_len, self._buf, <size_t>self._len)
        self._emptied()
        return frame

    def flush_room(self, Py_ssize_t room):
        """:meth:`flush`'s frame as a ``bytearray`` after ``room`` zero bytes, where the
        sender writes the frame's envelope in place (``codec.seal_envelope``)."""
        if room < 0:
            raise ValueError("room must be >= 0")
        cdef unsigned char head[7]
        cdef Py_ssize_t head_len = self._head(head)
        frame = PyByteArray_FromStringAndSize(NULL, room + head_len + self._len)
        cdef unsigned char* p = <unsigned char*>PyByteArray_AS_STRING(frame)
        memset(p, 0, <size_t>room)
        memcpy(p + room, head, <size_t>head_len)
        if self._len:
            memcpy(p + room + head_len, self._buf, <size_t>self._len)
        self._emptied()
        return frame


def record_size(record):
    """Return the encoded size of one record in a batch frame (the record is checked
    as :meth:`BatchEncoder.append` checks it)."""
    cdef BatchEncoder enc = BatchEncoder()
    enc._append(record)
    return enc._len


def records_bytes(records):
    """Estimated memory of message records held as Python tuples: what
    ``statefun_mesh.memory.records_bytes`` (the spec) returns, without a Python-level loop
    (the inbox accounting runs it on every record taken in or out)."""
    cdef Py_ssize_t size = 0, n = 0
    for rec in records:
        n += 1
        if type(rec) is tuple and PyTuple_GET_SIZE(rec) > 5:  # items 1 and 5 exist: unchecked reads
            size += len(<object>PyTuple_GET_ITEM(rec, 1)) + len(<object>PyTuple_GET_ITEM(rec, 5))
        else:  # not a record tuple: the same items, or the spec's error
            size += len(rec[1]) + len(rec[5])
    return size + n * _RECORD_OVERHEAD


def encode_batch(records):
    """Return the batch frame for ``records``."""
    cdef BatchEncoder enc = BatchEncoder()
    for rec in records:
        enc._append(rec)
    return enc.flush()


# ---------------------------------------------------------------- decoding

cdef enum _ReadStatus:
    _RD_OK = 0
    _RD_TRUNCATED = 1
    _RD_WRONG_TYPE = 2   # also: a negative integer where an unsigned one belongs


cdef struct _Reader:
    const unsigned char* p
    const unsigned char* end


cdef struct _TextCache:
    # The last text (or value) decoded for one field, reused while the next records repeat it.
    # `obj` is a borrowed reference, kept alive by the record that holds it: a local of
    # _decode until the record is stored in the output list; any error in between
    # ends the decode (and the cache with it).
    const unsigned char* data
    Py_ssize_t size
    PyObject* obj


cdef inline uint64_t _get_be(const unsigned char* p, int size) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(size):
        v = (v << 8) | p[i]
    return v


cdef inline _ReadStatus _rd_array(_Reader* r, uint64_t* count) noexcept nogil:
    """fixarray / array16 / array32 header."""
    cdef Py_ssize_t avail = r.end - r.p
    if avail < 1:
        return _RD_TRUNCATED
    cdef unsigned char b = r.p[0]
    cdef int width
    if 0x90 <= b <= 0x9f:
        count[0] = b & 0x0f
        r.p += 1
        return _RD_OK
    if b != 0xdc and b != 0xdd:
        return _RD_WRONG_TYPE
    width = 2 if b == 0xdc else 4
    if avail < 1 + width:
        return _RD_TRUNCATED
    count[0] = _get_be(r.p + 1, width)
    r.p += 1 + width
    return _RD_OK


cdef inline _ReadStatus _rd_payload(_Reader* r, Py_ssize_t head, uint64_t size,
                                    const unsigned char** data, Py_ssize_t* n) noexcept nogil:
    # `head` header bytes are known to be present; check the payload before using it,
    # so a huge declared length on a short frame is a truncation, never an allocation.
    if size > <uint64_t>(r.end - r.p - head):
        return _RD_TRUNCATED
    data[0] = r.p + head
    n[0] = <Py_ssize_t>size
    r.p += head + <Py_ssize_t>size
    return _RD_OK


cdef inline _ReadStatus _rd_sized(_Reader* r, unsigned char code8,
                                  const unsigned char** data, Py_ssize_t* n) noexcept nogil:
    """An 8/16/32-bit length header with type bytes code8, code8 + 1, code8 + 2, then data."""
    cdef Py_ssize_t avail = r.end - r.p
    if avail < 1:
        return _RD_TRUNCATED
    cdef unsigned char b = r.p[0]
    cdef int width
    if b == code8:
        width = 1
    elif b == code8 + 1:
        width = 2
    elif b == code8 + 2:
        width = 4
    else:
        return _RD_WRONG_TYPE
    if avail < 1 + width:
        return _RD_TRUNCATED
    return _rd_payload(r, 1 + width, _get_be(r.p + 1, width), data, n)


cdef inline _ReadStatus _rd_str(_Reader* r, const unsigned char** data, Py_ssize_t* n) noexcept nogil:
    """fixstr / str8 / str16 / str32 (never bin: the twin unpacks with raw=False)."""
    if r.p < r.end and 0xa0 <= r.p[0] <= 0xbf:
        return _rd_payload(r, 1, r.p[0] & 0x1f, data, n)
    return _rd_sized(r, 0xd9, data, n)


cdef inline _ReadStatus _rd_bin(_Reader* r, const unsigned char** data, Py_ssize_t* n) noexcept nogil:
    """bin8 / bin16 / bin32 (never str)."""
    return _rd_sized(r, 0xc4, data, n)


cdef inline _ReadStatus _rd_uint(_Reader* r, uint64_t* v) noexcept nogil:
    """Any msgpack integer whose value is >= 0: positive fixint, uint8..64, int8..64."""
    cdef Py_ssize_t avail = r.end - r.p
    if avail < 1:
        return _RD_TRUNCATED
    cdef unsigned char b = r.p[0]
    cdef int size
    cdef int64_t s
    if b <= 0x7f:
        v[0] = b
        r.p += 1
        return _RD_OK
    if 0xcc <= b <= 0xcf:      # uint8, uint16, uint32, uint64
        size = 1 << (b - 0xcc)
    elif 0xd0 <= b <= 0xd3:    # int8, int16, int32, int64
        size = 1 << (b - 0xd0)
    else:
        return _RD_WRONG_TYPE  # negative fixint, float, nil, bool, str, bin, ...
    if avail < 1 + size:
        return _RD_TRUNCATED
    v[0] = _get_be(r.p + 1, size)
    if b >= 0xd0:              # signed: reinterpret at its width, reject negatives
        if size == 1:
            s = <int8_t>v[0]
        elif size == 2:
            s = <int16_t>v[0]
        elif size == 4:
            s = <int32_t>v[0]
        else:
            s = <int64_t>v[0]
        if s < 0:
            return _RD_WRONG_TYPE
    r.p += 1 + size
    return _RD_OK


cdef int _field_error(_ReadStatus st, Py_ssize_t idx, int field) except -1:
    if st == _RD_TRUNCATED:
        raise FrameDecodeError(f"batch frame truncated in record {idx} field {field}")
    if field < 5:
        raise FrameDecodeError(f"record {idx} field {field} is not a string")
    if field == 5:
        raise FrameDecodeError(f"record {idx} field 5 (value) is not binary")
    raise FrameDecodeError(f"record {idx} field {field} is not an unsigned integer")


cdef inline bint _is_ascii(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned char seen = 0
    cdef Py_ssize_t i
    for i in range(n):
        seen |= p[i]
    return seen < 0x80


cdef int _utf8_error(Py_ssize_t idx, int field) except -1:
    # Called with the UnicodeDecodeError of SFM_DecodeUTF8 pending (or a MemoryError,
    # which propagates unchanged).
    try:
        _propagate_error()
    except UnicodeDecodeError as exc:
        raise FrameDecodeError(f"record {idx} field {field} is not valid UTF-8: {exc.reason}") from exc


cdef str _rd_text(_Reader* r, Py_ssize_t idx, int field, _TextCache* cache):
    cdef const unsigned char* data = NULL
    cdef Py_ssize_t n = 0
    cdef _ReadStatus st = _rd_str(r, &data, &n)
    if st != _RD_OK:
        _field_error(st, idx, field)
    # Type names repeat across a batch: reuse the previous record's str when equal.
    if cache != NULL and cache.obj != NULL and n == cache.size and memcmp(data, cache.data, <size_t>n) == 0:
        return <str>cache.obj
    cdef PyObject* obj
    if _is_ascii(data, n):
        # ASCII is valid UTF-8 that decodes to itself: build the compact str directly,
        # skipping the codec machinery (the common case: type names and ids).
        text = PyUnicode_New(n, 127)
        if n:
            memcpy(PyUnicode_1BYTE_DATA(text), data, <size_t>n)
    else:
        # Strict UTF-8 (surrogates and overlongs rejected), exactly as msgpack's raw=False.
        obj = SFM_DecodeUTF8(<const char*>data, n, NULL)
        if obj == NULL:
            _utf8_error(idx, field)
        text = <str>obj
        Py_DECREF(text)  # `text` now holds the only reference
    if cache != NULL:
        cache.data = data
        cache.size = n
        cache.obj = <PyObject*>text
    return text


@cython.cdivision(True)  # audited: one division, non-negative dividend by a constant
cdef list _decode(const unsigned char* data, Py_ssize_t size):
    cdef _Reader r
    # Initialised because GCC cannot see that _field_error() always raises.
    cdef uint64_t count = 0, nfields = 0, reply_peer = 0, request_id = 0
    cdef Py_ssize_t idx, n = 0
    cdef const unsigned char* value_data = NULL
    cdef _ReadStatus st
    # a frame's records often repeat the caller (one function's sends) and the value (the
    # same message to many ids): the previous record's objects are reused when equal
    cdef _TextCache target_type, caller_type, caller_id_cache, value_type, value_cache
    cdef list out
    if size < 3:
        raise FrameDecodeError(f"batch frame truncated: {size} bytes")
    if data[0] != _FRAME_VERSION:
        raise FrameDecodeError(
            f"unsupported frame version {data[0]} (this peer speaks version {_FRAME_VERSION})"
        )
    if data[1] != _KIND_BATCH:
        raise FrameDecodeError(f"not a batch frame: kind 0x{data[1]:02x}")
    r.p = data + 2
    r.end = data + size
    st = _rd_array(&r, &count)
    if st == _RD_TRUNCATED:
        raise FrameDecodeError("batch frame body is not valid msgpack: truncated array header")
    if st != _RD_OK:
        raise FrameDecodeError(f"batch frame body is not an array (msgpack type byte 0x{data[2]:02x})")
    if count > <uint64_t>((r.end - r.p) // _MIN_RECORD_SIZE):
        raise FrameDecodeError(
            f"batch frame truncated: {count} records declared in {r.end - r.p} bytes"
        )
    out = []
    target_type.obj = caller_type.obj = caller_id_cache.obj = value_type.obj = value_cache.obj = NULL
    value_cache.data = NULL
    value_cache.size = 0
    for idx in range(<Py_ssize_t>count):
        st = _rd_array(&r, &nfields)
        if st == _RD_TRUNCATED:
            _field_error(st, idx, 0)
        if st != _RD_OK or nfields != _RECORD_FIELDS:
            raise FrameDecodeError(f"record {idx} is not an array of {_RECORD_FIELDS} items")
        target_typename = _rd_text(&r, idx, 0, &target_type)
        target_id = _rd_text(&r, idx, 1, NULL)
        caller_typename = _rd_text(&r, idx, 2, &caller_type)
        caller_id = _rd_text(&r, idx, 3, &caller_id_cache)
        value_typename = _rd_text(&r, idx, 4, &value_type)
        st = _rd_bin(&r, &value_data, &n)
        if st != _RD_OK:
            _field_error(st, idx, 5)
        if value_cache.obj != NULL and n == value_cache.size and memcmp(value_data, value_cache.data, <size_t>n) == 0:
            value = <bytes>value_cache.obj
        else:
            value = PyBytes_FromStringAndSize(<char*>value_data, n)
            value_cache.data = value_data
            value_cache.size = n
            value_cache.obj = <PyObject*>value
        st = _rd_uint(&r, &reply_peer)
        if st != _RD_OK:
            _field_error(st, idx, 6)
        st = _rd_uint(&r, &request_id)
        if st != _RD_OK:
            _field_error(st, idx, 7)
        out.append((target_typename, target_id, caller_typename, caller_id,
                    value_typename, value, reply_peer, request_id))
    if r.p != r.end:
        raise FrameDecodeError(
            f"batch frame body is not valid msgpack: {r.end - r.p} trailing bytes after {count} records"
        )
    return out


def decode_batch(frame):
    """Decode a batch frame into records.

    Raises:
        FrameDecodeError: the frame is not exactly a version-1 batch frame of
            well-formed records, with what was wrong in the message.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(frame):
        return _decode(<const unsigned char*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
    _get_bytes(frame, &view)
    try:
        return _decode(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
