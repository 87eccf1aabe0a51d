"""Random small configurations drawn by hypothesis, through the same conformance engine.

The "ci" profile is derandomized (the same examples every run, so CI cannot flake) and has
no deadline (timing on a shared 2-core machine is noise).
"""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch  # noqa: F401  (the suite needs torch: a broken install fails, never skips)

from conformance import engine
from conformance.engine import Case
from manual.config import ModelConfig

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=16, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@st.composite
def small_cases(draw):
    # d_model >= 2: a layer norm over one feature maps every input to exactly 0 (x - mean(x) = 0),
    # so its weight gradient is identically zero and the two sides differ only in rounding noise
    # (torch reports ~1e-18) measured against a zero scale: not a meaningful comparison.
    n_heads = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 13))
    max_seq_len = draw(st.integers(1, 6))
    cfg = ModelConfig(
        vocab_size=vocab, max_seq_len=max_seq_len, d_model=n_heads * draw(st.integers(1, 4)) if n_heads > 1 else draw(st.integers(2, 4)), n_heads=n_heads,
        d_ff=draw(st.integers(1, 10)), n_layers=draw(st.integers(1, 2)),
        norm=draw(st.sampled_from(["pre", "post"])),
        activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh"])),
        bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()), n_future=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(["float64", "float32"])), pad_id=draw(st.integers(0, vocab - 1)),
        loss=draw(st.sampled_from(["cross_entropy", "brier"])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        ln_eps=draw(st.sampled_from([1e-5, 1e-3])))
    return Case(label="random", cfg=cfg, seed=draw(st.integers(0, 1000)), batch=draw(st.integers(1, 3)),
                seq_len=draw(st.integers(1, max_seq_len)), pad=draw(st.booleans()), opt_steps=3, gen_tokens=4)


@given(small_cases())
def test_random_small_configs(case):
    checks = ("param_count", "logits", "loss", "activation", "activation_grad", "param_grad", "optimizer",
              "generation")
    results = engine.run_case(case, checks)
    assert results, "no comparisons were made"
    failed = [c for c in results if not c.passed]
    assert not failed, f"{case.cfg}\n" + "\n".join(c.line() for c in failed[:20])
