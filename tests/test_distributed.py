"""Data-parallel glue (parallel/): the sampler, the weighting, and the distributed conformance check
with 2 gloo ranks on localhost, clean and with every distributed fault injected."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conformance.distributed import SCENARIOS, first_divergence, run_plan  # noqa: E402
from manual.config import ModelConfig  # noqa: E402
from parallel import dp  # noqa: E402
from parallel.sampler import shard_rows  # noqa: E402


# -- the sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 2, 5, 8, 12, 13])
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (3, 1), (2, 3), (4, 2)])
def test_shards_are_disjoint_and_cover_the_batch(B, world, accum):
    seen = []
    for k in range(accum):
        for r in range(world):
            rows = shard_rows(B, world, accum, r, k)
            assert rows == shard_rows(B, world, accum, r, k)          # a pure function: same after a restart
            seen += list(range(B))[rows]
    assert sorted(seen) == list(range(B)), (B, world, accum, seen)


def test_overlapping_shards_fault_overlaps():
    a, b = shard_rows(8, 2, 1, 0, 0, "overlapping_shards"), shard_rows(8, 2, 1, 1, 0, "overlapping_shards")
    assert set(range(8)[a]) & set(range(8)[b])


def test_shard_rows_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard_rows(8, 2, 1, 2, 0)


# -- the weighting ----------------------------------------------------------------------------

def test_weights_are_shares_of_the_global_count():
    # rank r's weight w = W n / N; with the mean over ranks (/ W) the weights of every shard sum to 1
    counts = {0: [5, 0, 7], 1: [1, 1, 0]}                    # rank -> per micro-step counts
    n_global = np.array([6, 1, 7])
    total = sum(sum(dp.weights(2, counts[r], n_global)) for r in counts) / 2
    assert total == pytest.approx(1.0)
    assert dp.weights(2, counts[1], n_global) == pytest.approx([2 / 14, 2 / 14, 0.0])
    wrong = sum(sum(dp.weights(2, counts[r], n_global, "per_rank_mean")) for r in counts) / 2
    assert wrong == pytest.approx(1.0)                       # sums to 1 too, but with the wrong shares
    assert dp.weights(2, counts[1], n_global, "per_rank_mean") != pytest.approx(dp.weights(2, counts[1], n_global))


def test_all_pad_global_batch_is_an_error():
    with pytest.raises(ValueError, match="every target of the global batch is PAD"):
        dp.weights(2, [0], np.array([0]))


def test_glue_refuses_what_it_cannot_do():
    import manual
    ctx = dp.Context(0, 1)
    with pytest.raises(ValueError, match="n_future = 1 only"):
        dp.ManualDP(manual.Model(ModelConfig.preset("tiny", n_future=2)), ctx)
    with pytest.raises(ValueError, match="unknown distributed fault 'nope'"):
        dp.ManualDP(manual.Model(ModelConfig.preset("tiny")), ctx, fault="nope")
    with pytest.raises(ValueError, match="grad-accum must be an int >= 1"):
        dp.ManualDP(manual.Model(ModelConfig.preset("tiny")), ctx, accum=0)


# -- the distributed check: 2 ranks, one spawn for the clean run and every fault ---------------

# fault -> (scenario, recorded tensor prefix, step or micro-step) where it must show first
WHERE = {
    "sum_over_ranks": ("uneven_pad", "grad.", None),
    "per_rank_mean": ("uneven_pad", "grad.", None),
    "accum_no_scale": ("accum3", "micro1.grad.", 1),
    "skip_last_sync": ("uneven_pad", "grad.", None),
    "no_broadcast": ("uneven_pad", "init.param.", None),
    "overlapping_shards": ("uneven_pad", "loss", None),     # wrong rows: the forward already differs
}


@pytest.fixture(scope="module")
def results():
    # each fault runs the scenario where it must show first (both sides): one spawn for everything
    plan = [(None, SCENARIOS)] + [(fault, tuple(sc for sc in SCENARIOS if sc.name == WHERE[fault][0]))
                                  for fault in dp.FAULTS]
    return run_plan(2, plan)


def test_every_fault_has_an_expected_place():
    assert set(WHERE) == set(dp.FAULTS)


def test_two_ranks_equal_one_process(results):
    rows = results[None]
    bad = first_divergence(rows)
    assert bad is None, bad.line()
    configs = {c.config for c in rows}
    for impl in ("manual", "reference", "manual-vs-ddp"):
        for sc in SCENARIOS:
            assert (f"dist2/{impl}/{sc.name}" in configs) == (impl == "manual" or not sc.shard), (impl, sc.name)
    # every tensor of every scenario was compared, on both ranks
    assert any(c.tensor.startswith("micro2.grad.") for c in rows)
    assert any(c.tensor.startswith("step20.param.") and c.extra["rank"] == 1 for c in rows)
    assert any(c.tensor.startswith("final.optim.exp_avg_sq.") for c in rows)
    # ZeRO-1 (sharded AdamW state) against the unsharded optimizer of one process, every step
    zero = [c for c in rows if c.config == "dist2/manual/zero20"]
    assert any(c.tensor.startswith("step20.param.") and c.extra["rank"] == 1 for c in zero)
    assert any(c.tensor.startswith("final.optim.exp_avg.") for c in zero)
    assert max(c.max_rel for c in rows) <= 1e-9


@pytest.mark.parametrize("fault", sorted(dp.FAULTS))
def test_fault_is_caught_and_localised(results, fault):
    rows = results[fault]
    bad = first_divergence(rows)
    assert bad is not None, f"{fault} was not caught"
    scenario, prefix, step = WHERE[fault]
    assert bad.config.split("/")[2] == scenario and bad.tensor.startswith(prefix) and bad.step == step, bad.line()
    for impl in ("manual", "reference"):      # injected on both sides, caught on both
        assert any(not c.passed for c in rows if c.config.startswith(f"dist2/{impl}/")), (fault, impl)


# -- launch and failures ------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--synthetic", "3000", "--max-steps", "4", "--batch-size", "6", "--dtype", "float64", "--eval-every", "0",
         "--quiet", "--impl", "reference"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_equals_one_process(tmp_path, nproc: int, flags: list[str]):
    """torchrun with `nproc` ranks and `flags` ends with the weights and losses of one plain process."""
    from manual.checkpoint import load_model
    torchrun = Path(sys.executable).with_name("torchrun")
    many = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), str(ROOT / "tools/train.py"),
                           *TRAIN, *flags, "--out", str(tmp_path / "many"), "--json", str(tmp_path / "many.json")],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert many.returncode == 0, many.stderr[-3000:]
    plain = [f for i, f in enumerate(flags) if f != "--shard-optimizer" and "--grad-accum" not in flags[max(0, i - 1):i + 1]]
    one = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *TRAIN, *plain,
                          "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _, pm, _, meta = load_model(tmp_path / "many" / "checkpoint.safetensors")
    _, p1, _, _ = load_model(tmp_path / "one" / "checkpoint.safetensors")
    assert meta["world_size"] == str(nproc)
    for name in p1:
        scale = np.max(np.abs(p1[name]))
        assert np.max(np.abs(pm[name] - p1[name])) <= 1e-9 * scale, name
    l1 = json.loads((tmp_path / "one.json").read_text())["loss_curve"]["train_loss"]
    lm = json.loads((tmp_path / "many.json").read_text())["loss_curve"]["train_loss"]
    assert np.allclose(lm, l1, rtol=1e-9, atol=0) and len(l1) == 4
    return meta


def test_torchrun_two_ranks_with_accumulation_equal_one_process(tmp_path):
    meta = _torchrun_equals_one_process(tmp_path, 2, ["--grad-accum", "2"])
    assert meta["grad_accum"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--impl", "manual", "--grad-accum", "2"],
                                   ["--impl", "manual", "--shard-optimizer", "--weight-decay", "0.1"]])
def test_torchrun_three_ranks_equal_one_process(tmp_path, flags):
    # batch 6 over 3 ranks x 2 micro-steps: one row per shard; ZeRO-1 with a slice per rank
    _torchrun_equals_one_process(tmp_path, 3, flags)


DIES = """
import os, sys, numpy as np
import manual
from manual.config import ModelConfig
from parallel import dp
ctx = dp.init(timeout_s=30)
glue = dp.ManualDP(manual.Model(ModelConfig.preset("tiny", dtype="float64")), ctx)
glue.broadcast_params()
rng = np.random.default_rng(0)
for step in range(3):
    xb, yb = rng.integers(0, 100, (4, 20)), rng.integers(1, 100, (4, 20))
    if step == 1 and ctx.rank == 1:
        os._exit(3)                    # dies mid-run, without a word
    try:
        glue.step(xb, yb)
    except dp.DistributedError as exc:
        print(exc)
        sys.exit(2)
"""


def test_a_dead_rank_stops_the_others_with_one_line_naming_it():
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", DIES], env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                                      RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out0, err0 = procs[0].communicate(timeout=120)            # a hang fails here
    procs[1].communicate(timeout=120)
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, err0[-2000:]
    lines = out0.strip().splitlines()
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "rank 1 died or stopped answering" in lines[0], out0


def test_a_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code = "from parallel import dp\ntry:\n    dp.init(timeout_s=10)\nexcept dp.DistributedError as e:\n    print(e)"
        r = subprocess.run([sys.executable, "-c", code], env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                                   RANK="0", WORLD_SIZE="2"),
                           capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == f"rank 0: the rendezvous port 127.0.0.1:{port} is already in use; pick another " \
                               f"(--rdzv-endpoint HOST:PORT or --master-port)", (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2)])
def test_zero1_state_per_rank_equals_its_closed_form(world, rank):
    """memprof's --ranks figure (manual.memory.sharded_adamw_state_bytes) is what a rank of ZeroAdamW holds."""
    import manual
    from manual.memory import sharded_adamw_state_bytes
    from manual.registry import decay_groups
    from parallel.dp import Context
    from parallel.zero import ZeroAdamW
    cfg = ModelConfig(vocab_size=37, max_seq_len=8, d_model=12, n_heads=2, d_ff=20, n_layers=2, dtype="float32")
    opt = ZeroAdamW(manual.Model(cfg, seed=0), Context(rank=rank, world=world), groups=decay_groups(cfg, 0.1))
    assert opt.state_bytes() == sharded_adamw_state_bytes(cfg, world)
    assert sharded_adamw_state_bytes(cfg, 1) == 2 * 4 * manual.registry.param_count(cfg)
