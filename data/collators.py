"""Batches: right padding for training, left padding for generation, optional padding-free packing.

Packed batches are one row, (1, N) with N the sum of the lengths, and position ids that restart at 0
for every sequence. Their `attention_mask` is None on purpose: transformers (5.x, masking_utils.
find_packed_sequence_indices) then builds a causal mask that never crosses a sequence boundary from
the position ids, for sdpa, eager and flash attention alike. It does so only when no cache is passed,
so call the model with `use_cache=False` (the default `use_cache=True` creates an empty cache and the
sequences attend to each other).

Shared-prompt preference batches (`share_prompt=True`) hold each pair as the prefix that chosen and
rejected have in common (the prompt), then the rest of chosen, then the rest of rejected, so the prompt
is run once instead of twice (Wang et al., 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv:2410.20305); short pairs may share a row. An (R, 1, T, T) boolean attention mask keeps
rejected tokens from seeing the chosen ones and every pair from seeing another, and position ids restart
for each pair and, for its rejected part, where the prompt ends, so every token sees exactly what it sees
in its own sequence: the outputs equal the ordinary layout's.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from data.errors import DataError
from data.formats import PAIR_NUMBERS
from data.tokenize import IGNORE_INDEX, check_tokenizer

TOKEN_COLUMNS = {"prompt_input_ids", "prompt", "prompt_messages"}


def make_collator(
    family: str,
    tokenizer,
    *,
    packing: bool = False,
    pad_to_multiple_of: int | None = None,
    allow_pad_as_eos: bool = False,
    share_prompt: bool = False,
    share_row_tokens: int = 0,
):
    """A picklable `collate_fn` for a DataLoader over `build_datasets(family, ...)` rows.

    A tokenizer whose pad token is its EOS is refused for "preference" and "prompt" batches, where a
    reward model would read its score before the EOS; pass `allow_pad_as_eos=True` where no reward is
    read from the batch (DPO, ORPO), since the masks and labels here never depend on the pad id.

    sft        -> input_ids, attention_mask, labels (-100 on prompt and padding), position_ids: (B, T);
                  weight (B,) when the rows have one (not packed: a packed row holds many sequences)
    preference -> the same with 2B rows, chosen_0..chosen_{B-1} then rejected_0..rejected_{B-1};
                  margin (B,) and soft_label (B,) when the rows have them
    prompt     -> input_ids, attention_mask (B, P) left-padded; prompt list[str]; extras list[dict]
    packing    -> (1, N) input_ids, labels, position_ids; attention_mask None; seq_lens (S,) the length
                  of each packed sequence in order (the padding tail, if any, is not counted)
    share_prompt (preference, without packing) -> each prompt once, pairs sharing a row up to
                  `share_row_tokens` tokens, see `share_prompt_batch`
    """
    if family not in ("sft", "preference", "prompt"):
        raise DataError(f"unknown data family {family!r}; expected 'sft', 'preference' or 'prompt'.")
    check_tokenizer(tokenizer, family, allow_pad_as_eos=allow_pad_as_eos)
    if packing and family == "prompt":
        raise DataError("packing is for training batches (sft, preference); prompts for generation are left-padded.")
    shared = share_prompt and family == "preference" and not packing
    return partial(_collate, family, tokenizer.pad_token_id, packing, pad_to_multiple_of or 1, shared,
                   share_row_tokens)


def _collate(
    family: str, pad_id: int, packing: bool, multiple: int, shared: bool, row_tokens: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    if family == "prompt":
        return _left_pad(rows, pad_id, multiple)
    if family == "sft":
        sequences = [(r["input_ids"], r["labels"]) for r in rows]
    else:
        sequences = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
        sequences += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    if shared:
        batch = share_prompt_batch(sequences, pad_id, multiple, row_tokens)
    elif packing:
        batch = _pack(sequences, pad_id, multiple)
    else:
        batch = _right_pad(sequences, pad_id, multiple)
    for key in PAIR_NUMBERS if family == "preference" else ():
        if key in rows[0]:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    if family == "sft" and not packing and "weight" in rows[0]:
        batch["weight"] = torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float32)
    return batch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _right_pad(sequences: list[tuple[list[int], list[int]]], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    T = _round_up(max(len(ids) for ids, _ in sequences), multiple)
    B = len(sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (ids, lab) in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    position_ids = torch.arange(T, dtype=torch.long).expand(B, T).clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def share_prompt_batch(
    sequences: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 1, row_tokens: int = 0
) -> dict[str, Any]:
    """B pairs, given as 2B sequences [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], in rows that hold
    each prompt once: pair i is `chosen + rejected[p:]`, p the length of the prefix the two have in common
    (the prompt, and any first response tokens they share). With `row_tokens` > 0, short pairs share rows
    of about `row_tokens` tokens (see `_fill_rows`), which trades padding for longer attention rows; else
    one pair per row, in order. Right-padded to T.

    input_ids, position_ids (R, T): positions restart at 0 for each pair, and at p for its rejected part;
        padding has position 0.
    attention_mask (R, 1, T, T) bool, True = the query (dim 2) attends to the key (dim 3): causal within each
        pair, except that rejected tokens never see chosen[p:]; nothing across pairs; a padding position sees
        itself only (no row is empty).
    labels (2B, T'): the labels of the ordinary `_right_pad` layout of the same sequences, unchanged.
    token_rows (2B,): the row that holds ordinary row r's sequence.
    token_positions (2B, T'): where token t of ordinary row r sits in row token_rows[r]; -1 on padding.
    """
    ordinary = _right_pad(sequences, pad_id, multiple)
    n_pairs = len(sequences) // 2
    pairs = [(chosen, rejected)
             for (chosen, _), (rejected, _) in zip(sequences[:n_pairs], sequences[n_pairs:])]
    prefixes = [_common_prefix(chosen, rejected) for chosen, rejected in pairs]
    lengths = [len(c) + len(r) - p for (c, r), p in zip(pairs, prefixes)]
    place = _fill_rows(lengths, row_tokens, multiple)  # pair i -> (row, offset)
    n_rows = 1 + max(row for row, _ in place)
    T = _round_up(max(offset + n for (_, offset), n in zip(place, lengths)), multiple)
    input_ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, T), dtype=torch.long)
    attention_mask = torch.eye(T, dtype=torch.bool).repeat(n_rows, 1, 1, 1)  # padding sees itself
    token_rows = torch.tensor([row for row, _ in place] * 2, dtype=torch.long)
    token_positions = torch.full_like(ordinary["labels"], -1)
    for i, ((chosen, rejected), p, n, (row, o)) in enumerate(zip(pairs, prefixes, lengths, place)):
        c = len(chosen)  # chosen ends at o + c, rejected at o + n
        input_ids[row, o:o + n] = torch.tensor(chosen + rejected[p:], dtype=torch.long)
        position_ids[row, o:o + c] = torch.arange(c)
        position_ids[row, o + c:o + n] = torch.arange(p, len(rejected))
        token_positions[i, :c] = torch.arange(o, o + c)
        token_positions[n_pairs + i, :p] = torch.arange(o, o + p)
        token_positions[n_pairs + i, p:len(rejected)] = torch.arange(o + c, o + n)
        query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
        rejected_sees_chosen = (query >= c) & (key >= p) & (key < c)
        attention_mask[row, 0, o:o + n, o:o + n] = (key <= query) & ~rejected_sees_chosen
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": ordinary["labels"],
        "token_rows": token_rows,
        "token_positions": token_positions,
    }


def _fill_rows(lengths: list[int], row_tokens: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(row, offset) of each item: of the row counts whose rows stay within `row_tokens` (or the longest item),
    each filled longest item first into the row holding the fewest tokens so far, the one with the fewest
    padded positions (rows x longest row, rounded up to `multiple`). Kept only if that saves at least 10% of
    the positions of one item per row padded to the longest item (longer rows cost attention); else, and for
    `row_tokens` <= 0, one item per row, in order."""
    n = len(lengths)
    alone = [(i, 0) for i in range(n)]
    best, best_positions = alone, 0.9 * n * _round_up(max(lengths, default=0), multiple)
    order = sorted(range(n), key=lambda i: -lengths[i])
    limit = max([row_tokens, *lengths])  # an item longer than row_tokens still gets a row
    for rows in range(max(1, -(-sum(lengths) // limit)), n if row_tokens > 0 else 0):
        heap = [(0, row) for row in range(rows)]  # (tokens so far, row)
        place = list(alone)
        for i in order:
            used, row = heapq.heappop(heap)
            place[i] = (row, used)
            heapq.heappush(heap, (used + lengths[i], row))
        longest = max(used for used, _ in heap)
        if longest <= limit and rows * _round_up(longest, multiple) <= best_positions:
            best, best_positions = place, rows * _round_up(longest, multiple)
    return best


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pack(sequences: list[tuple[list[int], list[int]]], pad_id: int, multiple: int) -> dict[str, Any]:
    ids, labels, positions, lengths = [], [], [], []
    for seq_ids, seq_labels in sequences:
        ids += seq_ids
        # the first token of a sequence is never predicted (it would be, from the previous sequence's last token)
        labels += [IGNORE_INDEX] + list(seq_labels[1:])
        positions += range(len(seq_ids))
        lengths.append(len(seq_ids))
    n_pad = _round_up(len(ids), multiple) - len(ids)
    ids += [pad_id] * n_pad
    labels += [IGNORE_INDEX] * n_pad
    positions += range(n_pad)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": None,
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "seq_lens": torch.tensor(lengths, dtype=torch.long),
    }


def _left_pad(rows: list[dict[str, Any]], pad_id: int, multiple: int) -> dict[str, Any]:
    P = _round_up(max(len(r["prompt_input_ids"]) for r in rows), multiple)
    B = len(rows)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["prompt_input_ids"])
        input_ids[i, P - n:] = torch.tensor(r["prompt_input_ids"], dtype=torch.long)
        attention_mask[i, P - n:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt": [r["prompt"] for r in rows],
        "extras": [{k: v for k, v in r.items() if k not in TOKEN_COLUMNS} for r in rows],
    }


def sequence_lengths(family: str, dataset) -> list[int]:
    """Tokens per row as the collator will see them (a preference row: chosen + rejected)."""
    if family == "sft":
        return [len(x) for x in dataset["input_ids"]]
    if family == "preference":
        return [len(c) + len(r) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    return [len(x) for x in dataset["prompt_input_ids"]]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50, drop_last: bool = False
) -> list[list[int]]:
    """Index batches of similar length (less padding), usable as a DataLoader `batch_sampler`.

    Shuffle, cut into mega-batches of `mega_batch_mult * batch_size`, sort each by length (longest
    first), split into batches, shuffle the batches: as transformers' LengthGroupedSampler, which keeps
    the randomness of the order while the lengths inside a batch stay close.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = mega_batch_mult * batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    return batches
