"""Tensor parallelism across the GPUs of one host: one process per GPU, rank 0 in charge.

* `sharding`: which slice of each weight a rank holds (`TPShard`) and how it is read.
* `comm`: the collectives the sharded forward issues (all-reduce, logits gather, the sampled
  tokens' broadcast) over `torch.distributed` (NCCL on CUDA, gloo on CPU).
* `protocol`: rank 0's messages to the workers (one step plan per step, capture orders,
  shutdown) and the workers' replies, framed over pipes.
* `launcher`: rank 0's side: starts the workers, watches that they live, and runs every
  agreement (load, setup, capture) with a deadline.
* `worker`: the worker process (`python -m server.distributed.worker`): loads its shard and
  runs what rank 0 sends, in order.
* `report`: the `tensor_parallel` section of /health/graphs (each rank's captures).

Importing the package imports nothing heavy; `sharding`, `comm` and `worker` import torch,
`protocol`, `launcher` and `report` do not.
"""
