"""manual/tokenizer.py and manual/data.py: tokenizers, corpora, split, windows, batches."""
import json

import numpy as np
import pytest

from manual.data import (Batches, batch_iterator, default_corpus, epoch_order, make_windows,
                         read_corpus, synthetic_corpus, train_val_split)
from manual.tokenizer import (BOS, EOS, PAD, UNK, CharTokenizer, Tokenizer, WordTokenizer,
                              tokenizer_from_json)


# ----------------------------------------------------------------------------------------------
# tokenizers

def test_special_ids():
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    tok = CharTokenizer.fit("ab")
    assert tok.pad_id == 0 and tok.vocab_size == 6 and len(tok) == 6


def test_char_frequency_order_and_ties():
    tok = CharTokenizer.fit("banana!")
    # counts: a 3, n 2, b 1, ! 1 -> ties (b, !) by code point: "!" (33) before "b" (98)
    assert tok.tokens == ["a", "n", "!", "b"]
    np.testing.assert_array_equal(tok.encode("nab!"), [5, 4, 7, 6])
    assert tok.encode("nab!").dtype == np.int64


def test_char_round_trip_exact_including_whitespace():
    text = "Hello,  world!\n\tTabs and  spaces ü€\n"
    tok = CharTokenizer.fit(text)
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == len(text) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == "<bos>" + text + "<eos>"


def test_char_max_vocab_maps_the_rest_to_unk():
    tok = CharTokenizer.fit("aaabbc", max_vocab=6)          # 4 specials + a, b
    assert tok.vocab_size == 6 and tok.tokens == ["a", "b"]
    np.testing.assert_array_equal(tok.encode("abcz"), [4, 5, UNK, UNK])
    assert tok.decode(tok.encode("abcz")) == "ab<unk><unk>"


def test_decode_drops_pad():
    tok = CharTokenizer.fit("ab")
    assert tok.decode([4, 5, PAD, PAD]) == "ab"
    assert tok.decode(np.array([], dtype=np.int64)) == ""


def test_word_split_and_spacing_rule():
    tok = WordTokenizer.fit("the cat sat (on the mat). the end, again!")
    assert tok.split("Hello, world (again).") == ["Hello", ",", "world", "(", "again", ")", "."]
    text = "the cat sat (on the mat). the end, again!"
    assert tok.decode(tok.encode(text)) == text                  # already in normal form
    messy = "the   cat\nsat ( on the mat ) .the end ,again !"
    assert tok.normalize(messy) == text
    assert tok.decode(tok.encode(messy)) == text                  # == normalize(messy)
    assert tok.normalize(tok.normalize(messy)) == tok.normalize(messy)


def test_word_vocabulary_of_100_by_frequency():
    # word i appears 200 - i times: a strict frequency order, the 96 most frequent are kept
    words = [f"w{i:03d}" for i in range(150)]
    text = " ".join(w for i, w in enumerate(words) for _ in range(200 - i))
    tok = WordTokenizer.fit(text, max_vocab=100)
    assert tok.vocab_size == 100
    assert tok.tokens == words[:96]
    ids = tok.encode("w000 w095 w096 w149")
    np.testing.assert_array_equal(ids, [4, 99, UNK, UNK])
    assert tok.decode(ids) == "w000 w095 <unk> <unk>"


def test_word_ties_are_deterministic():
    a = WordTokenizer.fit("zeta alpha mid zeta alpha mid")
    b = WordTokenizer.fit("mid alpha zeta zeta mid alpha")
    assert a.tokens == b.tokens == ["alpha", "mid", "zeta"]


def test_word_lowercase_option():
    tok = WordTokenizer.fit("The the THE cat", lowercase=True)
    assert tok.tokens == ["the", "cat"]
    assert tok.decode(tok.encode("THE CAT")) == "the cat"


@pytest.mark.parametrize("tok", [CharTokenizer.fit("hello world\n"),
                                 WordTokenizer.fit("Hello, world. Hello!", max_vocab=6, lowercase=True)],
                         ids=["char", "word"])
def test_json_round_trip(tok):
    s = tok.to_json()
    json.loads(s)
    for back in (tokenizer_from_json(s), Tokenizer.from_json(s), type(tok).from_json(s)):
        assert back == tok and type(back) is type(tok)
        assert back.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(back.encode("hello world"), tok.encode("hello world"))


def test_json_errors():
    with pytest.raises(ValueError, match="holds a 'char' tokenizer, not a 'word' one"):
        WordTokenizer.from_json(CharTokenizer.fit("ab").to_json())
    with pytest.raises(ValueError, match="kind 'bpe'"):
        tokenizer_from_json(json.dumps({"kind": "bpe"}))
    with pytest.raises(ValueError, match="does not parse"):
        tokenizer_from_json("{not json")


def test_tokenizer_errors():
    tok = CharTokenizer.fit("abc")                                   # vocab_size 7
    with pytest.raises(ValueError, match=r"token id 7 at position 1 is outside the vocabulary \[0, 7\)"):
        tok.decode([4, 7])
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integer ids"):
        tok.decode(np.array([4.0, 5.0]))
    with pytest.raises(ValueError, match=r"1-D.*\(1, 2\)"):
        tok.decode(np.array([[4, 5]]))
    with pytest.raises(TypeError, match="needs a str"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match=r"max_vocab must be an int > 4.*got 4"):
        CharTokenizer.fit("abc", max_vocab=4)
    with pytest.raises(ValueError, match="no tokens"):
        WordTokenizer.fit("   \n ")
    with pytest.raises(ValueError, match=r"duplicate tokens \['a'\]"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


def test_default_corpus_char_tokenizer():
    text = default_corpus()
    assert len(text) > 400_000 and text == default_corpus()
    assert "Assignment statements" in text
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text[:5000])
    assert tok.decode(ids) == text[:5000] and ids.min() >= 4


# ----------------------------------------------------------------------------------------------
# corpora

def test_synthetic_corpus_is_deterministic_and_exact_length():
    a = synthetic_corpus(2000, seed=1)
    assert len(a) == 2000 and a == synthetic_corpus(2000, seed=1)
    assert a != synthetic_corpus(2000, seed=2)
    assert synthetic_corpus(500, seed=1) == a[:500]               # a prefix of the longer text
    assert "one two three four five." in a
    assert len(set(a)) < 40                                       # small alphabet: learnable fast
    with pytest.raises(ValueError, match="positive int, got 0"):
        synthetic_corpus(0)


def test_read_corpus(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo\nworld\n", encoding="utf-8")
    assert read_corpus(good) == "héllo\nworld\n"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc é".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte 0xe9 at offset 4"):
        read_corpus(bad)
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not a regular file"):
        read_corpus(tmp_path)


# ----------------------------------------------------------------------------------------------
# split and windows

def test_train_val_split_sizes():
    ids = np.arange(4, 104)                                       # 100 tokens
    train, val = train_val_split(ids, 0.1)
    assert len(train) == 90 and len(val) == 10
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)     # contiguous, in order
    train, val = train_val_split(ids, 0.25)
    assert (len(train), len(val)) == (75, 25)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1\.0"):
        train_val_split(ids, 1.0)
    with pytest.raises(ValueError, match=r"10 tokens.*gives 9 training and 1 validation"):
        train_val_split(np.arange(4, 14), 0.1)


def test_windows_by_hand_with_padding():
    x, y = make_windows(np.array([5, 6, 7, 8, 9]), seq_len=3)
    np.testing.assert_array_equal(x, [[5, 6, 7], [8, 9, 0]])
    np.testing.assert_array_equal(y, [[6, 7, 8], [9, 0, 0]])
    assert x.dtype == y.dtype == np.int64


def test_windows_exact_fit_has_no_padding():
    x, y = make_windows(np.arange(4, 11), seq_len=3)              # 7 tokens: 6 (input, target) pairs
    np.testing.assert_array_equal(x, [[4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(y, [[5, 6, 7], [8, 9, 10]])


def test_windows_with_stride_and_pad_id():
    x, y = make_windows(np.arange(10, 17), seq_len=4, stride=2, pad_id=99)
    # starts 0, 2: the window at 2 has targets ids[3:7] = 13..16, reaching the last token
    np.testing.assert_array_equal(x, [[10, 11, 12, 13], [12, 13, 14, 15]])
    np.testing.assert_array_equal(y, [[11, 12, 13, 14], [13, 14, 15, 16]])
    x, y = make_windows(np.arange(10, 14), seq_len=4, stride=2, pad_id=99)
    np.testing.assert_array_equal(x, [[10, 11, 12, 13]])
    np.testing.assert_array_equal(y, [[11, 12, 13, 99]])


def test_windows_teacher_forcing_invariant():
    ids = CharTokenizer.fit(synthetic_corpus(3000, 0)).encode(synthetic_corpus(3000, 0))
    x, y = make_windows(ids, seq_len=16)
    real = y != PAD
    assert real.sum() == len(ids) - 1                             # every next-token pair exactly once
    # wherever the target is real, it is the token after the input in the stream
    flat_in = x[:, 1:][real[:, :-1]]
    np.testing.assert_array_equal(flat_in, y[:, :-1][real[:, :-1]])
    # non-overlapping windows: the inputs read the whole stream, the targets the stream from 1
    np.testing.assert_array_equal(x[x != PAD], ids)
    np.testing.assert_array_equal(y[real], ids[1:])


def test_future_targets_come_from_registry():
    from manual.registry import future_targets
    x, y = make_windows(np.array([5, 6, 7, 8, 9]), seq_len=3)
    np.testing.assert_array_equal(future_targets(y, 2, PAD), [[7, 8, 0], [0, 0, 0]])


def test_window_errors():
    with pytest.raises(ValueError, match=r"pad_id 0 at position 2"):
        make_windows(np.array([5, 6, 0, 7]), seq_len=2)
    with pytest.raises(ValueError, match="at least 2 tokens.*got 1"):
        make_windows(np.array([5]), seq_len=2)
    with pytest.raises(ValueError, match=r"stride must be an int in \[1, seq_len=4\], got 5"):
        make_windows(np.arange(4, 20), seq_len=4, stride=5)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        make_windows(np.arange(4, 20), seq_len=0)
    with pytest.raises(TypeError, match="integer token ids"):
        make_windows(np.array([4.0, 5.0]), seq_len=2)
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        make_windows(np.array([[4, 5], [6, 7]]), seq_len=2)


# ----------------------------------------------------------------------------------------------
# batches

def windows(n=10, T=3):
    x = np.arange(4, 4 + n * T).reshape(n, T)
    return x, x + 1


def test_batches_cover_every_window_once_per_epoch():
    x, y = windows(10)
    b = Batches(x, y, batch_size=4, seed=0)
    assert len(b) == 3
    got = list(b.epoch(0))
    assert [len(xb) for xb, _ in got] == [4, 4, 2]
    rows = np.concatenate([xb[:, 0] for xb, _ in got])
    assert sorted(rows.tolist()) == sorted(x[:, 0].tolist())
    for xb, yb in got:
        np.testing.assert_array_equal(yb, xb + 1)                 # pairs stay together


def test_shuffle_is_a_function_of_seed_and_epoch():
    x, y = windows(20)
    first = lambda seed, epoch: np.concatenate([xb[:, 0] for xb, _ in batch_iterator(x, y, 3, seed, epoch)])
    np.testing.assert_array_equal(first(0, 0), first(0, 0))
    assert not np.array_equal(first(0, 0), first(0, 1))           # reshuffled each epoch
    assert not np.array_equal(first(0, 0), first(1, 0))
    np.testing.assert_array_equal(epoch_order(20, 5, 7), epoch_order(20, 5, 7))
    np.testing.assert_array_equal(epoch_order(20, 5, 7, shuffle=False), np.arange(20))
    unshuffled = np.concatenate([xb[:, 0] for xb, _ in batch_iterator(x, y, 3, 0, 4, shuffle=False)])
    np.testing.assert_array_equal(unshuffled, x[:, 0])


def test_resume_mid_epoch_sees_the_same_batches():
    x, y = windows(17)
    full = list(batch_iterator(x, y, 4, seed=3, epoch=2))
    resumed = list(batch_iterator(x, y, 4, seed=3, epoch=2, start=2))
    assert len(resumed) == len(full) - 2
    for (a, _), (b, _) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a, b)


def test_drop_last_and_step_training():
    x, y = windows(10)
    assert len(Batches(x, y, 4, drop_last=True)) == 2
    assert all(len(xb) == 4 for xb, _ in Batches(x, y, 4, drop_last=True).epoch(0))
    assert len(list(Batches(x, y, 1).epoch(0))) == 10            # step training: one example per update


def test_batch_errors():
    x, y = windows(5)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        Batches(x, y, 0)
    with pytest.raises(ValueError, match=r"\(5, 3\) and \(5, 2\)"):
        Batches(x, y[:, :2], 2)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        Batches(x, y, 2, seed=-1)
    with pytest.raises(ValueError, match=r"start must be in \[0, 3\].*got 4"):
        Batches(x, y, 2).epoch(0, start=4)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        batch_iterator(x, y, 2, seed=0, epoch=-1)
