"""What a stage hands the backend factories of `engine.backends`, for the tests that build
backends through them."""

from __future__ import annotations


def factory_settings(**sizes: object) -> dict:
    """The model settings a stage hands `lm_scorer`, `judge_backend` or `generator`: float32 on
    the CPU, eager vLLM, torch's own thread count; `sizes` adds the kind's sizes (`max_length`,
    `max_new_tokens`, `max_batch_prompts` or `max_batch_tokens`) and may change any setting."""
    return {
        "dtype": "float32",
        "trust_remote_code": False,
        "enforce_eager": True,
        "num_threads": None,
        "use_gpu": False,
        **sizes,
    }
