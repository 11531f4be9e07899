# cython: language_level=3, embedsignature=True
"""Cython core of the hot path: XXH64 key hashing, key groups, batch frames, the
dispatcher's per-batch loop (grouping, state reads, invocation, write collection), and
the objects a function sees (Cell, Storage, Context, Message) as extension types.

The executable specification is ``statefun_mesh/_speedups_py.py``: this module
implements exactly its API, bit for bit (the golden vectors in ``tests/data/`` pin
both). Import it only through ``statefun_mesh._speedups``, which falls back to the
twin when this extension is not built.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.ref cimport Py_DECREF, PyObject
from cpython.tuple cimport PyTuple_GET_SIZE
from cpython.unicode cimport (
    PyUnicode_1BYTE_DATA,
    PyUnicode_AsUTF8AndSize,
    PyUnicode_Check,
    PyUnicode_New,
)
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from statefun_mesh.errors import FrameDecodeError

# C declarations live here, not in a _speedups_c.pxd: setup.py compiles this file as
# statefun_mesh._speedups_c, for which Cython would not read csrc/_speedups_c.pxd
# (while a bare `cython csrc/_speedups_c.pyx` would), so one build could differ from another.
cdef extern from *:
    """
    /* XXH64 primes, from the public specification:
       https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md (section XXH64) */
    #define SFM_XXH_P1 0x9E3779B185EBCA87ULL
    #define SFM_XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define SFM_XXH_P3 0x165667B19E3779F9ULL
    #define SFM_XXH_P4 0x85EBCA77C2B2AE63ULL
    #define SFM_XXH_P5 0x27D4EB2F165667C5ULL
    /* msgpack's str32/bin32/array32 length limit (msgpack-python's ITEM_LIMIT). */
    #define SFM_ITEM_LIMIT 0xFFFFFFFFULL
    """
    const uint64_t SFM_XXH_P1
    const uint64_t SFM_XXH_P2
    const uint64_t SFM_XXH_P3
    const uint64_t SFM_XXH_P4
    const uint64_t SFM_XXH_P5
    const uint64_t SFM_ITEM_LIMIT

cdef extern from "Python.h":
    # These two are declared without exception handling (cpython/*.pxd have it) so that
    # the hot loops check for errors themselves, without a try block per field:
    # the encoder turns the OverflowError of a negative or too-large int into the twin's
    # TypeError; the decoder gets NULL (+ UnicodeDecodeError) or a new reference.
    unsigned long long SFM_PyLong_AsULL "PyLong_AsUnsignedLongLong" (object o) noexcept
    PyObject* SFM_DecodeUTF8 "PyUnicode_DecodeUTF8" (const char* s, Py_ssize_t size, const char* errors) noexcept
    const Py_ssize_t PY_SSIZE_T_MAX

cdef extern from *:
    """
    /* Report the exception already set by a C-API call to Cython's error handling. */
    static CYTHON_INLINE int sfm_propagate_error(void) { return -1; }
    """
    int _propagate_error "sfm_propagate_error" () except -1

__all__ = [
    "FRAME_VERSION",
    "KIND_BATCH",
    "BatchEncoder",
    "Record",
    "collect_puts",
    "decode_batch",
    "dispatch_groups",
    "encode_batch",
    "group_records",
    "invoke_sync",
    "key_group",
    "key_groups",
    "load_cells",
    "partition",
    "record_size",
    "records_bytes",
    "stable_hash",
]

FRAME_VERSION = 1
KIND_BATCH = 0x01

#: One message on the wire: (target_typename, target_id, caller_typename, caller_id,
#: value_typename, value, reply_peer, request_id).
Record = tuple[str, str, str, str, str, bytes, int, int]

include "hashing.pxi"
include "batching.pxi"
# Cell, Storage, Context, Message and the per-address steps that use them, native.
include "objects.pxi"
# The dispatcher's per-batch loop: the twin's own source, compiled (see its docstring).
include "../statefun_mesh/_dispatch_loop.py"
# ... and its typed C version, which this core runs (the twin's above is its specification)
include "dispatch.pxi"

_K_DECODE_STATE = KIT_FIELDS.index("decode_state_value")
_K_STATE_KEY = KIT_FIELDS.index("state_key")
_K_PREFIXES = KIT_FIELDS.index("KG_PREFIXES")
_K_MAX_KEY = KIT_FIELDS.index("MAX_KEY")
_K_CACHEABLE = KIT_FIELDS.index("_CACHEABLE")
# the per-address steps under the twin's names are this core's native ones (objects.pxi);
# the twin's, compiled above, are left unused
invoke_sync = invoke_sync_native
load_cells = load_cells_native
collect_puts = collect_puts_native
dispatch_groups = dispatch_groups_native
