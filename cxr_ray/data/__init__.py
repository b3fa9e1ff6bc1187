"""Data: NIH metadata, cohorts, the embedded synthetic set, decoding, augmentation, shards."""
