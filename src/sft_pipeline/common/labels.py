"""The label rule's constants: positions whose label is `IGNORE_INDEX` are not supervised, and
`LOSS_WEIGHTS` names the optional column of per-token loss weights aligned with the labels.

Tokenization writes them (`labels`; `loss_weights` only for data that weights turns); the
trainer's collator, packing and loss and the evaluation's loss read them. -100 is the value
`torch.nn.functional.cross_entropy` ignores by default and the one every Hugging Face model and
TRL use.
"""

IGNORE_INDEX = -100
LOSS_WEIGHTS = "loss_weights"
