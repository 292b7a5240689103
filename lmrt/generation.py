"""Text generation for lmrt's models: greedy decoding, sampling (temperature, top-k, top-p) and beam search.

A model takes part through its decoding protocol (lmrt.models.LanguageModel): `init_decoding(batch_size,
max_length, **inputs)` returns a state (a KV cache for the Transformers, the hidden state for the LSTM) and
`decode(tokens, state)` runs new tokens through the model. With the cache each new token costs one query row;
`use_cache=False` recomputes the whole sequence at every step instead (slower; the same tokens, which the tests
check).

Generation runs under torch.no_grad() and leaves the model's mode alone: call `model.eval()` first to turn off
dropout.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lmrt._settings import is_integer


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool = False, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
             **model_inputs) -> Tensor:
    """Continue `prompt` (batch, length) by up to `max_new_tokens` tokens; returns (batch, length + generated).

    - Greedy (the default): the most likely token at each step.
    - Sampling (`do_sample=True`): from softmax(logits / temperature), restricted to the `top_k` most likely tokens
      and to the smallest set whose probability reaches `top_p` (nucleus sampling); `generator` seeds it.
    - Beam search (`num_beams` > 1): keeps the `num_beams` most likely continuations; a finished hypothesis (one
      that produced an end token) scores sum(log p) / generated_length ** length_penalty. With `early_stopping`
      an input stops as soon as it has `num_beams` finished hypotheses; otherwise it stops once no running beam
      can beat the worst of them at the current length. The best hypothesis is returned.

    A sequence stops at any of `eos_token_id` (kept in the output); shorter sequences are padded with
    `pad_token_id` (default: the first end token); token ids are ints >= 0: Python's, NumPy's or 0-d tensors.
    Generation stops early when every sequence has stopped.
    `model_inputs` go to the model's init_decoding (the source of an encoder-decoder, say).
    """
    _check_options(prompt, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty,
                   pad_token_id)
    eos = _as_token_list(eos_token_id)
    pad = _token_id(pad_token_id) if pad_token_id is not None else (eos[0] if eos else None)
    if num_beams > 1:
        return _beam_search(model, prompt, max_new_tokens, num_beams, length_penalty, early_stopping, eos, pad,
                            use_cache, model_inputs)
    steps = _Stepper(model, prompt, _fed_length(prompt, max_new_tokens), use_cache, model_inputs)
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    eos_ids = torch.tensor(eos, dtype=prompt.dtype, device=prompt.device)
    logits = steps.first()
    for step in range(max_new_tokens):
        if do_sample:
            next_tokens = sample(logits, temperature, top_k, top_p, generator)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = next_tokens.to(prompt.dtype)  # the output keeps the prompt's dtype, as beam search's does
        if pad is not None:
            next_tokens = torch.where(finished, pad, next_tokens)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= torch.isin(next_tokens, eos_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = steps.next(tokens)
    return tokens


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of `logits` (batch, vocab), drawn from the filtered, temperature-scaled softmax."""
    logits = logits.float()
    # Less the row's maximum (softmax stays the same): a tiny temperature then sends the other logits to -inf
    # (probability 0, the limit) instead of the largest to +inf, whose softmax is NaN.
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """`logits` with -inf outside the `top_k` largest and outside the nucleus of probability `top_p` (the most
    likely tokens until their probability reaches top_p; the most likely one always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        remove_sorted = before >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _fed_length(prompt: Tensor, max_new_tokens: int) -> int:
    """The most tokens the model sees: the prompt and every new token but the last, which is never fed back (so a
    prompt as long as the model's context still gets its one next token)."""
    return prompt.shape[1] + max_new_tokens - 1


class _Stepper:
    """The logits of the last position, step after step, with the model's cache or by recomputing everything."""

    def __init__(self, model, prompt: Tensor, max_length: int, use_cache: bool, model_inputs: dict):
        self.model, self.prompt, self.max_length = model, prompt, max_length
        self.use_cache, self.model_inputs = use_cache, model_inputs
        self.state = None

    def _fresh_state(self, batch_size: int):
        return self.model.init_decoding(batch_size, self.max_length, **self.model_inputs)

    def first(self) -> Tensor:
        self.state = self._fresh_state(self.prompt.shape[0])
        return self.model.decode(self.prompt, self.state)[:, -1]

    def next(self, tokens: Tensor) -> Tensor:
        if self.use_cache:
            return self.model.decode(tokens[:, -1:], self.state)[:, -1]
        return self.model.decode(tokens, self._fresh_state(tokens.shape[0]))[:, -1]

    def reorder(self, batch_indices: Tensor) -> None:
        if self.use_cache:
            self.state.reorder(batch_indices)


def _beam_search(model, prompt: Tensor, max_new_tokens: int, num_beams: int, length_penalty: float,
                 early_stopping: bool, eos: list[int], pad: int | None, use_cache: bool, model_inputs: dict) -> Tensor:
    batch, prompt_length = prompt.shape
    device = prompt.device
    # Beams are batch rows: input b's beams are rows b * num_beams ... (b + 1) * num_beams - 1.
    expanded_inputs = {name: value.repeat_interleave(num_beams, dim=0) if isinstance(value, Tensor) else value
                       for name, value in model_inputs.items()}
    tokens = prompt.repeat_interleave(num_beams, dim=0)
    steps = _Stepper(model, tokens, _fed_length(prompt, max_new_tokens), use_cache, expanded_inputs)
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = float("-inf")  # the beams start identical: only the first one expands at the first step
    hypotheses = [_FinishedHypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch)]
    eos_set = set(eos)
    logits = steps.first()
    for step in range(max_new_tokens):
        generated = step + 1
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        scores = (beam_scores.view(-1, 1) + log_probs).view(batch, num_beams * vocab)
        # Each beam has at most len(eos) end-token candidates, so the best (1 + len(eos)) * num_beams candidates
        # hold num_beams that continue, however many of them end here (Hugging Face takes as many).
        top_scores, top_ids = scores.topk(min((1 + len(eos_set)) * num_beams, scores.shape[1]), dim=1)
        next_scores = torch.full((batch, num_beams), float("-inf"), device=device)
        next_tokens = torch.full((batch, num_beams), pad if pad is not None else 0, dtype=prompt.dtype,
                                 device=device)
        next_rows = torch.arange(batch * num_beams, device=device).view(batch, num_beams)  # done inputs keep theirs
        for b, done in enumerate(hypotheses):
            if done.is_done:
                continue
            kept = 0
            for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist(), strict=True)):
                beam, token = divmod(flat, vocab)
                row = b * num_beams + beam
                if score == float("-inf"):
                    break
                if token in eos_set:
                    if rank < num_beams:  # an end among the best num_beams candidates finishes a hypothesis
                        done.add(torch.cat([tokens[row, prompt_length:], tokens.new_tensor([token])]), score)
                    continue
                next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = score, token, row
                kept += 1
                if kept == num_beams:
                    break
            done.update(next_scores[b].max().item(), generated)
        beam_scores = next_scores
        tokens = torch.cat([tokens.index_select(0, next_rows.view(-1)), next_tokens.view(-1, 1)], dim=1)
        if all(done.is_done for done in hypotheses) or step == max_new_tokens - 1:
            break
        steps.reorder(next_rows.view(-1))
        logits = steps.next(tokens)
    # Inputs that ran out of steps: their running beams are hypotheses too.
    for b, done in enumerate(hypotheses):
        if not done.is_done:
            for beam in range(num_beams):
                if beam_scores[b, beam] > float("-inf"):
                    done.add(tokens[b * num_beams + beam, prompt_length:], beam_scores[b, beam].item())
    best = [done.best() for done in hypotheses]
    width = max(len(seq) for seq in best)
    if pad is None and any(len(seq) < width for seq in best):
        raise ValueError("lmrt.generation.generate: the beams ended at different lengths; give `pad_token_id` (or "
                         "`eos_token_id`) to pad the shorter ones")
    out = prompt.new_full((batch, prompt_length + width), pad if pad is not None else 0)
    out[:, :prompt_length] = prompt
    for b, seq in enumerate(best):
        out[b, prompt_length: prompt_length + len(seq)] = seq
    return out


class _FinishedHypotheses:
    """The best `num_beams` finished hypotheses of one input, and whether its search is over."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.items: list[tuple[float, Tensor]] = []
        self.is_done = False

    def add(self, sequence: Tensor, sum_log_probs: float) -> None:
        self.items.append((sum_log_probs / len(sequence) ** self.length_penalty, sequence))
        self.items.sort(key=lambda item: item[0], reverse=True)
        del self.items[self.num_beams:]

    def update(self, best_running_sum: float, generated: int) -> None:
        """Done once full and, without early stopping, when the best running beam, scored at the current length,
        cannot beat the worst finished hypothesis."""
        if len(self.items) < self.num_beams:
            return
        if self.early_stopping or best_running_sum == float("-inf"):
            self.is_done = True
            return
        self.is_done = best_running_sum / generated ** self.length_penalty <= self.items[-1][0]

    def best(self) -> Tensor:
        return self.items[0][1]


def _token_id(value) -> int | None:
    """`value` as a token id: an int >= 0 (Python's, NumPy's or a 0-d tensor's, not a bool); None if it is none."""
    if isinstance(value, Tensor) and value.dim() == 0:
        value = value.item()
    return int(value) if is_integer(value) and value >= 0 else None


def _as_token_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    # A 0-d tensor claims to be iterable but refuses it.
    listed = isinstance(eos_token_id, Iterable) and not (isinstance(eos_token_id, Tensor) and eos_token_id.dim() == 0)
    ids = [_token_id(i) for i in (eos_token_id if listed else [eos_token_id])]
    if None in ids:
        raise ValueError(f"lmrt.generation.generate: `eos_token_id` must be a token id or a list of them, got "
                         f"{eos_token_id!r}")
    return ids


def _check_options(prompt, max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, length_penalty,
                   pad_token_id) -> None:
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.is_floating_point():
        shape = list(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(f"lmrt.generation.generate: `prompt` must be a tensor of token ids of shape (batch, "
                         f"length >= 1), got {shape}")
    checks = [
        (is_integer(max_new_tokens) and max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "an int >= 1"),
        (isinstance(temperature, numbers.Real) and temperature > 0, "temperature", temperature,
         "a number > 0 (greedy decoding is do_sample=False)"),
        (top_k is None or is_integer(top_k) and top_k >= 1,
         "top_k", top_k, "an int >= 1 or None"),
        (top_p is None or isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0, "top_p", top_p,
         "a number in (0, 1] or None"),
        (is_integer(num_beams) and num_beams >= 1, "num_beams", num_beams, "an int >= 1"),
        (not (do_sample and num_beams > 1), "num_beams", num_beams, "1 when do_sample=True (no beam sampling)"),
        (isinstance(length_penalty, numbers.Real) and length_penalty == length_penalty, "length_penalty",
         length_penalty, "a number"),
        (pad_token_id is None or _token_id(pad_token_id) is not None, "pad_token_id", pad_token_id,
         "a token id (an int >= 0) or None"),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise ValueError(f"lmrt.generation.generate: `{name}` must be {expected}, got {value!r}")
