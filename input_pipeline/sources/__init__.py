"""Converters from real datasets to TFRecord shards (the logic behind tools/make_shards.py).

One module per source, each with `plan(...) -> shard_writer.Plan`; `shard_writer.write_plan`
writes any plan. Sources: emoji, openclipart, fashion_mnist, folder, tfds_source; `embedded`
builds the project's default data set in one call.
"""
