"""Train: the train stage: loop, optimizers, precision, distributed, resume, memory."""
