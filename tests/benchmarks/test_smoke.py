"""The benchmark harness on the tiny model: the FLOP count by hand, and the table and JSON of a real run have
every field with sane values. Timings are never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import run as bench_run
from benchmarks.harness import FlopCounter, ModelShape, StepClock, head_positions


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_model_shape_counts_the_matmuls_of_the_layers_and_the_head():
    """Per layer: q 16x16, k 16x8, v 16x8, o 16x16 = 768; gate, up, down 3 x 16x32 = 1536; so 2304.
    Two layers: 4608. Head 16 x 50 = 800. Embeddings and norms are no matmul and do not count."""
    shape = ModelShape.of(tiny_llama())
    assert (shape.body, shape.head, shape.layers, shape.width) == (4608, 800, 2, 16)


def test_flops_of_a_training_and_a_frozen_forward_by_hand():
    """Two rows of 4 and 2 real tokens (right padding). Forward: 2 x 4608 x 6 tokens + 2 x 800 x 6 head
    positions + 4 x 2 layers x 16 x (4^2 + 2^2) attention = 55296 + 9600 + 2560 = 67456 FLOPs. With
    gradients it counts 3 x that; under no_grad once, as a frozen (reference) forward."""
    model = tiny_llama()
    counter = FlopCounter()
    counter.watch(model)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert (counter.train_tokens, counter.frozen_tokens, counter.flops) == (6, 0, 3 * 67456)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert (counter.train_tokens, counter.frozen_tokens, counter.flops) == (6, 6, 4 * 67456)


def test_the_lm_head_counts_only_at_the_positions_where_it_ran():
    """A boolean `logits_to_keep` keeping 3 of the 6 real positions returns (3, 50) logits: the head counts
    2 x 800 x 3 instead of 2 x 800 x 6, so the forward is 55296 + 4800 + 2560 = 62656 FLOPs."""
    model = tiny_llama().eval()
    counter = FlopCounter()
    counter.watch(model)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    keep = torch.tensor([[False, True, True, False], [True, False, False, False]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    assert logits.shape == (3, 50)
    assert (counter.flops, counter.head_positions) == (62656, 3)


def test_head_positions_of_fused_heads_and_classifiers():
    """TRL's fused LM head returns no logits but a `label_mask`: on CPU it scores every position (all 6 real
    tokens count), on CUDA only the labelled ones. A classifier's score head runs at every position."""
    real = 6
    label_mask = torch.tensor([[False, True, True], [True, False, False]])
    fused = SimpleNamespace(log_probs=torch.zeros(2, 3), label_mask=label_mask)
    assert head_positions(fused, real, vocab_head=True) == 6
    if torch.cuda.is_available():
        on_gpu = SimpleNamespace(log_probs=torch.zeros(2, 3), label_mask=label_mask.cuda())
        assert head_positions(on_gpu, real, vocab_head=True) == 3
    full = SimpleNamespace(logits=torch.zeros(2, 4, 50))  # 8 positions, 2 of them padding
    assert head_positions(full, real, vocab_head=True) == 6
    pooled = SimpleNamespace(logits=torch.zeros(2, 1))  # a reward model's (B, 1) scores
    assert head_positions(pooled, real, vocab_head=False) == 6
    assert ModelShape.of(tiny_llama()).vocab_head


def test_a_shared_prompt_row_counts_its_prompt_once():
    """One pair as one row [p0 p1 c0 r0 pad]: prompt of 2, chosen and rejected responses of 1 token each. The
    (1, 1, 5, 5) mask is causal except that r0 does not see c0, and the padding sees itself only. Real: 4.
    Allowed pairs among them: 1 + 2 + 3 + 3 = 9, so the context is 2 x 9 - 4 = 14 = 3^2 + 3^2 - 2^2 (the two
    sequences of 3 tokens, their shared prompt's 2^2 once). Forward: 2 x 4608 x 4 + 2 x 800 x 4 + 4 x 2 x 16
    x 14 = 36864 + 6400 + 1792 = 45056 FLOPs."""
    query, key = torch.arange(5)[:, None], torch.arange(5)[None, :]
    real = (query < 4) & (key < 4)
    allowed = ((key <= query) & real & ~((query == 3) & (key == 2))) | ((query == key) & ~real)
    model = tiny_llama().eval()
    counter = FlopCounter()
    counter.watch(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 0]]), attention_mask=allowed[None, None],
              position_ids=torch.tensor([[0, 1, 2, 2, 0]]))
    assert (counter.frozen_tokens, counter.flops) == (4, 45056)


def test_packed_rows_count_attention_per_sequence():
    """One packed row of sequences of 3 and 2 tokens (position ids restart): attention 4 x 2 x 16 x (9 + 4)."""
    model = tiny_llama().eval()
    counter = FlopCounter()
    counter.watch(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert counter.flops == 2 * 4608 * 5 + 2 * 800 * 5 + 4 * 2 * 16 * 13


def test_the_clock_drops_warmup_steps_and_reports_medians():
    counter = FlopCounter()
    clock = StepClock(counter, warmup=1, rows_per_step=4)
    for step in range(4):
        counter.train_tokens += 10
        counter.flops += 100.0
        clock.tick(**{"time/generation": float(step)})
    summary = clock.summary(peak_flops=1e9)
    assert summary["steps"] == 3
    assert summary["train_tokens_per_step"] == 10 and summary["flops_per_step"] == 100.0
    assert summary["time/generation"] == 2.0  # median of 1, 2, 3
    assert summary["peak_rss_mib"] >= summary["rss_at_start_mib"] > 0


def run_in_process(out, *argv: str) -> tuple[dict, dict]:
    """`python -m benchmarks.run ARGV --json OUT` with every measurement in this process."""
    spawn = bench_run.spawn
    bench_run.spawn = lambda runner, objective, size, threads, overrides=(), steps=None, device="cpu", \
        precision="fp32": bench_run.measure_one(runner, objective, size, threads, overrides, steps, device, precision)
    try:
        payload = bench_run.main([*argv, "--json", str(out)])
    finally:
        bench_run.spawn = spawn
    return payload, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m benchmarks.run --size tiny --objectives sft dpo ppo --steps 1`, measured in this process."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    return run_in_process(out, "--size", "tiny", "--objectives", "sft", "dpo", "ppo", "--steps", "1")


def test_the_json_has_every_field_with_sane_values(tiny_run):
    _, saved = tiny_run
    assert saved["size"] == "tiny" and saved["machine"]["cores"] >= 1 and saved["machine"]["versions"]["torch"]
    assert saved["matmul_peak_gflops"] > 0
    rows = {row["objective"]: row for row in saved["rows"]}
    assert set(rows) == {"sft", "dpo", "ppo"}
    for objective, row in rows.items():
        engine = row["engine"]
        assert engine["repeats"] == 1 and "errors" not in engine
        for key in ("samples_per_s", "tokens_per_s", "step_seconds", "peak_rss_mib", "flops_per_step"):
            assert math.isfinite(engine[key]) and engine[key] > 0, (objective, key)
        assert 0 < engine["mfu"] < 1, objective
        assert engine["train_tokens_per_step"] > 0
        # each measurement records whether its process had the malloc tuning engine/train.py applies
        # (in this process, the call is a repeat and gives the same answer)
        from engine.hostmem import keep_freed_memory
        assert row["runs"]["engine"][0]["malloc_tuning"] is keep_freed_memory()


def test_the_reference_sees_the_same_tokens_as_the_policy(tiny_run):
    """DPO against a frozen copy: one policy pass with gradients and one reference pass over the same batch."""
    _, saved = tiny_run
    dpo = next(row for row in saved["rows"] if row["objective"] == "dpo")["runs"]["engine"][0]
    assert dpo["frozen_tokens_per_step"] == dpo["train_tokens_per_step"] > 0
    sft = next(row for row in saved["rows"] if row["objective"] == "sft")["runs"]["engine"][0]
    assert sft["frozen_tokens_per_step"] == 0


def test_ppo_reports_its_phases(tiny_run):
    _, saved = tiny_run
    ppo = next(row for row in saved["rows"] if row["objective"] == "ppo")["engine"]
    for key in ("time/generation", "time/scoring", "time/experience", "time/training"):
        assert ppo[key] > 0, key
    assert sum(ppo[k] for k in ("time/generation", "time/scoring", "time/experience", "time/training")) \
        <= ppo["step_seconds"] * 1.5
    assert ppo["generation_tokens_per_s"] > 0


def test_the_table_names_every_row(tiny_run):
    payload, _ = tiny_run
    text = bench_run.format_table(payload)
    header = next(line for line in text.splitlines() if line.startswith("| objective"))
    for column in ("samples/s", "tokens/s", "peak RSS MiB", "MFU", "gen tok/s"):
        assert column in header
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 3


def test_the_long_rows_size_reads_its_own_file_of_long_rows(tmp_path, monkeypatch):
    from benchmarks import workloads
    from benchmarks.workloads import SIZES, engine_args

    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(workloads, "model_dir", lambda size, kind: tmp_path / f"{size}-{kind}")  # no build
    args = engine_args("dpo", "small-long", tmp_path / "out")
    data = dict(a.split("=", 1) for a in args[2:] if a.startswith("data."))
    assert data["data.max_length"] == "512" and "data.synthetic_size" not in data
    rows = [json.loads(line) for line in open(data["data.path"])]
    assert len(rows) == SIZES["small-long"].synthetic_size and set(rows[0]) == {"prompt", "chosen", "rejected"}
    low, high = SIZES["small-long"].letters
    assert all(low <= len(r["chosen"].split()) <= high for r in rows)


def test_rollout_bytes_count_weights_per_step_and_each_rows_kv_context():
    """Two rows, prompts of 3 and 1 tokens, responses of 2 and 4: the longest decodes 4 steps, so the weights
    are read 4 times; the KV contexts read are 3 + 4 (row 0) and 1 + 2 + 3 + 4 (row 1), 17 tokens."""
    from benchmarks.decoding import rollout_bytes
    from rollout.generation import Generation
    from tests.rollout.conftest import tiny_causal_lm

    model = tiny_causal_lm()  # float32, untied: 2 layers, 2 KV heads of 8 dims
    action = torch.tensor([[True, True, False, False], [True, True, True, True]])
    prompt = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]).bool()
    gen = Generation(sequences=torch.zeros(2, 8, dtype=torch.long), attention_mask=torch.cat([prompt, action], 1),
                     action_mask=action, no_eos=torch.ones(2, dtype=torch.bool), prompt_length=4)
    weights = (sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()) * 4
    kv_per_token = 2 * 2 * 2 * 8 * 4
    assert rollout_bytes(model, gen) == 4 * weights + 17 * kv_per_token


def test_decoding_benchmark_times_every_backend_against_the_copy_bandwidth(monkeypatch):
    from benchmarks import decoding

    monkeypatch.setitem(decoding.WORKLOADS, "tiny", (4, 8, 8))
    result = decoding.compare_backends("tiny", repeats=1, backends=["generate", "static", "continuous"],
                                       log=lambda line: None)
    rows = {r["backend"]: r for r in result["backends"]}
    assert rows["continuous"]["ran_as"] == "continuous" and rows["static"]["ran_as"] == "generate"
    assert result["copy_bandwidth_gbs"] > 0.1
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and 0 < row["bandwidth_fraction"] < 1
    assert "| continuous | continuous |" in decoding.format_decoding(result)


def test_the_gpu_comparison_runs_bf16_autocast_on_both_sides():
    """`--device cuda` defaults to bf16 on both sides: the engine's mixed_precision=bf16, TRL's bf16=True over
    float32 weights, off the CPU, and the MFU's peak measured with bf16 matmuls."""
    from benchmarks.run import peak_kind
    from benchmarks.trl_runner import _common_args

    args = _common_args("llama-1b", "/tmp/out", None, "cuda", "bf16")
    assert args["bf16"] and not args["fp16"] and not args["use_cpu"]
    assert _common_args("tiny", "/tmp/out", None)["use_cpu"] and not _common_args("tiny", "/tmp/out", None)["bf16"]
    assert peak_kind("cuda", "bf16") == {"device": "cuda", "dtype": torch.bfloat16, "size": 8192}


def test_the_llama_1b_size_has_llama_3_2_1b_parameters():
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.workloads import SIZES

    spec = json.loads(SIZES["llama-1b"].model_json.read_text())
    spec.pop("_about")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400


@pytest.fixture(scope="module")
def tiny_group_run(tmp_path_factory):
    """`python -m benchmarks.run --size tiny --objectives grpo rloo --steps 1`, measured in this process."""
    out = tmp_path_factory.mktemp("bench") / "tiny_group.json"
    return run_in_process(out, "--size", "tiny", "--objectives", "grpo", "rloo", "--steps", "1")


def test_grpo_and_rloo_time_an_iteration_of_group_sampled_full_length_rollouts(tiny_group_run):
    """The tiny size samples 2 prompts x 4 responses of exactly 4 tokens per iteration: 8 rollouts (so
    samples/s x seconds per iteration = 8) and 8 x 4 = 32 response tokens. Both have a KL (GRPO's in the loss,
    RLOO's in the reward), so the reference loads, and in float32 the rollout log-probs are the sampling pass's."""
    from benchmarks.workloads import SIZES

    spec = SIZES["tiny"]
    assert (spec.group_rollouts, spec.max_new_tokens) == (8, 4)
    payload, saved = tiny_group_run
    rows = {row["objective"]: row for row in saved["rows"]}
    assert set(rows) == {"grpo", "rloo"}
    for objective, row in rows.items():
        engine = row["engine"]
        assert engine["repeats"] == 1 and "errors" not in engine, objective
        assert engine["samples_per_s"] * engine["step_seconds"] == pytest.approx(8, rel=1e-9)
        for key in ("time/generation", "time/scoring", "time/experience", "time/training", "flops_per_step"):
            assert engine[key] > 0, (objective, key)
        run = row["runs"]["engine"][0]
        assert run["response_tokens_per_step"] == 32
        assert run["reference_loaded"] is True and run["rollout_logprobs"] == "sampling"
    text = bench_run.format_table(payload)
    assert sum(line.startswith(("| grpo |", "| rloo |")) for line in text.splitlines()) == 2


def test_group_rollouts_forward_the_reference_once_and_no_reference_without_a_kl(tiny_group_run, tmp_path):
    """Frozen tokens per iteration: decoding feeds each row's prompt and its first 3 sampled tokens (the full
    sequence less one token per row, 8 fewer than the training forward's tokens T), and the reference forward
    sees the T tokens again: 2T - 8. GRPO with kl_coef 0 loads no reference (nor does it forward one): T - 8."""
    _, saved = tiny_group_run
    for row in saved["rows"]:
        run = row["runs"]["engine"][0]
        assert run["frozen_tokens_per_step"] == 2 * run["train_tokens_per_step"] - 8, row["objective"]
    no_kl = bench_run.measure_one("engine", "grpo", "tiny", 1, ("objective.kl_coef=0.0",), 1)
    assert no_kl["reference_loaded"] is False
    assert no_kl["frozen_tokens_per_step"] == no_kl["train_tokens_per_step"] - 8 > 0


def test_a_baseline_checkout_runs_its_own_engine_alternating_with_this_one(tmp_path, monkeypatch):
    """`--baseline DIR`: each baseline measurement runs `--worker engine` in DIR's code (here this checkout
    again, so both sides run the same work), alternating with this checkout's, and the row pairs them."""
    from benchmarks.run import BASELINE, REPO_ROOT

    monkeypatch.setenv(BASELINE, "")  # main sets it for its workers; put back as it was after the test
    payload = bench_run.main(["--size", "tiny", "--objectives", "sft", "--steps", "1", "--repeats", "2",
                              "--baseline", str(REPO_ROOT), "--json", str(tmp_path / "base.json")])
    row = payload["rows"][0]
    assert set(row["runs"]) == {"engine", "baseline"} and row["baseline"]["repeats"] == row["engine"]["repeats"] == 2
    assert [r["runner"] for r in row["runs"]["baseline"]] == ["baseline", "baseline"]
    assert {r["checkout"] for r in row["runs"]["baseline"]} == {str(REPO_ROOT)}
    engine, base = row["runs"]["engine"], row["runs"]["baseline"]
    assert [e["train_tokens_per_step"] for e in engine] == [b["train_tokens_per_step"] for b in base]
    assert row["throughput_ratio"] > 0 and row["memory_ratio"] > 0
    assert "engine/baseline throughput" in bench_run.format_table(payload)


def test_the_peer_gets_the_prompts_in_the_order_the_engine_loader_draws_them():
    """`prompt_order` is the order of the engine runner's DataLoader(shuffle=True, generator seeded 0), batch
    after batch, and not the bare `torch.randperm` of that seed (the loader's iterator draws from the generator
    first)."""
    from torch.utils.data import DataLoader

    from benchmarks.workloads import prompt_order

    loader = DataLoader(list(range(40)), batch_size=8, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    drawn = [int(i) for batch in loader for i in batch]
    assert prompt_order(40) == drawn and sorted(drawn) == list(range(40))
    assert prompt_order(40) != torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
