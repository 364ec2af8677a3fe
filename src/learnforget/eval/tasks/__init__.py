"""Hooks that lm-eval task YAMLs written by `learnforget.eval.task_yaml` reference with `!function`."""
