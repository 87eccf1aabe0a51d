"""Feed-forward layer: fc = m W1 + b1;  act = f(fc);  out = act W2 + b2.

    m (B, T, C)  ->  fc (B, T, F)  ->  act (B, T, F)  ->  out (B, T, C)
    W1 = c_fc.weight (C, F), b1 (F,);  W2 = c_proj.weight (F, C), b2 (C,);  f in manual/layers/activations.py

Backward, step by step (forward line quoted above each gradient line):
    out = act W2 + b2    ->  dact = dout W2^T;  dW2 += act^T dout;  db2 += sum dout
    act = f(fc)          ->  dfc  = dact * f'(fc)
    fc  = m W1 + b1      ->  dm   = dfc W1^T;   dW1 += m^T dfc;     db1 += sum dfc

Cache: MLPCache. m (B*T*C, in c_fc, for dW1), act (B*T*F, in c_proj, for dW2), and for gelu /
gelu_tanh fc (B*T*F, in f, the activation's cache, for f'). relu needs no fc: relu'(fc) = [act > 0],
which saves B*T*F numbers (its cache holds act, the same array as c_proj's input).
"""
from __future__ import annotations

from typing import NamedTuple

from .activations import ACTIVATIONS, GeluCache, GeluTanhCache, ReluCache
from .linear import LinearCache, linear_backward, linear_forward
from .workspace import ws_kw


class MLPCache(NamedTuple):
    c_fc: LinearCache          # x = m (B, T, C), W = W1
    f: ReluCache | GeluCache | GeluTanhCache     # the activation's cache (x = fc, y = act)
    c_proj: LinearCache        # x = act (B, T, F), W = W2
    activation: str            # 'relu', 'gelu' or 'gelu_tanh'


def mlp_forward(m, W1, b1, W2, b2, activation, ws=None):
    """Returns (fc, act, out) and the cache (fc and act are the taps mlp.fc, mlp.act). `ws`: an
    optional Workspace (manual/layers/workspace.py), one scope per layer."""
    f_forward, _ = ACTIVATIONS[activation]
    fc, c_fc = linear_forward(m, W1, b1, **ws_kw(ws, "c_fc"))        # (B, T, F)
    act, c_act = f_forward(fc, **ws_kw(ws, "f"))                      # (B, T, F)
    out, c_proj = linear_forward(act, W2, b2, **ws_kw(ws, "c_proj"))  # (B, T, C)
    return (fc, act, out), MLPCache(c_fc, c_act, c_proj, activation)


def mlp_backward(dout, cache, dW1, db1, dW2, db2, record=None, ws=None):
    """Returns dm (B, T, C); accumulates the four parameter gradients.

    If `record` is a dict, the intermediate gradients are stored in it as 'act' and 'fc'.
    """
    _, f_backward = ACTIVATIONS[cache.activation]
    # out = act W2 + b2
    dact = linear_backward(dout, cache.c_proj, dW2, db2, **ws_kw(ws, "c_proj"))   # (B, T, F)
    # act = f(fc)
    dfc = f_backward(dact, cache.f, **ws_kw(ws, "f"))                          # (B, T, F)
    # fc = m W1 + b1
    dm = linear_backward(dfc, cache.c_fc, dW1, db1, **ws_kw(ws, "c_fc"))      # (B, T, C)
    if record is not None:
        record["act"], record["fc"] = dact, dfc
    return dm
