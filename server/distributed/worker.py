"""A tensor-parallel worker: rank r >= 1 of the group, started by rank 0's `TPLauncher`.

    python -m server.distributed.worker --rank R --control-fd F --reply-fd F --lifeline-fd F

The process owns GPU r (or a share of the CPU) and does only what rank 0's stream says, in
order (`server.distributed.protocol`):

1. `CONFIG`: load this rank's shard of the checkpoint (`model_loader.load_shard`), plan the
   KV cache this GPU holds, answer `LOADED` with the block count it fits;
2. `SETUP`: join the process group (rendezvous with a deadline), allocate the agreed KV cache
   and block table, answer `READY`;
3. then `STEP` (run the plan with `server.step_executor`, then receive rank 0's sampled tokens
   in the broadcast every sampling step ends with: the next step's carried inputs), `WARM`
   (an eager warm-up run), `CAPTURE` (capture that decode size or, with "mixed", that
   mixed-step bucket; answer `CAPTURED` with the result, failure included), until `SHUTDOWN`.

A worker samples nothing and has no scheduler, policy or tokenizer: rank 0 decides every
step, every graph size and every capture, so the ranks cannot disagree about them. Any error
is reported (`ERROR`) and ends the process non-zero; rank 0 then fails the server. When rank 0
dies, the lifeline pipe reaches end-of-file and the worker exits at once (a thread watches it).

Test seam: `GRAPHSERVE_TP_TEST_FAULT` makes workers fail on purpose: `load` (the load raises),
`capture:S` (capturing size S fails), `exit_at_step:K` (the process dies at its K-th step).

Thread ownership: the main thread runs everything below; the lifeline thread only exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from server.distributed.protocol import Kind, PeerGone, frame_json, read_message, write_all
from server.gc_control import freeze_startup_heap, pause_until_ready
from server.logging_setup import setup_logging

log = logging.getLogger("graphserve.tp.worker")

EXIT_RANK0_GONE = 3  # rank 0 closed the stream or died: nothing left to serve


def _watch_lifeline(fd: int) -> None:
    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        # Rank 0 is gone; a collective we may be blocked in will never complete.
        os._exit(EXIT_RANK0_GONE)

    threading.Thread(target=watch, name="graphserve-tp-lifeline", daemon=True).start()


class _Faults:
    """`GRAPHSERVE_TP_TEST_FAULT` parsed once (test seam; see the module docstring)."""

    def __init__(self, spec: str):
        kind, _, arg = spec.partition(":")
        self.load = kind == "load"
        self.capture_size = int(arg) if kind == "capture" else None
        self.exit_at_step = int(arg) if kind == "exit_at_step" else None


class Worker:
    """One rank's model, KV cache and graphs, driven by rank 0's messages."""

    def __init__(self, rank: int, control: int, reply: int):
        self.rank = rank
        self.control = control
        self.reply = reply
        self.faults = _Faults(os.environ.get("GRAPHSERVE_TP_TEST_FAULT", ""))

    def _answer(self, kind: Kind, seq: int, obj) -> None:
        write_all(self.reply, frame_json(kind, seq, obj))

    def run(self, cfg: dict) -> None:
        from server.torch_import import defer_unused

        defer_unused()  # as on rank 0: before torch's first import in this process
        import torch

        from server import ops
        from server.config import EngineConfig
        from server.distributed.comm import destroy_group, init_group, share_cpu_threads
        from server.distributed.sharding import TPShard
        from server.kv_cache import plan_kv_cache
        from server.mixed_graph_policy import MixedGraphPolicy
        from server.model_loader import load_shard
        from server.step_executor import StepExecutor
        from server.step_plan import StepPlan

        config = EngineConfig(**cfg["engine"])
        world = cfg["world"]
        # Rank 0's rule, on the same host: the same answer.
        cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda", self.rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            torch.backends.cuda.enable_cudnn_sdp(False)  # as rank 0 (model_runner.load)
        else:
            share_cpu_threads(world)
        if self.faults.load:
            raise RuntimeError("injected load fault (GRAPHSERVE_TP_TEST_FAULT=load)")
        model, hf_config = load_shard(
            cfg["model_path"], device.type, config.dtype, config.load_format,
            TPShard(self.rank, world),
        )  # fmt: skip
        max_num_seqs = config.max_num_seqs_for(device.type)
        batched = config.max_num_batched_tokens_for(device.type)
        # Rank 0's mixed-step buckets on CUDA (`server.mixed_graph_policy`): their pool too.
        mixed = MixedGraphPolicy.from_config(
            config, max_num_seqs, config.decode_prefill_tokens_for(device.type), batched,
            None if cuda else "no CUDA device",
        ).max_tokens  # fmt: skip
        plan = plan_kv_cache(
            config, hf_config, model.dtype, device, max_num_seqs, batched, model.weight_bytes,
            world, mixed,
        )  # fmt: skip
        self._answer(Kind.LOADED, 0, {
            "weight_bytes": model.weight_bytes, "num_blocks": plan.num_blocks,
            "max_model_len": plan.max_model_len,
        })  # fmt: skip

        setup = read_message(self.control)
        if setup.kind != Kind.SETUP:
            raise RuntimeError(f"expected SETUP, got {setup!r}")
        s = setup.json()
        comm = init_group(self.rank, world, device, config.tp_timeout_s, port=s["store_port"])
        if s["tp_allreduce"] == "symm-mem":  # rank 0's choice, right after joining (collective)
            comm.enable_symm_mem(max_num_seqs, model.shape.hidden_size, model.dtype, device,
                                 config.tp_timeout_s)  # fmt: skip
        model.attach_comm(comm)
        model.init_rope(s["max_model_len"])
        ops.use_triton(cuda)
        executor = StepExecutor.build(
            model, s["num_blocks"], config.block_size, s["max_model_len"], max_num_seqs,
            emulate=s["emulate_graphs"], tensor_parallel=True, mixed_tokens=s["mixed_tokens"],
        )  # fmt: skip
        graphs = executor.graphs
        if self.faults.capture_size is not None:
            graphs.fault_injector = self._capture_fault
        self._answer(Kind.READY, setup.seq, {"device": graphs.device_info()})
        log.info("rank %d ready: %.2f GB of weights, %d KV blocks", self.rank,
                 model.weight_bytes / 1e9, s["num_blocks"])
        # A full collection here stalls every rank's collectives (server.gc_control).
        freeze_startup_heap()

        prev_tokens = None
        steps = 0
        while True:
            msg = read_message(self.control)
            if msg.kind == Kind.STEP:
                steps += 1
                if steps == self.faults.exit_at_step:
                    log.error("injected exit at step %d (GRAPHSERVE_TP_TEST_FAULT)", steps)
                    os._exit(9)
                step = StepPlan.decode(msg.payload)
                executor.execute(step, prev_tokens)
                prev_tokens = None
                if step.num_sampled:
                    # Rank 0 sampled these from the same logits; the next step may carry them.
                    prev_tokens = torch.empty(step.num_sampled, dtype=torch.int64, device=device)
                    comm.broadcast_from_rank0(prev_tokens)
            elif msg.kind == Kind.WARM:
                order = msg.json()
                if "gemm_rows" in order:  # `ModelRunner._warm_gemm_rows`
                    for n in order["gemm_rows"]:
                        model.warm_gemms(n, order["logits_rows"])
                else:
                    graphs.warm(order["n"])
            elif msg.kind == Kind.CAPTURE:
                order = msg.json()
                if order.get("mixed"):
                    result = executor.mixed.capture(order["size"])
                else:
                    result = graphs.capture(order["size"])
                self._answer(Kind.CAPTURED, msg.seq, result.to_json())
            elif msg.kind == Kind.SHUTDOWN:
                log.info("rank %d shutting down", self.rank)
                destroy_group()  # with rank 0, which leaves the group at the same time
                return
            else:
                raise RuntimeError(f"unexpected message {msg!r}")

    def _capture_fault(self, size: int) -> None:
        if size == self.faults.capture_size:
            raise RuntimeError(f"injected capture fault for size {size} on rank {self.rank}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.distributed.worker")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--reply-fd", type=int, required=True)
    ap.add_argument("--lifeline-fd", type=int, required=True)
    args = ap.parse_args(argv)
    pause_until_ready()  # until `freeze_startup_heap` at READY (server.gc_control)
    # Rank 0 decides when the group stops (after draining); a terminal's Ctrl-C is its to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_lifeline(args.lifeline_fd)
    worker = Worker(args.rank, args.control_fd, args.reply_fd)
    try:
        first = read_message(args.control_fd)
        if first.kind != Kind.CONFIG:
            raise RuntimeError(f"expected CONFIG, got {first!r}")
        cfg = first.json()
        setup_logging(cfg.get("log_format", "text"), cfg.get("log_level", "info"))
        worker.run(cfg)
    except PeerGone:
        return EXIT_RANK0_GONE
    except BaseException as exc:  # report, then exit non-zero: rank 0 fails the server
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]
        log.error("rank %d failed: %s", args.rank, message, exc_info=True)
        try:
            write_all(args.reply_fd, frame_json(Kind.ERROR, 0, {"message": message}))
        except (PeerGone, OSError):
            pass
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: process-group and CUDA destructors could wait on peers that
    # have already gone; everything worth keeping has been said.
    os._exit(code)
