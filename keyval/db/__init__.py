"""The durable store behind the `keyval db` daemon.

- `backend`: the small `Backend` interface every store implements, and `open_backend(url)`.
- `sql`: the SQL both stores share; `sqlite` and `postgres`: the two stores.
- `fences`: the newest (term, epoch) seen per slot.
- `committer`: group commit (batches closed by op count or by time).
- `service`: the request handlers (fencing, op ids, term, map, grant key) over a backend.
"""
