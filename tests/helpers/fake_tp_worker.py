"""A stand-in for `server.distributed.worker` that speaks the protocol and misbehaves on demand.

`TPLauncher(..., worker_module="tests.helpers.fake_tp_worker")` starts it instead of the real
worker (no torch: it starts in milliseconds). Its CONFIG's "behaviour" (rank -> behaviour,
default "ok") says what it does with each order after answering LOADED:

* "ok": answer every CAPTURE with CAPTURED (same sequence number), exit 0 on SHUTDOWN;
* "error": answer the first CAPTURE with ERROR, then exit 1;
* "silent": never answer a CAPTURE (and stay alive);
* "wrong_seq": answer a CAPTURE with a sequence number that is not the order's;
* "die": exit 7 on the first CAPTURE without a word.

It watches its lifeline like the real worker, so it exits when its rank 0 is gone.
"""

from __future__ import annotations

import argparse
import os
import sys

from server.distributed.protocol import Kind, PeerGone, frame_json, read_message, write_all
from server.distributed.worker import EXIT_RANK0_GONE, _watch_lifeline


def main() -> int:
    ap = argparse.ArgumentParser()
    for flag in ("--rank", "--control-fd", "--reply-fd", "--lifeline-fd"):
        ap.add_argument(flag, type=int, required=True)
    args = ap.parse_args()
    _watch_lifeline(args.lifeline_fd)
    control, reply = args.control_fd, args.reply_fd
    try:
        cfg = read_message(control).json()
        behaviour = cfg.get("behaviour", {}).get(str(args.rank), "ok")
        write_all(reply, frame_json(Kind.LOADED, 0, {"rank": args.rank, "num_blocks": 10}))
        while True:
            msg = read_message(control)
            if msg.kind == Kind.SHUTDOWN:
                return 0
            if msg.kind != Kind.CAPTURE:
                continue
            size = msg.json()["size"]
            if behaviour == "ok":
                write_all(reply, frame_json(Kind.CAPTURED, msg.seq, {"size": size, "ok": True}))
            elif behaviour == "error":
                write_all(reply, frame_json(Kind.ERROR, 0, {"message": "injected failure"}))
                return 1
            elif behaviour == "wrong_seq":
                write_all(reply, frame_json(Kind.CAPTURED, msg.seq + 5, {"size": size}))
            elif behaviour == "die":
                os._exit(7)
    except PeerGone:
        return EXIT_RANK0_GONE


if __name__ == "__main__":
    sys.exit(main())
