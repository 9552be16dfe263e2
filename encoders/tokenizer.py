"""Text -> the token ids a CLIP text tower takes, with no torch: Hugging Face `tokenizers` (Rust) over a tokenizer.json.

open_clip's own CLIP tokenizer (SimpleTokenizer) is the byte-level BPE of OpenAI's CLIP. `bpe_tokenizer_json` rebuilds
it as a tokenizer.json from the same vocabulary file (the construction of transformers' CLIPConverter), so every CLIP
folder, Immich's exports included, is read by one `Tokenizer` class. Ids equal open_clip's: the import checks them on
its parity texts (encoders/openclip_export.py: PARITY_TEXTS).

open_clip cleans text in Python before it tokenises (ftfy, HTML entities twice, whitespace runs, and by default lower
case); tokenizer.json's normaliser cannot run ftfy, so the cleaning is done here, as open_clip does it.
"""

from __future__ import annotations

import gzip
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import ModelError

# SimpleTokenizer's split: its special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLEANINGS = ("lower", "whitespace", "canonicalize", "none")


def bpe_tokenizer_json(vocab_gz: Path) -> str:
    """The tokenizer.json of open_clip's SimpleTokenizer, from its vocabulary file (bpe_simple_vocab_16e6.txt.gz).

    Its vocabulary: the 256 byte symbols, the same with the end-of-word mark `</w>`, one symbol per merge (the first
    48,894 of the file's), then <start_of_text> and <end_of_text>: 49,408 ids, as SimpleTokenizer builds it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    lines = gzip.open(vocab_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + _CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    sot, eot = len(vocab) - 2, len(vocab) - 1
    tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    tok.post_processor = processors.TemplateProcessing(single="<start_of_text> $A <end_of_text>",
                                                       special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)])
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (what byte-level BPE symbols are)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text: str, how: str) -> str:
    """open_clip's text cleaning (tokenizer.py: basic_clean, whitespace_clean, and the clean= modes)."""
    if how == "none":
        return text
    import ftfy

    text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split())
    if how == "lower":
        return text.lower()
    if how == "canonicalize":  # lower case, no punctuation
        return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())
    return text


@dataclass(frozen=True)
class TokenizerConfig:
    """How a folder's text becomes ids (textual/tokenizer_config.json, "simsearch" section, or Immich's fields)."""

    context_length: int
    clean: str = "whitespace"  # one of CLEANINGS
    pad_id: int = 0
    strip_sep_token: bool = False  # some HF tokenisers' separator becomes padding (open_clip's strip_sep_token)

    def __post_init__(self):
        if self.clean not in CLEANINGS:
            raise ModelError(f"unknown text cleaning {self.clean!r} (known: {', '.join(CLEANINGS)})")
        if self.context_length < 2:
            raise ModelError(f"context length {self.context_length} is too short")


class Tokenizer:
    """texts -> (N, context_length) int64 ids: cleaned, wrapped in the start and end tokens, truncated (the end
    token kept), padded with pad_id. tokenizer.json supplies the vocabulary and the special tokens."""

    def __init__(self, file: Path, config: TokenizerConfig):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception subclass for any unreadable file
            raise ModelError(f"{file}: not a readable tokenizer.json ({e})") from None
        self.config = config
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=config.context_length)
        self._sep = self._tok.token_to_id("[SEP]") if config.strip_sep_token else None

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = np.full((len(texts), self.config.context_length), self.config.pad_id, np.int64)  # (N, context)
        for row, enc in zip(ids, self._tok.encode_batch([clean(t, self.config.clean) for t in texts])):
            row[:len(enc.ids)] = enc.ids
        if self._sep is not None:
            ids[ids == self._sep] = self.config.pad_id
        return ids


def write_tokenizer_json(textual: Path) -> Path:
    """textual/tokenizer.json, made from open_clip's BPE vocabulary file when the folder has only that."""
    target = textual / "tokenizer.json"
    if not target.is_file():
        vocab = textual / "bpe_simple_vocab_16e6.txt.gz"
        if not vocab.is_file():
            raise ModelError(f"{textual}: neither tokenizer.json nor open_clip's bpe_simple_vocab_16e6.txt.gz")
        target.write_text(bpe_tokenizer_json(vocab))
    return target


def tokenizer_config(textual: Path, context_length: int, clean: str | None = None) -> TokenizerConfig:
    """The folder's tokenizer settings: simsearch's own section of tokenizer_config.json (an open_clip export), else
    what Immich's exports say (pad_token; `clean`: config.json's text_cfg.tokenizer_kwargs.clean, else whitespace
    only, as their tokenizer.json normalises case itself)."""
    file = textual / "tokenizer_config.json"
    try:
        doc = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{file}: unreadable ({e})") from None
    ours = doc.get("simsearch")
    if ours:
        return TokenizerConfig(context_length=int(ours.get("context_length", context_length)), clean=ours["clean"],
                               pad_id=int(ours.get("pad_id", 0)), strip_sep_token=bool(ours.get("strip_sep_token")))
    pad_id = 0
    pad = doc.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad:
        from tokenizers import Tokenizer as HFTokenizer

        pad_id = HFTokenizer.from_file(str(textual / "tokenizer.json")).token_to_id(pad)
        if pad_id is None:
            raise ModelError(f"{file}: its pad_token {pad!r} is not in tokenizer.json")
    return TokenizerConfig(context_length=context_length, clean=clean or "whitespace", pad_id=pad_id)
