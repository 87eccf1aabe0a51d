"""tools/sample.py: generation from a checkpoint of tools/train.py with either implementation."""
import json

import numpy as np
import pytest

from manual.checkpoint import load_model
from manual.tokenizer import WordTokenizer, tokenizer_from_json
from tools import sample, train


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A char-level checkpoint trained briefly on the synthetic corpus."""
    out = tmp_path_factory.mktemp("char")
    assert train.main(["--synthetic", "3000", "--batch-size", "8", "--max-steps", "60", "--eval-every", "0",
                       "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("word")
    assert train.main(["--synthetic", "4000", "--tokenizer", "word", "--batch-size", "8", "--max-steps", "40",
                       "--eval-every", "0", "--quiet", "--out", str(out)]) == 0
    return out


def sample_text(capsys, *argv) -> tuple[str, str]:
    assert sample.main([str(a) for a in argv]) == 0
    cap = capsys.readouterr()
    return cap.out, cap.err


def test_greedy_is_deterministic_and_ignores_the_seed(char_run, capsys):
    a, _ = sample_text(capsys, char_run, "--prompt", "the cat ", "--max-new-tokens", 30, "--temperature", 0)
    b, _ = sample_text(capsys, char_run, "--prompt", "the cat ", "--max-new-tokens", 30, "--temperature", 0,
                       "--seed", 7)
    assert a == b
    assert a.startswith("the cat ") and len(a.rstrip("\n")) == len("the cat ") + 30


@pytest.mark.parametrize("extra", [["--temperature", "0"], ["--temperature", "0.8", "--top-k", "5", "--seed", "3"]])
def test_manual_and_reference_print_the_same_text(char_run, capsys, extra):
    args = [char_run, "--prompt", "a bird ", "--max-new-tokens", 40] + extra
    m, _ = sample_text(capsys, *args, "--impl", "manual")
    r, _ = sample_text(capsys, *args, "--impl", "reference")
    assert m == r


def test_seeds_change_samples_and_repeat_exactly(char_run, capsys):
    args = [char_run, "--prompt", "the ", "--max-new-tokens", 60, "--temperature", "1.0"]
    s1, _ = sample_text(capsys, *args, "--seed", 1)
    s1_again, _ = sample_text(capsys, *args, "--seed", 1)
    s2, _ = sample_text(capsys, *args, "--seed", 2)
    assert s1 == s1_again and s1 != s2


def test_context_is_cropped_to_max_seq_len(char_run, capsys):
    """A prompt longer than max_seq_len (20) and more new tokens than it: the model sees the last 20."""
    prompt = "the old man follows the river again.\n"
    out, err = sample_text(capsys, char_run, "--prompt", prompt, "--max-new-tokens", 45, "--temperature", 0)
    assert out.startswith(prompt) and len(out.rstrip("\n")) >= len(prompt) + 40
    assert "the model sees only the last 20" in err


def test_unknown_characters_map_to_unk(char_run, capsys):
    out, err = sample_text(capsys, char_run, "--prompt", "the Ωcat", "--max-new-tokens", 5, "--temperature", 0)
    assert "map to <unk>: 'Ω'" in err
    assert out.startswith("the <unk>cat")


def test_tokenizer_saved_in_the_checkpoint_is_used(word_run, capsys):
    _cfg, _params, _extras, meta = load_model(word_run / train.CHECKPOINT_NAME)
    tok = tokenizer_from_json(meta["tokenizer"])
    assert isinstance(tok, WordTokenizer) and _cfg.vocab_size == tok.vocab_size
    out, err = sample_text(capsys, word_run, "--prompt", "the cat sees", "--max-new-tokens", 12,
                           "--temperature", 0)
    words = out.split()
    assert words[:3] == ["the", "cat", "sees"] and len(words) >= 3 + 8     # word level: words, joined by spaces
    assert set(w.strip(".") for w in words[3:]) <= set(tok.tokens) | {""}
    _out, err = sample_text(capsys, word_run, "--prompt", "the zebra sees", "--max-new-tokens", 2)
    assert "1 word token(s) of the prompt are not in the vocabulary and map to <unk>: 'zebra'" in err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-0.5"], "argument --temperature: must be a finite number >= 0 (0 means greedy), got -0.5"),
    (["--temperature", "hot"], "argument --temperature: expected a number >= 0, got 'hot'"),
    (["--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer >= 0, got -1"),
    (["--prompt", ""], "argument --prompt: the prompt is empty"),
    (["--impl", "jax"], "argument --impl: invalid choice: 'jax'"),
])
def test_bad_arguments_are_rejected(char_run, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.main([str(char_run)] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert sample.main([str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from manual import Model
    from manual.config import ModelConfig
    Model(ModelConfig.preset("tiny")).save(tmp_path / "bare.safetensors")      # no tokenizer inside
    assert sample.main([str(tmp_path / "bare.safetensors")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


def test_zero_new_tokens_prints_the_prompt(char_run, capsys):
    out, _ = sample_text(capsys, char_run, "--prompt", "the dog", "--max-new-tokens", 0)
    assert out == "the dog\n"


def test_train_summary_reports_the_checkpoint(char_run):
    meta = load_model(char_run / train.CHECKPOINT_NAME)[3]
    assert json.loads(meta["train_state"])["step"] == 60
    assert np.isfinite(json.loads(meta["train_state"])["train_loss"]).all()
