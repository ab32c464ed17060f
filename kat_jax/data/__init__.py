"""Prompts and benchmarks: the embedded arithmetic task (arith), the training prompt sources
(sources: arith, JSONL, reasoning-gym via gym, prepared TFDS datasets), evaluation benchmarks
(benchmarks: presets, JSONL, tfds, Hugging Face) and chat templates (chat)."""
