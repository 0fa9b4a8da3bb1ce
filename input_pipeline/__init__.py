"""Host-side input pipeline: TFRecord shards to batches of numpy arrays."""
