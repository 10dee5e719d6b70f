"""The label rule's one constant: positions whose label is `IGNORE_INDEX` are not supervised.

Tokenization writes it into the `labels` column; the trainer's collator, packing and loss and the
evaluation's loss read it. -100 is the value `torch.nn.functional.cross_entropy` ignores by
default and the one every Hugging Face model and TRL use.
"""

IGNORE_INDEX = -100
