"""Every limit the wire layer enforces, named, with the reason beside it."""

from __future__ import annotations

# A frame carries one message. 1 MiB holds the largest default value (512 KiB) with room for a
# batch of small ones, and bounds what a peer can make us buffer before we have checked it.
# (Redis caps a bulk string at 512 MB and etcd a request at 1.5 MiB; we stay near etcd.)
MAX_FRAME_BYTES = 1024 * 1024

# The length prefix is a 4-byte big-endian unsigned integer.
FRAME_HEADER_BYTES = 4

# Nesting depth of a decoded CBOR item. Values are application data (maps of lists of ...);
# 32 levels inside a message envelope of 3 is generous and keeps recursive walks cheap and safe.
MAX_DEPTH = 32

# Items in one Batch message: bounds the work one frame can ask for.
MAX_BATCH_ITEMS = 4096

# The protocol versions this code speaks, newest first; negotiated at the handshake.
PROTOCOL_VERSIONS = (1,)
