"""Batched sampling from the policy: left-padded prompts in, right-padded responses out.

Shapes: B batch, P prompt length (left padded), R response length (right padded), T = P + R, V vocabulary.

The decoding loop is written out over `past_key_values` instead of calling `model.generate`, for three
reasons: each row gets its own length budget (the response-length sampler), position ids follow the
attention mask exactly as they do in the training forward (so rollout and training log-probs agree on
left-padded prompts), and the loop stops as soon as every row has finished (or, given `finished`, as soon as
every row on every process has: see engine/distributed.py for why sharded weights need that).

`RolloutConfig` picks how the tokens are computed, not what is sampled: that loop over a growing
(`DynamicCache`) or preallocated (`StaticCache`, optionally with a compiled forward on CUDA) KV cache, or
transformers' continuous batching (paged attention, `generate_batch`), which schedules rows of different
lengths into one running batch instead of padding every micro-batch to its longest row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache, StaticCache

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "generate", "continuous")
# attention implementations continuous batching runs (transformers' switch_to_cb_friendly_attn)
_CB_ATTENTION = ("eager", "sdpa", "paged|eager")


@dataclass(frozen=True)
class RolloutConfig:
    """How responses are decoded (the `rollout:` section of a run config); what is sampled is SamplingConfig."""

    backend: str = "generate"
    """generate: the engine's decoding loop over a KV cache; continuous: transformers' continuous batching,
    falling back to generate (one log line) where it cannot apply; auto: continuous on CUDA, generate elsewhere
    (on the CPU generate is the faster, benchmarks/RESULTS.md)."""
    memory_fraction: float = 0.3
    """continuous: the largest share of the device's free memory its paged KV cache may take, so training
    still fits (transformers' max_memory_percent)."""
    static_cache: bool = False
    """generate: preallocate the KV cache for prompt + max_new_tokens (`StaticCache`) instead of growing it."""
    compile: bool = False
    """generate on CUDA: torch.compile the forward over a static KV cache (implies static_cache)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"rollout.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"rollout.memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class Decoding:
    """How each response is drawn; the fields a config names (`ppo:` holds them too). `temperature=0` decodes
    greedily."""

    max_new_tokens: int = 64
    """Upper bound of every response, in tokens (EOS included)."""
    min_new_tokens: int = 1
    """EOS is forbidden before this many tokens."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    response_length: tuple[int, int] | None = None
    """If set, each row's length budget is drawn uniformly from [low, high] (e.g. (32, 400)); None: max_new_tokens."""

    def __post_init__(self) -> None:
        # each message starts with the field's name, so a config section can prefix its own ("ppo.top_k ...")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be 1 or more, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                             f"{self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no top-k filter) or more, got {self.top_k}")
        if self.response_length is not None:
            low, high = self.response_length
            if not self.min_new_tokens <= low <= high <= self.max_new_tokens:
                raise ValueError(f"response_length {self.response_length} must lie within "
                                 f"[min_new_tokens, max_new_tokens] = [{self.min_new_tokens}, {self.max_new_tokens}]")


@dataclass(frozen=True)
class SamplingConfig(Decoding):
    """How responses are sampled, and how many rows at a time."""

    micro_batch_size: int = 8
    """Rows decoded together; bounds the KV-cache memory."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


@dataclass
class Generation:
    """The output of `generate`: prompts followed by their sampled responses."""

    sequences: torch.Tensor  # (B, T) long: prompt left-padded to P, then the response right-padded to R
    attention_mask: torch.Tensor  # (B, T) bool: real prompt tokens, and response tokens up to the first EOS
    action_mask: torch.Tensor  # (B, R) bool: response tokens the policy produced, first EOS included
    no_eos: torch.Tensor  # (B,) bool: the response stopped at its length budget without an EOS
    prompt_length: int  # P
    logprobs: torch.Tensor | None = None  # (B, R) float32, with `with_logprobs`: log-prob of each sampled
    #                                       token under logits / temperature; 0 outside action_mask
    values: torch.Tensor | None = None  # (B, R), with `value_head`: its value of the final hidden state each
    #                                     response token was chosen from; 0 outside action_mask

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) response token ids; pad after the first EOS."""
        return self.sequences[:, self.prompt_length:]

    @property
    def response_length(self) -> torch.Tensor:
        """(B,) number of response tokens, first EOS included."""
        return self.action_mask.sum(-1)


def concat_generations(parts: Sequence[Generation], pad_token_id: int) -> Generation:
    """The rows of several `Generation`s as one: prompts left-padded to the longest prompt, responses
    right-padded to the longest response (pad tokens, False masks, 0 log-probs and values)."""
    P = max(g.prompt_length for g in parts)
    R = max(g.action_mask.shape[1] for g in parts)

    def pad(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    def both(g: Generation, t: torch.Tensor, value) -> torch.Tensor:  # a (b, P_g + R_g) tensor
        prompt, response = t[:, :g.prompt_length], t[:, g.prompt_length:]
        return torch.cat([pad(prompt, P - g.prompt_length, 0, value),
                          pad(response, 0, R - response.shape[1], value)], 1)

    def kept(name: str) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([pad(getattr(g, name), 0, R - g.action_mask.shape[1], 0.0) for g in parts])

    return Generation(
        sequences=torch.cat([both(g, g.sequences, pad_token_id) for g in parts]),
        attention_mask=torch.cat([both(g, g.attention_mask, False) for g in parts]),
        action_mask=torch.cat([pad(g.action_mask, 0, R - g.action_mask.shape[1], False) for g in parts]),
        no_eos=torch.cat([g.no_eos for g in parts]),
        prompt_length=P,
        logprobs=kept("logprobs"),
        values=kept("values"),
    )


def eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The EOS ids as a list; a policy without one cannot end a response, so that is an error."""
    if eos_token_id is None or (not isinstance(eos_token_id, int) and len(eos_token_id) == 0):
        raise ValueError("the policy has no EOS token (tokenizer.eos_token_id is None): responses could "
                         "never end; set tokenizer.eos_token or generation_config.eos_token_id")
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def sample_response_lengths(cfg: SamplingConfig, batch_size: int, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """(B,) long: each row's length budget, fixed or drawn from `cfg.response_length`."""
    if cfg.response_length is None:
        return torch.full((batch_size,), cfg.max_new_tokens, dtype=torch.long)
    low, high = cfg.response_length
    return torch.randint(low, high + 1, (batch_size,), generator=generator)


def sample_next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Draw one token per row from (B, V) logits with temperature, top-k and top-p; returns (B,) long.

    Inverse-CDF sampling: one uniform number per row, placed on the cumulative probabilities (float64, so no
    token's share is lost to rounding). It draws from the same distribution as `torch.multinomial`, which on
    the CPU draws an exponential variate for every vocabulary entry: 9 ms of a 54 ms decoding step for 16
    rows at a 32k vocabulary, against well under 1 ms for 16 uniforms and a cumulative sum."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # a token is dropped when the tokens before it already reach top_p, so the first always stays
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return sample_from_probs(logits.softmax(-1), generator)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) long: one draw per row of (B, V) probabilities (each row's sum need not be exactly 1).

    Row b takes the first token whose cumulative probability reaches u_b x total, u_b uniform on (0, 1]:
    u_b > 0 means a token of probability 0 at the start of the row is never taken, and u_b x total is at
    most the last cumulative sum, so the index stays in range."""
    cdf = probs.double().cumsum(-1)
    if not ((cdf[:, -1] > 0) & cdf[:, -1].isfinite()).all():
        raise ValueError("cannot sample: a row of probabilities is NaN, infinite or all zero (NaN or inf "
                         "logits?)")
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def finished_locally(done: torch.Tensor) -> bool:
    """Stop decoding once every row of this process's (b,) bool `done` is True."""
    return bool(done.all())


@dataclass
class _Decoded:
    tokens: torch.Tensor  # (b, r) long
    logprobs: torch.Tensor | None  # (b, r) float32
    values: torch.Tensor | None  # (b, r)


@torch.no_grad()
def _decode(model, input_ids, attention_mask, budgets, cfg, eos, pad_token_id, generator, finished,
            with_logprobs: bool, value_head: Callable[[torch.Tensor], torch.Tensor] | None,
            rollout: RolloutConfig = RolloutConfig()) -> _Decoded:
    """Sample one micro-batch's responses; tokens (b, r), pad after a row finishes.

    The loop's bound is `cfg.max_new_tokens`, the same on every process, and it stops when `finished(done)`;
    a row past its EOS or budget keeps producing pad tokens while other rows (or processes) go on.
    `with_logprobs` keeps each sampled token's log-prob under logits / temperature (before top-k, top-p and
    the min_new_tokens EOS ban, as `rollout.logprobs.response_logprobs` computes it from a full forward);
    `value_head` maps the final hidden state each token was chosen from, (b, H), to its (b,) values.

    With `rollout.static_cache` the cache and the attention mask are allocated once for P + max_new_tokens
    columns (the mask's future columns 0 until their token exists), so every decoding step has the same
    shapes, which is what lets a compiled forward (`rollout.compile`, CUDA) replay without recompiling."""
    eos = torch.tensor(eos, device=input_ids.device)
    budgets = budgets.to(input_ids.device)
    batch, prompt_length = input_ids.shape
    position_ids = position_ids_from_mask(attention_mask.long())
    static = rollout.static_cache or _compiles(rollout, input_ids.device)
    if static:
        cache = StaticCache(config=model.config, max_cache_len=prompt_length + cfg.max_new_tokens)
        attention_mask = torch.cat([attention_mask.long(), attention_mask.new_zeros(batch, cfg.max_new_tokens,
                                                                                    dtype=torch.long)], 1)
        step_forward = torch.compile(model, dynamic=False) if _compiles(rollout, input_ids.device) else model
    else:
        cache, attention_mask, step_forward = DynamicCache(config=model.config), attention_mask.long(), model
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
                output_hidden_states=value_head is not None)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs, values = [], [], []
    for step in range(cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        if value_head is not None:
            values.append(value_head(out.hidden_states[-1][:, -1]))
        scaled = logits / cfg.temperature if cfg.temperature not in (0.0, 1.0) else logits
        if step < cfg.min_new_tokens:
            logits = logits.index_fill(1, eos, float("-inf"))
        token = sample_next_token(logits, cfg, generator).masked_fill(done, pad_token_id)
        if with_logprobs:
            logprobs.append(scaled.gather(1, token[:, None]).squeeze(1) - scaled.logsumexp(-1))
        tokens.append(token)
        done |= torch.isin(token, eos) | (step + 1 >= budgets)
        if finished(done):
            break
        if static:
            attention_mask[:, prompt_length + step] = 1
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], 1)
        position_ids = position_ids[:, -1:] + 1
        out = step_forward(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=True, output_hidden_states=value_head is not None)
    return _Decoded(torch.stack(tokens, 1), torch.stack(logprobs, 1) if with_logprobs else None,
                    torch.stack(values, 1) if value_head is not None else None)


def _compiles(rollout: RolloutConfig, device: torch.device) -> bool:
    """`rollout.compile` where it applies: CUDA only (on the CPU the compiled step has not paid for itself)."""
    if rollout.compile and device.type != "cuda":
        _log_once(f"rollout.compile applies on CUDA only; decoding on {device.type} uncompiled")
    return rollout.compile and device.type == "cuda"


_logged: set[str] = set()


def _log_once(message: str) -> None:
    """One log line per distinct message and process, not one per rollout."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def continuous_unavailable(model, finished: Callable[[torch.Tensor], bool]) -> str | None:
    """Why transformers' continuous batching cannot decode for `model` here, or None when it can."""
    if not hasattr(model, "generate_batch"):
        import transformers
        return f"transformers {transformers.__version__} has no continuous batching (generate_batch)"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "the policy has quantised weights"
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in _CB_ATTENTION and "flash" not in attention:
        return f"attention implementation {attention!r} is not one continuous batching runs"
    if finished is not finished_locally:
        return "processes must run the same number of forwards (sharded weights)"
    return None


def resolve_backend(rollout: RolloutConfig, model, finished: Callable[[torch.Tensor], bool]) -> str:
    """"generate" or "continuous": `rollout.backend` with auto resolved by device, and continuous turned back
    to generate (one log line) where it cannot apply."""
    backend = rollout.backend
    if backend == "auto":
        backend = "continuous" if model.device.type == "cuda" else "generate"
    if backend == "continuous":
        reason = continuous_unavailable(model, finished)
        if reason is not None:
            _log_once(f"rollout.backend=continuous cannot apply ({reason}); decoding with generate")
            return "generate"
    return backend


@torch.no_grad()
def _decode_continuous(model, input_ids, attention_mask, budgets, cfg: SamplingConfig, eos, pad_token_id,
                       generator, with_logprobs: bool, value_head, rollout: RolloutConfig) -> _Decoded | None:
    """Sample every row's response with transformers' continuous batching; None if it failed (logged).

    Continuous batching has no min_new_tokens ban (its MinNewTokensLength processor is unsupported), so the
    first min_new_tokens tokens come from `_decode`, EOS banned, and continuous batching goes on from
    prompt + those tokens, each row with its own remaining budget. Its sampling draws on the global torch RNG
    from a seed taken from `generator`; the global RNG state is restored afterwards. Its log-probs are those
    of the processed logits, so they equal logits / temperature's only without top-k or top-p; otherwise (and
    for a value head, which needs hidden states) one forward over the finished sequences supplies them."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    device, rows = input_ids.device, input_ids.shape[0]
    head = None
    if cfg.min_new_tokens > 0:
        first = replace(cfg, max_new_tokens=cfg.min_new_tokens, response_length=None)
        head = _decode(model, input_ids, attention_mask, budgets.clamp(max=cfg.min_new_tokens), first, eos,
                       pad_token_id, generator, finished_locally, with_logprobs, None)
    lengths = attention_mask.sum(-1).tolist()
    prompts = [input_ids[i, input_ids.shape[1] - n:].tolist() for i, n in enumerate(lengths)]
    if head is not None:
        prompts = [p + t for p, t in zip(prompts, head.tokens.tolist())]
    remaining = (budgets - cfg.min_new_tokens).tolist()
    cb_logprobs = with_logprobs and value_head is None and cfg.top_k == 0 and cfg.top_p == 1.0
    sampling = cfg.temperature > 0
    gen_config = GenerationConfig(do_sample=sampling, temperature=cfg.temperature if sampling else None,
                                  top_k=cfg.top_k or None if sampling else None,
                                  top_p=cfg.top_p if sampling and cfg.top_p < 1.0 else None,
                                  eos_token_id=eos, pad_token_id=pad_token_id, max_new_tokens=max(remaining + [1]))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item()
               if generator is not None else torch.randint(0, 2**31 - 1, (1,)).item())
    wanted = {f"row{i}": i for i in range(rows) if remaining[i] > 0}
    # Sized for this rollout (every row's blocks, and one prefill of every prompt per step) rather than for
    # memory_fraction of the free memory, which on the CPU is most of the RAM; memory_fraction still caps it.
    page = ContinuousBatchingConfig.page_size
    blocks = sum(-(-(len(prompts[i]) + remaining[i]) // page) for i in wanted.values())
    tokens_per_step = min(8192, sum(len(prompts[i]) for i in wanted.values()))
    results: dict[str, object] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for num_blocks in (blocks, None):
            cb_config = ContinuousBatchingConfig(max_memory_percent=rollout.memory_fraction, num_blocks=num_blocks,
                                                 max_batch_tokens=tokens_per_step, return_logprobs=cb_logprobs,
                                                 seed=seed)
            try:
                session = model.continuous_batching_context_manager(generation_config=gen_config,
                                                                    continuous_batching_config=cb_config)
                manager = session.__enter__()
            except MemoryError:  # every row at once does not fit under memory_fraction: let rows queue
                continue
            try:
                for request_id, i in wanted.items():
                    manager.add_request(input_ids=prompts[i], request_id=request_id, max_new_tokens=remaining[i],
                                        eos_token_id=eos)
                while len(results) < len(wanted):
                    result = manager.get_result(timeout=1)
                    if result is not None and result.is_finished():
                        results[result.request_id] = result
                    elif result is None and not manager.is_running():
                        break
            finally:
                session.__exit__(None, None, None)
            break
    failed = [k for k in wanted if k not in results or results[k].error is not None]
    if failed:
        error = next((results[k].error for k in failed if k in results), "the generation thread stopped")
        _log_once(f"continuous batching failed ({error}); decoding with generate")
        return None

    width = max([len(results[k].generated_tokens) for k in wanted] + [0])
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(rows, width)
    for request_id, i in wanted.items():
        out = results[request_id].generated_tokens[:remaining[i]]
        tokens[i, :len(out)] = torch.tensor(out, dtype=torch.long)
        if cb_logprobs:
            logprobs[i, :len(out)] = torch.tensor(results[request_id].logprobs[:len(out)])
    tokens, logprobs = tokens.to(device), logprobs.to(device)
    if head is not None:
        tokens = torch.cat([head.tokens, tokens], 1)
        if cb_logprobs:
            logprobs = torch.cat([head.logprobs, logprobs], 1)
    if (with_logprobs and not cb_logprobs) or value_head is not None:
        refreshed = _forward_logprobs(model, input_ids, attention_mask, tokens, cfg, value_head)
        return _Decoded(tokens, refreshed.logprobs if with_logprobs else None, refreshed.values)
    return _Decoded(tokens, logprobs if with_logprobs else None, None)


def _forward_logprobs(model, input_ids, attention_mask, tokens, cfg: SamplingConfig, value_head) -> _Decoded:
    """Log-probs under logits / temperature of `tokens` (b, r), and a value head's values, from one forward
    of each micro-batch of prompt + response (positions past a row's end do not affect earlier ones)."""
    logprobs, values = [], []
    for i in range(0, input_ids.shape[0], cfg.micro_batch_size):
        rows = slice(i, i + cfg.micro_batch_size)
        sequences = torch.cat([input_ids[rows], tokens[rows]], 1)
        mask = torch.cat([attention_mask[rows].long(), torch.ones_like(tokens[rows])], 1)
        out = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    logits_to_keep=tokens.shape[1] + 1, output_hidden_states=value_head is not None)
        logits = out.logits[:, :-1].float()
        if cfg.temperature not in (0.0, 1.0):
            logits = logits / cfg.temperature
        logprobs.append(logits.log_softmax(-1).gather(-1, tokens[rows, :, None]).squeeze(-1))
        if value_head is not None:
            values.append(value_head(out.hidden_states[-1][:, -tokens.shape[1] - 1:-1]))
    return _Decoded(tokens, torch.cat(logprobs), torch.cat(values) if value_head is not None else None)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplingConfig, *,
             eos_token_id: int | Sequence[int] | None, pad_token_id: int,
             generator: torch.Generator | None = None,
             finished: Callable[[torch.Tensor], bool] = finished_locally,
             with_logprobs: bool = False,
             value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
             rollout: RolloutConfig = RolloutConfig()) -> Generation:
    """Sample a response for each left-padded prompt, `cfg.micro_batch_size` rows at a time.

    `model` is the unwrapped causal LM (`accelerator.unwrap_model`, a peft model is fine). It runs in
    eval mode for the duration (no dropout while sampling) and is put back in its previous mode.

    Args:
        input_ids: (B, P) long, left padded.
        attention_mask: (B, P), 1 on real prompt tokens.
        eos_token_id: one id or several (chat models often end turns with their own token).
        finished: given the (b,) bool rows done so far, whether to stop decoding; under FSDP or ZeRO-3 pass
            `engine.distributed.finished_everywhere`, so every process runs the same number of forwards.
        with_logprobs: keep the sampled tokens' log-probs (`Generation.logprobs`) from the decoding pass.
        value_head: a value head on this model's final hidden state, (b, H) -> (b,): its values are kept
            (`Generation.values`). Both spare PPO a forward of the policy over the finished sequences; they
            equal a fresh forward's within 1e-5 in float32 (tested), where in bf16 the cached pass and a full
            forward round differently (see `ppo.rollout_logprobs`).
        rollout: the decoding backend and its options; continuous batching decodes the whole batch at once.
    Returns:
        Generation with sequences (B, P + R), R the longest response (or more under `finished`, in pad
        columns); every token after a row's first EOS is `pad_token_id` and outside `action_mask`.
    """
    eos = eos_ids(eos_token_id)
    batch_size, prompt_length = input_ids.shape
    if attention_mask[:, -1].eq(0).any():
        raise ValueError("prompts must be left padded (the last prompt column holds a pad token)")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest_prompt = int(attention_mask.sum(-1).max())
    if limit is not None and longest_prompt + cfg.max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest_prompt} tokens plus max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the policy's {limit} positions; lower data.max_prompt_length or max_new_tokens")
    budgets = sample_response_lengths(cfg, batch_size, generator)

    was_training = model.training
    model.eval()
    try:
        chunks = None
        if resolve_backend(rollout, model, finished) == "continuous":
            decoded = _decode_continuous(model, input_ids, attention_mask, budgets, cfg, eos, pad_token_id,
                                         generator, with_logprobs, value_head, rollout)
            chunks = None if decoded is None else [decoded]
        if chunks is None:
            chunks = [_decode(model, input_ids[i:i + cfg.micro_batch_size], attention_mask[i:i + cfg.micro_batch_size],
                              budgets[i:i + cfg.micro_batch_size], cfg, eos, pad_token_id, generator, finished,
                              with_logprobs, value_head, rollout)
                      for i in range(0, batch_size, cfg.micro_batch_size)]
    finally:
        model.train(was_training)

    width = max(chunk.tokens.shape[1] for chunk in chunks)

    def columns(parts: list[torch.Tensor], value) -> torch.Tensor:
        """The chunks' (b, r) tensors padded to `width` response columns and stacked."""
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in parts])

    responses = columns([c.tokens for c in chunks], pad_token_id)
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
    # a token is an action if no EOS came strictly before it, and it lies within the row's budget
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    in_budget = torch.arange(width, device=responses.device) < budgets.to(responses.device)[:, None]
    action_mask = ~eos_before & in_budget

    def kept(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if parts[0] is None else columns(parts, 0.0).masked_fill(~action_mask, 0.0)

    return Generation(
        sequences=torch.cat([input_ids, responses], 1),
        attention_mask=torch.cat([attention_mask.bool(), action_mask], 1),
        action_mask=action_mask,
        no_eos=~(is_eos & action_mask).any(-1),
        prompt_length=prompt_length,
        logprobs=kept([c.logprobs for c in chunks]),
        values=kept([c.values for c in chunks]),
    )
