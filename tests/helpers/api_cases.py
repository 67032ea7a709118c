"""Requests the API tests share: the two generation routes, a minimal conversation, and the
bad-request table that the in-process tests (fake engine) and the end-to-end tests (real engine
on the default model) both run."""

from __future__ import annotations

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
USER_HI = [{"role": "user", "content": "hi"}]

# Rows sized for the fake engine's 256-token context; the end-to-end tests swap the rows that
# depend on the fake's tokenizer, template or context (see FAKE_ONLY there).
BAD_REQUESTS = [
    # (id, path, body (dict or raw bytes), status, param)
    ("malformed-json", COMPL, b'{"prompt": "x", ', 400, None),
    ("not-an-object", COMPL, b"[1, 2]", 400, None),
    ("missing-prompt", COMPL, {"max_tokens": 3}, 400, "prompt"),
    ("missing-messages", CHAT, {"model": "fake-model"}, 400, "messages"),
    ("max-tokens-wrong-type", COMPL, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("stream-wrong-type", CHAT, {"messages": USER_HI, "stream": "yes"}, 400, "stream"),
    ("prompt-wrong-type", COMPL, {"prompt": 5}, 400, "prompt"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages.0"),
    ("user-content-null", CHAT, {"messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content"),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages.0.content.0.type"),
    ("template-rejects", CHAT, {"messages": [{"role": "user", "content": "a"},
                                             {"role": "system", "content": "b"}]}, 400,
     "messages"),
    ("prompt-too-long", COMPL, {"prompt": "x" * 300}, 400, "prompt"),
    ("chat-prompt-too-long", CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, 400,
     "messages"),
    ("max-tokens-zero", COMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, {"messages": USER_HI, "max_tokens": -1}, 400, "max_tokens"),
    ("beyond-context", COMPL, {"prompt": "x", "max_tokens": 255}, 400, "max_tokens"),
    ("chat-beyond-context", CHAT, {"messages": USER_HI, "max_completion_tokens": 10**9}, 400,
     "max_completion_tokens"),
    ("temperature-negative", COMPL, {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("temperature-above-2", CHAT, {"messages": USER_HI, "temperature": 2.5}, 400,
     "temperature"),
    ("top-p-zero", COMPL, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-p-above-1", CHAT, {"messages": USER_HI, "top_p": 1.01}, 400, "top_p"),
    ("top-k-below-minus-1", COMPL, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("n-2", CHAT, {"messages": USER_HI, "n": 2}, 400, "n"),
    ("batched-prompts", COMPL, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("empty-token-list", COMPL, {"prompt": []}, 400, "prompt"),
    ("token-outside-vocab", COMPL, {"prompt": [1, 99999]}, 400, "prompt"),
    ("negative-token", COMPL, {"prompt": [-1]}, 400, None),
    ("empty-stop-string", COMPL, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("stop-token-outside-vocab", COMPL, {"prompt": "x", "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("seed-too-large", COMPL, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("lone-surrogate", COMPL, b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("nan-temperature", COMPL, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("logprobs", CHAT, {"messages": USER_HI, "logprobs": True}, 400, "logprobs"),
    ("tools", CHAT, {"messages": USER_HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ("echo", COMPL, {"prompt": "x", "echo": True}, 400, "echo"),
    ("stream-options-without-stream", CHAT, {"messages": USER_HI,
                                             "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("presence-penalty", CHAT, {"messages": USER_HI, "presence_penalty": 0.5}, 400,
     "presence_penalty"),
]
