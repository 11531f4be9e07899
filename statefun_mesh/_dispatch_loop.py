"""The per-batch loop of the dispatcher: group by address, read state, invoke, collect.

This file is the pure-Python twin *and* the specification of the Cython core's version:
the Cython core includes it verbatim (``csrc/_speedups_c.pyx``: ``include``) and runs its
``group_records``; for ``dispatch_groups`` it runs its typed C version,
``dispatch_groups_native`` (``csrc/dispatch.pxi``: the same statements, in the same order;
change both, ``tests/unit/test_dispatch_native.py`` compares them). The per-address
steps ``load_cells``, ``invoke_sync`` and ``collect_puts`` are the specification of the
Cython core's own versions (``csrc/objects.pxi``: ``*_native``, which build its extension
types ``Cell``, ``Context``, ``Message`` and storage with their C fields); the dispatcher
passes whichever core's in ``kit`` (``_speedups.load_cells``, ``invoke_sync``).
``tests/unit/test_dispatch_core.py`` pins the bytes a batch writes against
``tests/data/dispatch_batch.json`` on both cores. Import it only through
:mod:`statefun_mesh._speedups`.

Only builtin types are annotated (Cython types those); everything else is ``Any``.
The dispatcher passes the classes and functions this loop needs in ``kit``
(``KIT_FIELDS``): their modules import ``_speedups``, so this one imports none of them.

Where each step of a message runs (docs/architecture.md §4a): ``group_records`` groups
a batch by address; ``dispatch_groups`` then, per address, calls ``load_cells`` (state
keys from the function's precomputed parts, read in the batch's one read transaction,
values decoded by a prefix check against the spec's stored-value header) and
``invoke_sync`` (the function once per message with a fresh ``Context`` and ``Message``;
a returned invocation's writes go to the address's cells, its sends to the batch's
outcome). ``collect_puts`` encodes the cells' final values into one ``putmulti`` op.
"""

from typing import Any

#: What ``kit`` holds, in order (``Dispatcher`` builds it: these modules import this one)
KIT_FIELDS = (
    "Address",
    "Cell",
    "Context",
    "Message",
    "BatchOutcome",
    "_Running",
    "_RemoteRunning",
    "decode_state_value",
    "state_key",
    "KG_PREFIXES",
    "MAX_KEY",
    "LATENCY_BUCKETS",
    "bisect_left",
    "perf_counter",
    "DELETED",
    "_CACHEABLE",
    "_set_address",
    "_set_cells",
    "_set_writes",
    "encode_state_value",
    "load_cells",
    "invoke_sync",
)


def group_records(records: list[Any]) -> dict[Any, Any]:
    """``{(target_typename, target_id): [record, ...]}`` in first-arrival order, each
    address's records in arrival order."""
    groups: dict[Any, Any] = {}
    for rec in records:
        key = (rec[0], rec[1])
        g = groups.get(key)
        if g is None:
            groups[key] = [rec]
        else:
            g.append(rec)
    return groups


def dispatch_groups(
    d: Any,
    kit: tuple[Any, ...],
    groups: dict[Any, Any],
    txn: Any,
    now_ms: Any,
    out: Any,
    max_send_bytes: Any,
    merging: dict[Any, Any],
    starting: list[Any],
    touched: list[Any],
) -> Any:
    """Run the batch's address groups in order against dispatcher ``d`` (see
    ``Dispatcher.run``): queue those behind a parked address, defer those past
    ``max_send_bytes``, dead-letter unknown types, start async and remote ones (appended
    to ``starting``), and invoke sync ones. Appends each sync address's cells to
    ``touched`` and returns how many sync invocations returned. ``kit``: see ``KIT_FIELDS``."""
    (
        Address,
        _,
        _,
        _,
        BatchOutcome,
        _Running,
        _RemoteRunning,
        _,
        _,
        _,
        _,
        bounds,
        bisect_left,
        perf_counter,
        _,
        _,
        _,
        _,
        _,
        _,
        load_cells,
        invoke_sync,
    ) = kit
    new_tuple = tuple.__new__
    parked: dict[Any, Any] = d._parked
    qlens: dict[Any, Any] = d._qlens
    table: dict[Any, Any] = d.table
    get = txn.get
    db_state = d._db_state
    #: the store's write-back cache of state (None: off): looked in before txn (load_cells)
    cache: Any = d._state_cache
    key_group = d._key_group
    maxp = d.max_parallelism
    limit = d.message_limit
    #: where a sync invocation's sends past their share of memory_budget go (outbox.py; None: off)
    outbox = d.outbox
    stage_bytes = outbox.stage_bytes if outbox is not None else 0
    stats: dict[Any, Any] = d.stats
    first = bounds[0]
    sends: list[Any] = out.sends
    seen: set[Any] = set()
    counted = 0
    send_bytes = 0
    full = False  # the batch's sends reached max_send_bytes: every later address is deferred
    invocations = 0
    t0 = perf_counter()  # chained: one clock read per sync address
    # the function of the last address's type and what the loop reads of it (valid while
    # typename == last_tn; a type without a function is looked up every time)
    last_tn = None
    fspec = None
    is_async = False
    has_specs = False
    st = None
    for key, recs in groups.items():
        typename, id = key
        if parked or merging:
            # per-address order: behind an invocation that has not committed yet
            behind = parked.get(key) or merging.get(key)
            if behind is not None:
                if key not in qlens:
                    qlens[key] = (behind, len(behind.queue))
                behind.queue.extend(recs)
                continue
        if max_send_bytes is not None:
            if counted < len(sends):
                for r in sends[counted:]:
                    send_bytes += len(r[1]) + len(r[5]) + 64  # dispatch._SEND_OVERHEAD
                counted = len(sends)
                full = send_bytes >= max_send_bytes
            if full:  # (not only when new sends came: then every other address ran past the budget)
                out.deferred.extend(recs)
                continue
        if max_send_bytes is not None and outbox is not None and outbox.staging:
            out.deferred.extend(recs)  # an invocation's sends went to the outbox: the batch is full
            continue
        if typename != last_tn:  # a batch is mostly runs of one type: its lookups once per run
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
        kg = key_group(id, maxp)
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
        address = new_tuple(Address, key)
        if fspec is None:  # a remote function: an address task like an async one's
            rcells = d.remote.load(d, txn, typename, id, kg, now_ms)
            starting.append(_RemoteRunning(endpoint, address, kg, rcells, recs, dedup_out))
            continue
        cells: dict[Any, Any] = (
            load_cells(fspec, typename, id, kg, get, db_state, cache, now_ms, kit) if has_specs else {}
        )
        if is_async:
            starting.append(_Running(fspec, address, kg, cells, recs, dedup_out))
            continue
        if cells:
            touched.append(cells)
        d.current = address
        invocations += invoke_sync(
            d, fspec, address, kg, cells, recs, limit, outbox, stage_bytes, out, sends, now_ms, kit
        )
        d.current = None
        # TypeStats.observe, inlined: this runs once per address of every batch
        t1 = perf_counter()
        if st is None:
            st = stats.get(typename) or d._type_stats(typename)
        n = len(recs)
        dt = t1 - t0
        st.seconds += dt
        if dt < n * first:  # the usual case: under the first bucket's bound
            st.buckets[0] += n
        else:
            st.buckets[bisect_left(bounds, dt / n)] += n
        t0 = t1
    return invocations


def load_cells(
    fspec: Any,
    typename: str,
    id: str,
    kg: int,
    get: Any,
    db_state: Any,
    cache: Any,
    now_ms: Any,
    kit: tuple[Any, ...],
) -> dict[Any, Any]:
    """The cells of address ``(typename, id)`` of function ``fspec`` (which declares state):
    state keys from the function's precomputed parts, read from the store's write-back
    ``cache`` (a dict, ``None``: off; a value ``None`` there is a deletion) or else the batch's
    transaction (``get``), values of the declared type without expiry decoded by a prefix check against
    the spec's stored-value header. (The Cython core's own: ``load_cells_native``.)"""
    cell_cls, decode_state_value, state_key, kg_prefix, max_key = kit[1], kit[7], kit[8], kit[9], kit[10]
    new = object.__new__
    cells: dict[Any, Any] = {}
    head = kg_prefix[kg]
    idb = id.encode("utf-8", "surrogatepass")
    for name, stype, tprefix, suffix, vhead, decode in fspec.key_parts:
        skey = head + tprefix + idb + suffix
        if len(skey) > max_key:
            skey = state_key(kg, typename, id, name)
        raw = cache
        if cache is not None:
            raw = cache.get(skey, cache)  # the dict itself: not cached (a value is bytes or None)
        if raw is cache:
            raw = get(skey, None, db_state)  # (key, default, db): no keyword dict per read
        if raw is None:
            cells[name] = cell_cls(name, stype, skey, None, None, 0)
        elif raw.startswith(vhead):  # the declared type, no expiry: the usual case
            data = raw[len(vhead) :]
            cell = new(cell_cls)  # Cell.__init__, inlined (test_dispatch_core checks every slot is set)
            cell.name = name
            cell.type = stype
            cell.key = skey
            cell.vt = stype.typename
            cell.data = data
            cell.expire = 0
            cell.decoded = None
            cell.has_decoded = False
            cell.dirty = False
            if decode is not None:
                try:
                    cell.decoded = decode(data)
                    cell.has_decoded = True
                except Exception:  # left for the read to raise, inside the invocation
                    pass
            cells[name] = cell
        else:
            vt, data, expire = decode_state_value(raw)
            cell = cell_cls(name, stype, skey, vt, data, expire)
            if expire and expire <= now_ms:
                cell.vt = cell.data = None
                cell.expire = 0
                cell.dirty = True
            cells[name] = cell
    return cells


def invoke_sync(
    d: Any,
    fspec: Any,
    address: Any,
    kg: int,
    cells: dict[Any, Any],
    recs: list[Any],
    limit: int,
    outbox: Any,
    stage_bytes: int,
    out: Any,
    sends: list[Any],
    now_ms: Any,
    kit: tuple[Any, ...],
) -> int:
    """Invoke sync function ``fspec`` once per record of ``recs`` at ``address``, in order,
    each with a fresh ``Context``, storage (the function's generated class) and ``Message``;
    a returned invocation's writes go to ``cells``, its sends to ``sends``, its other
    effects to ``out``; one that raises is dead-lettered (``d._failed``). Returns how many
    returned. (The Cython core's own: ``invoke_sync_native``.)"""
    (
        _,
        _,
        context_cls,
        message_cls,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        _,
        DELETED,
        cacheable,
        set_address,
        set_cells,
        set_writes,
        _,
        _,
        _,
    ) = kit
    new = object.__new__
    storage_cls = fspec.storage_class
    fun = fspec.fun
    ttl = fspec.ttl_ms
    typename, id = address
    invocations = 0
    for rec in recs:
        storage = new(storage_cls)  # Storage.__init__, inlined (its slots' own setters)
        set_address(storage, address)
        set_cells(storage, cells)
        set_writes(storage, None)
        ctx = new(context_cls)  # Context.__init__, inlined (test_dispatch_core checks every slot is set)
        ctx.address = address
        ctx._rec = rec
        ctx.storage = storage
        ctx._sends = None
        ctx._delayed = None
        ctx._egress = None
        ctx._reply = None
        ctx._limit = limit
        ctx._outbox = outbox
        ctx._room = stage_bytes
        msg = new(message_cls)
        msg.target_typename = typename
        msg.target_id = id
        msg._vt = rec[4]
        msg._v = rec[5]
        try:
            fun(ctx, msg)
            writes = storage._writes
            if writes is not None:
                # Dispatcher._serialize_writes, inlined: encode every write before any applies
                wl: list[Any] = []
                for wname, value in writes.items():
                    cell = cells[wname]
                    if value is DELETED:
                        wl.append((cell, None, None))
                    else:
                        data = cell.type.serializer().serialize(value)
                        if type(data) is not bytes and not isinstance(data, bytes):
                            raise TypeError(
                                f"the serializer of type {cell.type.typename!r} returned "
                                f"{type(data).__name__}, not bytes, for state {wname!r}"
                            )
                        wl.append((cell, value, data))
                writes = wl
        except Exception as exc:
            d._failed(rec, address, cells, exc, out)
            continue
        if writes is not None:
            # Dispatcher._apply's writes, inlined
            for cell, value, data in writes:
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


def collect_puts(touched: list[Any], ops: list[Any], encode: Any) -> None:
    """Append the batch's state writes to ``ops``: a ``del`` op per deleted cell, then one
    ``putmulti`` op with every other changed cell's encoded value (distinct keys: one cell
    per key, and no other op of the batch writes a sync address's cell) and the bytes of
    its keys and values (what the store's write-back cache counts against its bound)."""
    puts: list[Any] = []
    size = 0
    for cells in touched:
        for cell in cells.values():
            if cell.dirty:
                if cell.data is None:
                    ops.append(("del", "state", cell.key))
                else:
                    value = encode(cell.vt, cell.data, cell.expire)
                    puts.append((cell.key, value))
                    size += len(cell.key) + len(value)
    if puts:
        ops.append(("putmulti", "state", puts, size))
