"""Do two arms compute the same thing? Greedy outputs with top-k logprobs on a fixed
prompt set, compared token by token ("Accuracy is not all you need": % flips, KL).

Exact techniques (scheduling, attention, allocation) must give identical greedy
tokens in float32; the KL and top-1 figures show how far apart arms are when not.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vllm_ext.ab.traces import TraceError

KL_METHOD = ("KL(base || arm) per token over the base's top-k tokens plus one bucket for the "
             "rest; a token missing from the arm's top-k gets an even share of the arm's "
             "leftover mass. Compared at every position up to and including the first "
             "divergent token (later tokens follow different contexts).")

_WORDS = ("river stone light garden engine window market winter letter silver morning "
          "station paper forest signal harbor number pattern orange circle").split()


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    answer: str | None = None  # a reference answer: correct if the output contains it


def default_prompts() -> list[Prompt]:
    """Sixteen fixed prompts: short questions, and four passages of roughly 300 to 900
    tokens (longer than a typical chunk, shorter than a 1K context) so that chunked
    prefills meet decodes in the same batches."""
    short = [f"Question {i}: what comes after the {_WORDS[i]} and the {_WORDS[-1 - i]}?"
             for i in range(12)]
    long = [" ".join(_WORDS[(3 * j + k) % len(_WORDS)] for k in range(100 + 50 * j))
            for j in range(4)]
    return [Prompt(t) for t in short + long]


def load_prompts(path: str | Path) -> list[Prompt]:
    """JSON Lines: {"prompt": "...", "answer": "..."} per line, answer optional."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise TraceError(f"prompt file {path}: {e.strerror or e}") from None
    prompts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d.get("prompt"), str) or not isinstance(d.get("answer", ""), str):
                raise ValueError
        except (ValueError, AttributeError):
            raise TraceError(f'prompt file {path}, line {n}: expected {{"prompt": str, '
                             f'"answer": str (optional)}}') from None
        prompts.append(Prompt(d["prompt"], d.get("answer")))
    if not prompts:
        raise TraceError(f"prompt file {path}: no prompts")
    return prompts


@dataclass(frozen=True, slots=True)
class Output:
    token_ids: tuple[int, ...]
    text: str
    top: tuple[dict[int, float], ...]  # per position: token id -> logprob (top-k)


def topk_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) from two top-k logprob lists, over P's tokens plus one rest bucket."""
    P = {t: math.exp(lp) for t, lp in p.items()}
    Q = {t: math.exp(lp) for t, lp in q.items()}
    missing = [t for t in P if t not in Q]
    share = max(0.0, 1.0 - sum(Q.values())) / (len(missing) + 1)
    q_on_p = {t: Q.get(t, share) for t in P}
    p_rest = max(0.0, 1.0 - sum(P.values()))
    q_rest = max(0.0, 1.0 - sum(q_on_p.values()))
    kl = sum(pv * (math.log(pv) - math.log(max(q_on_p[t], 1e-30))) for t, pv in P.items() if pv > 0)
    if p_rest > 1e-12:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, 1e-30)))
    return max(0.0, kl)  # >= 0 in exact arithmetic; only rounding takes it below


def _argmax(d: dict[int, float]) -> int | None:
    return max(d, key=d.get) if d else None


def compare(prompts: list[Prompt], base: list[Output], arm: list[Output]) -> dict:
    """Exact-match rate, first divergent positions, KL and top-1 agreement, % flips."""
    exact, divergences, kls, top1 = 0, [], [], []
    answered = flips = 0
    for prompt, b, a in zip(prompts, base, arm, strict=True):
        n = min(len(b.token_ids), len(a.token_ids))
        div = next((i for i in range(n) if b.token_ids[i] != a.token_ids[i]), None)
        if div is None and len(b.token_ids) != len(a.token_ids):
            div = n
        exact += div is None
        divergences.append(div)
        upto = n if div is None else min(div + 1, n)
        for i in range(min(upto, len(b.top), len(a.top))):
            kls.append(topk_kl(b.top[i], a.top[i]))
            top1.append(_argmax(b.top[i]) == _argmax(a.top[i]))
        if prompt.answer is not None:
            answered += 1
            flips += (prompt.answer.strip() in b.text) != (prompt.answer.strip() in a.text)
    diverged = [d for d in divergences if d is not None]
    return {
        "prompts": len(prompts), "exact_match_rate": exact / len(prompts),
        "first_divergence": divergences,
        "earliest_divergence": min(diverged) if diverged else None,
        "kl_mean": sum(kls) / len(kls) if kls else math.nan,
        "kl_max": max(kls) if kls else math.nan,
        "top1_agreement": sum(top1) / len(top1) if top1 else math.nan,
        "prompts_with_answers": answered,
        "flips_pct": 100.0 * flips / answered if answered else None,
    }


def verdict(name: str, base: str, cmp: dict) -> str:
    """One plain sentence for the report."""
    n = cmp["prompts"]
    if cmp["exact_match_rate"] == 1.0:
        return f"{name}: greedy outputs identical to {base} on all {n} prompts."
    differ = round((1 - cmp["exact_match_rate"]) * n)
    return (f"{name}: greedy outputs NOT identical to {base}: {differ} of {n} prompts differ, the "
            f"earliest at output token {cmp['earliest_divergence']}; mean KL {cmp['kl_mean']:.2e}, "
            f"top-1 agreement {100 * cmp['top1_agreement']:.1f}%.")


def _parse_top(entry: dict | None) -> dict[int, float]:
    # Tokens come back as "token_id:N" (return_tokens_as_token_ids): strings of
    # different ids can decode alike, ids cannot.
    return {int(k.rsplit(":", 1)[1]): v for k, v in (entry or {}).items()}


async def _fetch(base_url: str, model: str, prompts: list[Prompt], max_tokens: int,
                 top_k: int) -> list[Output]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=None)

    async def one(p: Prompt) -> Output:
        r = await client.completions.create(
            model=model, prompt=p.text, max_tokens=max_tokens, temperature=0.0, logprobs=top_k,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        lp = r.choices[0].logprobs
        ids = tuple(int(t.rsplit(":", 1)[1]) for t in lp.tokens)
        return Output(ids, r.choices[0].text, tuple(_parse_top(e) for e in lp.top_logprobs))

    try:
        # All at once, so the arm's batching (chunked prefills beside decodes) is exercised.
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def fetch(base_url: str, model: str, prompts: list[Prompt], max_tokens: int = 32,
          top_k: int = 5) -> list[Output]:
    """Greedy completions of every prompt with its top-k logprobs per output token."""
    return asyncio.run(_fetch(base_url, model, prompts, max_tokens, top_k))
