"""Data: datasets, tokenization, packing, instruction masks and token shards."""
