"""What each objective family (losses.registry.FAMILIES: the call convention of its loss) is to the engine, in
one table: the data it reads, whether its tokenizer's pad may be EOS, the model it trains, how many sequences
one example is, whether it samples its own data (the online loop and its `ppo:` section), and whether dropout is
off by default. The start-up checks, the memory estimate and the model loader read these facts instead of
testing family names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    data: str
    """The data family it reads: "sft", "preference" or "prompt" (data.build_datasets)."""
    pad_may_be_eos: bool
    """False where a score is read at the last non-pad token (reward models, the online loop's rewards), so a
    pad token equal to EOS would put the score before the EOS."""
    model: str
    """"causal" (a policy) or "reward" (a sequence-classification model with a scalar head)."""
    sequences_per_example: int
    """Rows one example is in a batch: 2 for a pair (chosen and rejected), else 1."""
    online: bool
    """Samples its own responses (engine/loops/ppo.py): the `ppo:` section, a reward, generation."""
    dropout_free: bool
    """Dropout off unless `model.disable_dropout` says otherwise: where a log-ratio of two forwards is the
    signal (the pairwise objectives against a reference, the online ratio to the rollout policy)."""


FAMILIES = {
    "sft": Family(data="sft", pad_may_be_eos=True, model="causal", sequences_per_example=1, online=False,
                  dropout_free=False),
    "reward": Family(data="preference", pad_may_be_eos=False, model="reward", sequences_per_example=2,
                     online=False, dropout_free=False),
    "pairwise": Family(data="preference", pad_may_be_eos=True, model="causal", sequences_per_example=2,
                       online=False, dropout_free=True),
    "ppo": Family(data="prompt", pad_may_be_eos=False, model="causal", sequences_per_example=1, online=True,
                  dropout_free=True),
}
