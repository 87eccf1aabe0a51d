"""tools/memprof.py: its JSON, its agreement with conformance/memory.py (one accounting for both),
the dry-run sizes, the sweep's growth fit, churn and the plots."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402,F401  (the suite needs torch: a broken install fails, never skips)
import memory_profiler  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import memprof  # noqa: E402

from conformance import memory as cmem  # noqa: E402
from conformance.engine import make_batch  # noqa: E402
from manual import memory as mmem  # noqa: E402
from manual.config import ModelConfig  # noqa: E402

B, T = 4, 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One real run on the tiny preset, with the timeline and the plot."""
    out = tmp_path_factory.mktemp("memprof")
    js, png = out / "tiny.json", out / "tiny.png"
    assert memprof.main(["--preset", "tiny", "--impl", "both", "--batch-size", str(B), "--seq-len", str(T),
                         "--dtype", "float32", "--optimizer", "adamw", "--json", str(js), "--plot", str(png)]) == 0
    return json.loads(js.read_text()), png


def test_json_structure(tiny):
    result, _ = tiny
    assert set(result["phases"]) == {"manual", "reference"}
    for impl in ("manual", "reference"):
        assert list(result["phases"][impl]) == list(cmem.PHASES)
        for row in result["phases"][impl].values():
            assert set(row["live"]) == set(cmem.CATEGORIES)
            assert row["total"] == sum(row["live"].values())
            assert row["peak"] >= row["total"] > 0
            for cat in cmem.CATEGORIES:
                want = None if row["predicted"][cat] is None else row["live"][cat] - row["predicted"][cat]
                assert row["diff"][cat] == want
    assert set(result["activation_bytes"]) >= {"manual", "reference"}
    assert result["saved_tensors"]["manual"] and result["saved_tensors"]["reference"]


def test_agrees_with_conformance_memory(tiny):
    """The JSON's numbers are the conformance memory checks' numbers, recomputed here independently."""
    import manual
    import reference
    from reference import optim as ropt

    result, _ = tiny
    cfg = ModelConfig.preset("tiny")
    ids, targets = make_batch(cfg, B, T, seed=0)
    closed = cmem.closed_forms(cfg, "adamw")
    m, r = manual.Model(cfg, seed=0), reference.Model(cfg, seed=0)
    mo, ro = cmem.memory_optimizer("manual", m, "adamw"), cmem.memory_optimizer("reference", r, "adamw")
    for model, opt in ((m, mo), (r, ro)):
        model.forward(ids, targets)
        model.backward()
        opt.step()
    got_m, got_r = cmem.manual_bytes(m, mo), cmem.reference_bytes(r, ro)
    assert got_m == got_r == closed
    conf = result["conformance"]
    assert conf["manual_bytes"] == got_m and conf["reference_bytes"] == got_r and conf["closed_forms"] == closed
    for impl, got in (("manual", got_m), ("reference", got_r)):
        step = result["phases"][impl]["optimizer_step"]["live"]
        assert {k: step[k] for k in closed} == got
        assert result["phases"][impl]["init"]["live"]["optimizer_state"] == 0      # created at the first step
    # activations: manual caches = closed form; reference = autograd's saved bytes, by the same function
    assert result["activation_bytes"]["manual"] == m.cache_bytes() == mmem.activation_bytes(cfg, B, T)
    saved = ropt.activation_saved_bytes(reference.Model(cfg, seed=0), ids, targets)
    assert result["activation_bytes"]["reference"] == saved == conf["reference_saved_bytes"]
    for phase in ("forward", "backward", "optimizer_step"):
        assert result["phases"]["manual"][phase]["live"]["activations"] == m.cache_bytes()
        assert result["phases"]["reference"][phase]["live"]["activations"] == saved
    # the peak as the conformance check measures it, within its tolerance of the prediction
    assert conf["peak"]["predicted"] == mmem.peak_bytes(cfg, B, T)
    assert abs(conf["peak"]["rel_diff"]) <= cmem.PEAK_TOLERANCE
    # the first step's backward peak holds to the closed form (parameters + gradients + peak_bytes)
    bwd = result["phases"]["manual"]["backward"]
    assert bwd["predicted"]["peak"] == mmem.peak_bytes_closed_form(cfg, B, T)
    assert abs(bwd["diff"]["peak"]) <= cmem.PEAK_TOLERANCE * bwd["predicted"]["peak"]


def test_saved_tensor_tables_sum_to_the_totals(tiny):
    result, _ = tiny
    cfg = ModelConfig.preset("tiny")
    manual_rows = result["saved_tensors"]["manual"]
    per_layer = {}
    for row in manual_rows:
        per_layer[row["layer"]] = per_layer.get(row["layer"], 0) + row["bytes"]
    want = {k: v for k, v in mmem.activation_breakdown(cfg, B, T).items() if v}
    assert per_layer == want
    assert sum(r["bytes"] for r in result["saved_tensors"]["reference"]) == result["activation_bytes"]["reference"]
    probs = [r for r in manual_rows if r["name"] == "probs"]
    assert len(probs) == cfg.n_layers and probs[0]["shape"] == [B, cfg.n_heads, T, T]
    assert memprof.saved_table(result)     # side by side rows exist


@pytest.mark.parametrize("variant", [dict(attention="flash"), dict(activation="relu", n_future=2, tie_embeddings=False,
                                                                 norm="post", dtype="float64")])
def test_tables_match_the_measurements_in_variants(variant):

    import manual
    import reference
    from reference import optim as ropt

    cfg = ModelConfig.preset("tiny", **variant)
    ids, targets = make_batch(cfg, 2, 9, seed=1)
    m = manual.Model(cfg, seed=0)
    m.forward(ids, targets)
    per_layer = {}
    for row in cmem.manual_cache_tensors(m):
        per_layer[row["layer"]] = per_layer.get(row["layer"], 0) + row["bytes"]
    assert per_layer == {k: v for k, v in m.cache_breakdown().items() if v}
    r = reference.Model(cfg, seed=0)
    rows = cmem.saved_tensors(r, lambda: r.module(torch.from_numpy(ids), torch.from_numpy(targets))[1])
    assert sum(x["bytes"] for x in rows) == ropt.activation_saved_bytes(r, ids, targets)


def test_dry_run_gpt2_small(tmp_path, capsys):
    js = tmp_path / "dry.json"
    assert memprof.main(["--preset", "gpt2-small", "--dry-run", "--batch-size", "8", "--seq-len", "1024",
                         "--json", str(js)]) == 0
    d = json.loads(js.read_text())["dry_run"]
    P = 124_439_808
    assert d["parameters_count"] == P
    assert d["parameters"] == d["gradients"] == 4 * P
    assert d["optimizer_state"] == 2 * 4 * P
    cfg = ModelConfig.preset("gpt2-small")
    assert d["activations"] == mmem.activation_bytes(cfg, 8, 1024)
    assert d["peak"] == 4 * P * 4 + mmem.peak_bytes(cfg, 8, 1024)
    # recompute="blocks": the block inputs (L B T C floats) and what lies outside the blocks
    rec = mmem.activation_bytes(cfg, 8, 1024, recompute="blocks")
    assert d["activations_recompute_blocks"] == rec < d["activations"] / 5
    assert rec - mmem.activation_bytes(cfg, 8, 1024, recompute="blocks", with_targets=False) \
        == 8 * 1024 * (4 * cfg.vocab_size + 8)
    assert d["activations_recompute_blocks_in_backward"] == rec + mmem.recompute_block_bytes(cfg, 8, 1024)
    out = capsys.readouterr().out
    assert "nothing allocated" in out and 'recompute="blocks"' in out and f"{rec:,} B" in out
    sgd = memprof.dry_run(cfg, 1, 64, "sgd")
    assert sgd["optimizer_state"] == 4 * P


def test_recompute_side_by_side(tiny):
    """Both modes, both implementations: closed form = manual caches, manual / reference <= 1, and
    recompute keeps less."""
    rec = tiny[0]["conformance"]["recompute"]
    assert list(rec) == list(mmem.RECOMPUTE)
    for row in rec.values():
        assert row["manual"] == row["closed_form"]
        assert row["ratio"] == row["manual"] / row["reference"] <= 1
    assert rec["blocks"]["manual"] < rec["none"]["manual"] and rec["blocks"]["reference"] < rec["none"]["reference"]


def test_gpt2_small_real_run_is_refused_with_the_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        memprof.main(["--preset", "gpt2-small"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dry-run" in err and "GiB" in err and "B=8, T=1024" in err


@pytest.mark.parametrize("argv, words", [
    (["--preset", "huge"], "invalid choice"),
    (["--impl", "numpy"], "invalid choice"),
    (["--seq-len", "21"], "outside [1, 20]"),
    (["--batch-size", "0"], ">= 1"),
    (["--sweep-values", "2", "4", "8"], "needs --sweep"),
    (["--sweep", "seq_len", "--sweep-values", "4", "8"], "at least 3"),
    (["--dry-run", "--sweep", "batch"], "separate modes"),
])
def test_bad_arguments(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        memprof.main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_sweep_seq_len_standard_quadratic_flash_linear(tmp_path):
    js, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert memprof.main(["--preset", "tiny", "--sweep", "seq_len", "--sweep-values", "4", "8", "12", "16", "20",
                         "--json", str(js), "--plot", str(png)]) == 0
    s = json.loads(js.read_text())
    series = s["series"]
    assert series["manual (standard)"]["fit"]["growth"] == "quadratic in T"
    assert series["reference (standard)"]["fit"]["growth"] == "quadratic in T"
    assert series["manual (flash)"]["fit"]["growth"] == "linear in T"
    assert series["reference (flash)"]["fit"]["growth"] == "linear in T"
    assert series["manual (standard)"]["bytes"] == series["manual (standard)"]["closed_form"]
    cfg = ModelConfig.preset("tiny")
    # the T^2 coefficient is the probs: L * s * B * H per T^2
    assert series["manual (standard)"]["fit"]["c"] == pytest.approx(cfg.n_layers * 4 * B * cfg.n_heads, rel=1e-6)
    assert png.stat().st_size > 10_000


def test_sweep_batch_is_linear():
    s = memprof.sweep(ModelConfig.preset("tiny"), 4, 12, "batch", [1, 2, 3, 5, 8])
    for ser in s["series"].values():
        assert ser["fit"]["growth"] == "linear in B"


def test_fit_growth_classifies():
    xs = np.arange(1, 9)
    assert memprof.fit_growth(xs, 100 + 50 * xs, "T")["growth"] == "linear in T"
    assert memprof.fit_growth(xs, 100 + 50 * xs + 10 * xs ** 2, "T")["growth"] == "quadratic in T"


def test_churn_table(tiny):
    result, _ = tiny
    c = result["churn"]["manual"]
    assert c["allocations"] > 100 and c["bytes"] > 0 and c["top_sites"]
    assert all(":" in s["site"] and s["count"] > 0 for s in c["top_sites"])
    assert sum(s["count"] for s in c["top_sites"]) <= c["allocations"]
    assert result["churn"]["reference"]["allocations"] > 0
    # Model(cfg, workspace=True): the same step without the plain path's large arrays
    ws = result["churn"]["manual_workspace"]
    assert c["allocations_over_64k"] > 0 and ws["allocations_over_64k"] == 0 and ws["bytes"] < c["bytes"]


def _allocate_800_bytes():
    return np.zeros((10, 10))                      # one allocation of 800 bytes


def test_numpy_counter_counts_exactly():
    with memprof.NumpyAllocationCounter() as counter:
        a = np.empty(1000, dtype=np.float32)       # one allocation of 4000 bytes
        b = _allocate_800_bytes()
        c = np.empty(10, dtype=np.int8)            # 10 bytes, the same function as the first
    assert counter.count == 3 and counter.bytes == 4810
    # one site per function (named, not numbered: a line number goes stale), largest first
    assert counter.top() == [
        {"site": "tests/test_memprof.py: test_numpy_counter_counts_exactly", "count": 2, "bytes": 4010},
        {"site": "tests/test_memprof.py: _allocate_800_bytes", "count": 1, "bytes": 800}]
    del a, b, c


def test_plot_written(tiny):
    result, png = tiny
    assert png.stat().st_size > 20_000
    assert result["plot"] == str(png)
    tl = result["timeline"]
    for impl in ("manual", "reference"):
        names = [name for name, _ in tl[impl]["marks"]]
        assert names[0] == "init" and "backward" in names and names[-1] == "end"
        assert len(tl[impl]["t_s"]) == len(tl[impl]["rss_mib"]) > 2


def test_command_line_runs():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "memprof.py"), "--preset", "tiny", "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "parameters" in p.stdout
