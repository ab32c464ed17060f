"""Prompt sources: the embedded arithmetic task and local JSONL files."""
