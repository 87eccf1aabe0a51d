"""Generate text from a checkpoint written by tools/train.py, with either implementation.

    python tools/sample.py runs/latest --prompt "The " --max-new-tokens 200
    python tools/sample.py runs/latest/checkpoint.safetensors --prompt "def " --temperature 0     # greedy
    python tools/sample.py runs/latest --prompt "The " --temperature 0.8 --top-k 10 --seed 3 --impl reference
    python tools/sample.py --from-hf gpt2/ --prompt "Hello" --temperature 0      # a Hugging Face GPT-2 folder

The tokenizer is the one saved in the checkpoint. Characters (or words) of the prompt that it
does not know become UNK (<unk>), and a note on stderr says which. Sampling (manual/sampling.py;
reference/sampling.py states the same rule in torch): temperature 0 picks the most likely token
(ties: the lowest id); otherwise logits / temperature, cut to the top k when --top-k is given,
softmax, and one draw from a stream of uniform numbers seeded by --seed, the same stream for
both implementations, so both print the same text from the same checkpoint. The context fed to
the model is cropped to its last max_seq_len tokens. Prints the prompt followed by the
generated text, decoded.

Errors (tools/_cli.py): a bad checkpoint (tampered metadata, non-finite weights, bfloat16
tensors, a truncated or unreadable file) or non-finite logits is one line on stderr and exit
code 2; `... | head` ends quietly.
"""
from __future__ import annotations

import argparse
import math
import sys


from tools._args import CHECKPOINT_NAME, checkpoint_in, int_at_least
from tools._cli import cli


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 means greedy), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                   help=f"a checkpoint file, or a folder holding {CHECKPOINT_NAME} (tools/train.py --out)")
    p.add_argument("--from-hf", metavar="DIR", help="instead of CHECKPOINT: a Hugging Face GPT-2 folder "
                   "(model.safetensors, config.json, vocab.json, merges.txt), e.g. real GPT-2 weights")
    p.add_argument("--prompt", default="The ", help="text to continue (default 'The ')")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=200, help="default 200")
    p.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int_at_least(1, " (or leave it out for no cut)"), default=None,
                   help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the uniform draws (default 0)")
    p.add_argument("--impl", choices=("manual", "reference"), default="manual")
    return p


@cli("sample.py")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt == "":
        parser.error("argument --prompt: the prompt is empty; give at least one character to continue from")

    import numpy as np

    from manual.checkpoint import CheckpointError, load_model
    from manual.tokenizer import UNK, tokenizer_from_json

    if (args.checkpoint is None) == (args.from_hf is None):
        parser.error("give either CHECKPOINT or --from-hf DIR (exactly one)")
    if args.from_hf is not None:      # weights + GPT-2 tokenizer files of a Hugging Face folder
        from manual.formats import FormatError
        from tools.convert import BadInput, load_hf_folder
        path = args.from_hf
        try:
            cfg, params, tok = load_hf_folder(args.from_hf)
        except (BadInput, FormatError) as exc:
            parser.error(f"argument --from-hf: {exc}")
    else:
        path = checkpoint_in(args.checkpoint)
        cfg, params, _extras, meta = load_model(path)       # a CheckpointError: one line, exit 2 (tools/_cli.py)
        if "tokenizer" not in meta:
            raise CheckpointError(f"{path} holds no tokenizer (metadata 'tokenizer'); "
                                  f"use a checkpoint written by tools/train.py")
        try:
            tok = tokenizer_from_json(meta["tokenizer"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}")

    prompt = tok.encode(args.prompt)                                              # (N,)
    if len(prompt) == 0:
        parser.error(f"argument --prompt: {args.prompt!r} has no {tok.kind} tokens to continue from")
    unknown = [t for t in tok.split(args.prompt) if tok.token_to_id(t) == UNK]
    if unknown:
        shown = ", ".join(repr(t) for t in dict.fromkeys(unknown))
        print(f"note: {len(unknown)} {tok.kind} token(s) of the prompt are not in the vocabulary and map to "
              f"<unk>: {shown}", file=sys.stderr)
    if len(prompt) > cfg.max_seq_len:
        print(f"note: the prompt has {len(prompt)} tokens; the model sees only the last "
              f"{cfg.max_seq_len} (max_seq_len)", file=sys.stderr)

    if args.impl == "manual":
        import manual
        from manual.sampling import generate
        model = manual.Model.from_params(cfg, params)
    else:
        import reference
        from reference.sampling import generate
        model = reference.Model.from_params(cfg, params)
    new = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed)          # non-finite logits: NonFiniteError, one line (tools/_cli.py)
    print(tok.decode(np.concatenate([prompt, new])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
