"""One debugging session: walk every tensor, name the first divergent one and the layer that
wrote it, and judge that layer (blame.py). `debug` is what the command line and the zoo run."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from conformance.compare import Comparison
from conformance.conventions import missing_tap_grads_warning

from .blame import Blame, add_origin, blame_layer, blame_optimizer, opt_where
from .graph import where
from .walk import Setup, expected_names, first_failure, optimizer_walk, run_model, walk


@dataclass
class Report:
    setup: Setup
    rows: list                         # forward / backward comparisons
    opt_rows: list = field(default_factory=list)
    first: Comparison | None = None
    first_where: str = ""
    blame: Blame | None = None
    seconds: float = 0.0
    absent: list = field(default_factory=list)   # names a dump did not hold
    other: str = "manual"              # the side under test

    @property
    def ok(self) -> bool:
        return self.first is None

    def as_json(self) -> dict:
        s, f = self.setup, self.first
        return {"config": s.cfg.to_dict(), "batch": list(s.ids.shape), "under_test": self.other,
                "agree": self.ok,
                "first_divergent": None if f is None else
                {"tensor": f.tensor, "step": f.step, "check": f.check, "layer": self.first_where,
                 "max_abs": _num(f.max_abs), "tol": f.tol, "worst_index": list(f.worst_index),
                 "a_value": _num(f.a_value), "b_value": _num(f.b_value), "note": f.note},
                "blame": None if self.blame is None else self.blame.as_json(), "absent": self.absent,
                "rows": [c.as_json() for c in self.rows], "optimizer_rows": [c.as_json() for c in self.opt_rows],
                "seconds": round(self.seconds, 3)}


def _num(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def debug(setup: Setup, sides=None, steps: int = 0, optimizer: str = "adamw", blame: bool = True,
          against: dict | None = None) -> Report:
    """Walk every tensor of manual (or of a dump, `against`) against the reference; name the first
    divergent one and blame a side. With steps > 0 and a clean walk, then walk the optimizer."""
    import reference
    from conformance.engine import Sides
    t0 = time.perf_counter()
    sides = sides or Sides.default()
    cfg = setup.cfg
    ref = run_model(sides.reference or reference.Model, setup)
    if against is None:
        under, other = run_model(sides.manual, setup), "manual"
    else:
        under, other = against, "dump"
    rows = walk(under, ref, cfg, setup.label)
    rep = Report(setup, rows, absent=[n for n, _ in expected_names(cfg) if n not in under], other=other)
    rep.first = first_failure(rows)
    if rep.first is None and steps > 0 and against is None:
        rep.opt_rows, failing = optimizer_walk(setup, sides, steps, optimizer)
        rep.first = first_failure(rep.opt_rows)
        if rep.first is not None:
            rep.first_where = opt_where(rep.first.tensor, optimizer, rep.first.step)
            if blame:
                rep.blame = blame_optimizer(rep.first, sides, optimizer, failing, cfg)
    elif rep.first is not None:
        rep.first_where = where(cfg, rep.first.tensor)
        if blame:
            rep.blame = blame_layer(setup, rep.first.tensor, ref, under, other)
            if against is not None and missing_tap_grads_warning(against, cfg):
                add_origin(rep.blame, cfg, rep.first.tensor, rows)
    rep.seconds = time.perf_counter() - t0
    return rep
