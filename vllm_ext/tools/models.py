"""Synthetic Llama-architecture models for tests and benchmarks.

There is no model-hub access in CI or on the dev boxes, so we fabricate
checkpoints locally: a ``LlamaForCausalLM`` with seeded random weights and a
byte-level BPE tokenizer trained on generated text.  The output is gibberish,
but it exercises the same loading, scheduling and kernel paths as a real
Llama, and the weights are byte-identical for a given preset and seed.

This module deliberately does not import vLLM, so it can be used by tools that
run without an engine (or build a model before one is started).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ModelPreset", "PRESETS", "make_model", "make_shape"]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    purpose: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# head_dim stays 64: vLLM's CPU attention only supports 32/64/80/96/112/128.
PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("tiny", 128, 256, 2, 2, 1, 2048, 4096,
                    "Loads in seconds on CPU; for unit and integration tests."),
        ModelPreset("small", 1024, 2816, 8, 16, 4, 4096, 8192,
                    "~100M params; slow enough on CPU for scheduling effects to show."),
    )
}

MARKER_FILE = "vllm_ext_model.json"
# Bump when the on-disk layout changes so cached directories get rebuilt.
_FORMAT_VERSION = 1
# Llama's conventional ids (unk=0, bos=1, eos=2), which are also LlamaConfig's defaults.
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(_SPECIAL_TOKENS))
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_COMMON_WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have "
    "they which one you were all we her she there would their will when who him been has more if "
    "out so said what up its about than into them can only other new some could time these two "
    "first then do any like my now over such our man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "hello world model token cache request batch queue memory engine prompt decode serve"
).split()
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br",
           "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "str", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rd", "st", "ck", "sh", "th")


def _corpus(num_sentences: int, seed: int = 1234) -> Iterator[str]:
    # The corpus seed is fixed (not the model seed) so every model of a preset
    # shares one tokenizer and token ids stay comparable across seeds.
    # Pseudo-words give BPE enough distinct merges to fill a 4k vocabulary;
    # real words (drawn more often) keep prompts like "Hello world" short.
    rng = random.Random(seed)
    syllable = lambda: rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)  # noqa: E731
    lexicon = ["".join(syllable() for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    for _ in range(num_sentences):
        words = [rng.choice(_COMMON_WORDS) if rng.random() < 0.6 else rng.choice(lexicon)
                 for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(".....?!,") + rng.choice(("", " 42", " 2024"))


def _build_tokenizer(preset: ModelPreset, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level so any input text encodes without <unk>, like GPT-2/Llama-3.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size, special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(20_000), trainer)
    if tok.get_vocab_size() != preset.vocab_size:
        raise RuntimeError(f"BPE made {tok.get_vocab_size()} tokens, not {preset.vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=preset.max_position_embeddings,
        chat_template=_CHAT_TEMPLATE,
    )
    # Keep the template inside tokenizer_config.json: older loaders ignore chat_template.jinja.
    hf_tok.save_pretrained(out_dir, save_jinja_files=False)


def _llama_config(preset: ModelPreset):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim, max_position_embeddings=preset.max_position_embeddings,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, dtype="float32",
    )


def make_shape(out_dir: str | os.PathLike[str], preset: str | ModelPreset = "tiny",
               dtype: str | None = None) -> Path:
    """A directory holding only a preset's config.json (any Llama shape's, given a
    `ModelPreset`): no weights, no tokenizer.

    Enough for vLLM to build an engine's config (with ``skip_tokenizer_init=True``),
    so the scheduler can be driven without a model (``vllm_ext.tools.driver``), in seconds.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _llama_config(preset)
    if dtype is not None:
        config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]  # saving the weights would record it
    config.save_pretrained(out)
    return out


def _build_weights(preset: ModelPreset, seed: int, out_dir: Path) -> int:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = _llama_config(preset)
    # fork_rng: seeding must not leak into the caller's global torch RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Only ids: sampling defaults here would silently become vLLM's defaults.
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out_dir, safe_serialization=True)
    # safetensors writes 0600; a cached model must stay readable by other users/containers.
    (out_dir / "model.safetensors").chmod(0o644)
    return sum(p.numel() for p in model.parameters())


def _marker(preset: ModelPreset, seed: int) -> dict[str, object]:
    # Everything except `purpose`, so rewording a preset's blurb doesn't invalidate caches.
    arch = {k: v for k, v in dataclasses.asdict(preset).items() if k != "purpose"}
    return {"format": _FORMAT_VERSION, "preset": preset.name, "seed": seed, "config": arch}


def make_model(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build (or reuse) a random-weight Llama model plus tokenizer in ``out_dir``.

    Returns ``out_dir`` as a Path, loadable by vLLM and ``transformers.Auto*``.
    A directory already built with the same preset, seed and preset definition
    is returned untouched, so CI can cache it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[preset]
    out = Path(out_dir)
    marker_path = out / MARKER_FILE
    wanted = _marker(spec, seed)
    try:
        stored = json.loads(marker_path.read_text())
        if {k: stored.get(k) for k in wanted} == wanted and all(
            (out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")
        ):
            return out
    except (OSError, ValueError, AttributeError):
        pass

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    out.mkdir(parents=True, exist_ok=True)
    # Drop the marker first so an interrupted build is never mistaken for a finished one.
    marker_path.unlink(missing_ok=True)
    # save_pretrained draws its own "Writing model shards" bar; quiet means quiet.
    hf_bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with tqdm(total=2, desc=f"make_model[{preset}]", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            _build_tokenizer(spec, out)
            bar.update()
            bar.set_postfix_str("weights")
            num_params = _build_weights(spec, seed, out)
            bar.update()
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
    marker_path.write_text(json.dumps({**wanted, "num_params": num_params}, indent=2) + "\n")
    return out
