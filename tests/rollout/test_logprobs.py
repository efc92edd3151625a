"""`rollout.logprobs`: the response log-probs every online caller uses equal those of a plain forward of each
row alone, unpadded, at the sampling temperature; and the labelled path gives the same numbers."""

import torch

from engine.logprobs import label_logprobs
from rollout.logprobs import response_forward, response_logprobs
from tests.rollout.conftest import left_pad, tiny_causal_lm

PAD = 3


def rows():
    prompts = [[1, 10, 11, 12, 13], [1, 20, 21]]
    responses = [[30, 31, 2], [32, 2]]
    ids, mask = left_pad(prompts, PAD)
    response = torch.tensor([[30, 31, 2], [32, 2, PAD]])
    action = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return prompts, responses, torch.cat([ids, response], 1), torch.cat([mask, action], 1), action.bool()


def test_response_logprobs_equal_each_row_forwarded_alone_at_the_temperature():
    model = tiny_causal_lm()
    prompts, responses, seq, mask, action = rows()
    with torch.no_grad():
        out = response_forward(model, seq, mask, action, temperature=0.7, hidden=True)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True)
            P = len(prompt)
            logits = alone.logits[0, P - 1:P - 1 + len(response)] / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            torch.testing.assert_close(out.logprobs[i, :len(response)], expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.logits[i, :len(response)], logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.hidden[i, :len(response)],
                                       alone.hidden_states[-1][0, P - 1:P - 1 + len(response)], rtol=0, atol=1e-5)
    assert out.logprobs[1, 2] == 0  # off the action mask
    # the plain variant is the same numbers
    torch.testing.assert_close(response_logprobs(model, seq, mask, action, temperature=0.7), out.logprobs)


def test_labelled_and_response_paths_agree_at_temperature_one():
    """The same tokens scored as a right-padded labelled batch (SFT, DPO) and as rollout rows (PPO)."""
    model = tiny_causal_lm()
    prompts, responses, seq, mask, action = rows()
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((2, width), PAD)
    labels = torch.full((2, width), -100)
    attention = torch.zeros(2, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p + r)] = torch.tensor(p + r)
        labels[i, len(p):len(p + r)] = torch.tensor(r)
        attention[i, :len(p + r)] = 1
    with torch.no_grad():
        labelled, label_mask = label_logprobs(model, {"input_ids": input_ids, "attention_mask": attention,
                                                      "labels": labels})
        rollout = response_logprobs(model, seq, mask, action)
    torch.testing.assert_close(labelled[label_mask], rollout[action], rtol=0, atol=1e-5)
