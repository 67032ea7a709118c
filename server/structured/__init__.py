"""Structured outputs and tool calling: grammars (llguidance) and tool-call formats.

* `grammar`: JSON schema / JSON object / tool-call grammars as llguidance grammar strings
  (built and validated on the event loop, cached), and the engine thread's handles to the
  per-sequence matchers that fill token bitmasks and advance on sampled tokens;
* `grammar_worker`: the process those matchers (and llguidance's tokenizer) live in.
* `tool_calls`: the tool-call formats of the template families we support (Hermes/Qwen,
  Llama 3.x JSON, Mistral), which one a chat template uses, the grammar that forces calls,
  and the incremental parser that turns output text into content and tool-call deltas.

Torch-free: the HTTP layer builds grammars, the grammar process runs matchers for the engine
thread; masks are numpy int32 bitmasks that the model runner applies to the logits on the
device.
"""
