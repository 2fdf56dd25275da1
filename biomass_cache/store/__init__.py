"""The token store: the Zarr layout, the handle on an open store, direct shard reads, dtypes, the writer lock, the
fingerprint of what determines the tokens, verification and the derived (reduced) store."""
