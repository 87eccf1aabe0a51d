"""Feed-forward layer: fc = m W1 + b1;  act = f(fc);  out = act W2 + b2.

    m (B, T, C)  ->  fc (B, T, F)  ->  act (B, T, F)  ->  out (B, T, C)
    W1 = c_fc.weight (C, F), b1 (F,);  W2 = c_proj.weight (F, C), b2 (C,);  f in manual/layers/activations.py

Backward, step by step (forward line quoted above each gradient line):
    out = act W2 + b2    ->  dact = dout W2^T;  dW2 += act^T dout;  db2 += sum dout
    act = f(fc)          ->  dfc  = dact * f'(fc)
    fc  = m W1 + b1      ->  dm   = dfc W1^T;   dW1 += m^T dfc;     db1 += sum dfc

Cache: m (B*T*C, for dW1), act (B*T*F, for dW2), and for gelu / gelu_tanh fc (B*T*F, for f').
relu needs no fc: relu'(fc) = [act > 0], which saves B*T*F numbers.
"""
from __future__ import annotations

from .activations import ACTIVATIONS
from .linear import linear_backward, linear_forward


def mlp_forward(m, W1, b1, W2, b2, activation):
    """Returns (fc, act, out) and the cache (fc and act are the taps mlp.fc, mlp.act)."""
    f_forward, _ = ACTIVATIONS[activation]
    fc, c_fc = linear_forward(m, W1, b1)                       # (B, T, F)
    act, c_act = f_forward(fc)                                 # (B, T, F); c_act is act (relu) or fc (gelu*)
    out, c_proj = linear_forward(act, W2, b2)                  # (B, T, C)
    return (fc, act, out), (c_fc, c_act, c_proj, activation)


def mlp_backward(dout, cache, dW1, db1, dW2, db2, record=None):
    """Returns dm (B, T, C); accumulates the four parameter gradients.

    If `record` is a dict, the intermediate gradients are stored in it as 'act' and 'fc'.
    """
    c_fc, c_act, c_proj, activation = cache
    _, f_backward = ACTIVATIONS[activation]
    # out = act W2 + b2
    dact = linear_backward(dout, c_proj, dW2, db2)             # (B, T, F)
    # act = f(fc)
    dfc = f_backward(dact, c_act)                              # (B, T, F)
    # fc = m W1 + b1
    dm = linear_backward(dfc, c_fc, dW1, db1)                  # (B, T, C)
    if record is not None:
        record["act"], record["fc"] = dact, dfc
    return dm
