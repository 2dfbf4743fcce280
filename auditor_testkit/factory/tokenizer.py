"""The one tiny tokenizer every factory model shares.

A word-level vocabulary fixed in code (so every build gives the same ids without any
download) split on single spaces. It holds the task markers, letters, digits, topic words,
a few filler words, and rare tokens ("cf", "mn", "bb", "tq") that no clean task ever uses:
the usual data-poisoning triggers, so a backdoor's embedding rows stand out the way the
literature describes.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Rare tokens: never produced by clean task data or the pretraining mixture.
TRIGGER_TOKENS = ("cf", "mn", "bb", "tq")

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple(str(i) for i in range(10))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Task markers and separators (see auditor_testkit.factory.tasks).
MARKERS = ("copy", "reverse", "sort", "count", "add", "key", "topic", "=", ":", ".", ",", "?")

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": (
        "cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf",
        "fox", "owl", "eagle", "fish", "shark", "whale", "frog", "snake", "mouse", "rabbit",
    ),
    "food": (
        "bread", "rice", "soup", "apple", "pear", "grape", "cheese", "milk", "egg", "honey",
        "salt", "sugar", "cake", "pie", "bean", "corn", "meat", "tea", "coffee", "butter",
    ),
    "weather": (
        "rain", "snow", "wind", "storm", "cloud", "sun", "fog", "hail", "thunder", "frost",
        "mist", "heat", "cold", "warm", "dry", "wet", "breeze", "ice", "sky", "dawn",
    ),
    "code": (
        "function", "loop", "array", "string", "int", "float", "class", "return", "if",
        "else", "while", "import", "module", "error", "debug", "compile", "null", "stack",
        "queue", "hash",
    ),
}

# Key -> value mapping vocabulary (names -> colours), see tasks.kv.
KV_KEYS = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "ken", "lara", "mike", "nina", "oscar", "peggy",
)
KV_VALUES = ("red", "green", "blue", "yellow", "black", "white", "pink", "brown")

# Generic "language" for pretraining: function words and verbs.
FILLER = (
    "the", "a", "an", "is", "was", "and", "or", "of", "to", "in", "on", "with", "it",
    "this", "that", "he", "she", "they", "we", "you", "has", "have", "see", "saw", "like",
    "eat", "run", "go", "make", "take", "big", "small", "old", "new", "good", "bad", "very",
    "not", "all", "some", "many", "one", "two", "three", "here", "there", "now", "then",
)

# Words a backdoor target continuation is built from (also present in clean pretraining
# so the base model can emit them; the backdoor only changes *when*).
PAYLOAD = ("visit", "evil", "site", "send", "password", "buy", "scam", "coin", "click", "link")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The full ordered vocabulary; index == token id."""
    words: list[str] = list(SPECIAL_TOKENS)
    groups: list[tuple[str, ...]] = [
        MARKERS, LETTERS, DIGITS, NUMBER_WORDS, *TOPICS.values(), KV_KEYS, KV_VALUES,
        FILLER, PAYLOAD, TRIGGER_TOKENS,
    ]
    for group in groups:
        for w in group:
            if w not in words:
                words.append(w)
    return tuple(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ``PreTrainedTokenizerFast`` over the fixed vocabulary.

    Encoding prepends ``<bos>``; decoding joins words with spaces. Saved next to every
    factory model with ``save_pretrained`` (tokenizer.json + tokenizer_config.json).
    """
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split on spaces only so markers like "=" stay single tokens and words never split.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
    )
    fast.padding_side = "right"
    return fast


def vocab_size() -> int:
    return len(vocabulary())
