"""learnforget: does parameter-efficient finetuning learn less and forget less?"""

__version__ = "0.1.0"
