"""transformers as a third implementation (conformance/hf.py), and our HF writer read by transformers itself.

transformers is the optional extra `hf` (in `dev`, so CI runs these); without it they are skipped.
"""
import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from conformance import hf as hfcheck  # noqa: E402
from manual import formats  # noqa: E402
from manual.config import ModelConfig  # noqa: E402
from manual.registry import param_specs  # noqa: E402

CATEGORIES = {"logits", "loss", "activation", "param_grad", "generation", "param_count"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_manual_agrees_with_transformers(dtype):
    rows = hfcheck.run_hf(dtype, count=dtype == "float64")
    failed = [r.line() for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    assert {r.check for r in rows} == CATEGORIES - ({"param_count"} if dtype == "float32" else set())
    assert all(r.config.startswith("transformers(3rd)") for r in rows)
    cfg = ModelConfig.preset("tiny", activation="gelu_tanh")
    assert sum(r.check == "param_grad" for r in rows) == len(param_specs(cfg))
    assert [r.tensor for r in rows if r.check == "activation"] == ["embed.out", "h.0.out", "h.1.out", "ln_f.out"]
    if dtype == "float64":
        assert max(r.badness for r in rows) < 1e-3            # 1e-15-level agreement, far inside 1e-9


def test_gpt2_small_count_is_124439808_three_ways():
    rows = hfcheck.gpt2_small_count()
    assert all(r.passed for r in rows) and len(rows) == 3
    assert {r.b_value for r in rows} == {124_439_808}


def test_a_wrong_mapping_is_caught(monkeypatch):
    """The check can fail: read c_proj (square, so its shape cannot tell) transposed."""
    row = formats.TABLE["transformer.h.{i}.attn.c_proj.weight"]
    monkeypatch.setitem(formats.TABLE, "transformer.h.{i}.attn.c_proj.weight", (formats.SAME_T,) + row[1:])
    rows = hfcheck.run_hf("float64", count=False)
    bad = {r.check for r in rows if not r.passed}
    assert {"logits", "loss", "param_grad"} <= bad


@pytest.mark.parametrize("variant", [{}, dict(tie_embeddings=False), dict(activation="relu", d_ff=48),
                                     dict(activation="gelu", ln_eps=1e-6)])
def test_our_hf_folder_loads_into_transformers(tmp_path, variant):
    """ours -> write_hf -> GPT2LMHeadModel.from_pretrained (transformers' own loader): same logits."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    import manual

    logging.set_verbosity_error()
    cfg = ModelConfig(vocab_size=40, max_seq_len=10, d_model=16, n_heads=4, d_ff=64, n_layers=2,
                      activation="gelu_tanh", dtype="float64", pad_id=39).replace(**variant)
    rng = np.random.default_rng(1)
    ours = manual.Model(cfg, seed=3)
    for arr in ours.params.values():
        arr += rng.normal(scale=0.1, size=arr.shape)
    formats.write_hf(tmp_path / "m", cfg, ours.params)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    assert theirs.config.tie_word_embeddings == cfg.tie_embeddings
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    ours.forward(ids)
    with torch.no_grad():
        logits = theirs(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours.logits - logits).max() <= 1e-9 * np.abs(logits).max()


def test_bfloat16_rounding_matches_torch():
    x = torch.randn(10000, dtype=torch.float32) * 3
    x[:3] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, float("inf")])
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(formats._f32_to_bf16(x.numpy()), theirs)


def test_conformance_command_has_the_third_implementation(capsys):
    from conformance.__main__ import main
    code = main(["--third", "hf", "--variant", "base", "--check", "logits", "--dtype", "float64", "--jobs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "transformers(3rd).tiny/64" in out and "transformers(3rd).gpt2-small" in out


def tokenizer_files(folder):
    """A tiny GPT-2-style byte-level BPE: the 256 byte symbols and one merge ("Ġ t" -> "Ġt")."""
    import json

    from tokenizers import pre_tokenizers
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġt"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    return len(vocab)


def test_sample_from_hf_folder_uses_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    import manual
    from manual.sampling import generate
    from tools import sample
    from tools.convert import HFTokenizer

    folder = tmp_path / "gpt2"
    folder.mkdir()
    V = tokenizer_files(folder)
    cfg = ModelConfig(vocab_size=V, max_seq_len=16, d_model=16, n_heads=2, d_ff=64, n_layers=2,
                      activation="gelu_tanh", pad_id=V - 1)
    model = manual.Model(cfg, seed=4)
    formats.write_hf(folder, cfg, model.params)
    tok = HFTokenizer(folder)
    prompt = tok.encode("Hi the")
    assert len(prompt) == 5 and prompt[2] == V - 1                  # H, i, Ġt (the merge), h, e
    assert sample.main(["--from-hf", str(folder), "--prompt", "Hi the", "--temperature", "0",
                        "--max-new-tokens", "6"]) == 0
    want = tok.decode(np.concatenate([prompt, generate(model, prompt, 6, temperature=0)]))
    assert capsys.readouterr().out == want + "\n"

    (folder / "merges.txt").unlink()
    with pytest.raises(SystemExit) as exc:
        sample.main(["--from-hf", str(folder), "--prompt", "Hi"])
    assert exc.value.code == 2
    assert "tokenizer file(s) ['merges.txt'] missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--from-hf", str(folder), str(folder)])
    assert "exactly one" in capsys.readouterr().err


def test_gpt2_config_json_reads_as_our_gpt2_small_preset():
    from transformers import GPT2Config
    assert formats.hf_config_to_ours(GPT2Config().to_dict()) == ModelConfig.preset("gpt2-small")
    assert formats.hf_config_to_ours(formats.ours_to_hf_config(ModelConfig.preset("gpt2-small"))) == \
        ModelConfig.preset("gpt2-small")
