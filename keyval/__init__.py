"""keyval: a hash-slot sharded, in-memory, transactional key-value cluster."""
