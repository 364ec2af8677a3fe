"""Hooks that lm-eval task YAMLs written by `learnforget.lmeval_tasks` reference with `!function`."""
