"""Intrinsic-dimension finetuning: SAID and DID (learnforget.methods.said.model) through a
Fastfood projection (learnforget.methods.said.fastfood)."""
