"""Your implementation under test: the Implementation interface (load_impl, missing members, unsupported
configurations, not-provided capabilities), the dump conventions (masked attention entries, dtypes, no tap
gradients) and the outside-program harness (--impl-cmd): every failure is one line for its configuration.

Outside programs are small Python scripts written into tmp_path; the "port" runs manual/ on the case and
then misbehaves in the way each test names."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conformance import conventions, external
from conformance.implementation import (ImplementationError, ModelAdapter, Unsupported, capabilities_of, check_impl,
                                        construct, load_impl, manual_impl)
from manual import registry
from manual.config import ModelConfig

SMALL = dict(vocab_size=20, d_model=8, n_heads=2, d_ff=16, n_layers=2, max_seq_len=6)


def small_cfg(dtype="float64", **over) -> ModelConfig:
    return ModelConfig(**{**SMALL, "dtype": dtype, **over})


def batch(cfg, B=2, T=5, seed=0):
    from conformance.engine import make_batch
    return make_batch(cfg, B, T, seed)


def train_batches(cfg, n=3):
    return [batch(cfg, seed=s + 1) for s in range(n)]


PORT = textwrap.dedent('''
    """An outside program for the tests: manual/ on the case, then the misbehaviour named by argv[4]."""
    import json, sys, time
    import numpy as np
    import manual
    from manual.checkpoint import load_model, save_tensors
    case, out, steps, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "exit1":
        print("something broke\\nTraceback: KeyError 'h.0.attn'", file=sys.stderr); sys.exit(1)
    if mode == "exit3":
        print("post-LN is not implemented", file=sys.stderr); sys.exit(3)
    if mode == "sleep":
        time.sleep(30)
    if mode == "nodump":
        sys.exit(0)
    if mode == "garbage":
        open(out, "wb").write(b"this is not a dump at all"); sys.exit(0)
    cfg, params, _, _ = load_model(case + "/checkpoint.safetensors")
    m = manual.Model.from_params(cfg, params)
    if steps:
        from manual import optim, registry
        o = json.load(open(case + "/train/optimizer.json"))
        lr = o["lr"] * (2 if mode == "wrong_lr" else 1)
        opt = optim.SGD(m.params, m.grads, lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
                        groups=registry.decay_groups(cfg, o["weight_decay"]))
        ids, tg = np.load(case + "/train/ids.npy"), np.load(case + "/train/targets.npy")
        losses = []
        for s in range(steps):
            m.zero_grad(); losses.append(m.forward(ids[s], tg[s])); m.backward(); opt.step()
        save_tensors(out, {"losses": np.asarray(losses, dtype=cfg.dtype), **m.params}); sys.exit(0)
    m.forward(np.load(case + "/ids.npy"), np.load(case + "/targets.npy")); m.backward()
    d = dict(m.taps); d["loss"] = np.asarray(m.loss, dtype=cfg.dtype)
    if mode != "no_tap_grads":
        d.update({"grad." + k: v for k, v in m.tap_grads.items()})
    d.update({"grad." + k: v for k, v in m.grads.items()})
    T = d["logits"].shape[1]
    future = np.triu(np.ones((T, T), bool), 1)
    for k in list(d):
        v = d[k] = np.array(d[k])
        if mode.startswith("att=") and k.endswith("attn.att") and not k.startswith("grad."):
            v[..., future] = float(mode[4:])
        if mode == "grad_masked_zero" and k.startswith("grad.") and (k.endswith(".probs") or k.endswith(".att")):
            v[..., future] = 0.0
        if mode == "probs_leak" and k == "h.1.attn.probs":
            v[..., future] = 0.25
    if mode == "float32":
        d = {k: v.astype(np.float32) for k, v in d.items()}
    if mode == "transposed":
        d["grad.transformer.h.0.mlp.c_fc.weight"] = d["grad.transformer.h.0.mlp.c_fc.weight"].T
    if mode == "unknown":
        d["h.0.attn.scores"] = d.pop("h.0.attn.att")
    if mode == "missing_required":
        del d["grad.transformer.wpe.weight"], d["loss"]
    if mode == "npz":
        np.savez(open(out, "wb"), **d); sys.exit(0)
    save_tensors(out, {k: np.ascontiguousarray(v) for k, v in d.items()})
    if mode == "truncated":
        data = open(out, "rb").read(); open(out, "wb").write(data[: len(data) // 2])
''')


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("port") / "port.py"
    path.write_text(PORT)
    return path


def run_port(port, mode, cfg=None, *, timeout=60.0, steps=False, workdir=None, template=None):
    cfg = cfg or small_cfg()
    ids, targets = batch(cfg)
    tmpl = template or f"{sys.executable} {port} {{case}} {{out}} {{steps}} {mode}"
    if not steps:
        tmpl = tmpl.replace("{steps}", "0")
    return external.check_command(tmpl, cfg, registry.init_params(cfg, 0), ids, targets, label="small",
                                  train_batches=train_batches(cfg) if steps else None, timeout=timeout,
                                  workdir=workdir)


def only_line(o) -> str:
    """The one failing line of a configuration that failed before any comparison."""
    assert o.status == "error" and not o.passed and len(o.rows) == 1 and not o.rows[0].passed
    return o.message


# -- outside programs: passing ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ok", "att=-inf", "att=-1e9", "att=0", "grad_masked_zero", "npz"])
def test_a_correct_port_passes_whatever_it_stores_in_masked_entries(port, mode):
    o = run_port(port, mode)
    assert o.status == "compared" and o.passed, [c.line() for c in o.rows if not c.passed]
    assert not o.not_provided and not o.notes
    att = next(c for c in o.rows if c.tensor == "h.0.attn.att")
    assert att.extra["excluded"] == 2 * 2 * 10 and "causal mask" in att.extra["excluded_reason"]  # B*H*T(T-1)/2
    probs = next(c for c in o.rows if c.tensor == "h.0.attn.probs")
    assert "excluded" not in probs.extra          # probs are compared everywhere


def test_masked_probs_that_leak_are_a_failure(port):
    o = run_port(port, "probs_leak")
    first = o.first_failure()
    assert not o.passed and first.tensor == "h.1.attn.probs" and first.max_abs == pytest.approx(0.25)


def test_the_mask_is_what_makes_an_inf_port_pass():
    """Without the convention, -inf stored in the masked scores is an infinite error."""
    cfg = small_cfg()
    ref = np.random.default_rng(0).normal(size=(2, 2, 5, 5))
    port_att = ref.copy()
    port_att[..., np.triu(np.ones((5, 5), bool), 1)] = -np.inf
    from conformance.compare import compare
    assert not compare(port_att, ref, tensor="h.0.attn.att", check="activation").passed
    assert external.compare_one("h.0.attn.att", port_att, ref, check="activation", cfg=cfg).passed
    port_att[0, 0, 3, 1] += 1e-3                                    # below the diagonal: compared
    c = external.compare_one("h.0.attn.att", port_att, ref, check="activation", cfg=cfg)
    assert not c.passed and c.worst_index == (0, 0, 3, 1)


def test_masked_entries_cover_exactly_the_future_keys():
    m = conventions.masked_entries("grad.h.3.attn.probs", (1, 1, 3, 3))
    assert m.tolist() == [[[[False, True, True], [False, False, True], [False, False, False]]]]
    assert conventions.masked_entries("h.3.attn.probs", (1, 1, 3, 3)) is None
    assert conventions.masked_entries("h.0.attn.out", (1, 3, 8)) is None
    assert conventions.masked_entries("grad.h.0.attn.att", (1, 1, 3, 3)) is not None


def test_steps_mode_compares_losses_and_final_params(port):
    o = run_port(port, "ok", steps=True)
    assert o.passed, [c.line() for c in o.rows if not c.passed]
    steps_rows = [c for c in o.rows if c.check == "optimizer"]
    assert {"losses", "transformer.wte.weight"} <= {c.tensor for c in steps_rows}
    assert all(c.step == 3 for c in steps_rows)


def test_steps_mode_catches_a_wrong_learning_rate(port):
    o = run_port(port, "wrong_lr", steps=True)
    first = o.first_failure()
    assert not o.passed and first.check == "optimizer" and first.tensor == "losses"
    assert first.worst_index[0] >= 1                    # step 1's loss is before any update: it agrees


def test_paths_with_spaces_stay_one_argument(port, tmp_path):
    work = tmp_path / "a folder with spaces"
    work.mkdir()
    assert run_port(port, "ok", workdir=work).passed


# -- outside programs: each failure is one line and the run goes on --------------------------------------

def test_command_not_found():
    line = only_line(run_port(None, "ok", template="./no-such-port-binary {case} {out}"))
    assert line.startswith("command not found: './no-such-port-binary'")


def test_command_not_executable(tmp_path):
    script = tmp_path / "port.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    line = only_line(run_port(None, "ok", template=f"{script} {{case}} {{out}}"))
    assert line.startswith("command not executable")


def test_nonzero_exit_shows_the_tail_of_stderr(port):
    line = only_line(run_port(port, "exit1"))
    assert line.startswith("exited with status 1") and "KeyError 'h.0.attn'" in line


def test_exit_3_is_unsupported_not_a_failure(port):
    o = run_port(port, "exit3")
    assert o.status == "unsupported" and o.passed and o.rows == []
    assert o.message == "post-LN is not implemented"


def test_timeout(port):
    line = only_line(run_port(port, "sleep", timeout=2))
    assert line.startswith("timeout: no exit after 2 s")


@pytest.mark.parametrize("mode, start", [("nodump", "no dump: "), ("truncated", "truncated dump: "),
                                         ("garbage", "unreadable dump: ")])
def test_missing_truncated_unreadable_dump(port, mode, start):
    assert only_line(run_port(port, mode)).startswith(start)


def _problems(o):
    return [c.note for c in o.rows if c.check == "impl"]


def test_wrong_dtype_is_one_clear_line(port):
    o = run_port(port, "float32")
    assert not o.passed
    problems = _problems(o)
    assert problems and all(p.startswith("wrong dtype: ") and "the case is float64" in p for p in problems)
    assert all(np.isfinite(c.max_abs) for c in o.rows if c.check != "impl")      # never rows of inf


def test_wrong_shape_says_transposed(port):
    o = run_port(port, "transposed")
    (p,) = _problems(o)
    assert p == ("wrong shape: grad.transformer.h.0.mlp.c_fc.weight is (16, 8), expected (8, 16) [C, F] "
                 "(transposed? matrices are stored [in, out]: y = x @ W)")
    assert not o.passed


def test_unknown_keys(port):
    o = run_port(port, "unknown")
    (p,) = _problems(o)
    assert p.startswith("unknown key(s) (1): h.0.attn.scores;") and "names.txt" in p
    assert not o.passed


def test_missing_required_keys(port):
    (p,) = _problems(run_port(port, "missing_required"))
    assert p == "required key(s) missing (2): loss, grad.transformer.wpe.weight"


def test_no_tap_gradients_warns_and_lists_them_as_not_provided(port):
    o = run_port(port, "no_tap_grads")
    assert o.passed
    assert any("no tap gradients" in n and "before the cause in the forward pass" in n for n in o.notes)
    (np_,) = o.not_provided
    assert np_["check"] == "activation_grad" and np_["count"] == np_["of"] == len(registry.tap_specs(small_cfg()))


def test_the_template_needs_case_and_out():
    with pytest.raises(ValueError, match=r"no \{out\} placeholder"):
        external.command_argv("./port {case}", "c", "o")
    assert external.command_argv("./port --case={case} '{out}' {steps}", "my case", "o", 4) == \
        ["./port", "--case=my case", "o", "4"]


# -- dtype policy --------------------------------------------------------------------------------------

def test_dtype_policy_strict_and_loose():
    with pytest.raises(conventions.DumpDtypeError, match="wrong dtype: x has dtype float32, the case is float64"):
        conventions.dtype_policy(np.float32, "float64", strict=True, key="x")
    loose = conventions.dtype_policy(np.float32, "float64", strict=False)
    assert loose.compare_dtype == np.float32 and "float32's tolerance" in loose.note
    with pytest.raises(conventions.DumpDtypeError):
        conventions.dtype_policy(np.float16, "float64", strict=False)
    cfg = small_cfg()
    b = np.random.default_rng(1).normal(size=(3, 4))
    c = external.compare_one("grad.transformer.ln_f.weight", b.astype(np.float32), b, check="param_grad", cfg=cfg,
                             strict=False)
    assert c.passed and np.isfinite(c.max_abs) and "float32's tolerance" in c.note


# -- the case directory ----------------------------------------------------------------------------------

def test_case_directory_and_readme(tmp_path):
    cfg = small_cfg(norm="post")
    ids, targets = batch(cfg)
    files = external.write_case(tmp_path / "case", cfg, registry.init_params(cfg, 0), ids, targets, label="small",
                                train_batches=train_batches(cfg), optimizer="adamw")
    assert all(f.is_file() for f in files)
    readme = (tmp_path / "case" / "README.txt").read_text()
    for must in ("scaled scores BEFORE the causal mask", "key j > query i", "[in, out]", "PAD = 0",
                 "docs/your-implementation.md", "(2, 5)", "Exit status", "Q | K | V", "betas (0.9, 0.95)",
                 "x = ln_1(x + attn(x))"):
        assert must in readme, must
    assert "DESIGN" ".md" not in readme  # the team's note is not in the repository
    repo = Path(__file__).resolve().parents[1]
    for pointer in ("docs/your-implementation.md", "manual/registry.py"):
        assert (repo / pointer).is_file(), pointer
    names = (tmp_path / "case" / "names.txt").read_text().splitlines()
    assert names[0] == "embed.out [2, 5, 8] ['B', 'T', 'C']"
    assert len(names) == len(external.dump_names(cfg))
    back = external.read_case(tmp_path / "case")
    assert back[0] == cfg and np.array_equal(back[2], ids)


# -- in-process implementations ---------------------------------------------------------------------------

class OnlyRequired(ModelAdapter):
    """A port that declares no optional capability (manual underneath)."""
    capabilities = frozenset()

    def __init__(self, cfg, params):
        import manual
        super().__init__(manual.Model.from_params(cfg, params), "manual")


class MissingMembers:
    def __init__(self, cfg, params):
        self.params = params

    def forward(self, ids, targets=None):
        return 0.0


def no_post_ln(cfg, params):
    if cfg.norm == "post":
        raise Unsupported("only pre-LN is implemented")
    return OnlyRequired(cfg, params)


def test_load_impl_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_port.py").write_text("import numpy_does_not_exist\n")
    (tmp_path / "raising_port.py").write_text("raise RuntimeError('no GPU found')\n")
    (tmp_path / "fine_port.py").write_text("factory = 3\ndef make(cfg, params):\n    return None\n")
    cases = {
        "no_colon": "--impl expects 'package.module:factory'",
        "no_such_module_xyz:make": "module 'no_such_module_xyz' not found",
        "broken_port:make": "importing 'broken_port' failed: No module named 'numpy_does_not_exist'",
        "raising_port:make": "importing 'raising_port' raised RuntimeError: no GPU found",
        "fine_port:nope": "'fine_port' has no attribute 'nope'; it has: factory, make",
        "fine_port:factory": "'fine_port:factory' is a int, not callable",
    }
    for spec, message in cases.items():
        with pytest.raises(ImplementationError) as err:
            load_impl(spec)
        assert str(err.value).startswith(message), (spec, str(err.value))
    import manual
    assert load_impl("manual:Model") == manual.Model.from_params
    assert load_impl("fine_port:make").__name__ == "make"


def test_missing_members_are_listed():
    cfg = small_cfg()
    with pytest.raises(ImplementationError) as err:
        construct(MissingMembers, cfg, registry.init_params(cfg, 0))
    assert "missing required member(s) backward, zero_grad, grads, logits, loss" in str(err.value)
    o = check_impl(MissingMembers, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small")
    assert o.status == "error" and not o.passed and "backward, zero_grad" in o.message


def test_declared_capability_without_its_members():
    class Liar:
        capabilities = {"taps", "optimizer"}
        params = grads = taps = {}
        logits = loss = None

        def __init__(self, cfg, params):
            pass

        def forward(self, ids, targets=None):
            return None

        backward = zero_grad = forward
    cfg = small_cfg()
    with pytest.raises(ImplementationError, match="declares capability 'optimizer' but has no make_optimizer"):
        construct(Liar, cfg, registry.init_params(cfg, 0))


def test_unsupported_configuration_is_not_a_failure():
    cfg = small_cfg(norm="post")
    o = check_impl(no_post_ln, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small.post")
    assert o.status == "unsupported" and o.passed and o.message == "only pre-LN is implemented"


def test_capabilities_not_provided_are_listed_never_passed():
    cfg = small_cfg()
    o = check_impl(OnlyRequired, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small",
                   train_batches=train_batches(cfg))
    assert o.passed
    assert [n["check"] for n in o.not_provided] == ["activation", "activation_grad", "generation", "optimizer"]
    taps = o.not_provided[0]
    assert taps["count"] == taps["of"] - 1          # logits is the one tap it has
    assert {c.check for c in o.rows} == {"activation", "loss", "param_grad"}
    assert capabilities_of(OnlyRequired(cfg, registry.init_params(cfg, 0))) == frozenset()


def test_manual_through_the_interface_passes_with_every_capability():
    cfg = small_cfg("float32")
    o = check_impl(manual_impl, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small",
                   train_batches=train_batches(cfg))
    assert o.passed and not o.not_provided, [c.line() for c in o.rows if not c.passed]
    assert {"activation", "activation_grad", "param_grad", "loss", "generation", "optimizer"} <= \
        {c.check for c in o.rows}


def test_a_bug_in_process_is_found_at_its_tensor():
    class WrongLnf(OnlyRequired):
        def backward(self):
            super().backward()
            self.model.grads["transformer.ln_f.weight"] *= 1.01
    cfg = small_cfg()
    o = check_impl(WrongLnf, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small")
    assert not o.passed and o.first_failure().tensor == "grad.transformer.ln_f.weight"


# -- python -m conformance --impl / --impl-cmd -----------------------------------------------------------

def conformance_main(capsys, *argv):
    from conformance.__main__ import main
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


@pytest.fixture
def port_module(tmp_path, monkeypatch):
    """A Python implementation in its own module: only the required members, and no post-LN."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_port.py").write_text(textwrap.dedent('''
        import manual
        from conformance.implementation import ModelAdapter, Unsupported

        class Port(ModelAdapter):
            capabilities = frozenset({"taps"})

        def make(cfg, params):
            if cfg.norm == "post":
                raise Unsupported("post-LN is not implemented")
            return Port(manual.Model.from_params(cfg, params), "manual")
    '''))
    return "my_port:make"


def test_cli_impl_lists_unsupported_and_not_provided(capsys, port_module, tmp_path):
    js = tmp_path / "r.json"
    rc, out = conformance_main(capsys, "--impl", port_module, "--variant", "base", "--variant", "post_ln",
                               "--dtype", "float64", "-j", "1", "--impl-steps", "2", "--json", js)
    assert rc == 0, out.out
    lines = out.out.splitlines()
    assert any(ln.startswith("tiny.base/64") and " ok " in ln for ln in lines)
    assert any(ln.startswith("tiny.post_ln/64") and "unsupported  post-LN is not implemented" in ln for ln in lines)
    assert "not provided (not compared, never counted as passed):" in out.out
    assert "generation (generate)  [tiny.base/64]" in out.out
    assert "PASSED: 1 of 1 configurations agree, 1 declared unsupported" in out.out
    import json
    rep = json.loads(js.read_text())
    assert rep["passed"] and rep["unsupported"] == [{"config": "tiny.post_ln/64", "reason": "post-LN is not implemented"}]
    base = rep["configurations"][0]
    assert base["status"] == "compared" and {n["check"] for n in base["not_provided"]} == \
        {"activation_grad", "generation", "optimizer"}
    assert rep["checks"] and all(c["passed"] for c in rep["checks"])


def test_cli_everything_unsupported_is_not_a_pass(capsys, port_module):
    rc, out = conformance_main(capsys, "--impl", port_module, "--variant", "post_ln", "--dtype", "float32", "-j", "1")
    assert rc == 1 and "(nothing was compared)" in out.out


def test_cli_impl_cmd_failure_exits_1_with_one_line(capsys, port):
    rc, out = conformance_main(capsys, "--impl-cmd", f"{sys.executable} {port} {{case}} {{out}} 0 transposed",
                               "--variant", "base", "--dtype", "float32", "-j", "1")
    assert rc == 1
    (line,) = [ln for ln in out.out.splitlines() if ln.startswith("tiny.base/32")]
    assert "FAIL" in line and "transposed?" in line


@pytest.mark.parametrize("argv, message", [
    (["--impl", "a:b", "--impl-cmd", "x {case} {out}"], "give --impl or --impl-cmd, not both"),
    (["--impl", "no_such_module_xyz:make"], "module 'no_such_module_xyz' not found"),
    (["--impl-cmd", "./port {case}"], "no {out} placeholder"),
    (["--impl", "manual:Model", "--check", "loss"], "--check does not apply"),
    (["--impl", "manual:Model", "--impl-timeout", "0"], "--impl-timeout must be > 0"),
])
def test_cli_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        conformance_main(capsys, *argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


# -- the debugger reads dumps with the same conventions --------------------------------------------------

def layerdiff(*argv):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "tools.layerdiff", *map(str, argv)], capture_output=True,
                          text=True, cwd=root, timeout=300)


@pytest.fixture(scope="module")
def debug_case(tmp_path_factory, port):
    d = tmp_path_factory.mktemp("dbg")
    p = layerdiff("--export-case", d / "case", "--batch", 2, "--seq-len", 5, "--n-layers", 2)
    assert p.returncode == 0, p.stderr
    return d


def dump_for(debug_case, port, mode):
    import subprocess
    out = debug_case / f"{mode}.safetensors"
    subprocess.run([sys.executable, str(port), str(debug_case / "case"), str(out), "0", mode], check=True,
                   timeout=120, cwd=Path(__file__).resolve().parents[1])
    return out


@pytest.mark.parametrize("mode", ["att=-inf", "att=-1e9", "grad_masked_zero"])
def test_debugger_accepts_masked_entries(debug_case, port, mode):
    p = layerdiff("--case", debug_case / "case", "--against", dump_for(debug_case, port, mode))
    assert p.returncode == 0 and "tensors agree" in p.stdout, p.stdout + p.stderr


def test_debugger_float32_dump_of_a_float64_case(debug_case, port):
    p = layerdiff("--case", debug_case / "case", "--against", dump_for(debug_case, port, "float32"))
    assert "dump float32, case float64: compared at float32's tolerance" in p.stdout
    assert " inf " not in p.stdout and "wrong side: neither" not in p.stdout
    assert p.returncode == 0, p.stdout


def test_debugger_warns_without_tap_gradients(debug_case, port):
    p = layerdiff("--case", debug_case / "case", "--against", dump_for(debug_case, port, "no_tap_grads"))
    assert p.returncode == 0 and "no tap gradients" in p.stdout


def test_debugger_transposed_gradient_is_a_clear_error(debug_case, port):
    p = layerdiff("--case", debug_case / "case", "--against", dump_for(debug_case, port, "transposed"))
    assert p.returncode == 2
    assert "grad.transformer.h.0.mlp.c_fc.weight is (256, 64), expected (64, 256) [C, F] (transposed?" in p.stderr


def test_report_names_the_layer_whose_backward_wrote_the_first_divergent_tensor(capsys, tmp_path):
    """The issue's case: a layer-norm backward without its mean term in ln_f. The gradient of h.{L-1}.out
    is the first to differ and ln_f's backward wrote it (not block h.{L-1}, which owns the tap)."""
    script = tmp_path / "ln_bug.py"
    script.write_text(PORT.replace('m = manual.Model.from_params(cfg, params)', textwrap.dedent('''
        import manual.model as mm
        def no_mean(dy, cache, dw, db=None):
            xhat, rstd, w = cache[0], cache[1], cache[2]
            dw += (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
            if db is not None:
                db += dy.reshape(-1, dy.shape[-1]).sum(0)
            g = dy * w
            return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
        mm.layernorm_backward = no_mean
        m = manual.Model.from_params(cfg, params)''')))
    rc, out = conformance_main(capsys, "--impl-cmd", f"{sys.executable} {script} {{case}} {{out}} 0 ok", "--variant",
                               "base", "--dtype", "float64", "-j", "1")
    assert rc == 1
    (line,) = [ln for ln in out.out.splitlines() if ln.startswith("tiny.base/64")]
    assert ("first divergent: grad.h.2.out (activation_grad), written by ln_f (manual/layers/layernorm.py: "
            "layernorm_backward)") in line, line


def test_manual_and_reference_are_implementations():
    import manual
    import reference
    from conformance.implementation import Implementation, check_members
    cfg = small_cfg()
    for model in (manual.Model(cfg), reference.Model(cfg), manual_impl(cfg, registry.init_params(cfg, 0))):
        assert isinstance(model, Implementation)
        check_members(model)
    assert not isinstance(MissingMembers(cfg, {}), Implementation)


def test_impl_keep_writes_what_the_debugger_reads(capsys, tmp_path):
    class Scaled(OnlyRequired):
        def backward(self):
            super().backward()
            self.model.grads["transformer.h.0.ln_1.bias"] *= 1.5
    cfg = small_cfg()
    keep = tmp_path / "keep"
    o = check_impl(Scaled, cfg, registry.init_params(cfg, 0), *batch(cfg), label="small", keep=keep)
    assert o.first_failure().tensor == "grad.transformer.h.0.ln_1.bias"
    p = layerdiff("--case", keep / "case", "--against", keep / "dump.safetensors")
    assert p.returncode == 1 and "First divergent tensor: grad.transformer.h.0.ln_1.bias" in p.stdout, p.stdout
