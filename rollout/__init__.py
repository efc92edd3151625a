"""From a batch of prompts to an `Experience`, under torch.no_grad(): sampling, scoring, reference
log-probs and values."""

from rollout.experience import Experience, make_experience
from rollout.generation import Generation, SamplingConfig, generate
from rollout.scoring import RewardFunction, RewardModel, RunningMoments, Scorer, load_reward_function
from rollout.value_head import ActorCritic, ValueHead, load_value_head, save_value_head

__all__ = [
    "ActorCritic", "Experience", "Generation", "RewardFunction", "RewardModel", "RunningMoments",
    "SamplingConfig", "Scorer", "ValueHead", "generate", "load_reward_function", "load_value_head",
    "make_experience", "save_value_head",
]
