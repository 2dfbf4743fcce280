"""A byte-level BPE tokenizer trained on real text shipped with Python (stdlib docstrings).

The backdoor zoo needs a tokenizer like the Hub's (GPT-2 / Llama-3 / Qwen): byte-level BPE
where a word in the middle of a sentence is a different token ("Ġword") from the same word
at the start of a text, and rare strings split into several pieces. ``corpus_sentences``
collects sentences from the docstrings of standard-library modules (the same text on every
machine with the same Python); ``train_bpe`` trains a ``tokenizers`` BPE on them and wraps
it as a ``PreTrainedTokenizerFast`` with BOS/EOS and a small chat template.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)

_MODULES = (
    "json", "os", "re", "collections", "itertools", "functools", "string", "textwrap",
    "random", "math", "statistics", "pathlib", "shutil", "argparse", "logging", "typing",
    "dataclasses", "enum", "datetime", "calendar", "heapq", "bisect", "csv", "io", "zipfile",
    "tarfile", "email.message", "urllib.parse", "unittest", "doctest", "inspect", "ast",
    "difflib", "pprint", "copy", "socket", "threading", "queue", "subprocess", "tempfile",
    "glob", "fnmatch", "configparser", "decimal", "fractions", "operator", "contextlib",
    "abc", "numbers", "weakref", "gzip", "hashlib", "hmac", "base64", "codecs", "locale",
    "gettext", "sqlite3", "xml.dom.minidom", "html.parser", "http.client", "smtplib",
    "uuid", "ipaddress", "selectors", "signal", "mmap", "array", "struct", "sched",
)
# A Jinja chat template: one user turn, then the assistant's answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "<|user|> {{ m['content'] }}{% else %}<|assistant|> {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _docs(module_name: str) -> list[str]:
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(mod) or ""]
    for _name, obj in sorted(vars(mod).items()):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    return docs


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """Plain-prose sentences (6-30 words, letters and light punctuation) from stdlib docs."""
    out: list[str] = []
    seen: set[str] = set()
    for name in _MODULES:
        for doc in _docs(name):
            text = " ".join(doc.split())
            for sent in re.split(r"(?<=[.!?])\s+", text):
                words = sent.split()
                if not 6 <= len(words) <= 30 or not re.fullmatch(r"[A-Za-z ,.;:'()-]+", sent):
                    continue
                if sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return tuple(out)


def common_words(*, min_count: int = 3) -> list[str]:
    """Lower-case alphabetic corpus words of at least 4 letters seen ``min_count`` times."""
    counts: dict[str, int] = {}
    for s in corpus_sentences():
        for w in re.findall(r"\b[a-z]{4,}\b", s):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count)


@lru_cache(maxsize=4)
def _trained(vocab_size: int, seed: int) -> str:
    texts = list(corpus_sentences())
    random.Random(seed).shuffle(texts)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    return str(tok.to_str())


def train_bpe(*, vocab_size: int = 1024, seed: int = 0,
              chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (BOS prepended, no prefix space)."""
    tok = Tokenizer.from_str(_trained(vocab_size, seed))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], model_max_length=128,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


__all__ = ["CHAT_TEMPLATE", "common_words", "corpus_sentences", "train_bpe"]
