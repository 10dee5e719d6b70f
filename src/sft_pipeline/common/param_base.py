"""What every parameter section shares: the strict base model and the bounds of counts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Bounds of numbers (README, Configuration, lists them). Every float must be finite (`.inf`,
# `.nan` are refused by `allow_inf_nan=False`), and every count fits a signed 32-bit integer:
# a YAML `1e30` where a count belongs is a typo, not a plan, and would fail deep in a library.
# Seeds go to numpy, whose seeds are 32-bit unsigned integers.
SEED_MAX = 2**32 - 1
COUNT_MAX = 2**31 - 1


class _Section(BaseModel):
    # extra="forbid": an unknown key is almost always a typo (`learning_rte`), never intended.
    # allow_inf_nan=False: `.inf` or `.nan` in a float parameter is refused with its key path.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
