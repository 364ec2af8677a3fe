"""Methods: finetuning methods (peft and the harness's own) and how they are applied."""
