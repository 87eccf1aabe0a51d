"""layerdiff: the layer-by-layer gradient debugger. Which tensor went wrong first, in which layer,
and which side is to blame.

    python -m tools.layerdiff                                  # tiny preset, float64, one batch
    python -m tools.layerdiff --norm post --activation relu --dtype float32
    python -m tools.layerdiff --checkpoint run/checkpoint.safetensors --ids ids.npy --targets targets.npy
    python -m tools.layerdiff --inject ln_gamma_grad_assigned --diff-only      # a bug from the zoo
    python -m tools.layerdiff --steps 5                        # then 5 AdamW steps, step by step
    python -m tools.layerdiff --export-case case/             # checkpoint + batch for your own port
    python -m tools.layerdiff --case case/ --against my_port_dump.safetensors
    python -m tools.layerdiff --case case/ --against dump.safetensors --layout llmc   # nanoGPT / llm.c layouts
    python -m tools.layerdiff --case case/ --against gpt2_124M_debug_state.bin        # an llm.c debug state
    python -m tools.layerdiff --zoo --json zoo.json            # every fault of tools/faults.py
    python -m tools.layerdiff --list-faults

What it does. Both implementations (manual/ NumPy, reference/ PyTorch; or your dump against
the reference) get identical weights and the identical batch. One forward and one backward,
then every named tensor is compared with conformance.compare.compare (the suite's function and
tolerances: float64 1e-9 of each tensor's scale; float32 torch.testing's table), in this order
(walk.py):

    1. the taps (named activations) in forward order, then the loss;
    2. the tap gradients, grad.<tap>, in backward order (the taps read bottom-up);
    3. the parameter gradients, grad.<param>, in reverse registry order (the order backward
       produces them);
    4. with --steps N: an optimizer trajectory (AdamW, or SGD with --optimizer sgd, with the conformance suite's
       hyperparameters, decay groups and global-norm clipping), step by step: loss, grad.<p>,
       grad_norm, clipped_grad.<p>, param.<p>, optim.exp_avg(_sq).<p>, stopping after the first
       step that disagrees (conformance/trajectory.py: the conformance suite's own loop).

One row per tensor (name, shape, max abs error, max relative error, tolerance, OK/DIFF). The
FIRST divergent tensor in that order is named with the layer function that produced it:
for an activation, the layer whose forward wrote it; for a gradient, the layer whose
backward wrote it (the layer that CONSUMES the tap in the forward, or the tap's own layer for
a tap inside attention / the MLP; for a parameter, the layer that owns it). The layer graph
(graph.py) is built from manual/registry.py: tap_specs and BLOCK_TOPOLOGY.

Then, for that layer alone, who is wrong:
  * forward divergence: each side's output is compared with a float64 recomputation from
    the layer's inputs by conformance/oracle.py, NumPy straight from docs/design.md's formulas (an
    oracle that shares no code with either side);
  * backward divergence: a float64 finite-difference check of both sides' backward:
    manual: manual/layers' forward/backward functions on the captured input; reference:
    torch autograd on the reference module's own submodule. Each gradient is checked along
    3 random directions per argument, (L(x + h v) - L(x - h v)) / 2h against <grad, v>,
    L = sum(dout * layer(x)), with the oracle's forward;
  * optimizer divergence: the step is redone in float64 from the reference's state before it.
The verdict is "manual", "reference", "neither (...)" or "both" (blame.py; every tolerance
comes from conformance/compare.py).

The package: graph (layers and who wrote what), walk (setup, tensors, walk order, optimizer
walk), layers (one layer on each side), blame (the judges), session (debug: one run), report
(table, heatmap), dump (--export-case, --against), zoo (--zoo), cli.

Exit status: 0 when every tensor agrees, 1 when something diverges, 2 on bad arguments.
"""
from __future__ import annotations

from .blame import Blame, LayerCheck, SideCheck, blame_backward, blame_forward, blame_layer, blame_optimizer
from .cli import build_parser, main
from .dump import DUMP_README, export_case, load_dump
from .graph import Node, culprits, nodes, where
from .layers import manual_layer, oracle_outputs, reference_layer, roles
from .report import plot, print_report
from .session import Report, debug
from .walk import Setup, expected_names, expected_shapes, first_failure, make_setup, run_model, walk
from .zoo import print_zoo, run_fault, run_zoo

__all__ = ["Blame", "LayerCheck", "SideCheck", "blame_backward", "blame_forward", "blame_layer", "blame_optimizer",
           "build_parser", "main", "DUMP_README", "export_case", "load_dump", "Node", "culprits", "nodes", "where",
           "manual_layer", "oracle_outputs", "reference_layer", "roles", "plot", "print_report", "Report", "debug",
           "Setup", "expected_names", "expected_shapes", "first_failure", "make_setup", "run_model", "walk",
           "print_zoo", "run_fault", "run_zoo"]
