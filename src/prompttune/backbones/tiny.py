"""Tiny random backbones built in-process for tests: nothing is downloaded, every process gets the same weights.

Three architectures cover the code paths real models take:

- `tiny-llama`: `LlamaForCausalLM` with rotary positions and grouped-query attention (4 heads, 2 KV heads),
  untied LM head.
- `tiny-gpt2`: `GPT2LMHeadModel`, a second decoder with *learned absolute* positions and a tied head.
- `tiny-bert`: `BertModel`, a bidirectional encoder without an MLM head (like the embedded `minilm-l6`).

Tokenizers come from a fixed built-in English corpus via the `tokenizers` library and are identical across
processes. The decoders share a 512-piece byte-level BPE (any string encodes; " positive", " negative", " good",
" movie", ... are single pieces); `tokenizer("x").input_ids` returns the BPE ids only, no BOS/EOS added (GPT-2
convention, like SmolLM2). `tiny-bert` uses a WordPiece vocab (characters + whole corpus words, unknown
characters -> `[UNK]`) and wraps every input as `[CLS] ... [SEP]`.

Attention is `eager`: plain matmul + softmax, deterministic on CPU and GPU and able to return attention maps;
speed is irrelevant at this size.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ..errors import PromptTuneError
from ..zoo import ModelRef

SEED = 1234
MAX_POSITIONS = 512
HIDDEN = 32
# With hidden 32, std 0.2 gives logits of std ~1 after the final norm, so next-token distributions are far from
# uniform (the usual 0.02 gives near-uniform outputs that make training/eval tests vacuous).
INIT_STD = 0.2

KINDS = {"tiny-llama": "causal_lm", "tiny-gpt2": "causal_lm", "tiny-bert": "encoder"}

# Label-like words are repeated so BPE learns them as single pieces (" positive", " negative", ...).
_KEYWORDS = (
    "good bad great terrible movie film review sentiment positive negative neutral question answer yes no "
    "true false label text the a is it this was not very and or but of to in for with"
)
_CORPUS = """\
Review: This movie was great. The acting was good and the story was great fun.
Sentiment: positive
Review: This film was terrible. The plot was bad and the ending was worse.
Sentiment: negative
Review: The film was fine. Not good, not bad, just a movie.
Sentiment: neutral
Question: Is the review positive or negative? Answer: positive.
Question: Was the movie good? Answer: yes. Was it bad? Answer: no.
Question: How many stars did the review give? Answer: 4 out of 5, or 80 percent.
Text: I loved this film! It is one of the best movies of 2019; a great cast, great music, great jokes.
Text: I hated it... the worst film I have seen in years (1 star). Do not watch it.
Label: negative. Label: positive. Label: neutral.
The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 1000 3.14 0.5 -1 +2 = 3 * 4 / 5 % 6
Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ & < > | ~ ^ `
Is it true or false? It is true. It is false. Yes or no? Yes. No.
A review of a film is a text that says if the film is good or bad; the answer is the label.
We watched the movie with friends and talked about it for a long time after the show.
The story starts slowly, but the second half is very strong and the final scene is moving.
"""


def _corpus() -> list[str]:
    return _CORPUS.splitlines(keepends=True) + [_KEYWORDS + "\n", " " + _KEYWORDS + "\n"] * 8


def _bpe() -> Tokenizer:
    # The BPE trainer is deterministic here: the byte alphabet is fixed and merge ties break on pair ids.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _wordpiece() -> Tokenizer:
    # Not WordPieceTrainer: it numbers the alphabet in hash-map order, so ids differ between processes.
    # Vocab = specials, every corpus character (alone and as "##c"), then whole words by frequency.
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for line in _corpus() for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    pieces += [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


@functools.cache
def _tokenizer_json(kind: str) -> str:
    """Build the tokenizer once per process; returns its JSON so each `build` gets a fresh, unshared object."""
    return (_bpe() if kind == "bpe" else _wordpiece()).to_str()


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer for a tiny backbone (the trained tokenizer itself is cached per process)."""
    if name == "tiny-bert":
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_tokenizer_json("wordpiece")),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=MAX_POSITIONS,
        )
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json("bpe")),
        bos_token=eos,
        eos_token=eos,
        unk_token=eos,
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )


def _config(name: str, tokenizer: PreTrainedTokenizerFast):
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    if name == "tiny-llama":
        eos = tokenizer.eos_token_id
        return LlamaForCausalLM, LlamaConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            initializer_range=INIT_STD,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    if name == "tiny-gpt2":
        eos = tokenizer.eos_token_id
        return GPT2LMHeadModel, GPT2Config(
            vocab_size=vocab,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=MAX_POSITIONS,
            initializer_range=INIT_STD,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return BertModel, BertConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_STD,
        pad_token_id=pad,
    )


def build(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, ModelRef]:
    """Build a tiny random backbone: same weights and tokenizer in every process, caller's RNG untouched.

    Args:
        name: `tiny-llama`, `tiny-gpt2` or `tiny-bert`.
    Returns:
        `(model, tokenizer, ref)`: an fp32 model in eval mode with `requires_grad=False`, its tokenizer
        (`len(tokenizer) == config.vocab_size`) and a `ModelRef` with path `"tiny:<name>"`.
    Raises:
        PromptTuneError: `name` is not a tiny backbone.
    """
    if name not in KINDS:
        raise PromptTuneError(f"unknown tiny backbone {name!r}; expected one of {', '.join(KINDS)}")
    tokenizer = build_tokenizer(name)
    cls, config = _config(name, tokenizer)
    # fork_rng restores the caller's CPU (and CUDA) RNG state afterwards, so building is side-effect free.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, tokenizer, ModelRef(name=name, path=f"tiny:{name}", kind=KINDS[name], embedded=False)
