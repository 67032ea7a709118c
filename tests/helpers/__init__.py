"""What the tests share, one module per concern (test files import from here, never from each
other):

* `app`: the in-process harness, the app on the fake engine behind an httpx client, SSE parsing,
  OpenAI error checks, a raw ASGI exchange for disconnect timing;
* `server_process`: `python -m server serve` as a subprocess on loopback;
* `fake_engine`: a torch-free engine satisfying `server.engine_protocol.EngineProtocol`, and the
  `--engine-class` references to it;
* `api_cases`: route paths, message lists and the bad-request table the in-process and
  end-to-end API tests both run;
* `tiny_models`: tiny random checkpoints (and tokenizers) of each supported architecture;
* `imports`: what importing a module pulls in (a fresh interpreter, or its source);
* `k8s`: Kubernetes manifests against the API schema, argv options, the CLI's flags;
* `fake_tp_worker`: a protocol-speaking stand-in for a tensor-parallel worker process.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout's root
