"""State storage: the LMDB state backend (``lmdb_backend``), sole owner of the key layout,
value headers and the grow-and-retry write loop."""
