"""Test and benchmark helpers that are not part of the engine (e.g. a local `vllm serve`)."""
