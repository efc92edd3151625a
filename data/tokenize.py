"""From canonical records to token ids and labels, split on tokens and never on characters.

The prompt and each response are tokenised separately and concatenated, so the labels select exactly
the response tokens, and the prompt ids are the ones a generator will be given:

    input_ids = [BOS] prompt ... | response ... EOS
    labels    = -100  -100   ... | response ... EOS          (train_on_prompt: labels = input_ids)

BOS appears exactly once: formatted text is encoded without special tokens, and BOS is prepended only
when the tokenizer would add it itself and the template has not written it already.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from data.config import DataConfig
from data.errors import DataError
from data.formats import PAIR_NUMBERS

IGNORE_INDEX = -100
SENTINEL = "\u2063SENTINEL\u2063"

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR}


def check_tokenizer(tokenizer, family: str, *, allow_pad_as_eos: bool = False) -> None:
    """Pad and EOS tokens the family needs, or an error that says how to add them."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {name!r} has no EOS token, so responses cannot be taught to stop. Set one: "
            "tokenizer.add_special_tokens({'eos_token': '</s>'}) and resize the model's embeddings."
        )
    if tokenizer.pad_token_id is None:
        raise DataError(
            f"tokenizer {name!r} has no pad token. Add one that is not EOS: "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) then model.resize_token_embeddings(len(tokenizer)), "
            "or reuse a token the data never contains, e.g. tokenizer.pad_token = tokenizer.unk_token."
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id and family in ("preference", "prompt") and not allow_pad_as_eos:
        raise DataError(
            f"tokenizer {name!r} uses the same token for pad and EOS ({tokenizer.eos_token!r}, id "
            f"{tokenizer.eos_token_id}). A reward model reads its score at the last non-pad token, so with pad == "
            "EOS the score lands before the EOS (and PPO rewards on the wrong token). Give the tokenizer a "
            "distinct pad token: tokenizer.add_special_tokens({'pad_token': '<pad>'}) then "
            "model.resize_token_embeddings(len(tokenizer)), or tokenizer.pad_token = tokenizer.unk_token."
        )


class Formatter:
    """Turns messages into prompt text and token ids, the same way for every row."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.tokenizer = tokenizer
        self.prompt_format = cfg.prompt_format
        self.train_on_prompt = cfg.train_on_prompt
        self.max_length, self.max_prompt_length = cfg.max_length, cfg.max_prompt_length
        self.response_template = cfg.response_template
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.adds_bos = self.bos_id is not None and tokenizer("a").input_ids[:1] == [self.bos_id]
        if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
            raise DataError(
                f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length ({cfg.max_length}) "
                "to leave room for a response."
            )
        template = cfg.template
        if template is None:
            self.mode, self.chat_template = ("chat", None) if tokenizer.chat_template else ("plain", None)
        elif template in ("plain", "raw"):
            self.mode, self.chat_template = template, None
        elif template in NAMED_TEMPLATES:
            self.mode, self.chat_template = "chat", NAMED_TEMPLATES[template]
        elif "{{" in template or "{%" in template:
            self.mode, self.chat_template = "chat", template
        else:
            raise DataError(
                f"data.template={template!r} is not known; expected None (the tokenizer's chat template), 'plain', "
                f"'raw', one of {sorted(NAMED_TEMPLATES)}, or a Jinja chat template string."
            )
        # Roles a template does not know are rendered silently by permissive ones (or dropped): refuse them.
        template_text = str(self.chat_template or tokenizer.chat_template or "") if self.mode == "chat" else ""
        self.roles = ("system", "user", "assistant") + (("tool",) if "tool" in template_text else ())
        if self.mode == "plain" and "{prompt}" not in cfg.prompt_format:
            raise DataError(f"data.prompt_format={cfg.prompt_format!r} must contain '{{prompt}}'.")
        self.markers = self._markers()
        probe = self.prompt_ids([{"role": "user", "content": "x"}])
        if self.bos_id is not None and probe[:2] == [self.bos_id, self.bos_id]:
            raise DataError(
                f"the {self.mode} template writes BOS ({tokenizer.bos_token!r}) twice at the start of every prompt. "
                "Remove the extra bos_token from the template."
            )

    @property
    def description(self) -> str:
        bos = "tokenizer adds BOS" if self.adds_bos else "tokenizer adds no BOS"
        if self.mode == "plain":
            return f"plain prompt_format {self.prompt_format!r}; {bos}"
        return f"{self.mode} template; {bos}"

    # ---- text -------------------------------------------------------------------------------------

    def render(self, messages: list[Mapping[str, str]], *, generation_prompt: bool) -> str:
        if self.mode == "chat":
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        eos = self.tokenizer.eos_token
        parts, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system += m["content"] + "\n\n"
            elif m["role"] == "assistant":
                parts.append(m["content"] + eos)
            elif self.mode == "plain":
                parts.append(self.prompt_format.replace("{prompt}", system + m["content"]))
                system = ""
            else:
                parts.append(system + m["content"])
                system = ""
        return "".join(parts)

    def _markers(self) -> list[str]:
        """Text that only a template writes; seeing it inside a row means the row is templated already."""
        if self.mode == "raw":
            return []
        text = self.render([{"role": "user", "content": SENTINEL}], generation_prompt=True)
        head, _, tail = text.partition(SENTINEL)
        if self.mode == "plain":
            return [tail.rstrip()] if len(tail.strip()) >= 3 else []
        markers = [s.strip() for s in (head.replace(self.tokenizer.bos_token or "\0", ""), tail)]
        specials = [t for t in self.tokenizer.all_special_tokens if t in text and t != self.tokenizer.bos_token]
        return [m for m in markers if m] + specials

    def check_text(self, text: str) -> str | None:
        """The template markup found in a row's text, if any ("raw" text is used as it is)."""
        if self.mode == "raw":
            return None
        bos = self.tokenizer.bos_token
        if bos and text.lstrip().startswith(bos):
            return bos
        for marker in self.markers:
            if marker in text:
                return marker
        return None

    # ---- ids --------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.adds_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id] + ids
        return ids

    def prompt_ids(self, messages: list[Mapping[str, str]]) -> list[int]:
        return self.with_bos(self.encode(self.render(messages, generation_prompt=True)))

    def response_ids(self, text: str) -> list[int]:
        return self.encode(text) + [self.eos_id]

    def conversation(self, messages: list[Mapping[str, str]]) -> list[tuple[list[int], bool]]:
        """Segments (ids, trained) of a whole conversation: each assistant turn + EOS is trained."""
        segments: list[tuple[list[int], bool]] = []
        consumed = ""
        eos = self.tokenizer.eos_token
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:k], generation_prompt=True)
            if not prefix.startswith(consumed):
                raise DataError(
                    "the chat template renders earlier turns differently once later turns follow (for example it "
                    "drops them), so a conversation cannot be split into prompt and response tokens. Train on "
                    "single-turn rows, or set data.template to 'chatml', 'zephyr' or your own Jinja template."
                )
            gap = prefix[len(consumed):]
            if consumed and gap.startswith(eos):
                gap = gap[len(eos):]
            gap_ids = self.encode(gap) if consumed else self.with_bos(self.encode(gap))
            segments.append((gap_ids, False))
            segments.append((self.response_ids(message["content"]), True))
            consumed = prefix + message["content"]
        return segments

    def text_segments(self, text: str) -> list[tuple[list[int], bool]]:
        """A plain-text row: trained whole, or after the first `response_template` when one is set."""
        if self.response_template is None:
            return [(self.with_bos([]), False), (self.encode(text) + [self.eos_id], True)]
        cut = text.index(self.response_template) + len(self.response_template)
        return [(self.with_bos(self.encode(text[:cut])), False), (self.response_ids(text[cut:]), True)]

    # ---- truncation -------------------------------------------------------------------------------

    def cut_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        """Keep the end of the prompt (next to the response) and its BOS."""
        if self.max_prompt_length is None or len(ids) <= self.max_prompt_length:
            return ids, False
        keep_bos = self.bos_id is not None and ids[:1] == [self.bos_id]
        if keep_bos:
            return [self.bos_id] + ids[len(ids) - self.max_prompt_length + 1:], True
        return ids[len(ids) - self.max_prompt_length:], True


class Tokenise:
    """The `datasets.map` function of one family: canonical record -> token columns + length stats."""

    def __init__(self, family: str, formatter: Formatter):
        self.family, self.fmt = family, formatter

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, self.family)(row)

    def sft(self, row: dict[str, Any]) -> dict[str, Any]:
        f = self.fmt
        segments = f.text_segments(row["text"]) if row.get("text") is not None else f.conversation(row["messages"])
        n_prompt = len(segments[0][0])
        prompt_ids, prompt_cut = f.cut_prompt(segments[0][0])
        segments[0] = (prompt_ids, False)
        ids, labels = [], []
        for seg, trained in segments:
            ids += seg
            labels += seg if (trained or f.train_on_prompt) else [IGNORE_INDEX] * len(seg)
        n_response = sum(len(seg) for seg, trained in segments if trained)
        response_cut = len(ids) > f.max_length
        ids, labels = ids[: f.max_length], labels[: f.max_length]
        drop = "" if len(ids) > len(prompt_ids) else "no_room_for_response"
        return {
            "input_ids": ids,
            "labels": labels,
            **({"weight": row["weight"]} if row.get("weight") is not None else {}),
            "_prompt_len": n_prompt,
            "_response_len": n_response,
            "_prompt_truncated": prompt_cut,
            "_response_truncated": response_cut,
            "_drop": drop,
        }

    def preference(self, row: dict[str, Any]) -> dict[str, Any]:
        f = self.fmt
        full_prompt = f.prompt_ids(row["prompt_messages"])
        prompt_ids, prompt_cut = f.cut_prompt(full_prompt)
        budget = f.max_length - len(prompt_ids)
        out: dict[str, Any] = {}
        response_cut, lengths = False, []
        for name in ("chosen", "rejected"):
            response = f.response_ids(row[name])
            lengths.append(len(response))
            response_cut |= len(response) > budget
            response = response[: max(budget, 0)]
            out[f"{name}_input_ids"] = prompt_ids + response
            out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
        drop = ""
        if budget < 1:
            drop = "no_room_for_response"
        elif out["chosen_input_ids"] == out["rejected_input_ids"]:
            drop = "chosen_equals_rejected_after_truncation"
        for key in PAIR_NUMBERS:
            if key in row:
                out[key] = row[key]
        out.update(
            _prompt_len=len(full_prompt),
            _response_len=max(lengths),
            _prompt_truncated=prompt_cut,
            _response_truncated=response_cut,
            _drop=drop,
        )
        return out

    def scored_ids(self, prompt: str, response: str) -> list[int]:
        """The ids the reward loop trains a reward model on for (prompt, response): a preference row's
        side, so a reward model scores a rollout exactly as it read its training pairs."""
        row = self.preference({"prompt_messages": [{"role": "user", "content": prompt}],
                               "chosen": response, "rejected": response})
        return row["chosen_input_ids"]

    def prompt(self, row: dict[str, Any]) -> dict[str, Any]:
        full_prompt = self.fmt.prompt_ids(row["prompt_messages"])
        prompt_ids, prompt_cut = self.fmt.cut_prompt(full_prompt)
        return {
            "prompt_input_ids": prompt_ids,
            "_prompt_len": len(full_prompt),
            "_response_len": 0,
            "_prompt_truncated": prompt_cut,
            "_response_truncated": False,
            "_drop": "",
        }


def reward_pair_encoder(cfg: DataConfig, tokenizer) -> Callable[[str, str], list[int]]:
    """(prompt, response) -> the ids the reward loop would train on for that pair under `cfg`."""
    return Tokenise("preference", Formatter(cfg, tokenizer)).scored_ids
