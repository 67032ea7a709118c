"""Benchmark scripts, run as modules from the checkout's root: `python -m bench.<script> ...`
(`bench.decode`, `bench.op_timing`, `bench.cold_start`, `bench.serve`, `bench.peers`,
`bench.make_checkpoint`); `bench.common` holds what they share. See docs/benchmarks.md."""
