"""Convert GPT-2 weights between our checkpoints and Hugging Face, nanoGPT and llm.c; write llm.c debug states.

    python tools/convert.py --from hf gpt2/ --out gpt2.safetensors                  # folder: model.safetensors + config.json
    python tools/convert.py --from nanogpt ckpt.safetensors --out ours.safetensors
    python tools/convert.py --from llmc gpt2_124M.bin --out ours.safetensors --dtype float64
    python tools/convert.py --to hf --checkpoint ours.safetensors --out gpt2/
    python tools/convert.py --to nanogpt --checkpoint ours.safetensors --out ckpt.safetensors
    python tools/convert.py --to llmc --checkpoint ours.safetensors --out gpt2_124M.bin
    python tools/convert.py --to llmc-state --checkpoint ours.safetensors --ids ids.npy --targets targets.npy \\
        --out gpt2_124M_debug_state.bin [--impl manual|reference]

Where every tensor lives in each format is one table, manual/formats.py (TABLE). A config that a
format cannot hold is refused with the field and the value; a file that is not what it claims
is refused with the file, the offset or field, the value found and the value expected. Writes
are atomic (temporary file in the same folder, fsync, os.replace): on failure nothing is written
and an existing --out survives. No pickle: .pt / .pth / .ckpt files are refused unopened.

Exit status: 0 on success, 2 on bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from tools._args import CHECKPOINT_NAME, checkpoint_in
from tools._cli import cli

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin.pt", ".pkl")
SAFE_CONVERSION = (
    '    ckpt = torch.load("{path}", map_location="cpu", weights_only=True)\n'
    '    safetensors.torch.save_file({{k: v.contiguous().clone() for k, v in ckpt["model"].items()}}, '
    '"{stem}.safetensors", metadata={{"model_args": json.dumps(ckpt["model_args"])}})')


class BadInput(Exception):
    """Printed as one line (plus, for pickle files, the two conversion lines) and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, no usage block
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python tools/convert.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", nargs=2, metavar=("FORMAT", "PATH"),
                     help="read hf (a folder) | nanogpt (.safetensors) | llmc (gpt2_*.bin) into our checkpoint")
    way.add_argument("--to", dest="dst", metavar="FORMAT",
                     help="write our checkpoint as hf | nanogpt | llmc, or an llm.c debug state (llmc-state)")
    p.add_argument("--out", required=True, help="the file (or, for --to hf, the folder) to write")
    p.add_argument("--checkpoint", help="with --to: our checkpoint (.safetensors)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="with --from: dtype of the checkpoint written (default float32)")
    p.add_argument("--ids", help="with --to llmc-state: (B, T) integer token ids, .npy")
    p.add_argument("--targets", help="with --to llmc-state: (B, T) integer targets, .npy")
    p.add_argument("--impl", choices=("manual", "reference"), default="manual",
                   help="with --to llmc-state: the implementation that computes logits, loss and gradients")
    return p


class HFTokenizer:
    """GPT-2's byte-level BPE from a Hugging Face folder's vocab.json + merges.txt, read with the
    `tokenizers` library; the encode / decode / split / vocab_size of manual/tokenizer.py's tokenizers.
    Byte-level BPE has no unknown token: every byte of every text has an id."""
    kind = "GPT-2 byte-level BPE"

    def __init__(self, folder):
        folder = Path(folder)
        files = [folder / "vocab.json", folder / "merges.txt"]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise BadInput(f"{folder}: tokenizer file(s) {absent} missing; --from-hf needs the folder's vocab.json "
                           f"and merges.txt (GPT-2's tokenizer files, as Hugging Face ships them)")
        try:
            from tokenizers import ByteLevelBPETokenizer
        except ImportError:
            raise BadInput("reading vocab.json + merges.txt needs the `tokenizers` library: pip install '.[hf]'") from None
        try:
            self._tok = ByteLevelBPETokenizer(str(files[0]), str(files[1]))
        except Exception as exc:       # the library raises its own exception types
            raise BadInput(f"{folder}: vocab.json / merges.txt are not a byte-level BPE tokenizer: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str):
        import numpy as np
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)            # (N,)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def split(self, text: str) -> list:
        return []                                                                 # no unknown tokens

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)


def load_hf_folder(folder):
    """(cfg, params, tokenizer) of a Hugging Face GPT-2 folder, for tools/sample.py --from-hf."""
    from manual.formats import read_hf

    cfg, params, _notes = read_hf(folder)
    tok = HFTokenizer(folder)
    if tok.vocab_size != cfg.vocab_size:
        raise BadInput(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size}")
    return cfg, params, tok


def refuse_pickle(path: str) -> None:
    """A pickle file is refused before it is opened (unpickling can run any code)."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        stem = Path(path).with_suffix("").name
        raise BadInput(f"{path}: a pickle file ({Path(path).suffix}) is refused unopened (loading pickle runs "
                       f"arbitrary code). Convert it on your side, in Python with torch and safetensors:\n"
                       + SAFE_CONVERSION.format(path=path, stem=stem))


def _load_npy(path: str, what: str):
    import numpy as np
    refuse_pickle(path)
    if not Path(path).is_file():
        raise BadInput(f"{path}: no such file (--{what})")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BadInput(f"{path}: not a readable .npy array (--{what}): {str(exc).splitlines()[0]}") from None
    if arr.dtype.kind not in "iu" or arr.ndim != 2:
        raise BadInput(f"{path}: --{what} must be a 2-D (B, T) integer array, found dtype {arr.dtype} "
                       f"shape {arr.shape}")
    return arr


def state_from(cfg, params, ids, targets, impl: str):
    """One forward and backward of `impl` on (ids, targets): (logits, loss, grads), canonical names."""
    if cfg.loss != "cross_entropy" or cfg.temperature != 1.0:
        raise BadInput(f"llm.c's debug state holds the plain cross-entropy loss; config loss = {cfg.loss!r}, "
                       f"temperature = {cfg.temperature!r}")
    pads = targets == cfg.pad_id
    if pads.any():
        where = tuple(int(i) for i in (pads.nonzero()[0][0], pads.nonzero()[1][0]))
        raise BadInput(f"--targets hold pad_id {cfg.pad_id} at {where} ({int(pads.sum())} in all): llm.c's loss "
                       f"counts every target, ours ignores PAD, so the two losses would differ")
    if impl == "manual":
        import manual
        model = manual.Model.from_params(cfg, params)
    else:
        import reference
        model = reference.Model.from_params(cfg, params)
    model.zero_grad()
    try:
        loss = model.forward(ids, targets)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"--ids/--targets: {exc}") from None
    model.backward()
    return model.logits, loss, model.grads


def run(args) -> str:
    from manual import formats
    from manual.checkpoint import load_model, save_model

    if args.src:
        fmt, path = args.src
        if fmt not in formats.READERS:
            raise BadInput(f"--from {fmt}: unknown format; expected one of {', '.join(formats.READERS)}")
        refuse_pickle(path)
        if not str(args.out).endswith(".safetensors"):
            raise BadInput(f"--out {args.out}: our checkpoints are .safetensors files")
        cfg, params, notes = formats.READERS[fmt](path, dtype=args.dtype)
        extra = {"converted_from": f"{fmt} {path}"}
        if notes:
            extra["conversion_notes"] = " | ".join(notes)
        save_model(args.out, cfg, params, extra_metadata=extra)
        return f"wrote {args.out}: {fmt} -> ours, {len(params)} tensors, {cfg.dtype}" + \
            "".join(f"; {n}" for n in notes)

    fmt = args.dst
    if fmt not in (*formats.WRITERS, "llmc-state"):
        raise BadInput(f"--to {fmt}: unknown format; expected one of {', '.join((*formats.WRITERS, 'llmc-state'))}")
    if not args.checkpoint:
        raise BadInput(f"--to {fmt} needs --checkpoint FILE.safetensors (ours)")
    refuse_pickle(args.checkpoint)
    checkpoint = checkpoint_in(args.checkpoint)       # a file, or a tools/train.py --out folder holding one
    if not checkpoint.is_file():
        raise BadInput(f"{args.checkpoint}: no such checkpoint file (--checkpoint; a file, or a folder holding "
                       f"{CHECKPOINT_NAME})")
    cfg, params, _extras, _meta = load_model(checkpoint)
    if fmt == "llmc-state":
        if not (args.ids and args.targets):
            raise BadInput("--to llmc-state needs --ids IDS.npy and --targets TARGETS.npy")
        formats.check_can_hold(cfg, "llmc")
        ids, targets = _load_npy(args.ids, "ids"), _load_npy(args.targets, "targets")
        if ids.shape != targets.shape:
            raise BadInput(f"--targets shape {targets.shape} differs from --ids shape {ids.shape}")
        logits, loss, grads = state_from(cfg, params, ids, targets, args.impl)
        formats.write_llmc_state(args.out, cfg, ids, targets, logits, loss, grads)
        B, T = ids.shape
        narrowed = "" if cfg.dtype == "float32" else f"; computed in {cfg.dtype}, stored as float32"
        return f"wrote {args.out}: llm.c debug state (version 2) from {args.impl}, B {B}, T {T}, loss {loss:.6f}" \
               + narrowed
    notes = formats.WRITERS[fmt](args.out, cfg, params) or []
    return f"wrote {args.out}: ours -> {fmt}, {len(params)} tensors" + "".join(f"; {n}" for n in notes)


@cli("convert.py")
def main(argv=None) -> int:
    from manual.checkpoint import CheckpointError
    from manual.formats import FormatError

    try:
        args = build_parser().parse_args(argv)
        print(run(args))
        return 0
    except (BadInput, FormatError, CheckpointError) as exc:
        text = str(exc)
        if isinstance(exc, CheckpointError):
            text = " ".join(line.strip() for line in text.splitlines())
        print(f"convert.py: error: {text}", file=sys.stderr)
        return 2
    except OSError as exc:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        print(f"convert.py: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
