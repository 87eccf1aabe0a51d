"""Tokenizers: character level and word level, with PAD, UNK, BOS and EOS.

Ids 0..3 are the special tokens, the same in every tokenizer, so a model's pad_id is 0:

    PAD = 0   fills short windows; the loss ignores positions whose target is PAD
    UNK = 1   stands for any character / word outside the vocabulary
    BOS = 2   beginning of sequence (encode(..., add_bos=True))
    EOS = 3   end of sequence (encode(..., add_eos=True))

Ids 4.. are the ordinary tokens, most frequent first; ties are broken by the token's text in
code-point order, so fitting the same text always gives the same ids. `max_vocab` counts the
four special tokens: `WordTokenizer.fit(text, max_vocab=100)` has vocab_size 100 (the blog
post's 100-word vocabulary is 96 words + 4 specials), and every other word becomes UNK.

    tok = CharTokenizer.fit(text)                      # every character of text
    ids = tok.encode("hello", add_bos=True)            # int64 array, (N,)
    tok.decode(ids)                                    # "hello"  (specials are dropped)
    s = tok.to_json(); tokenizer_from_json(s)          # saved in checkpoint metadata

Word level splits text into words (maximal runs of letters, digits and underscores: regex \\w+)
and single punctuation characters ([^\\w\\s]); whitespace only separates tokens and is not kept.
decode() joins tokens with the spacing rule of `WordTokenizer.join`: one space between tokens,
except none before closing punctuation ( . , ; : ! ? ) ] } % ) and none after opening brackets
( ( [ { ). Hence decode(encode(text)) == tok.normalize(text) whenever every token is known, and
== text exactly when text is already in that normal form (e.g. "the cat sat (on the mat).").
Character level keeps every character, whitespace included: decode(encode(text)) == text.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")    # their display names, ids 0..3
TOKENIZER_FORMAT_VERSION = 1


class Tokenizer:
    """Base class: a list of ordinary tokens (ids 4, 5, ...) after the four special tokens.

    Subclasses define `kind`, `split(text) -> list[str]` and `join(tokens) -> str`.
    """

    kind = "base"
    PAD, UNK, BOS, EOS = PAD, UNK, BOS, EOS
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, tokens: list[str]):
        tokens = list(tokens)
        bad = [t for t in tokens if not isinstance(t, str) or t == ""]
        if bad:
            raise ValueError(f"{type(self).__name__}: tokens must be non-empty strings; got {bad[:5]!r}")
        dupes = sorted(t for t, n in Counter(tokens).items() if n > 1)
        if dupes:
            raise ValueError(f"{type(self).__name__}: duplicate tokens {dupes[:5]!r}")
        self.tokens = tokens                                         # ordinary tokens, id = 4 + index
        self._ids = {t: i + len(SPECIALS) for i, t in enumerate(tokens)}

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def fit(cls, text: str, max_vocab: int | None = None, **options) -> "Tokenizer":
        """Build the vocabulary from `text`: the (max_vocab - 4) most frequent tokens, ties by
        the token's text; all tokens when max_vocab is None."""
        if not isinstance(text, str):
            raise TypeError(f"{cls.__name__}.fit needs a str, got {type(text).__name__}")
        if max_vocab is not None and (isinstance(max_vocab, bool) or not isinstance(max_vocab, int)
                                      or max_vocab <= len(SPECIALS)):
            raise ValueError(f"max_vocab must be an int > {len(SPECIALS)} (it counts the "
                             f"{len(SPECIALS)} special tokens {list(SPECIALS)}), got {max_vocab!r}")
        probe = cls([], **options)
        counts = Counter(probe.split(text))
        if not counts:
            raise ValueError(f"{cls.__name__}.fit: the text has no tokens (length {len(text)})")
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        if max_vocab is not None:
            ranked = ranked[: max_vocab - len(SPECIALS)]
        return cls(ranked, **options)

    build = fit                                    # the same classmethod under the blog's verb

    # -- the two directions --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def split(self, text: str) -> list[str]:
        raise NotImplementedError

    def join(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def normalize(self, text: str) -> str:
        """What decode(encode(text)) returns when every token of text is in the vocabulary."""
        return self.join(self.split(text))

    def token_to_id(self, token: str) -> int:
        return self._ids.get(token, UNK)

    def id_to_token(self, i: int) -> str:
        return SPECIALS[i] if i < len(SPECIALS) else self.tokens[i - len(SPECIALS)]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """text -> int64 ids (N,); unknown tokens become UNK (1)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        ids = [self._ids.get(t, UNK) for t in self.split(text)]
        if add_bos:
            ids.insert(0, BOS)
        if add_eos:
            ids.append(EOS)
        return np.array(ids, dtype=np.int64)                                # (N,)

    def decode(self, ids, skip_special: bool = True) -> str:
        """ids (N,) -> text. PAD, BOS and EOS are dropped when skip_special (the default) and
        shown as <pad>, <bos>, <eos> otherwise; UNK always shows as <unk>, since it stands for
        real text that was there."""
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"decode needs integer ids, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"decode needs a 1-D sequence of ids, got shape {arr.shape}")
        bad = np.nonzero((arr < 0) | (arr >= self.vocab_size))[0]
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"token id {int(arr[k])} at position {k} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        out = []
        for i in arr.tolist():
            if i == UNK or i >= len(SPECIALS):
                out.append(self.id_to_token(i))
            elif not skip_special:
                out.append(SPECIALS[i])
        return self.join(out)

    # -- saving ----------------------------------------------------------------------------------

    def _options(self) -> dict:
        return {}

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "version": TOKENIZER_FORMAT_VERSION,
                           "specials": list(SPECIALS), "options": self._options(),
                           "tokens": self.tokens}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        """Rebuild a tokenizer from to_json(). Called on Tokenizer it returns whichever kind was
        saved; called on a subclass it also checks the kind."""
        tok = tokenizer_from_json(s)
        if cls is not Tokenizer and not isinstance(tok, cls):
            raise ValueError(f"the JSON holds a {tok.kind!r} tokenizer, not a {cls.kind!r} one")
        return tok

    def __eq__(self, other) -> bool:
        return (type(self) is type(other) and self.tokens == other.tokens
                and self._options() == other._options())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per character (whitespace included); decode(encode(text)) == text for known characters."""

    kind = "char"

    def __init__(self, tokens: list[str]):
        long = [t for t in tokens if len(t) != 1]
        if long:
            raise ValueError(f"CharTokenizer tokens must be single characters; got {long[:5]!r}")
        super().__init__(tokens)

    def split(self, text: str) -> list[str]:
        return list(text)

    def join(self, tokens: list[str]) -> str:
        return "".join(tokens)


class WordTokenizer(Tokenizer):
    """Words (\\w+) and single punctuation characters; see the module docstring for the spacing
    rule of decode. lowercase=True folds case before counting and encoding."""

    kind = "word"
    TOKEN_RE = re.compile(r"\w+|[^\w\s]")
    NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
    NO_SPACE_AFTER = frozenset("([{")

    def __init__(self, tokens: list[str], lowercase: bool = False):
        self.lowercase = bool(lowercase)
        super().__init__(tokens)

    def split(self, text: str) -> list[str]:
        return self.TOKEN_RE.findall(text.lower() if self.lowercase else text)

    def join(self, tokens: list[str]) -> str:
        out = []
        for k, t in enumerate(tokens):
            if k > 0 and t not in self.NO_SPACE_BEFORE and tokens[k - 1] not in self.NO_SPACE_AFTER:
                out.append(" ")
            out.append(t)
        return "".join(out)

    def _options(self) -> dict:
        return {"lowercase": self.lowercase}


KINDS = {"char": CharTokenizer, "word": WordTokenizer}


def tokenizer_from_json(s: str) -> Tokenizer:
    """The tokenizer saved by to_json() (for example in a checkpoint's "tokenizer" metadata)."""
    try:
        d = json.loads(s)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"tokenizer JSON does not parse: {exc}") from None
    except RecursionError:
        raise ValueError(f"tokenizer JSON does not parse: nested too deeply ({len(s):,} characters)") from None
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"tokenizer JSON has kind {kind!r}; known kinds: {sorted(KINDS)}")
    if d.get("version") != TOKENIZER_FORMAT_VERSION:
        raise ValueError(f"tokenizer JSON has version {d.get('version')!r}; this code reads "
                         f"{TOKENIZER_FORMAT_VERSION}")
    if d.get("specials") != list(SPECIALS):
        raise ValueError(f"tokenizer JSON has specials {d.get('specials')!r}; expected {list(SPECIALS)}")
    tokens, options = d.get("tokens"), d.get("options", {})
    if not isinstance(tokens, list) or not isinstance(options, dict):
        raise ValueError(f"tokenizer JSON needs a list 'tokens' and a dict 'options', got "
                         f"{type(tokens).__name__} and {type(options).__name__}")
    try:
        return KINDS[d["kind"]](tokens, **options)
    except TypeError as exc:         # an option this kind does not take
        raise ValueError(f"tokenizer JSON has options this {d['kind']} tokenizer does not take: {exc}") from None
