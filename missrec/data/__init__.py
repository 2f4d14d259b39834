"""Data: atomic files, synthetic catalogue, shards, batching."""
