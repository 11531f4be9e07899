# The objects a function sees, native (issue 9): Cell, Storage (with a C descriptor per
# declared state), Context and Message as extension types, the int/long value codec in C,
# and the per-address steps of the batch loop that build and use them (load_cells_native,
# invoke_sync_native).
#
# The specification is the pure-Python twin: statefun_mesh/context.py (Cell, Storage,
# Context), messages.py (Message) and _dispatch_loop.py (load_cells, invoke_sync). Those
# modules replace their classes by these when the Cython core is in use, so a user sees
# one Context/Message class either way; the same tests (tests/unit/test_dispatch_core.py
# and the suite) and the byte vectors in tests/data/ run on both cores. Cold methods
# (send_after, reply, as_kafka, ...) run the twin's own code on these objects' fields.

from cpython.dict cimport PyDict_GetItem, PyDict_Next
from cpython.object cimport PyObject_GenericGetAttr, PyTypeObject
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM

cdef extern from *:
    """
    /* tp_new of a type without arguments: a Storage subclass's instance, fields None */
    static PyObject* sfm_empty_args = NULL;
    static PyObject* sfm_type_new(PyObject* t) {
        if (sfm_empty_args == NULL) {
            sfm_empty_args = PyTuple_New(0);
            if (sfm_empty_args == NULL) return NULL;
        }
        return ((PyTypeObject*)t)->tp_new((PyTypeObject*)t, sfm_empty_args, NULL);
    }
    """
    object sfm_type_new(object t)

cdef extern from *:
    """
    /* Address(a, b) without Address.__new__ or tuple.__new__'s temporary tuple: what
       tuple_subtype_new does (tp_alloc, then the items), for a tuple subtype. */
    static PyObject* sfm_new_pair(PyObject* type, PyObject* a, PyObject* b) {
        PyTypeObject* tp = (PyTypeObject*)type;
        PyObject* o = tp->tp_alloc(tp, 2);
        if (o == NULL) return NULL;
        Py_INCREF(a);
        PyTuple_SET_ITEM(o, 0, a);
        Py_INCREF(b);
        PyTuple_SET_ITEM(o, 1, b);
        return o;
    }
    """
    object sfm_new_pair(object type, object a, object b)

cdef extern from "Python.h":
    # without exception handling: the caller clears an overflow and lets the serializer raise
    long long SFM_PyLong_AsLL "PyLong_AsLongLong" (object o) noexcept
    bint SFM_IS_ASCII "PyUnicode_IS_ASCII" (object o) noexcept
    Py_ssize_t SFM_UNICODE_LEN "PyUnicode_GET_LENGTH" (object o) noexcept

# Bound once by the twin modules (bind_messages, bind_context): they import this module,
# so it cannot import them.
cdef object _DELETED = None
cdef object _ADDRESS = None
cdef object _PY_CONTEXT = None
cdef object _PY_STORAGE = None
cdef object _ACCESSORS = None
cdef object _FROM_TYPED_VALUE = None
cdef object _INT_TYPE = None
cdef object _LONG_TYPE = None
cdef object _INT_TN = None
cdef object _LONG_TN = None
cdef object _IMMUTABLE = frozenset({int, float, str, bool, bytes, type(None)})
#: positions in the dispatcher's kit (_dispatch_loop.KIT_FIELDS; set after its include)
cdef Py_ssize_t _K_DECODE_STATE, _K_STATE_KEY, _K_PREFIXES, _K_MAX_KEY, _K_CACHEABLE
cdef bytes _EMPTY_BYTES = b""


def bind_messages(accessors, from_typed_value, int_type, long_type):
    """Called once by ``messages.py``: the twin's accessors (cold methods of ``Message``
    run them) and the int/long types whose values this module codes itself."""
    global _ACCESSORS, _FROM_TYPED_VALUE, _INT_TYPE, _LONG_TYPE, _INT_TN, _LONG_TN
    _ACCESSORS = accessors
    _FROM_TYPED_VALUE = from_typed_value
    _INT_TYPE = int_type
    _LONG_TYPE = long_type
    _INT_TN = int_type.typename
    _LONG_TN = long_type.typename


def bind_context(deleted, address, py_context, py_storage):
    """Called once by ``context.py``: the deleted-value marker, ``Address`` and the twin's
    ``Context`` and ``Storage`` (cold methods and error texts run their code)."""
    global _DELETED, _ADDRESS, _PY_CONTEXT, _PY_STORAGE
    _DELETED = deleted
    _ADDRESS = address
    _PY_CONTEXT = py_context
    _PY_STORAGE = py_storage


cdef inline object _pair_item(object a, Py_ssize_t i):
    """``a[i]`` of an address: an ``Address`` is a tuple subtype, whose ``a[i]`` through the
    sequence protocol (Cython's for an untyped object) is a Python-level ``__getitem__``
    call (CPython gives a heap subtype of tuple a generic ``sq_item``): ~0.1 us each."""
    if PyTuple_Check(a) and PyTuple_GET_SIZE(a) == 2:
        return <object>PyTuple_GET_ITEM(a, i)
    return a[i]


# -- the int/long value codec (valuetypes._IntSerializer/_LongSerializer's common cases) --

cdef inline object _decode_fixed(object data, Py_ssize_t n, unsigned char tag):
    """The value of a ``fixed32``/``fixed64`` wrapper of exactly ``n`` bytes with ``tag``,
    or ``None`` when ``data`` is not that (the serializer then decodes it)."""
    cdef const unsigned char* p
    cdef int32_t v32
    cdef int64_t v64
    if type(data) is not bytes or PyBytes_GET_SIZE(data) != n:
        return None
    p = <const unsigned char*>PyBytes_AS_STRING(data)
    if p[0] != tag:
        return None
    if n == 5:
        v32 = <int32_t>(<uint32_t>p[1] | (<uint32_t>p[2] << 8) | (<uint32_t>p[3] << 16) | (<uint32_t>p[4] << 24))
        return v32
    v64 = <int64_t>(<uint64_t>p[1] | (<uint64_t>p[2] << 8) | (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 24)
                    | (<uint64_t>p[5] << 32) | (<uint64_t>p[6] << 40) | (<uint64_t>p[7] << 48)
                    | (<uint64_t>p[8] << 56))
    return v64


cdef inline object _encode_fixed(object value, bint wide):
    """The bytes of an ``int`` as IntType (``wide``: LongType) writes it, or ``None`` when
    the serializer must (not an ``int``, out of range: it raises with its own message)."""
    cdef long long v
    cdef unsigned char buf[9]
    cdef uint64_t u
    cdef int i, n
    if type(value) is not int:
        return None
    v = SFM_PyLong_AsLL(value)
    if v == -1 and PyErr_Occurred():
        PyErr_Clear()
        return None
    if v == 0:
        return _EMPTY_BYTES  # proto3 leaves a zero out
    if wide:
        buf[0] = 0x09
        n = 8
    else:
        if v < -2147483648 or v > 2147483647:
            return None
        buf[0] = 0x0D
        n = 4
    u = <uint64_t>v
    for i in range(n):  # little-endian, as struct's "<i"/"<q"
        buf[1 + i] = <unsigned char>(u >> (8 * i))
    return PyBytes_FromStringAndSize(<char*>buf, n + 1)


cdef inline object _decode_value(object stype, object data):
    if stype is _INT_TYPE:
        v = _decode_fixed(data, 5, 0x0D)
        if v is not None:
            return v
    elif stype is _LONG_TYPE:
        v = _decode_fixed(data, 9, 0x09)
        if v is not None:
            return v
    return stype.serializer().deserialize(data)


cdef inline object _encode_value(object stype, object value):
    if stype is _INT_TYPE:
        data = _encode_fixed(value, False)
        if data is not None:
            return data
    elif stype is _LONG_TYPE:
        data = _encode_fixed(value, True)
        if data is not None:
            return data
    return stype.serializer().serialize(value)


def encode_value(stype, value):
    """``stype.serializer().serialize(value)``, with IntType and LongType ints coded here."""
    return _encode_value(stype, value)


def decode_value(stype, data):
    """``stype.serializer().deserialize(data)``, with IntType and LongType values decoded here."""
    return _decode_value(stype, data)


# -- Cell ---------------------------------------------------------------------------------

@cython.freelist(64)
cdef class Cell:
    """One declared value of one instance during a batch: its stored bytes and decoded value
    (the twin: ``context.Cell``)."""

    cdef public object name
    cdef public object type
    cdef public object key
    cdef public object vt
    cdef public object data
    cdef public object expire
    cdef public object decoded
    cdef public bint has_decoded
    cdef public bint dirty
    #: the spec's stored-value header (load_cells_native), for collect_puts_native; None: unknown
    cdef object _head

    def __init__(self, name, type, key, vt, data, expire):
        self.name = name
        self.type = type
        self.key = key
        self.vt = vt
        self.data = data
        self.expire = expire
        self.decoded = None
        self.has_decoded = False
        self.dirty = False

    cpdef object read(self, address):
        """Return the decoded value (``None`` when absent or expired)."""
        if self.has_decoded:
            return self.decoded
        if self.data is None:
            value = None
        else:
            if self.vt != self.type.typename:
                raise TypeError(
                    f"state {self.name!r} of {address} holds a value of type {self.vt!r}, but its "
                    f"ValueSpec declares type {self.type.typename!r}; migrate or delete the stored value"
                )
            value = _decode_value(self.type, self.data)
        if type(value) in _IMMUTABLE:
            self.decoded = value
            self.has_decoded = True
        return value


cdef inline Cell _new_cell(name, stype, key, vt, data, expire):
    cdef Cell cell = Cell.__new__(Cell)
    cell.name = name
    cell.type = stype
    cell.key = key
    cell.vt = vt
    cell.data = data
    cell.expire = expire
    cell.decoded = None
    cell.has_decoded = False
    cell.dirty = False
    cell._head = None
    return cell


# -- Storage ------------------------------------------------------------------------------

cdef class Storage:
    """``context.storage`` (the twin: ``context.Storage``): a subclass per function with a
    :class:`StateProperty` per declared state; assignments and ``del`` are recorded in
    ``_writes`` (``None`` until the first)."""

    cdef public object _address
    cdef public dict _cells
    cdef public dict _writes

    def __init__(self, address, dict cells):
        self._address = address
        self._cells = cells
        self._writes = None

    def __getattribute__(self, name):
        # object.__getattribute__ first (a StateProperty per declared state, methods, the
        # fields), then what the twin's __getattr__ does: reached only for names without a
        # property (the base class, or an undeclared name). Not a __getattr__: CPython gives
        # a subclass (each function's storage class) of a type with one a generic slot that
        # looks both methods up on every read (~60 ns of a ~115 ns `storage.x`).
        try:
            return PyObject_GenericGetAttr(self, name)
        except AttributeError:
            pass
        cell = self._cells.get(name)
        if cell is None:
            raise AttributeError(
                f"{self._address.typename} has no state {name!r}; declare it with "
                f"ValueSpec(name={name!r}, type=...) in bind(specs=[...])"
            )
        return _storage_read(self, name)

    def __setattr__(self, name, value):
        if name not in self._cells:
            raise AttributeError(
                f"{self._address.typename} has no state {name!r}; declare it with "
                f"ValueSpec(name={name!r}, type=...) in bind(specs=[...])"
            )
        if self._writes is None:
            self._writes = {name: _DELETED if value is None else value}
        else:
            self._writes[name] = _DELETED if value is None else value

    def __delattr__(self, name):
        self.__setattr__(name, None)

    def __dir__(self):
        return sorted(self._cells)


cdef object _storage_read(Storage storage, object name):
    cdef dict writes = storage._writes
    cdef PyObject* p
    if writes is not None:
        p = PyDict_GetItem(writes, name)
        if p is not NULL:
            value = <object>p
            return None if value is _DELETED else value
    cdef Cell cell = storage._cells[name]
    if cell.has_decoded:
        return cell.decoded
    return cell.read(storage._address)


cdef class StateProperty:
    """The read of one declared state on a function's ``Storage`` class (the twin's
    ``property``): the value written by this invocation, else the stored one."""

    cdef readonly str name

    def __init__(self, str name):
        self.name = name

    def __get__(self, obj, objtype):
        if obj is None:
            return self
        return _storage_read(<Storage?>obj, self.name)


# -- Message ------------------------------------------------------------------------------

@cython.freelist(64)
cdef class Message:
    """A message to a function instance (build one with :func:`message_builder`).

    As in StateFun, ``Message(target_typename, target_id, typed_value)`` also builds one
    from a ``TypedValue`` (statefun_mesh's, or the request-reply protocol's protobuf one).
    """

    cdef public object target_typename
    cdef public object target_id
    cdef public object _vt
    cdef public object _v

    def __init__(self, target_typename, target_id, value_typename=None, value=None, *, typed_value=None):
        self.target_typename = target_typename
        self.target_id = target_id
        if value is None:  # the StateFun form: a TypedValue, positionally or by keyword
            if not target_typename:
                raise ValueError("target_typename can not be missing")
            if not target_id:
                raise ValueError("target_id can not be missing")
            value_typename, value = _FROM_TYPED_VALUE(typed_value if typed_value is not None else value_typename)
        self._vt = value_typename
        self._v = value

    def __repr__(self):
        return f"Message(to={self.target_typename}/{self.target_id}, type={self._vt!r}, value={self._v!r:.40})"

    def __reduce__(self):
        return (Message, (self.target_typename, self.target_id, self._vt, self._v))

    def value_typename(self):
        """The type name of the value, e.g. ``io.statefun.types/int``."""
        return self._vt

    def raw_value(self):
        """The value's bytes, as its type encoded them."""
        return self._v

    @property
    def typed_value(self):
        """The value as a :class:`TypedValue` (StateFun compatibility)."""
        return _ACCESSORS.typed_value.fget(self)

    def is_type(self, tpe):
        """Whether the value has ``tpe``'s type name."""
        return self._vt == tpe.typename

    def as_type(self, tpe):
        """Decode the value with ``tpe``.

        Raises:
            TypeError: the value has a different type name.
        """
        if self._vt != tpe.typename:
            raise TypeError(f"cannot read a value of type {self._vt!r} as {tpe.typename!r}")
        return _decode_value(tpe, self._v)

    def is_int(self):
        return self._vt == "io.statefun.types/int"

    def as_int(self):
        if self._vt == _INT_TN:
            v = _decode_fixed(self._v, 5, 0x0D)
            if v is not None:
                return v
        return self.as_type(_INT_TYPE)

    def is_long(self):
        return self._vt == "io.statefun.types/long"

    def as_long(self):
        if self._vt == _LONG_TN:
            v = _decode_fixed(self._v, 9, 0x09)
            if v is not None:
                return v
        return self.as_type(_LONG_TYPE)

    def is_float(self):
        return self._vt == "io.statefun.types/float"

    def as_float(self):
        return _ACCESSORS.as_float(self)

    def is_double(self):
        return self._vt == "io.statefun.types/double"

    def as_double(self):
        return _ACCESSORS.as_double(self)

    def is_bool(self):
        return self._vt == "io.statefun.types/bool"

    def as_bool(self):
        return _ACCESSORS.as_bool(self)

    def is_string(self):
        return self._vt == "io.statefun.types/string"

    def as_string(self):
        return _ACCESSORS.as_string(self)

    def is_kafka(self):
        """Whether the value is a Kafka egress record (from :func:`~statefun_mesh.kafka_egress_message`)."""
        return _ACCESSORS.is_kafka(self)

    def as_kafka(self):
        """Decode a Kafka egress record: a :class:`~statefun_mesh.egress_io.KafkaEgressRecord`."""
        return _ACCESSORS.as_kafka(self)

    def is_kinesis(self):
        """Whether the value is a Kinesis egress record (from :func:`~statefun_mesh.kinesis_egress_message`)."""
        return _ACCESSORS.is_kinesis(self)

    def as_kinesis(self):
        """Decode a Kinesis egress record: a :class:`~statefun_mesh.egress_io.KinesisEgressRecord`."""
        return _ACCESSORS.as_kinesis(self)


# -- Context ------------------------------------------------------------------------------

@cython.freelist(64)
cdef class Context:
    """What a function gets besides its message: its address, its caller, its storage and
    the ways to send messages (StateFun's ``Context``, plus :meth:`reply`).

    Everything a function does through its context takes effect only if the invocation
    returns normally; if it raises, its sends, timers, egress records, reply and state
    changes are all discarded.
    """

    cdef public object address
    cdef public object _rec
    cdef public object storage
    cdef public list _sends
    cdef public list _delayed
    cdef public list _egress
    cdef public object _reply
    cdef public Py_ssize_t _limit
    cdef public object _outbox
    cdef public Py_ssize_t _room

    def __init__(self, address, rec, storage, Py_ssize_t limit=0):
        self.address = address
        self._rec = rec
        self.storage = storage
        self._sends = None
        self._delayed = None
        self._egress = None
        self._reply = None
        self._limit = limit
        self._outbox = None
        self._room = 0

    @property
    def caller(self):
        """The address of the function that sent the message; ``None`` for a message from
        a client, an ingress or a timer the mesh itself fired."""
        rec = self._rec
        return sfm_new_pair(_ADDRESS, rec[2], rec[3]) if rec[2] else None

    @property
    def _reply_peer(self):
        return self._rec[6]

    @property
    def _request_id(self):
        return self._rec[7]

    @property
    def in_request(self):
        """Whether the message being handled is part of a client request (see :meth:`reply`)."""
        return self._rec[7] != 0

    def _check_size(self, rec, kind):
        return _PY_CONTEXT._check_size(self, rec, kind)

    def send(self, message):
        """Send ``message`` to its target instance.

        Raises:
            MessageTooLargeError: the message is over the mesh's ``max_message_bytes``.
        """
        cdef Message m
        cdef Py_ssize_t room
        if type(message) is not Message:
            raise TypeError(f"send() takes a Message (use message_builder), got {type(message).__name__}")
        m = <Message>message
        a = self.address
        at = _pair_item(a, 0)
        ai = _pair_item(a, 1)
        own = self._rec
        t, i, vt, v = m.target_typename, m.target_id, m._vt, m._v
        rec = (t, i, at, ai, vt, v, own[6], own[7])
        if self._limit and len(v) + 4 * (len(t) + len(i) + len(at) + len(ai) + len(vt)) + 49 > self._limit:
            self._check_size(rec, "message")
        if self._sends is None:
            self._sends = [rec]
        else:
            self._sends.append(rec)
        if self._outbox is not None:
            # counted down, with memory.RECORD_OVERHEAD (400): see the twin's send
            room = self._room - len(i) - len(v) - 400
            self._room = room
            if room <= 0:
                self._outbox.stage(self)  # to disk, part of the batch (outbox.py)

    def send_after(self, duration, message, cancellation_token=""):
        """Send ``message`` once ``duration`` has passed (StateFun's signature).

        Delayed messages are state: they survive restarts and are restored with
        checkpoints. ``cancellation_token`` names the message for
        :meth:`cancel_delayed_message`; tokens are scoped to the sending instance.
        """
        return _PY_CONTEXT.send_after(self, duration, message, cancellation_token)

    def cancel_delayed_message(self, cancellation_token):
        """Cancel every pending delayed message this instance sent with ``cancellation_token``.

        A message that has already fired is not affected.
        """
        return _PY_CONTEXT.cancel_delayed_message(self, cancellation_token)

    def send_egress(self, message):
        """Emit a record to the egress named by ``message.typename``."""
        return _PY_CONTEXT.send_egress(self, message)

    def reply(self, *args, **kwargs):
        """Answer the client request this message belongs to (see the twin's ``reply``:
        ``int_value=``, ..., or ``value`` with ``value_type``, positionally or by keyword)."""
        return _PY_CONTEXT.reply(self, *args, **kwargs)


# -- the per-address steps of the batch loop (the twin: _dispatch_loop.load_cells, invoke_sync) --

cdef inline bytes _state_key(int kg, bytes b, const char* c, Py_ssize_t nc, bytes d):
    """``KG_PREFIXES[kg] + b + c[:nc] + d`` in one allocation. The key group's two bytes
    (big-endian, lmdb_backend.KG_PREFIXES) are written here: reading them from that list
    of 32,768 bytes objects was a cache miss or two per address (over half of this step)."""
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t nd = PyBytes_GET_SIZE(d)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 2 + nb + nc + nd)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>((kg >> 8) & 0xFF)
    p[1] = <char>(kg & 0xFF)
    memcpy(p + 2, PyBytes_AS_STRING(b), nb)
    memcpy(p + 2 + nb, c, nc)
    memcpy(p + 2 + nb + nc, PyBytes_AS_STRING(d), nd)
    return out


def load_cells_native(fspec, str typename, str id not None, int kg, get, db_state, dict cache, now_ms, tuple kit):
    """``_dispatch_loop.load_cells``, compiled with this module's Cell (and the state key,
    the write-back cache's lookup and the stored-value header check in C)."""
    return _load_cells(fspec, typename, id, kg, get, db_state, cache, now_ms, kit)


cdef dict _load_cells(fspec, str typename, str id, int kg, get, db_state, dict cache, now_ms, tuple kit):
    cdef dict cells = {}
    cdef Cell cell
    if not 0 <= kg <= 0xFFFF:
        raise ValueError(f"key group {kg} is out of range (0..65535)")
    cdef Py_ssize_t max_key = kit[_K_MAX_KEY]
    cdef bytes skey, vhead
    cdef Py_ssize_t nh
    cdef PyObject* p
    state_key = kit[_K_STATE_KEY]
    # the id's UTF-8 bytes: an ASCII str's own data (no bytes object per address), else encoded
    cdef bytes idb = None
    cdef const char* idp
    cdef Py_ssize_t nid
    if SFM_IS_ASCII(id):
        idp = <const char*>PyUnicode_1BYTE_DATA(id)
        nid = SFM_UNICODE_LEN(id)
    else:
        idb = id.encode("utf-8", "surrogatepass")
        idp = PyBytes_AS_STRING(idb)
        nid = PyBytes_GET_SIZE(idb)
    for part in fspec.key_parts:
        name, stype, tprefix, suffix, vhead, decode = part
        skey = _state_key(kg, tprefix, idp, nid, suffix)
        if PyBytes_GET_SIZE(skey) > max_key:
            skey = state_key(kg, typename, id, name)
        # the store's write-back cache first (a dict lookup in C; None there: deleted)
        p = PyDict_GetItem(cache, skey) if cache is not None else NULL
        if p != NULL:
            raw = <object>p
        else:
            raw = get(skey, None, db_state)
        nh = PyBytes_GET_SIZE(vhead)
        if raw is None:
            cell = _new_cell(name, stype, skey, None, None, 0)
        elif (type(raw) is bytes and PyBytes_GET_SIZE(raw) >= nh
              and memcmp(PyBytes_AS_STRING(raw), PyBytes_AS_STRING(vhead), nh) == 0):
            # the declared type, no expiry: the usual case
            data = PyBytes_FromStringAndSize(PyBytes_AS_STRING(raw) + nh, PyBytes_GET_SIZE(raw) - nh)
            cell = _new_cell(name, stype, skey, stype.typename, data, 0)
            if decode is not None:
                try:
                    cell.decoded = _decode_value(stype, data)
                    cell.has_decoded = True
                except Exception:  # left for the read to raise, inside the invocation
                    pass
        else:
            vt, data, expire = kit[_K_DECODE_STATE](raw)
            cell = _new_cell(name, stype, skey, vt, data, expire)
            if expire and expire <= now_ms:
                cell.vt = cell.data = None
                cell.expire = 0
                cell.dirty = True
        cell._head = vhead
        cells[name] = cell
    return cells


def collect_puts_native(list touched, list ops, encode):
    """``_dispatch_loop.collect_puts``, with this module's Cell: a value of the declared
    type without expiry is the spec's stored-value header (load_cells') plus its bytes,
    which is what ``encode`` (``encode_state_value``) returns for it."""
    cdef list puts = []
    cdef Cell cell
    cdef dict cells
    cdef bytes value
    cdef Py_ssize_t size = 0  # bytes of the keys and values: the write-back cache's bound counts them
    for cells in touched:
        for c in cells.values():
            cell = <Cell>c
            if cell.dirty:
                if cell.data is None:
                    ops.append(("del", "state", cell.key))
                else:
                    if (cell._head is not None and type(cell.data) is bytes and cell.vt is cell.type.typename
                            and type(cell.expire) is int and cell.expire == 0):
                        value = _concat2(cell._head, cell.data)
                    else:
                        value = encode(cell.vt, cell.data, cell.expire)
                    puts.append((cell.key, value))
                    size += PyBytes_GET_SIZE(cell.key) + PyBytes_GET_SIZE(value)
    if puts:
        ops.append(("putmulti", "state", puts, size))


cdef inline bytes _concat2(bytes a, bytes b):
    cdef Py_ssize_t na = PyBytes_GET_SIZE(a), nb = PyBytes_GET_SIZE(b)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, na + nb)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(a), na)
    memcpy(p + na, PyBytes_AS_STRING(b), nb)
    return out


cdef inline void _apply_write(Cell cell, object value, object data, object cacheable):
    # Dispatcher._apply's writes (the twin: invoke_sync's)
    cell.dirty = True
    if data is None:
        cell.vt = cell.data = None
        cell.expire = 0
        cell.decoded = None
        cell.has_decoded = True
    else:
        cell.vt = cell.type.typename
        cell.data = data
        cell.expire = 0
        if type(value) in cacheable:
            cell.decoded = value
            cell.has_decoded = True
        else:
            cell.has_decoded = False


cdef object _serialize(Cell cell, str wname, object value):
    if value is _DELETED:
        return None
    data = _encode_value(cell.type, value)
    if type(data) is not bytes and not isinstance(data, bytes):
        raise TypeError(
            f"the serializer of type {cell.type.typename!r} returned "
            f"{type(data).__name__}, not bytes, for state {wname!r}"
        )
    return data


def invoke_sync_native(d, fspec, address, int kg, dict cells, list recs, Py_ssize_t limit, outbox,
                       Py_ssize_t stage_bytes, out, list sends, now_ms, tuple kit):
    """``_dispatch_loop.invoke_sync``, compiled with this module's Context, Storage,
    Message and Cell: a sync function's invocations at one address, in order."""
    return _invoke_sync(d, fspec, address, kg, cells, recs, limit, outbox, stage_bytes, out, sends, now_ms, kit)


cdef Py_ssize_t _invoke_sync(d, fspec, address, int kg, dict cells, list recs, Py_ssize_t limit, outbox,
                             Py_ssize_t stage_bytes, out, list sends, now_ms, tuple kit) except -1:
    cdef Context ctx
    cdef Storage storage
    cdef Message msg
    cdef Cell cell
    cdef dict writes
    cdef list datas
    cdef Py_ssize_t invocations = 0, pos
    cdef PyObject* pk
    cdef PyObject* pv
    cacheable = kit[_K_CACHEABLE]
    storage_cls = fspec.storage_class
    fun = fspec.fun
    ttl = fspec.ttl_ms
    typename = _pair_item(address, 0)
    id = _pair_item(address, 1)
    # one storage per address group, its writes emptied before each invocation (those of one
    # that raised are dropped with it); a fresh Context and Message per invocation
    storage = <Storage>sfm_type_new(storage_cls)
    storage._address = address
    storage._cells = cells
    for rec in recs:
        storage._writes = None
        ctx = Context.__new__(Context)
        ctx.address = address
        ctx._rec = rec
        ctx.storage = storage
        ctx._limit = limit
        ctx._outbox = outbox
        ctx._room = stage_bytes
        msg = Message.__new__(Message)
        msg.target_typename = typename
        msg.target_id = id
        msg._vt = rec[4]
        msg._v = rec[5]
        try:
            fun(ctx, msg)
            writes = storage._writes
            if writes is not None:
                # every write encoded before any applies (a raising serializer applies none)
                if len(writes) == 1:
                    pos = 0
                    PyDict_Next(writes, &pos, &pk, &pv)
                    cell = cells[<object>pk]
                    value = <object>pv
                    data = _serialize(cell, <object>pk, value)
                    datas = None
                else:
                    datas = [_serialize(<Cell>cells[wname], wname, value) for wname, value in writes.items()]
        except Exception as exc:
            d._failed(rec, address, cells, exc, out)
            continue
        if writes is not None:
            if datas is None:
                _apply_write(cell, value, data, cacheable)
            else:
                pos = 0
                for wname, value in writes.items():
                    _apply_write(<Cell>cells[wname], value, datas[pos], cacheable)
                    pos += 1
        if ttl:
            d._apply(fspec, cells, None, now_ms)
        invocations += 1
        if outbox is not None and outbox.current is ctx:  # some of its sends were staged
            outbox.emitted(ctx, sends)
        if ctx._sends is not None:
            sends.extend(ctx._sends)
        if ctx._delayed is not None or ctx._egress is not None or ctx._reply is not None:
            d._emit_other(address, kg, ctx, out, now_ms)
    return invocations

