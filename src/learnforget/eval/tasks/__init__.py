"""Hooks that lm-eval task YAMLs written by `learnforget.eval.lmeval_tasks` reference with `!function`."""
