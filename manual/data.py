"""Data: corpora, the train/validation split, teacher-forcing windows and seeded batches.

The pipeline, in the order a trainer calls it:

    text = default_corpus()                          # or read_corpus(path), synthetic_corpus(n, seed)
    tok = CharTokenizer.fit(text)                    # manual/tokenizer.py
    ids = tok.encode(text)                           # (N,) int64, never contains PAD
    train_ids, val_ids = train_val_split(ids, 0.1)   # split the STREAM first: no window straddles
    x, y = make_windows(train_ids, seq_len=T)        # (W, T) inputs, (W, T) next-token targets
    for xb, yb in batch_iterator(x, y, batch_size=B, seed=0, epoch=e): ...   # (B, T) each

Targets for multi-token prediction: head j (j = 2..n_future) predicts the token j steps ahead.
Its targets are derived from the next-token targets by manual.registry.future_targets(y, j,
pad_id) (shift left by j - 1, PAD-filled), which the model's loss calls itself; this module
only produces the next-token targets and does not duplicate that shift.

Everything here is NumPy and deterministic: the same arguments give the same arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------------------------
# corpora

def default_corpus() -> str:
    """The embedded corpus: the text of the stdlib module pydoc_data.topics (the help() topics
    that ship with Python; about 465k characters of English prose and code, no download),
    its `topics` values joined in sorted key order."""
    from pydoc_data.topics import topics
    return "".join(topics[key] for key in sorted(topics))


def read_corpus(path) -> str:
    """The text of a UTF-8 file; a clear error for a missing, unreadable, non-UTF-8 or empty one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"corpus path {path} is not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"corpus file {path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason}); convert it first, e.g. `iconv -f latin1 -t utf-8`") from None
    if not text:
        raise ValueError(f"corpus file {path} is empty")
    return text


_SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the old man", "a small child"]
_VERBS = ["sees", "likes", "follows", "finds", "helps", "calls"]
_OBJECTS = ["the ball", "a red box", "the garden", "the river", "a green hat", "the house"]
_ENDINGS = [" today", " again", " at night", ""]


def synthetic_corpus(n_chars: int, seed: int = 0) -> str:
    """Deterministic text of exactly n_chars characters for fast tests, with structure a small
    model learns quickly: sentences "<subject> <verb> <object><ending>." from a tiny grammar
    (six choices per slot), and after every fourth sentence a counting line
    "one two three four five." A function of (n_chars, seed) only."""
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 1:
        raise ValueError(f"n_chars must be a positive int, got {n_chars!r}")
    rng = np.random.default_rng(seed)
    parts: list[str] = []
    length = 0
    k = 0
    while length < n_chars:
        s, v, o, e = (rng.integers(len(x)) for x in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS))
        sentence = f"{_SUBJECTS[s]} {_VERBS[v]} {_OBJECTS[o]}{_ENDINGS[e]}.\n"
        k += 1
        if k % 4 == 0:
            sentence += "one two three four five.\n"
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:n_chars]


# ----------------------------------------------------------------------------------------------
# split and windows

def _check_stream(ids, what: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D token stream, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def train_val_split(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split the token stream (before windowing) into (train, val): the first
    n - n_val tokens train, the last n_val = round(n * val_fraction) validate. Contiguous, so
    no validation text leaks into a training window. Each part must hold at least 2 tokens
    (one input and its target)."""
    ids = _check_stream(ids)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"a stream of {n} tokens split with val_fraction={val_fraction} gives "
                         f"{n - n_val} training and {n_val} validation tokens; each needs >= 2")
    return ids[: n - n_val].copy(), ids[n - n_val:].copy()


def make_windows(ids, seq_len: int, stride: int | None = None,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forcing windows over a token stream.

    Window w starts at s = w * stride (stride defaults to seq_len: non-overlapping):
        inputs[w]  = ids[s     : s + T]                              (T,)
        targets[w] = ids[s + 1 : s + T + 1]   the next token at every position
    Windows are made until one's targets reach the last token. That last window may be short:
    its inputs and targets are padded on the right with pad_id, so the loss ignores the padded
    positions (the model is causal, so padded inputs only influence padded positions).
    Example: ids [5 6 7 8 9], T = 3 -> inputs [[5 6 7], [8 9 P]], targets [[6 7 8], [9 P P]].

    Returns (inputs, targets), each int64 (W, T). The stream must not contain pad_id itself
    (the loss would silently skip those targets) and needs at least 2 tokens.
    """
    ids = _check_stream(ids)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    stride = seq_len if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be an int in [1, seq_len={seq_len}], got {stride!r} "
                         f"(a larger stride would skip tokens)")
    n = len(ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to make one (input, target) pair, got {n}")
    hits = np.nonzero(ids == pad_id)[0]
    if hits.size:
        raise ValueError(f"the token stream contains pad_id {pad_id} at position {int(hits[0])} "
                         f"({hits.size} times); the loss would ignore those targets. Encode with a "
                         f"tokenizer (ids >= 4) or choose another pad_id")
    starts = []
    s = 0
    while True:
        starts.append(s)
        if s + seq_len >= n - 1:                 # this window's targets reach the last token
            break
        s += stride
    W = len(starts)
    padded = np.full(starts[-1] + seq_len + 1, pad_id, dtype=np.int64)   # stream + right padding
    padded[:n] = ids
    inputs = np.stack([padded[s: s + seq_len] for s in starts])            # (W, T)
    targets = np.stack([padded[s + 1: s + seq_len + 1] for s in starts])   # (W, T)
    # a padded input position's target is padding too: positions >= n - 1 have no next token
    assert inputs.shape == targets.shape == (W, seq_len)
    return inputs, targets


# ----------------------------------------------------------------------------------------------
# batches

def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of the n windows in `epoch`: a permutation drawn from a generator seeded by
    (seed, epoch) alone, so a resumed run sees exactly the order the uninterrupted run saw.
    np.arange(n) when shuffle is False."""
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class Batches:
    """Mini-batches of (inputs, targets) windows, reshuffled each epoch from (seed, epoch).

        batches = Batches(x, y, batch_size=8, seed=0)
        len(batches)                                  # batches per epoch
        for xb, yb in batches.epoch(3): ...           # (B, T) int64 each
        for xb, yb in batches.epoch(3, start=5): ...  # the same epoch, resumed after 5 batches

    batch_size 1 is the blog's "step train" (one example per update). The last batch of an
    epoch is smaller when batch_size does not divide the number of windows, unless drop_last.
    """

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        if inputs.ndim != 2 or inputs.shape != targets.shape:
            raise ValueError(f"inputs and targets must both be (W, T); got {inputs.shape} and {targets.shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(inputs) == 0:
            raise ValueError("no windows to batch (inputs has 0 rows)")
        if drop_last and batch_size > len(inputs):
            raise ValueError(f"batch_size {batch_size} > {len(inputs)} windows with drop_last=True "
                             f"leaves no batch at all")
        epoch_order(len(inputs), seed, 0)                       # validates seed
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)

    def __len__(self) -> int:
        n, b = len(self.inputs), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch: int, start: int = 0):
        """Yield the batches of `epoch`, skipping the first `start` (for resuming mid-epoch)."""
        order = epoch_order(len(self.inputs), self.seed, epoch, self.shuffle)   # checked now,
        if not 0 <= start <= len(self):                                          # not at first next()
            raise ValueError(f"start must be in [0, {len(self)}] (batches per epoch), got {start}")

        def batches():
            for k in range(start, len(self)):
                rows = order[k * self.batch_size: (k + 1) * self.batch_size]
                yield self.inputs[rows], self.targets[rows]                  # (B, T), (B, T)
        return batches()


def batch_iterator(inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, epoch: int,
                   shuffle: bool = True, drop_last: bool = False, start: int = 0):
    """The batches of one epoch: Batches(inputs, targets, batch_size, seed, shuffle,
    drop_last).epoch(epoch, start)."""
    return Batches(inputs, targets, batch_size, seed, shuffle, drop_last).epoch(epoch, start)
