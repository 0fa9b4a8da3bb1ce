"""Parallelism: the device mesh and batch sharding, FSDP rules, multi-process start-up, the
process's memory allocator."""
