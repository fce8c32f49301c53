"""WebDataset shards: the writer (moco-shard), the reader, the source and the device decode of encoded bytes."""
