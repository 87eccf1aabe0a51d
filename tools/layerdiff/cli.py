"""The command line: `python -m tools.layerdiff ...` (see the package docstring for the flags' story)."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from conformance.trajectory import DEFAULT_OPTIMIZERS
from manual import registry
from manual.config import PRESETS, ModelConfig
from tools._args import CHECKPOINT_NAME, int_at_least
from tools._cli import cli, output_dir, output_file, write_output

from .dump import LAYOUTS, OURS, against_llmc_state, export_case, is_llmc_state, load_dump, where_in_layout
from .report import plot, print_report
from .session import debug
from .walk import Setup, cfg_label, make_setup
from .zoo import print_zoo, run_zoo

DESCRIPTION = ("layerdiff: the layer-by-layer gradient debugger. Which tensor went wrong first, in which layer, "
               "and which side is to blame.")

CFG_FLAGS = ("dtype", "norm", "activation", "attention", "loss", "n_layers", "d_model", "n_heads", "d_ff",
             "max_seq_len", "vocab_size", "n_future", "temperature", "ln_eps", "pad_id")


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line and exit status 2 (--help shows the flags)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tools.layerdiff", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the README section \"Debugging a gradient bug\" for a walk-through.")
    g = p.add_argument_group("model and weights")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    g.add_argument("--config", metavar="JSON", help="ModelConfig overrides: a JSON object or a path to one")
    g.add_argument("--dtype", choices=["float32", "float64"], help="default float64 (with --checkpoint: its own)")
    g.add_argument("--norm", choices=["pre", "post"])
    g.add_argument("--activation", choices=["relu", "gelu", "gelu_tanh"])
    g.add_argument("--attention", choices=["standard", "flash"])
    g.add_argument("--loss", choices=["cross_entropy", "brier"])
    for flag, typ in (("n_layers", int), ("d_model", int), ("n_heads", int), ("d_ff", int), ("max_seq_len", int),
                      ("vocab_size", int), ("n_future", int), ("temperature", float), ("ln_eps", float),
                      ("pad_id", int)):
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ)
    g.add_argument("--no-bias", action="store_true", help="bias=False")
    g.add_argument("--untied", action="store_true", help="tie_embeddings=False")
    g.add_argument("--seed", type=int, default=0, help="weights: registry.init_params(cfg, seed)")
    g.add_argument("--checkpoint", metavar="PATH", help="weights and config from a checkpoint")
    g.add_argument("--case", metavar="DIR", help="a folder written by --export-case (checkpoint + batch)")
    b = p.add_argument_group("batch")
    b.add_argument("--batch", type=int_at_least(1), default=2)
    b.add_argument("--seq-len", type=int_at_least(1), default=8)
    b.add_argument("--batch-seed", type=int, default=0)
    b.add_argument("--no-pad", action="store_true", help="no PAD among the generated targets")
    b.add_argument("--ids", metavar="FILE.npy", help="your own token ids (B, T) or (T,)")
    b.add_argument("--targets", metavar="FILE.npy", help="their targets (default: ids shifted left, PAD last)")
    w = p.add_argument_group("what to run")
    w.add_argument("--steps", type=int_at_least(0), help="also walk N optimizer steps (default 0; a fault's own with --inject)")
    w.add_argument("--optimizer", choices=DEFAULT_OPTIMIZERS, default="adamw")
    w.add_argument("--inject", metavar="NAME", help="inject a fault of the bug zoo into the manual side")
    w.add_argument("--list-faults", action="store_true")
    w.add_argument("--zoo", nargs="*", metavar="NAME", help="run every fault (or the ones named)")
    w.add_argument("--workers", type=int_at_least(1), default=2, help="processes for --zoo (default 2)")
    w.add_argument("--against", metavar="FILE",
                   help="compare a dump (.safetensors/.npz) against the reference; or an llm.c debug state "
                        "(magic 20240327, e.g. gpt2_124M_debug_state.bin): its logits, loss and every parameter "
                        "gradient, on the state's own x, y, with the weights of --case/--checkpoint")
    w.add_argument("--layout", default=OURS, metavar="|".join(LAYOUTS),
                   help="the layout of the dump's grad.<param> tensors: ours (default; Hugging Face names, "
                        "[in, out] matrices), nanogpt (nn.Linear [out, in] under nanoGPT's state-dict names, "
                        "prefixes _orig_mod./module. stripped) or llmc (llm.c's 16 stacked tensors, grad.wte "
                        "with V or padded Vp rows); mapped by manual/formats.py's table. Taps keep our names "
                        "(docs/interop.md)")
    w.add_argument("--export-case", metavar="DIR", help="write checkpoint + batch + format README, then exit")
    w.add_argument("--no-blame", action="store_true", help="skip the finite-difference / recomputation check")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH")
    o.add_argument("--plot", metavar="PNG", help="heatmap of log10(error / tolerance) per layer and tensor")
    o.add_argument("--diff-only", action="store_true", help="print only the rows that differ")
    return p


def _config_overrides(args, p) -> dict:
    over = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        try:
            over = json.loads(text)
        except json.JSONDecodeError as exc:
            p.error(f"--config is neither a JSON object nor a file holding one: {exc}")
        if not isinstance(over, dict):
            p.error(f"--config must be a JSON object, got {type(over).__name__}")
    for f in CFG_FLAGS:
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    if args.no_bias:
        over["bias"] = False
    if args.untied:
        over["tie_embeddings"] = False
    return over


def setup_from_args(args, p) -> Setup:
    from manual.checkpoint import load_model
    over = _config_overrides(args, p)
    ckpt = args.checkpoint
    if args.case:
        d = Path(args.case)
        if not (d / CHECKPOINT_NAME).is_file():
            p.error(f"--case {d}: no checkpoint.safetensors there (write one with --export-case)")
        ckpt = ckpt or str(d / CHECKPOINT_NAME)
        args.ids = args.ids or str(d / "ids.npy")
        args.targets = args.targets or str(d / "targets.npy")
    if ckpt:
        cfg, params, _extras, _meta = load_model(ckpt)
        if over:
            dtype = over.pop("dtype", None)
            if over:
                p.error(f"--checkpoint fixes the model; only --dtype may change it (got {sorted(over)})")
            if dtype:
                cfg = cfg.replace(dtype=dtype)
                params = {k: v.astype(dtype) for k, v in params.items()}
        label = f"{cfg.dtype} {Path(ckpt).name}"
    else:
        over.setdefault("dtype", "float64")
        cfg = ModelConfig.preset(args.preset, **over)
        params = registry.init_params(cfg, args.seed)
        label = cfg_label(cfg, args.preset)
    if args.ids:
        ids = np.load(args.ids, allow_pickle=False)
        if ids.ndim == 1:
            ids = ids[None]
        if args.targets:
            targets = np.load(args.targets, allow_pickle=False)
            if targets.ndim == 1:
                targets = targets[None]
        else:
            targets = np.full_like(ids, cfg.pad_id)
            targets[:, :-1] = ids[:, 1:]
        from manual.model import check_token_array
        ids = check_token_array(ids, cfg, "ids")
        targets = check_token_array(targets, cfg, "targets")
        if targets.shape != ids.shape:
            p.error(f"--targets shape {targets.shape} differs from --ids shape {ids.shape}")
        if not (targets != cfg.pad_id).any():
            p.error(f"every target is PAD (pad_id={cfg.pad_id})")
        return Setup(cfg, params, ids, targets, label, own_batch=True)
    return make_setup(cfg, batch=args.batch, seq_len=args.seq_len, batch_seed=args.batch_seed,
                      pad=not args.no_pad, params=params, label=label)


@cli("python -m tools.layerdiff")
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    output_file(args.json, "--json")          # checked before any work (tools/_cli.py): one line, exit 2
    output_file(args.plot, "--plot")
    if args.export_case:
        output_dir(args.export_case, "--export-case")
    from tools import faults
    if args.list_faults:
        print(faults.describe())
        return 0
    if args.zoo is not None:
        try:
            z = run_zoo(args.zoo or None, args.workers)
        except KeyError as exc:
            p.error(str(exc.args[0]))
        print_zoo(z)
        if args.json:
            write_output(args.json, json.dumps(z, indent=1))
            print(f"wrote {args.json}")
        return 0 if z["caught"] == z["total"] and z["localized"] == z["total"] else 1
    fault = None
    if args.inject:
        if args.inject not in faults.BY_NAME:
            p.error(f"unknown fault {args.inject!r}; --list-faults shows the {len(faults.FAULTS)} faults")
        if args.against:
            p.error("--inject changes the manual side; --against compares a dump, which has none")
        fault = faults.get(args.inject)
        # the fault's own case, unless the command line says otherwise
        if not (args.checkpoint or args.case):
            for k, v in fault.config.items():
                if getattr(args, k, None) is None:
                    setattr(args, k, v)
        if args.steps is None:
            args.steps = fault.opt_steps
    steps = args.steps or 0
    if args.layout not in LAYOUTS:
        p.error(f"--layout {args.layout!r}: unknown layout; expected one of {', '.join(LAYOUTS)}")
    if args.layout != OURS and not args.against:
        p.error(f"--layout {args.layout} says how a dump is laid out; give the dump with --against")
    if steps and args.against:
        p.error("--steps runs the manual optimizer; a dump (--against) holds one forward/backward only")
    try:
        setup = setup_from_args(args, p)
    except (ValueError, TypeError, OSError) as exc:
        p.error(str(exc))
    if args.export_case:
        written = export_case(setup, args.export_case)
        print(f"wrote {', '.join(str(w) for w in written)}")
        print(f"the format of the dump to produce: {Path(args.export_case) / 'README.txt'}")
        return 0
    against, layout = None, args.layout
    if args.against:
        B, T = setup.ids.shape
        try:
            if is_llmc_state(args.against):
                if args.layout not in (OURS, "llmc"):
                    p.error(f"--layout {args.layout}: {args.against} is an llm.c debug state, in llm.c's layout")
                setup, against, notes = against_llmc_state(args.against, setup)
                layout = "llmc"
                print("\n".join(notes))
            else:
                against = load_dump(args.against, setup.cfg, B, T, args.layout)
        except ValueError as exc:
            p.error(str(exc))
        if args.layout != OURS:
            setup.label += f" | {args.layout} layout"
    with warnings.catch_warnings():          # overflow in a broken side is a finding, reported in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        if fault is not None:
            with faults.inject(fault.name) as sides:
                setup.label += f" | fault {fault.name}"
                rep = debug(setup, sides, steps=steps, optimizer=args.optimizer, blame=not args.no_blame)
        else:
            rep = debug(setup, None, steps=steps, optimizer=args.optimizer, blame=not args.no_blame,
                        against=against)
    in_dump = where_in_layout(rep.first.tensor, layout, rep.first.worst_index) if rep.first else None
    if in_dump:                              # on the worst element's line (and in the JSON's note), in the dump's terms
        rep.first.note = "; ".join(filter(None, [rep.first.note, f"in the dump's {layout} layout: {in_dump}"]))
    print_report(rep, diff_only=args.diff_only)
    if args.json:
        write_output(args.json, json.dumps(rep.as_json(), indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0 if rep.ok else 1
