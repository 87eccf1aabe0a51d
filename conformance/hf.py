"""transformers as a third implementation: Hugging Face's GPT2LMHeadModel against manual/.

Nobody here wrote transformers' GPT-2, so agreeing with it checks our reading of GPT-2 (and our
converter) from outside. `run_hf()` does, with random weights and no download:

    1. builds GPT2LMHeadModel from a small GPT2Config (the tiny preset's shape, GELU tanh =
       'gelu_new'), every dropout 0, eval mode, in float64 (or float32), and draws every
       parameter at random: layer-norm weights around 1, biases non-zero, so a bias or a
       layer-norm parameter read into the wrong place shows;
    2. saves it with save_pretrained (model.safetensors + config.json) and reads that folder with
       manual.formats.read_hf, the converter's own reader, into manual.Model;
    3. compares, through conformance.compare.compare, with the dtype's tolerance:
         logits        one forward on identical ids;
         loss          computed here in the run's dtype from transformers' logits, with our rule
                       (mean cross entropy over targets that are not pad_id; a PAD is among them).
                       transformers' built-in loss upcasts the logits to float32 (measured 1.5e-8
                       relative off in float64), so it is not used;
         param_grad    every parameter gradient: autograd through transformers from that loss;
         activation    hidden states: transformers' output_hidden_states[0] is embed.out, [i] is
                       h.{i-1}.out for i < L, and its last entry [L] is AFTER ln_f: ln_f.out
                       (h.{L-1}.out itself is not exposed);
         generation    greedy, token for token, against generate(do_sample=False) (no EOS stop);
    4. gpt2-small as a dry parameter count: ours (the registry), the closed form and transformers'
       num_parameters() on the meta device (nothing allocated) all say 124,439,808.

The configuration labels start with "transformers(3rd)" so the report names the third
implementation on its own lines. Needs torch and transformers (`pip install .[hf]`).
"""
from __future__ import annotations

import tempfile

import numpy as np

from manual import registry
from manual.config import ModelConfig

from .compare import Comparison, compare, compare_exact

LABEL = "transformers(3rd)"
GPT2_SMALL_PARAMS = 124_439_808
GEN_TOKENS = 10


def require_transformers():
    """Import transformers, or say in one line how to get it."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"the transformers check needs torch and transformers ({exc}); "
                          f"install them with: pip install '.[hf]'") from None
    return transformers


def hf_config(cfg: ModelConfig):
    """The GPT2Config of a GPT-2-shaped ModelConfig, every dropout 0, EOS never reached by ids."""
    from transformers import GPT2Config

    from manual.formats import HF_ACTIVATION_OF, check_can_hold
    check_can_hold(cfg, "hf")
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads,
                      n_inner=None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
                      activation_function=HF_ACTIVATION_OF[cfg.activation], layer_norm_epsilon=cfg.ln_eps,
                      tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      summary_first_dropout=0.0, pad_token_id=cfg.pad_id, bos_token_id=cfg.pad_id,
                      eos_token_id=cfg.pad_id)


def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """GPT2LMHeadModel for `cfg` in eval mode, its dtype, every parameter drawn at random."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(cfg)).to(getattr(torch, cfg.dtype)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)                # layer-norm gains around 1
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)                      # non-zero biases
            else:
                p.copy_(0.05 * noise)
    model.generation_config.eos_token_id = None           # greedy runs the full length, as ours does
    return model


def gpt2_small_count() -> list[Comparison]:
    """gpt2-small, dry: ours (registry), the closed form, transformers on the meta device."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ModelConfig.preset("gpt2-small")
    with torch.device("meta"):                            # shapes only, no memory
        theirs = GPT2LMHeadModel(GPT2Config()).num_parameters()
    label = f"{LABEL}.gpt2-small"
    return [compare_exact(registry.param_count(cfg), theirs, tensor="total (ours vs transformers)",
                          check="param_count", config=label),
            compare_exact(registry.param_count_closed_form(cfg), theirs, tensor="total (closed form vs transformers)",
                          check="param_count", config=label),
            compare_exact(theirs, GPT2_SMALL_PARAMS, tensor="total (transformers vs 124,439,808)",
                          check="param_count", config=label)]


def run_hf(dtype: str = "float64", preset: str = "tiny", seed: int = 0, batch: int = 4, seq_len: int = 12,
           count: bool = True) -> list[Comparison]:
    """Every comparison of manual against transformers (module docstring), as Comparison rows."""
    require_transformers()
    import torch
    import torch.nn.functional as F
    from transformers.utils import logging as hf_logging

    import manual
    from manual.formats import read_hf
    from manual.sampling import generate

    hf_logging.set_verbosity_error()                      # no progress bars or advice in the report
    hf_logging.disable_progress_bar()
    base = ModelConfig.preset(preset, activation="gelu_tanh", dtype=dtype)
    hf = random_hf_model(base, seed)
    with tempfile.TemporaryDirectory() as folder:         # into manual through the converter's reader
        hf.save_pretrained(folder)
        cfg, params, _notes = read_hf(folder, dtype=dtype)
    label = f"{LABEL}.{preset}/{dtype[-2:]}"
    ours = manual.Model.from_params(cfg, params)
    rng = np.random.default_rng(seed)
    T = min(seq_len, cfg.max_seq_len)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, T))
    targets = rng.integers(0, cfg.vocab_size, size=(batch, T))
    targets[0, :2] = cfg.pad_id                           # PAD among the targets: ignored by both losses
    rows = []

    ours.zero_grad()
    ours.forward(ids, targets)
    ours.backward()
    out = hf(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), output_hidden_states=True)
    logits = out.logits                                   # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(targets).reshape(-1),
                           ignore_index=cfg.pad_id)       # in the run's dtype, never upcast
    loss.backward()

    rows.append(compare(ours.logits, logits.detach().numpy(), tensor="logits", check="logits", config=label))
    rows.append(compare(np.asarray(ours.loss, dtype=dtype), loss.detach().numpy(), tensor="loss", check="loss",
                        config=label))
    hidden = out.hidden_states                            # L + 1 entries; the last one is after ln_f
    names = ["embed.out"] + [f"h.{i}.out" for i in range(cfg.n_layers - 1)] + ["ln_f.out"]
    for name, h in zip(names, hidden, strict=True):
        rows.append(compare(ours.taps[name], h.detach().numpy(), tensor=name, check="activation", config=label,
                            note="transformers output_hidden_states"))
    theirs = dict(hf.named_parameters())                  # the tied lm_head is wte, listed once
    for spec in registry.param_specs(cfg):
        rows.append(compare(ours.grads[spec.name], theirs[spec.name].grad.numpy(), tensor=spec.name,
                            check="param_grad", config=label))

    prompt = ids[0, :4]
    mine = generate(ours, prompt, GEN_TOKENS, temperature=0)
    with torch.no_grad():
        full = hf.generate(torch.from_numpy(prompt)[None], max_new_tokens=GEN_TOKENS, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=cfg.pad_id)
    rows.append(compare_exact(mine, full[0, len(prompt):].numpy(), tensor=f"greedy {GEN_TOKENS} tokens",
                              check="generation", config=label))
    if count:
        rows += gpt2_small_count()
    return rows
