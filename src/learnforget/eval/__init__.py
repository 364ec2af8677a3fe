"""Eval: the eval stage: lm-eval tasks and backends, sandboxed code, drift, paired statistics."""
