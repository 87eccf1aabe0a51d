"""Dumps from other implementations, and the case they are computed on (--export-case, --against).
The case directory, its README.txt and the dump's conventions are conformance/external.py's (one
definition for the conformance matrix's --impl-cmd and for this debugger).

Two more ways to hand the debugger another implementation's numbers (docs/interop.md, "The debugger
reads these layouts"):

  --layout nanogpt|llmc   the dump's parameter gradients are in that format's layout: nanoGPT's
                          nn.Linear [out, in] weights under its state-dict names (prefixes `_orig_mod.`
                          and `module.` stripped), or llm.c's 16 tensors stacked over layers with wte's
                          rows padded to Vp, each under grad.<key>. They are mapped to ours by
                          manual/formats.py's TABLE (grads_from_layout) and nothing else; taps and tap
                          gradients keep our names.
  --against STATE.bin     llm.c's debug state (magic 20240327): logits, loss and every parameter
                          gradient, computed on the state's own batch x, y (manual/formats.py,
                          read_llmc_state). The case gives the weights and the config.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance import external
from manual import formats, registry
from manual.config import ModelConfig

from .walk import Setup

DUMP_README = external.CASE_README


def export_case(setup: Setup, folder) -> list[Path]:
    return external.write_case(folder, setup.cfg, setup.params, setup.ids, setup.targets, label=setup.label)


OURS = "ours"
LAYOUTS = (OURS, "nanogpt", "llmc")        # ours = Hugging Face GPT-2's names and Conv1D [in, out] layout


def load_dump(path, cfg: ModelConfig, B: int, T: int, layout: str = OURS) -> dict[str, np.ndarray]:
    """Read a dump (.safetensors or .npz). A file that cannot be read, unknown names, wrong shapes and
    dtypes that cannot be compared raise ValueError listing them (with the --layout that reads the file,
    when another one does); the dump's notes (a float32 dump of a float64 case, no tap gradients, the
    layout mapping) are printed. `layout`: the layout of its parameter gradients (LAYOUTS)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: unknown layout; expected one of {', '.join(LAYOUTS)}")
    try:
        raw = external.load_dump_file(path)
    except external.DumpError as exc:
        raise ValueError(str(exc)) from None
    tensors, notes, problem = read_in_layout(raw, cfg, B, T, layout, path)
    if problem:
        raise ValueError(problem + layout_hint(raw, cfg, B, T, layout))
    for note in notes:
        print(note)
    return tensors


def read_in_layout(raw: dict, cfg: ModelConfig, B: int, T: int, layout: str, path) -> tuple[dict, list, str]:
    """(the comparable tensors under our names, notes, "" or the one-line problem)."""
    notes = []
    try:
        if layout != OURS:
            raw, notes = from_layout_dump(raw, cfg, layout, path)
    except formats.FormatError as exc:
        return {}, [], f"--layout {layout}: {exc}"
    dump = external.check_dump(raw, cfg, B, T, strict=False, require=False)
    if dump.problems:
        return {}, [], f"dump {path}: " + "; ".join(dump.problems)
    return dump.tensors, notes + dump.notes, ""


def layout_hint(raw: dict, cfg: ModelConfig, B: int, T: int, tried: str) -> str:
    """For a dump that fails in layout `tried`: ' (... add --layout X)' when it reads cleanly in X."""
    for fmt in LAYOUTS:
        if fmt != tried and not read_in_layout(raw, cfg, B, T, fmt, "")[2]:
            return (f" (the dump reads cleanly in the {fmt} layout: " +
                    ("drop --layout)" if fmt == OURS else f"add --layout {fmt})"))
    return ""


# -- --layout: parameter gradients in another format's layout ---------------------------------------------

def _format_key(key: str, fmt: str) -> str | None:
    """'grad.<key>' -> <key> as the format names it (nanogpt: prefixes stripped); None for other keys."""
    if not key.startswith("grad."):
        return None
    bare = key[len("grad."):]
    if fmt == "nanogpt":
        while bare.startswith(formats.NANOGPT_PREFIXES):
            bare = bare[len(next(p for p in formats.NANOGPT_PREFIXES if bare.startswith(p))):]
    return bare


def from_layout_dump(tensors: dict, cfg: ModelConfig, fmt: str, path) -> tuple[dict, list[str]]:
    """A dump whose grad.<param> keys are in `fmt`'s layout -> the same dump in ours (taps untouched).
    Every parameter gradient must then be there (a stacked llm.c tensor holds all layers at once);
    FormatError lists every missing, unexpected, mis-shaped or misnamed key."""
    formats.check_can_hold(cfg, fmt)         # a case the format's model does not compute: say so first
    held = set(formats.layout_shapes(cfg, fmt)) | ({"lm_head.weight"} if fmt == "nanogpt" else set())
    canonical = set(registry.param_shapes(cfg))
    grads, rest, misnamed = {}, {}, []
    for key, arr in tensors.items():
        bare = _format_key(key, fmt)
        if bare in held:
            if bare in grads:
                misnamed.append(f"{key}: a second gradient of {bare}")
            grads[bare] = arr
        elif bare in canonical:
            misnamed.append(f"{key} is our name; in the {fmt} layout it is grad.{formats.describe(bare)[fmt]}")
        else:
            rest[key] = arr
    if misnamed:
        raise formats.FormatError(f"dump {path}: " + "; ".join(misnamed))
    if not grads:
        return rest, [f"dump {path}: no parameter gradient in the {fmt} layout (expected grad.<key> for "
                      f"{', '.join(sorted(held)[:4])}, ...)"]
    mapped = formats.grads_from_layout(grads, fmt, cfg, what=f"dump {path}")
    notes = [f"dump {path}: {len(grads)} parameter gradient(s) read in the {fmt} layout and mapped to ours "
             f"through manual/formats.py's TABLE"]
    pad = np.asarray(grads.get("wte", np.zeros((0, 0))))[cfg.vocab_size:] if fmt == "llmc" else np.zeros(0)
    if pad.size and np.any(pad != 0):
        notes.append(f"dump {path}: grad.wte's {pad.shape[0]} padded rows are not zero (max |x| "
                     f"{float(np.abs(pad).max()):.3g}): no token reaches them, so llm.c leaves them zero; not compared")
    rest.update({f"grad.{name}": g for name, g in mapped.items()})
    return rest, notes


def where_in_layout(tensor: str, fmt: str, index=()) -> str | None:
    """Where a canonical grad.<param> (and its element `index`) sits in `fmt`'s layout, by the table:
    'grad.fcw[1] (transposed, stacked over layers), element [1, 255, 3]'. None for other tensors."""
    if fmt == OURS or not tensor.startswith("grad."):
        return None
    name = tensor[len("grad."):]
    p = formats.place(name, fmt)
    if p is None:
        return None
    text = f"grad.{formats.describe(name)[fmt]}"
    idx = tuple(int(i) for i in index)
    if idx:
        idx = idx[::-1] if p.transpose else idx
        idx = ((formats.pattern_of(name)[1],) + idx) if p.stacked else idx
        text += f", element {list(idx)}"
    return text


# -- --against STATE.bin: llm.c's debug state ------------------------------------------------------------

def is_llmc_state(path) -> bool:
    """An llm.c debug state: magic 20240327 in the first int32. A `.bin` file with another magic
    raises ValueError (it is not a dump either)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    magic = int.from_bytes(head, "little", signed=True) if len(head) == 4 else None
    if magic == formats.LLMC_STATE_MAGIC:
        return True
    if path.suffix == ".bin":
        if magic == formats.LLMC_MAGIC:
            raise ValueError(f"{path}: magic {magic} is llm.c's model file (gpt2_*.bin), not its debug state "
                             f"(magic {formats.LLMC_STATE_MAGIC}): give it to tools/convert.py --from llmc and "
                             f"pass the result as --checkpoint")
        raise ValueError(f"{path}: offset 0 (magic): found {magic}, expected {formats.LLMC_STATE_MAGIC} "
                         f"(llm.c debug state; a .bin file is read as nothing else)")
    return False


def against_llmc_state(path, setup: Setup) -> tuple[Setup, dict, list[str]]:
    """(the setup on the state's own batch, the state as a dump, notes). The state holds only B and T,
    so the setup's config must be one llm.c computes (check_can_hold) and fit the state's size."""
    cfg = setup.cfg
    if cfg.loss != "cross_entropy" or cfg.temperature != 1.0:
        raise ValueError(f"an llm.c debug state holds the plain cross-entropy loss; the case has loss = "
                         f"{cfg.loss!r}, temperature = {cfg.temperature!r}")
    try:
        formats.check_can_hold(cfg, "llmc")
    except formats.FormatError as exc:
        raise ValueError(f"{path} is an llm.c debug state, and the case's model is not one llm.c computes: {exc}") \
            from None
    try:
        st = formats.read_llmc_state(path, cfg)
    except formats.FormatError as exc:
        raise ValueError(f"{exc} (the case's config decides every size but B and T)") from None
    most = formats.llmc_padded_vocab(cfg.vocab_size)
    if not cfg.vocab_size <= st.Vp <= most:      # the header has no Vp: the file's size implied this one
        raise ValueError(f"{path}: its size implies a gradient of wte with Vp = {st.Vp} rows, expected "
                         f"{cfg.vocab_size}..{most} (llm.c pads V = {cfg.vocab_size} to {most}): the state was "
                         f"written for another config than the case's (C {cfg.d_model}, L {cfg.n_layers}, "
                         f"V {cfg.vocab_size}, maxT {cfg.max_seq_len})")
    from manual.model import check_token_array
    ids = check_token_array(st.x, cfg, f"{path}: x")
    targets = check_token_array(st.y, cfg, f"{path}: y")
    B, T = ids.shape
    notes = [f"{path}: llm.c debug state, B {B}, T {T}, Vp {st.Vp}: compared on its own x and y "
             f"(not the case's ids.npy / targets.npy)"]
    pads = targets == cfg.pad_id
    if pads.any():
        free = np.setdiff1d(np.arange(cfg.vocab_size), targets)
        if free.size == 0:
            raise ValueError(f"{path}: y holds pad_id {cfg.pad_id} at {int(pads.sum())} position(s) and every other "
                             f"id of [0, {cfg.vocab_size}) as well: llm.c counts every target, and no pad_id is "
                             f"left that would make ours count them all")
        notes.append(f"PAD: y holds pad_id {cfg.pad_id} at {int(pads.sum())} position(s). llm.c counts every "
                     f"target, ours ignores PAD; the reference runs with pad_id = {int(free[0])} (absent from y) "
                     f"so that it counts every target too")
        cfg = cfg.replace(pad_id=int(free[0]))
    tensors = {"logits": st.logits, "loss": np.asarray(st.loss, dtype=np.float32)}
    tensors.update({f"grad.{name}": g for name, g in st.grads.items()})
    dump = external.check_dump(tensors, cfg, B, T, strict=False, require=False)
    if dump.problems:
        raise ValueError(f"{path}: " + "; ".join(dump.problems))
    label = f"{setup.label} | llm.c state {Path(path).name}"
    return Setup(cfg, setup.params, ids, targets, label, own_batch=True), dump.tensors, notes + dump.notes
