"""Proof that the suite can fail: corrupt one element in a copy and watch it name that tensor."""
import numpy as np
import pytest

import torch  # noqa: F401  (the suite needs torch: a broken install fails, never skips)

import manual
import manual.optim
from conformance import engine
from conformance.engine import Case, Sides
from manual.config import ModelConfig

CASE64 = Case("tiny.corrupt", ModelConfig.preset("tiny", dtype="float64"), batch=2, seq_len=8, opt_steps=5,
              gen_tokens=5)
CASE32 = Case("tiny.corrupt", ModelConfig.preset("tiny", dtype="float32"), batch=2, seq_len=8, opt_steps=5,
              gen_tokens=5)


def failures(results):
    return [c for c in results if not c.passed]


def sides_with(manual_cls=None, optim_module=None) -> Sides:
    s = Sides.default()
    if manual_cls is not None:
        s.manual = manual_cls
    if optim_module is not None:
        s.manual_optim = optim_module
    return s


@pytest.mark.parametrize("case", [CASE64, CASE32], ids=["f64", "f32"])
def test_one_gradient_element(case):
    name = "transformer.h.1.mlp.c_fc.weight"

    class Corrupt(manual.Model):
        def backward(self):
            super().backward()
            g = self.grads[name]
            g[3, 5] += 1e-3 * np.abs(g).max() + g.dtype.type(1e-4)

    bad = failures(engine.run_case(case, ("param_grad",), sides_with(Corrupt)))
    assert [c.tensor for c in bad] == [name]
    assert bad[0].worst_index == (3, 5)


@pytest.mark.parametrize("case", [CASE64, CASE32], ids=["f64", "f32"])
def test_one_logit(case):
    class Corrupt(manual.Model):
        def forward(self, ids, targets=None):
            loss = super().forward(ids, targets)
            self.logits[1, 2, 7] += self.logits.dtype.type(1e-3)
            return loss

    bad = failures(engine.run_case(case, ("logits",), sides_with(Corrupt)))
    assert [c.tensor for c in bad] == ["logits"]
    assert bad[0].worst_index == (1, 2, 7)


def test_one_adamw_moment():
    name = "transformer.h.0.attn.c_attn.weight"

    class CorruptAdamW(manual.optim.AdamW):
        def step(self):
            super().step()
            if self.state[name]["step"] == 3:
                m = self.state[name]["exp_avg"]
                m[0, 1] += 1e-3 * np.abs(m).max()

    class Optim:  # a copy of manual.optim with one AdamW moment corrupted
        AdamW = CorruptAdamW
        SGD = manual.optim.SGD
        clip_grad_norm_ = staticmethod(manual.optim.clip_grad_norm_)

    bad = failures(engine.run_case(CASE64, ("optimizer",), sides_with(optim_module=Optim)))
    assert bad, "a corrupted AdamW moment went unnoticed"
    first = min(bad, key=lambda c: c.step)
    assert first.tensor == f"adamw.optim.exp_avg.{name}" and first.step == 3
    assert all(c.tensor.startswith("adamw.") for c in bad)    # the SGD run is untouched


def test_one_byte_count():
    class Corrupt(manual.Model):
        def cache_bytes(self):
            return super().cache_bytes() + 1

    bad = failures(engine.run_case(CASE64, ("memory",), sides_with(Corrupt)))
    assert [c.tensor for c in bad] == ["activation bytes (manual caches vs closed form)"]


def test_summary_names_first_divergent_tensor_and_layer():
    """A zoo fault (layer-norm backward without its mean term): the default summary names the first
    divergent tensor in walk order and the layer function that wrote it, as the debugger does."""
    import io

    from conformance.report import summarize
    from tools import faults

    fault = faults.get("ln_dx_missing_mean_term")
    with faults.inject(fault.name) as sides:
        results = engine.run_case(fault.case(), fault.checks, sides)
    first = failures(results)[0]
    assert (first.check, "grad." + first.tensor) == ("activation_grad", fault.expected)   # grad.h.2.out
    assert first.layer == "ln_f (manual/layers/layernorm.py: layernorm_backward)"
    out = io.StringIO()
    assert not summarize(results, out=out)
    want = (f"{fault.case().name()}: first divergent grad.h.2.out (activation_grad), written by ln_f "
            "(manual/layers/layernorm.py: layernorm_backward)")
    assert want in [line.strip() for line in out.getvalue().splitlines()], out.getvalue()
