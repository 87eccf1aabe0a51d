"""tools/bench.py and its baseline reference/plain.py.

1. The plain PyTorch twin computes the same function as the reference: same weights, float64,
   logits, loss and every parameter gradient within the suite's tolerances (conformance.compare),
   over the variations the plain model covers; and one plain AdamW step equals the reference's.
2. bench's command line: every side reported with its statistics and ratios in the JSON, a plot,
   the BLAS in use, and a one-line error for an unknown preset. Time is never asserted.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch

import reference
from conformance.compare import compare
from conformance.engine import make_batch
from manual.config import ModelConfig
from manual.registry import init_params
from reference import optim as ropt
from reference.plain import PlainGPT, _transposed, make_optimizer

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [
    {},
    {"norm": "post", "activation": "relu"},
    {"bias": False, "tie_embeddings": False, "activation": "gelu_tanh"},
    {"temperature": 0.7, "attention": "flash", "pad_id": 3},
]


def _check_all(comparisons):
    bad = [c for c in comparisons if not c.passed]
    assert not bad, "\n".join(f"{c.tensor}: max_abs {c.max_abs:.3g} tol {c.tol} {c.note}" for c in bad)


@pytest.mark.parametrize("over", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny")
def test_plain_equals_reference_float64(over):
    cfg = ModelConfig.preset("tiny", dtype="float64", **over)
    params = init_params(cfg, seed=1)
    ids, targets = make_batch(cfg, 3, cfg.max_seq_len, seed=2)
    targets[0, :4] = cfg.pad_id                                     # PAD targets are ignored on both sides
    ref = reference.Model.from_params(cfg, params)
    plain = PlainGPT.from_params(cfg, params)
    ref_loss = ref.forward(ids, targets)
    ref.backward()
    logits = plain(torch.from_numpy(ids))
    loss = plain(torch.from_numpy(ids), torch.from_numpy(targets))
    loss.backward()
    grads = plain.canonical_grads()
    assert list(grads) == list(ref.grads)
    out = [compare(logits.detach().numpy(), ref.logits, tensor="logits", check="plain", expect_dtype=np.float64),
           compare(np.float64(loss.item()), np.float64(ref_loss), tensor="loss", check="plain",
                   expect_dtype=np.float64)]
    out += [compare(grads[n], g, tensor=f"grad.{n}", check="plain", expect_dtype=np.float64)
            for n, g in ref.grads.items()]
    _check_all(out)


def test_plain_adamw_step_equals_reference():
    cfg = ModelConfig.preset("tiny", dtype="float64")
    params = init_params(cfg, seed=3)
    ids, targets = make_batch(cfg, 2, 8, seed=4)
    ref = reference.Model.from_params(cfg, params)
    plain = PlainGPT.from_params(cfg, params)
    ro = ropt.make_optimizer(ref, kind="adamw", lr=1e-2, weight_decay=0.1)
    po = make_optimizer(plain, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        ref.zero_grad()
        po.zero_grad()
        ref.forward(ids, targets)
        ref.backward()
        plain(torch.from_numpy(ids), torch.from_numpy(targets)).backward()
        ro.step()
        po.step()
    new = {n: p.detach() for n, p in plain.canonical().items()}
    _check_all([compare((t.T if _transposed(n) else t).contiguous().numpy(), ref.params[n],
                        tensor=f"param.{n}", check="plain", expect_dtype=np.float64) for n, t in new.items()])


def test_plain_weights_are_checked_and_unsupported_configs_refused():
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, seed=0)
    params.pop("transformer.wpe.weight")
    with pytest.raises(Exception, match="transformer.wpe.weight"):
        PlainGPT.from_params(cfg, params)
    with pytest.raises(ValueError, match="n_future=2"):
        PlainGPT(ModelConfig.preset("tiny", n_future=2))


def _bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_bench_json_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = _bench("--preset", "tiny", "--batch-size", "2", "--seq-len", "8", "--repeats", "20", "--warmup", "1",
               "--sides", "manual,reference,plain", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert res["flops_per_token"] > 0 and "6N + 12" in res["flop_convention"]
    assert res["blas"] and all("num_threads" in lib for lib in res["blas"])
    assert res["peak_gflops"]["numpy"] > 0 and res["peak_gflops"]["torch"] > 0
    for side in ("manual", "reference", "plain"):
        s = res["sides"][side]
        for phase in ("forward", "backward", "optimizer", "step"):
            t = s["phases"][phase]
            assert len(t["times_ms"]) == 20 and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert s["tokens_per_s"] > 0 and s["gflops"] > 0 and 0 < s["utilisation"]
        assert s["peak_memory_bytes"] > 0
    for phase in ("forward", "backward", "optimizer", "step"):
        for other in ("plain", "reference"):
            ratio = res["ratios"][f"manual/{other}"][phase]
            want = res["sides"]["manual"]["phases"][phase]["median_ms"] / \
                res["sides"][other]["phases"][phase]["median_ms"]
            assert ratio == pytest.approx(want)


def test_bench_unknown_preset_is_one_line():
    r = _bench("--preset", "unknown")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown" in lines[0] and "tiny" in lines[0] and "medium" in lines[0], r.stderr


def test_bench_rejects_unknown_sides_and_too_few_steps():
    r = _bench("--sides", "manual,gpu")
    assert r.returncode == 2 and "'gpu'" in r.stderr and "plain" in r.stderr, r.stderr
    r = _bench("--repeats", "5")
    assert r.returncode == 2 and "at least 20 steps" in r.stderr, r.stderr
