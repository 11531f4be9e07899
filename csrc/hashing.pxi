# Stable 64-bit key hash (XXH64, seed 0), key groups, and partitioning by peer.
# Included by _speedups_c.pyx; the spec is statefun_mesh/_speedups_py.py.
#
# XXH64 is implemented here from the public specification
# (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md). Every step is
# plain uint64_t arithmetic, which wraps modulo 2**64 exactly like the twin's `& _M64`.

cdef enum:
    _MAX_PARALLELISM = 32768


cdef inline uint64_t _rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64le(const unsigned char* p) noexcept nogil:
    # Byte-wise little-endian load: independent of host endianness and alignment;
    # GCC and Clang compile it to a single 8-byte load on little-endian targets.
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


cdef inline uint64_t _read32le(const unsigned char* p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24))


cdef inline uint64_t _xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * SFM_XXH_P2
    return _rotl64(acc, 31) * SFM_XXH_P1


cdef inline uint64_t _xxh_merge(uint64_t acc, uint64_t val) noexcept nogil:
    acc ^= _xxh_round(0, val)
    return acc * SFM_XXH_P1 + SFM_XXH_P4


cdef uint64_t _xxh64(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """XXH64 of the n bytes at p, seed 0."""
    cdef const unsigned char* end = p + n
    cdef const unsigned char* limit
    cdef uint64_t v1, v2, v3, v4, h
    if n >= 32:
        v1 = SFM_XXH_P1 + SFM_XXH_P2
        v2 = SFM_XXH_P2
        v3 = 0
        v4 = 0 - SFM_XXH_P1
        limit = end - 32
        while p <= limit:
            v1 = _xxh_round(v1, _read64le(p))
            v2 = _xxh_round(v2, _read64le(p + 8))
            v3 = _xxh_round(v3, _read64le(p + 16))
            v4 = _xxh_round(v4, _read64le(p + 24))
            p += 32
        h = _rotl64(v1, 1) + _rotl64(v2, 7) + _rotl64(v3, 12) + _rotl64(v4, 18)
        h = _xxh_merge(h, v1)
        h = _xxh_merge(h, v2)
        h = _xxh_merge(h, v3)
        h = _xxh_merge(h, v4)
    else:
        h = SFM_XXH_P5
    h += <uint64_t>n
    while end - p >= 8:
        h ^= _xxh_round(0, _read64le(p))
        h = _rotl64(h, 27) * SFM_XXH_P1 + SFM_XXH_P4
        p += 8
    if end - p >= 4:
        h ^= _read32le(p) * SFM_XXH_P1
        h = _rotl64(h, 23) * SFM_XXH_P2 + SFM_XXH_P3
        p += 4
    while p < end:
        h ^= p[0] * SFM_XXH_P5
        h = _rotl64(h, 11) * SFM_XXH_P1
        p += 1
    h ^= h >> 33
    h *= SFM_XXH_P2
    h ^= h >> 29
    h *= SFM_XXH_P3
    h ^= h >> 32
    return h


cdef int _get_bytes(object obj, Py_buffer* view) except -1:
    """Export the raw bytes of a bytes-like object as one contiguous block.

    The caller must PyBuffer_Release(view). A non-contiguous buffer (a strided
    memoryview, as the twin accepts) is copied first; the view then owns the copy.
    """
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)  # TypeError if not bytes-like
        return 0
    except (BufferError, ValueError):  # a buffer, but not one contiguous block
        pass
    PyObject_GetBuffer(memoryview(obj).tobytes(), view, PyBUF_SIMPLE)
    return 0


cdef inline const char* _id_utf8(object id, Py_ssize_t* n) except NULL:
    # The twin hashes id.encode("utf-8"): the cached UTF-8 of a str, no bytes object.
    if not PyUnicode_Check(id):
        raise TypeError(f"an address id must be str, got {type(id).__name__}")
    return PyUnicode_AsUTF8AndSize(id, n)


cdef long _check_parallelism(object max_parallelism) except -1:
    # Compare the Python object first, exactly as the twin does, so an out-of-range
    # value of any size or type gets the twin's ValueError (not an OverflowError).
    if not 1 <= max_parallelism <= _MAX_PARALLELISM:
        raise ValueError(f"max_parallelism must be between 1 and 32768, got {max_parallelism}")
    # __index__, not int(): Cython's own C-long conversion would truncate a float.
    return PyNumber_Index(max_parallelism)


def stable_hash(data):
    """Return XXH64(data, seed=0) as an unsigned 64-bit int.

    Args:
        data: the bytes to hash (for routing, the UTF-8 encoding of an address id).
    """
    cdef Py_buffer view
    cdef uint64_t h
    if PyBytes_CheckExact(data):
        return _xxh64(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    _get_bytes(data, &view)
    h = _xxh64(<const unsigned char*>view.buf, view.len)
    PyBuffer_Release(&view)
    return h


@cython.cdivision(True)  # audited: mp >= 1, operands unsigned
def key_group(id, max_parallelism):
    """Return the key group of an address id: ``stable_hash(utf8(id)) % max_parallelism``."""
    cdef uint64_t mp = <uint64_t>_check_parallelism(max_parallelism)
    cdef Py_ssize_t n
    cdef const char* s = _id_utf8(id, &n)
    return <long>(_xxh64(<const unsigned char*>s, n) % mp)


@cython.cdivision(True)  # audited: mp >= 1, operands unsigned
def key_groups(ids, max_parallelism):
    """Return ``[key_group(id, max_parallelism) for id in ids]``."""
    cdef uint64_t mp = <uint64_t>_check_parallelism(max_parallelism)
    cdef list out = []
    cdef Py_ssize_t n
    cdef const char* s
    for id in ids:
        s = _id_utf8(id, &n)
        out.append(<long>(_xxh64(<const unsigned char*>s, n) % mp))
    return out


@cython.cdivision(True)  # audited: mp >= 1, all operands non-negative
def partition(records, max_parallelism, n_peers):
    """Split records by the peer that owns each target id, keeping their order.

    Returns a list of ``n_peers`` lists; list ``p`` holds, in input order, the records
    whose ``target_id`` (field 1) falls in a key group owned by peer ``p``.
    """
    cdef long mp = _check_parallelism(max_parallelism)
    if not 1 <= n_peers <= max_parallelism:
        raise ValueError(
            f"n_peers must be between 1 and max_parallelism ({max_parallelism}), got {n_peers}"
        )
    cdef long np = PyNumber_Index(n_peers)
    cdef long kg
    cdef Py_ssize_t n
    cdef const char* s
    cdef list out = [[] for _ in range(np)]
    for rec in records:
        tid = rec[1]  # a named reference keeps the str (and its UTF-8) alive
        s = _id_utf8(tid, &n)
        kg = <long>(_xxh64(<const unsigned char*>s, n) % <uint64_t>mp)
        # 0 <= kg < mp, so 0 <= kg * np // mp < np == len(out): no bounds check needed.
        (<list>PyList_GET_ITEM(out, kg * np // mp)).append(rec)
    return out
