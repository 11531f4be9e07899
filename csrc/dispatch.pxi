# The dispatcher's per-batch loop, typed (issue 9, session 7): ``dispatch_groups_native``.
#
# The specification is the twin's ``_dispatch_loop.dispatch_groups`` (compiled above by
# the include, and left unused here, like the twin's load_cells and invoke_sync): the
# same statements in the same order, with what it reads of the dispatcher read once per
# batch into C variables, the per-address steps called as C functions (_load_cells,
# _invoke_sync), the key group hashed in C, the target Address built with tp_alloc, and
# each type's TypeStats updated once per run of its addresses instead of once per address
# (same sums and bucket counts; see docs/architecture.md §4a). The same tests run on both
# cores (tests/unit/test_dispatch_core.py pins a batch's bytes, test_dispatch_runs.py the
# statistics and the parked/deferred/unknown paths).

from libc.time cimport timespec

cdef extern from "<time.h>" nogil:
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC

cdef object _PERF_COUNTER = __import__("time").perf_counter


cdef inline double _monotonic() noexcept nogil:
    # what time.perf_counter reads on Linux (CLOCK_MONOTONIC), without a Python call
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class _RunStats:
    """The TypeStats of the current run of one type's addresses, summed in C and added to
    the TypeStats object when the run ends (the type changes, or the batch's loop ends)."""

    cdef object st
    cdef double seconds
    cdef Py_ssize_t first  # invocations under the first latency bucket's bound

    cdef int flush(self) except -1:
        st = self.st
        if st is not None:
            if self.seconds != 0.0:
                st.seconds += self.seconds
            if self.first:
                st.buckets[0] += self.first
        self.st = None
        self.seconds = 0.0
        self.first = 0
        return 0


def dispatch_groups_native(
    d, tuple kit, dict groups, txn, now_ms, out, max_send_bytes, dict merging, list starting, list touched
):
    """``_dispatch_loop.dispatch_groups`` (see there), in typed C: returns how many sync
    invocations returned."""
    Address = kit[0]
    BatchOutcome = kit[4]
    _Running = kit[5]
    _RemoteRunning = kit[6]
    bounds = kit[11]
    bisect_left = kit[12]
    perf_counter = kit[13]
    load_cells = kit[20]
    invoke_sync = kit[21]
    # the kit's steps are this core's own unless a caller passed others (then they are called)
    cdef bint c_load = load_cells is load_cells_native
    cdef bint c_invoke = invoke_sync is invoke_sync_native
    cdef bint c_clock = perf_counter is _PERF_COUNTER
    cdef dict parked = d._parked
    cdef dict qlens = d._qlens
    cdef dict table = d.table
    get = txn.get
    db_state = d._db_state
    # the store's write-back cache of state (None: off): looked in before txn (_load_cells)
    cdef dict cache = d._state_cache
    key_group_fn = d._key_group
    maxp = d.max_parallelism
    cdef bint c_kg = key_group_fn is key_group
    cdef uint64_t mp = <uint64_t>_check_parallelism(maxp) if c_kg else 1
    cdef Py_ssize_t limit = d.message_limit
    #: where a sync invocation's sends past their share of memory_budget go (outbox.py; None: off)
    outbox = d.outbox
    cdef Py_ssize_t stage_bytes = outbox.stage_bytes if outbox is not None else 0
    cdef dict stats = d.stats
    cdef double first = bounds[0]
    cdef list sends = out.sends
    cdef set seen = set()
    cdef bint budget = max_send_bytes is not None
    cdef Py_ssize_t counted = 0, j, n_sends
    send_bytes = 0
    cdef bint full = False  # the batch's sends reached max_send_bytes: every later address is deferred
    cdef Py_ssize_t invocations = 0, n
    cdef double t0, t1, dt
    cdef object pt0 = None, pt1
    cdef Py_ssize_t pos = 0
    cdef PyObject* pk
    cdef PyObject* pv
    cdef Py_ssize_t nid
    cdef const char* idp
    cdef int kg
    cdef list recs
    cdef dict cells
    cdef _RunStats run = _RunStats.__new__(_RunStats)
    if c_clock:
        t0 = _monotonic()  # chained: one clock read per sync address
    else:
        pt0 = perf_counter()
    # the function of the last address's type and what the loop reads of it (valid while
    # typename == last_tn; a type without a function is looked up every time)
    last_tn = None
    fspec = None
    cdef bint is_async = False
    cdef bint has_specs = False
    st = None
    try:
        while PyDict_Next(groups, &pos, &pk, &pv):
            key = <object>pk
            recs = <list>pv
            typename, id = key
            if parked or merging:
                # per-address order: behind an invocation that has not committed yet
                behind = parked.get(key) or merging.get(key)
                if behind is not None:
                    if key not in qlens:
                        qlens[key] = (behind, len(behind.queue))
                    behind.queue.extend(recs)
                    continue
            if budget:
                n_sends = len(sends)
                if counted < n_sends:
                    for j in range(counted, n_sends):
                        r = sends[j]
                        send_bytes += len(r[1]) + len(r[5]) + 64  # dispatch._SEND_OVERHEAD
                    counted = n_sends
                    full = send_bytes >= max_send_bytes
                if full:
                    out.deferred.extend(recs)
                    continue
                if outbox is not None and outbox.staging:
                    out.deferred.extend(recs)  # an invocation's sends went to the outbox: the batch is full
                    continue
            if typename != last_tn:  # a batch is mostly runs of one type: its lookups once per run
                run.flush()
                fspec = table.get(typename)
                st = None  # its TypeStats, once one of its invocations ran
                if fspec is None:
                    last_tn = None
                else:
                    last_tn = typename
                    is_async = fspec.is_async
                    has_specs = bool(fspec.specs)
            endpoint = None
            if fspec is None:
                endpoint = d.remote.endpoint_for(typename) if d.remote is not None else None
                if endpoint is None:
                    for rec in recs:
                        d._unknown(rec, out)
                    continue
            if c_kg:
                idp = _id_utf8(id, &nid)
                kg = <int>(_xxh64(<const unsigned char*>idp, nid) % mp)
            else:
                kg = key_group_fn(id, maxp)
            dedup_out = out
            if fspec is None or is_async:
                # an async address's idempotency keys commit with its invocations
                dedup_out = BatchOutcome()
            for r in recs:
                if not r[2] and r[3]:  # a client message with an idempotency key
                    recs = d._dedup(txn, typename, id, kg, recs, seen, now_ms, dedup_out)
                    break
            if not recs:
                continue
            address = sfm_new_pair(Address, typename, id)
            if fspec is None:  # a remote function: an address task like an async one's
                rcells = d.remote.load(d, txn, typename, id, kg, now_ms)
                starting.append(_RemoteRunning(endpoint, address, kg, rcells, recs, dedup_out))
                continue
            if not has_specs:
                cells = {}
            elif c_load and type(id) is str and type(typename) is str:
                cells = _load_cells(fspec, typename, id, kg, get, db_state, cache, now_ms, kit)
            else:
                cells = load_cells(fspec, typename, id, kg, get, db_state, cache, now_ms, kit)
            if is_async:
                starting.append(_Running(fspec, address, kg, cells, recs, dedup_out))
                continue
            if cells:
                touched.append(cells)
            d.current = address
            if c_invoke:
                invocations += _invoke_sync(
                    d, fspec, address, kg, cells, recs, limit, outbox, stage_bytes, out, sends, now_ms, kit
                )
            else:
                invocations += invoke_sync(
                    d, fspec, address, kg, cells, recs, limit, outbox, stage_bytes, out, sends, now_ms, kit
                )
            d.current = None
            # TypeStats.observe, in C: summed for the run of this type's addresses
            if st is None:
                st = stats.get(typename) or d._type_stats(typename)
                run.st = st
            n = len(recs)
            if c_clock:
                t1 = _monotonic()
                dt = t1 - t0
                t0 = t1
            else:
                pt1 = perf_counter()
                dt = pt1 - pt0
                pt0 = pt1
            run.seconds += dt
            if dt < n * first:  # the usual case: under the first bucket's bound
                run.first += n
            else:
                st.buckets[bisect_left(bounds, dt / n)] += n
    finally:
        run.flush()
    return invocations
