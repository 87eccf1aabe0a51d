"""Training: tools/train.py, manual/trainer.py, reference/training.py, conformance/training.py.

CI (fast): exact resume on both implementations, the non-finite stop that keeps the last good
checkpoint, the JSON summary, Brier and step training, bad arguments, the optimizer wrapper's
state round trip, and the 200-step float64 equivalence of the two implementations.
Opt-in (--runslow): the acceptance numbers on the embedded corpus (300 steps: validation loss
-20%; two minutes: -40%) for both implementations.
"""
import json
import math

import numpy as np
import pytest

from manual.checkpoint import load_model, load_tensors
from manual.config import ModelConfig
from manual.data import Batches, make_windows, synthetic_corpus
from manual.tokenizer import CharTokenizer
from manual.trainer import Trainer, TrainState, lr_at
from tools import train

IMPLS = ["manual", "reference"]
# a small synthetic corpus: 2,700 training characters = 135 windows of 20 = 34 batches of 4 per epoch
FAST = ["--synthetic", "3000", "--batch-size", "4", "--eval-windows", "16", "--quiet"]


def run(args) -> int:
    return train.main([str(a) for a in args])


def ckpt(folder):
    return load_tensors(folder / train.CHECKPOINT_NAME)


# ----------------------------------------------------------------------------------------------
# exact resume

@pytest.mark.parametrize("impl", IMPLS)
def test_resume_is_bit_exact(tmp_path, impl):
    """Stopped at step 30 and resumed with `--resume DIR` alone (the saved arguments are the
    defaults), the run ends with the same parameters, optimizer state and losses, bit for bit, as
    the uninterrupted run. An epoch has 34 batches, so the resumed part crosses into epoch 1; the
    checkpoint at step 20 (--save-every) is overwritten on the way."""
    common = FAST + ["--impl", impl, "--max-steps", 45, "--schedule", "cosine", "--warmup", 5,
                     "--weight-decay", 0.1, "--eval-every", 10, "--save-every", 20]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(common + ["--out", full, "--json", tmp_path / "full.json"]) == 0
    assert run(common + ["--out", part, "--stop-at", 30]) == 0
    t_mid, m_mid = ckpt(part)
    assert m_mid["step"] == "30" and m_mid["epoch"] == "0" and m_mid["batch_in_epoch"] == "30"
    assert run(["--resume", part, "--json", tmp_path / "part.json"]) == 0
    (t_full, m_full), (t_part, m_part) = ckpt(full), ckpt(part)
    assert m_part["step"] == m_full["step"] == "45"
    assert m_part["epoch"] == "1" and m_part["batch_in_epoch"] == "11"
    assert sorted(t_full) == sorted(t_part)
    assert any(k.startswith("optim.exp_avg.") for k in t_full)
    for name in t_full:
        np.testing.assert_array_equal(t_part[name], t_full[name], err_msg=name)   # bit for bit
    j_full = json.loads((tmp_path / "full.json").read_text())
    j_part = json.loads((tmp_path / "part.json").read_text())
    assert j_part["loss_curve"]["train_loss"] == j_full["loss_curve"]["train_loss"]
    assert j_part["loss_curve"]["val_step"] == j_full["loss_curve"]["val_step"] == [0, 10, 20, 30, 40, 45]
    assert j_part["loss_curve"]["val_loss"] == j_full["loss_curve"]["val_loss"]
    assert j_part["initial_val_loss"] == j_full["initial_val_loss"]
    assert j_part["start_step"] == 30 and j_part["impl"] == impl


def test_resume_rejects_changed_model_flags(tmp_path, capsys):
    out = tmp_path / "a"
    assert run(FAST + ["--max-steps", 3, "--out", out]) == 0
    with pytest.raises(SystemExit) as e:
        run(["--resume", out, "--d-model", 32])
    assert e.value.code == 2
    assert "d_model: checkpoint 64, command line 32" in capsys.readouterr().err


def test_resume_warns_when_the_data_changed(tmp_path, capsys):
    out = tmp_path / "a"
    assert run(FAST + ["--max-steps", 6, "--stop-at", 3, "--out", out]) == 0
    assert run(["--resume", out, "--synthetic", 3100]) == 0
    assert "warning: the training data differs" in capsys.readouterr().err


@pytest.mark.parametrize("impl", IMPLS)
def test_resume_on_the_other_implementation(tmp_path, impl):
    """The optimizer state has one format, so a run continues on the other implementation."""
    other = "reference" if impl == "manual" else "manual"
    out = tmp_path / "a"
    assert run(FAST + ["--impl", impl, "--max-steps", 8, "--stop-at", 4, "--out", out]) == 0
    assert run(["--resume", out, "--impl", other, "--json", tmp_path / "s.json"]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["impl"] == other and s["start_step"] == 4 and s["steps"] == 8


def test_resume_missing_checkpoint(tmp_path, capsys):
    assert run(["--resume", tmp_path / "nothing"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# non-finite values stop the run; the last good checkpoint stays

def test_huge_lr_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = run(FAST + ["--optimizer", "sgd", "--lr", "1e6", "--clip-norm", 0, "--max-steps", 20,
                       "--save-every", 1, "--out", out, "--json", tmp_path / "s.json"])
    assert code == 1
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stopped"] == "non-finite"
    bad_step = summary["steps"] + 1
    assert f"at step {bad_step}" in err and "last good checkpoint" in err
    _cfg, params, _extras, meta = load_model(out / train.CHECKPOINT_NAME)
    assert int(meta["step"]) == summary["steps"] == bad_step - 1
    assert all(np.isfinite(p).all() for p in params.values())


class _PoisonAt:
    """A model whose loss (or gradient) becomes NaN at one step: the injected fault."""

    def __init__(self, model, step, where="loss"):
        self.model, self.step, self.where, self.calls = model, step, where, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, ids, targets=None):
        loss = self.model.forward(ids, targets)
        if targets is not None and ids.shape[0] == 4:      # training batches only (evaluation uses 16)
            self.calls += 1
            if self.calls == self.step and self.where == "loss":
                return float("nan")
        return loss

    def backward(self):
        self.model.backward()
        if self.calls == self.step and self.where == "grad":
            if hasattr(self.model, "module"):              # reference: model.grads is a copy; poison torch's
                from reference.model import canonical_parameters
                next(iter(canonical_parameters(self.model.module).values())).grad[0] = np.nan
            else:
                next(iter(self.model.grads.values()))[0] = np.nan


def _small_run(tmp_path, model_cls, where, impl="manual"):
    from manual.optim import AdamW
    text = synthetic_corpus(3000)
    tok = CharTokenizer.fit(text)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    x, y = make_windows(tok.encode(text), cfg.max_seq_len)
    if impl == "manual":
        import manual
        inner = manual.Model(cfg, seed=0)
        opt = AdamW(inner.params, inner.grads, lr=1e-3)
        clips = (None, None)
    else:
        import reference
        from reference.training import TorchOptimizer, clip_functions
        inner = reference.Model(cfg, seed=0)
        opt = TorchOptimizer(inner, "adamw", lr=1e-3)
        clips = clip_functions(inner)
    model = model_cls(inner, 7, where)
    path = tmp_path / "c.safetensors"
    trainer = Trainer(model, opt, Batches(x, y, 4), x[:16], y[:16], total_steps=20, lr=1e-3, clip_norm=1.0,
                      clip_grad_norm=clips[0], clip_grad_value=clips[1], save_every=3, checkpoint_path=path)
    return trainer, trainer.run(), path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_injected_nan_stops_at_that_step(tmp_path, impl, where):
    trainer, result, path = _small_run(tmp_path, _PoisonAt, where, impl)
    assert result.stopped == "non-finite"
    what = "the loss is nan" if where == "loss" else "the gradient norm is nan"
    assert f"{what} at step 7" in result.message
    assert f"{path} (step 6) is kept" in result.message
    _cfg, params, extras, meta = load_model(path)
    assert meta["step"] == "6" and result.state.step == 6
    assert all(np.isfinite(p).all() for p in params.values())
    assert all(np.isfinite(v).all() for v in extras.values())


def test_non_finite_parameters_are_never_saved(tmp_path):
    from manual import Model
    from manual.optim import SGD
    cfg = ModelConfig.preset("tiny", vocab_size=40)
    text = synthetic_corpus(2000)
    tok = CharTokenizer.fit(text)
    x, y = make_windows(tok.encode(text), cfg.max_seq_len)
    model = Model(cfg, seed=0)
    path = tmp_path / "c.safetensors"
    trainer = Trainer(model, SGD(model.params, model.grads, lr=0.1), Batches(x, y, 4), total_steps=5, lr=0.1,
                      checkpoint_path=path)
    trainer.save_checkpoint()
    before = path.read_bytes()
    model.params["transformer.ln_f.weight"][3] = np.inf
    result = trainer.run()
    assert result.stopped == "non-finite" and path.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# the summary, the plot, the variants

def test_json_summary_and_plot(tmp_path):
    out, js, png = tmp_path / "run", tmp_path / "s.json", tmp_path / "loss.png"
    assert run(FAST + ["--max-steps", 25, "--eval-every", 10, "--out", out, "--json", js, "--plot", png]) == 0
    s = json.loads(js.read_text())
    for key in ("initial_val_loss", "final_val_loss", "steps", "tokens_per_s", "impl", "loss_curve",
                "initial_perplexity", "final_perplexity", "stopped", "checkpoint"):
        assert key in s, key
    assert s["steps"] == 25 and s["impl"] == "manual" and s["stopped"] == "finished"
    assert s["final_val_loss"] < s["initial_val_loss"]
    assert math.isclose(s["final_perplexity"], math.exp(s["final_val_loss"]))
    assert s["tokens_per_s"] > 0
    assert len(s["loss_curve"]["train_loss"]) == 25
    assert s["loss_curve"]["val_step"] == [0, 10, 20, 25]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg, _params, _extras, meta = load_model(out / train.CHECKPOINT_NAME)
    tok = CharTokenizer.from_json(meta["tokenizer"])
    assert cfg.vocab_size == tok.vocab_size and cfg.pad_id == tok.PAD == 0
    assert tok == CharTokenizer.fit(synthetic_corpus(3000))
    assert json.loads(meta["train_args"])["max_steps"] == 25
    assert json.loads(meta["optimizer"])["kind"] == "AdamW"
    assert json.loads(meta["rng"])["data_seed"] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_brier_training_lowers_the_loss(tmp_path, impl):
    js = tmp_path / "s.json"
    assert run(FAST + ["--impl", impl, "--loss", "brier", "--max-steps", 40, "--eval-every", 0,
                       "--out", tmp_path, "--json", js]) == 0
    s = json.loads(js.read_text())
    assert s["config"]["loss"] == "brier" and s["final_perplexity"] is None
    assert s["final_val_loss"] < 0.9 * s["initial_val_loss"]


def test_step_train_word_level_float64_cosine(tmp_path):
    """Batch size 1 (the blog's step training), word tokenizer, float64, cosine schedule, SGD."""
    js = tmp_path / "s.json"
    assert run(FAST + ["--batch-size", 1, "--tokenizer", "word", "--dtype", "float64", "--schedule", "cosine",
                       "--warmup", 3, "--optimizer", "sgd", "--momentum", 0.9, "--lr", 0.05, "--clip-value", 0.5,
                       "--max-steps", 30, "--out", tmp_path, "--json", js]) == 0
    s = json.loads(js.read_text())
    assert s["batch_size"] == 1 and s["tokenizer"] == "word" and s["config"]["dtype"] == "float64"
    assert s["final_val_loss"] < s["initial_val_loss"]


def test_epochs(tmp_path):
    js = tmp_path / "s.json"
    assert run(["--synthetic", 600, "--batch-size", 8, "--epochs", 2, "--quiet", "--out", tmp_path,
                "--json", js]) == 0
    s = json.loads(js.read_text())
    windows = -(-(540 - 1) // 20)        # 540 training characters -> 27 windows -> 4 batches of 8
    assert windows == 27 and s["steps"] == 2 * 4 and s["total_steps"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--max-steps", "ten"], "argument --max-steps: expected an integer >= 1, got 'ten'"),
    (["--clip-norm", "-0.5"], "argument --clip-norm: must be a finite number >= 0, got -0.5"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    (["--tokenizer", "bpe"], "argument --tokenizer: invalid choice: 'bpe'"),
    (["--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
    (["--data", "x.txt", "--synthetic", "10"], "argument --synthetic: not allowed with argument --data"),
    (["--synthetic", "3000", "--max-steps", "5", "--stop-at", "9"], "argument --stop-at: 9 is past --max-steps 5"),
])
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_model_and_missing_data_say_why(tmp_path, capsys):
    assert run(FAST + ["--d-model", 30, "--out", tmp_path]) == 2
    assert "d_model 30 is not divisible by n_heads 4" in capsys.readouterr().err
    assert run(["--data", tmp_path / "none.txt", "--out", tmp_path, "--quiet"]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the pieces

def test_lr_schedule():
    assert [lr_at(s, 1.0, 10, "constant", warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_at(s, 1.0, 10, "cosine", warmup=2, min_lr=0.1) for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(cos[2:], cos[3:]))          # strictly decreasing after warm-up
    assert math.isclose(lr_at(6, 1.0, 10, "cosine", 2, 0.1), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(0, 1.0, 10, "linear")


def test_train_state_round_trip():
    st = TrainState(step=3, epoch=1, batch=2, train_loss=[3.0, 2.5, 2.25], val=[[0, 4.0]], tokens=240)
    assert TrainState.from_json(st.to_json()) == st and st.initial_val_loss == 4.0


def test_trainer_refuses_to_clip_a_copy_of_the_gradients():
    import reference
    from reference.training import TorchOptimizer
    cfg = ModelConfig.preset("tiny", vocab_size=40)
    model = reference.Model(cfg)
    x = np.full((4, 20), 5)
    with pytest.raises(TypeError, match="clip_functions"):
        Trainer(model, TorchOptimizer(model), Batches(x, x, 2), total_steps=2, lr=1e-3, clip_norm=1.0)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_torch_optimizer_state_round_trip_and_cross_load(kind):
    """TorchOptimizer.state_dict -> load_state_dict continues exactly; its format is manual.optim's,
    so state saved by either implementation loads into the other."""
    import manual
    import reference
    from manual.optim import SGD, AdamW
    from manual.registry import decay_groups
    from reference.training import TorchOptimizer

    cfg = ModelConfig.preset("tiny", vocab_size=40, dtype="float64")
    rng = np.random.default_rng(0)
    batches = [(rng.integers(4, 40, (2, 8)), rng.integers(4, 40, (2, 8))) for _ in range(6)]
    mom = 0.9 if kind == "sgd" else 0.0

    def ref(params=None):
        m = reference.Model.from_params(cfg, params) if params else reference.Model(cfg)
        return m, TorchOptimizer(m, kind, lr=1e-2, weight_decay=0.1, momentum=mom)

    def man(params=None):
        m = manual.Model.from_params(cfg, params) if params else manual.Model(cfg)
        groups = decay_groups(cfg, 0.1)
        o = (AdamW(m.params, m.grads, lr=1e-2, weight_decay=0.1, groups=groups) if kind == "adamw"
             else SGD(m.params, m.grads, lr=1e-2, momentum=mom, weight_decay=0.1, groups=groups))
        return m, o

    def steps(m, o, bs):
        for x, y in bs:
            o.zero_grad()
            m.forward(x, y)
            m.backward()
            o.step()

    a, oa = ref()
    steps(a, oa, batches)                                  # 6 uninterrupted steps
    b, ob = ref()
    steps(b, ob, batches[:3])
    tensors, meta = ob.state_dict()
    json.dumps(meta)                                       # the meta is JSON, as checkpoints store it
    c, oc = ref({k: v.copy() for k, v in b.params.items()})
    oc.load_state_dict(tensors, meta)
    assert oc.step_count == 3
    steps(c, oc, batches[3:])
    for name in a.params:
        np.testing.assert_array_equal(c.params[name], a.params[name], err_msg=name)
    # cross-load: reference state -> manual optimizer, and back, continue within float64 noise
    m, om = man({k: v.copy() for k, v in b.params.items()})
    om.load_state_dict(tensors, meta)
    steps(m, om, batches[3:])
    for name in a.params:
        np.testing.assert_allclose(m.params[name], a.params[name], rtol=0, atol=1e-12, err_msg=name)
    m_tensors, m_meta = om.state_dict()
    d, od = ref({k: v.copy() for k, v in m.params.items()})
    od.load_state_dict(m_tensors, m_meta)
    assert sorted(od.state_dict()[0]) == sorted(m_tensors)
    with pytest.raises(ValueError, match="cannot load"):
        od.load_state_dict(m_tensors, {**m_meta, "kind": "SGD" if kind == "adamw" else "AdamW"})


# ----------------------------------------------------------------------------------------------
# manual against reference over 200 training steps (the conformance check)

def cfg_param_names(cfg):
    from manual.registry import param_specs
    return [spec.name for spec in param_specs(cfg)]


def _equivalence(cfg, steps, **kw):
    from conformance.training import training_equivalence
    results = training_equivalence(cfg, steps, seed=0, **kw)
    failed = [c.line() for c in results if not c.passed]
    assert not failed, "\n".join(failed)
    assert results[0].tensor == "loss" and results[0].shape == (steps,)
    assert all(c.check == "training" for c in results)
    assert len(results) == 1 + len(cfg_param_names(cfg))
    return results


def test_training_equivalence_tiny_float64_200_steps():
    """The tiny preset, float64, AdamW with cosine schedule, warm-up, weight decay and clipping."""
    _equivalence(ModelConfig.preset("tiny", dtype="float64"), 200)


def test_training_equivalence_brier_sgd_short():
    _equivalence(ModelConfig.preset("tiny", dtype="float64", loss="brier", n_layers=1), 50,
                 optimizer="sgd", lr=0.05, schedule="constant", warmup=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(optimizer="sgd", lr=0.05),
                                     dict(cfg=dict(loss="brier")),
                                     dict(cfg=dict(norm="post", tie_embeddings=False, n_future=2)),
                                     dict(batch_size=1, clip_norm=None, clip_value=0.5)])
def test_training_equivalence_variants_200_steps(variant):
    variant = dict(variant)
    cfg = ModelConfig.preset("tiny", dtype="float64", **variant.pop("cfg", {}))
    _equivalence(cfg, 200, **variant)


# ----------------------------------------------------------------------------------------------
# acceptance (issue 7), opt-in: tiny preset, char level, embedded corpus

@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_acceptance_300_steps_cut_val_loss_by_20_percent(tmp_path, impl):
    js = tmp_path / "s.json"
    assert run(["--impl", impl, "--max-steps", 300, "--quiet", "--out", tmp_path, "--json", js]) == 0
    s = json.loads(js.read_text())
    print(f"{impl}: val loss {s['initial_val_loss']:.4f} -> {s['final_val_loss']:.4f} "
          f"({-100 * s['val_loss_reduction']:.1f}%), {s['tokens_per_s']:,.0f} tokens/s")
    assert s["final_val_loss"] <= 0.8 * s["initial_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_acceptance_two_minutes_cut_val_loss_by_40_percent(tmp_path, impl):
    js = tmp_path / "s.json"
    assert run(["--impl", impl, "--time-limit", 120, "--epochs", 50, "--eval-every", 1000, "--quiet",
                "--out", tmp_path, "--json", js]) == 0
    s = json.loads(js.read_text())
    print(f"{impl}: {s['steps']} steps in {s['wall_seconds']:.0f} s: val loss {s['initial_val_loss']:.4f} -> "
          f"{s['final_val_loss']:.4f} ({-100 * s['val_loss_reduction']:.1f}%), {s['tokens_per_s']:,.0f} tokens/s")
    assert s["wall_seconds"] < 135
    assert s["final_val_loss"] <= 0.6 * s["initial_val_loss"]
