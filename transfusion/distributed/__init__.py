"""Data parallelism applied to a single-device model (import the submodules):

- ``env``: process group, device and the (dp_replicate x dp_shard) mesh; collective helpers
- ``parallelize``: the fixed order activation checkpointing -> torch.compile -> FSDP2 / HSDP
- ``init``: meta-device materialisation with weights independent of sharding and world size
- ``data``: the data stream split into world-size-independent consumers
"""
