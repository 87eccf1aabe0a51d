"""Bad inputs and bad configs: each raises ValueError / TypeError whose message names the value and the limit."""
import numpy as np
import pytest

from manual.config import ModelConfig
from manual.model import Model

CFG = ModelConfig(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_seq_len=6, dtype="float64")
OK = np.array([[1, 2, 3], [4, 5, 6]])


@pytest.fixture(scope="module")
def model():
    return Model(CFG, 0)


def with_value(pos, value, base=OK):
    out = base.copy()
    out[pos] = value
    return out


@pytest.mark.parametrize("ids,error,pattern", [
    (with_value((0, 2), 11), ValueError, r"token id 11 at position \(0, 2\) is outside the vocabulary \[0, 11\)"),
    (with_value((1, 0), 112), ValueError, r"token id 112 at position \(1, 0\) is outside the vocabulary \[0, 11\)"),
    (with_value((1, 1), -1), ValueError, r"token id -1 at position \(1, 1\) is outside the vocabulary \[0, 11\).*wrap"),
    (np.zeros((2, 7), np.int64), ValueError, r"length T = 7: max_seq_len is only 6"),
    (np.zeros((2, 0), np.int64), ValueError, r"shape \(2, 0\) are empty.*max_seq_len = 6"),
    (np.zeros((0, 3), np.int64), ValueError, r"shape \(0, 3\) are empty"),
    (OK.astype(np.float64), TypeError, r"integer array of token ids, got dtype float64"),
    (OK.astype(np.float32), TypeError, r"got dtype float32"),
    (OK > 2, TypeError, r"dtype bool; token ids must be integers in \[0, 11\)"),
    (np.array([1, 2, 3]), ValueError, r"must be 2-D \(B, T\), got shape \(3,\) with 1 dimension"),
    (np.zeros((1, 2, 3), np.int64), ValueError, r"got shape \(1, 2, 3\) with 3 dimension"),
    (np.array(5), ValueError, r"got shape \(\) with 0 dimension"),
    (np.array([["a", "b"]]), TypeError, r"got dtype <U1"),
    (np.array([[2**63 + 5]], dtype=np.uint64), ValueError, r"token id 9223372036854775813 at position \(0, 0\)"),
])
def test_bad_ids(model, ids, error, pattern):
    with pytest.raises(error, match=pattern):
        model.forward(ids, OK)


@pytest.mark.parametrize("targets,error,pattern", [
    (OK[:, :2], ValueError, r"targets have shape \(2, 2\) but ids have shape \(2, 3\)"),
    (OK[:1], ValueError, r"targets have shape \(1, 3\) but ids have shape \(2, 3\)"),
    (with_value((0, 1), 11), ValueError, r"target 11 at position \(0, 1\) is outside the vocabulary \[0, 11\)"),
    (with_value((1, 2), -3), ValueError, r"target -3 at position \(1, 2\) is outside the vocabulary \[0, 11\)"),
    (OK.astype(float), TypeError, r"targets must be an integer array.*float64"),
    (OK > 0, TypeError, r"targets have dtype bool"),
    (OK[0], ValueError, r"targets must be 2-D \(B, T\), got shape \(3,\)"),
    (np.zeros_like(OK), ValueError, r"every target is PAD \(pad_id=0\)"),
])
def test_bad_targets(model, targets, error, pattern):
    with pytest.raises(error, match=pattern):
        model.forward(OK, targets)


def test_backward_after_forward_without_targets():
    m = Model(CFG, 0)
    assert m.forward(OK) is None and m.logits.shape == (2, 3, 11)
    with pytest.raises(ValueError, match="targets=None"):
        m.backward()


def test_failed_forward_leaves_no_stale_state():
    m = Model(CFG, 0)
    m.forward(OK, OK)
    with pytest.raises(ValueError):
        m.forward(OK, with_value((0, 0), 99))
    m.backward()                                       # the last successful forward is still the one used
    assert m.grads["transformer.wpe.weight"].any()


def test_ids_are_not_kept_by_reference():
    m = Model(CFG, 0)
    ids = OK.copy()
    loss = m.forward(ids, OK)
    ids[:] = 0                                         # the caller mutating its array afterwards changes nothing
    m.backward()
    assert m.forward(OK, OK) == loss


def test_list_input_is_accepted():
    m = Model(CFG, 0)
    assert m.forward(OK.tolist(), OK.tolist()) == m.forward(OK, OK)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(d_model=10, n_heads=4), r"d_model 10 is not divisible by n_heads 4"),
    (dict(n_future=0), r"n_future must be >= 1, got 0"),
    (dict(vocab_size=0), r"vocab_size must be >= 1, got 0"),
    (dict(pad_id=11), r"pad_id 11 is outside the vocabulary \[0, 11\)"),
    (dict(pad_id=-1), r"pad_id -1 is outside the vocabulary \[0, 11\)"),
    (dict(norm="middle"), r"norm must be one of \('pre', 'post'\), got 'middle'"),
    (dict(activation="swish"), r"activation must be one of"),
    (dict(attention="sparse"), r"attention must be one of"),
    (dict(dtype="float16"), r"dtype must be one of \('float32', 'float64'\), got 'float16'"),
    (dict(loss="hinge"), r"loss must be one of"),
    (dict(ln_eps=0.0), r"ln_eps must be a finite number > 0, got 0.0"),
    (dict(temperature=-1.0), r"temperature must be a finite number > 0, got -1.0"),
    (dict(d_ff=2.5), r"d_ff must be an int, got 2.5"),
    (dict(bias=1), r"bias must be a bool, got 1"),
])
def test_invalid_configs(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        CFG.replace(**overrides)


def test_model_needs_a_config():
    with pytest.raises(TypeError, match="cfg must be a ModelConfig, got dict"):
        Model(CFG.to_dict())


def test_from_params_lists_every_problem():
    params = dict(Model(CFG).params)
    params.pop("transformer.ln_f.bias")
    params["transformer.wte.weight"] = np.zeros((12, 8))
    with pytest.raises(ValueError, match=r"(?s)1 missing, 0 unexpected, 1 mismatched.*ln_f.bias.*shape \(12, 8\), "
                                         r"expected \(11, 8\)"):
        Model.from_params(CFG, params)


def test_numpy_scalar_config_floats_do_not_promote_float32():
    """np.float64(0.5) passes an isinstance(float) check; stored as is, it would turn every float32
    logit / temperature (and the whole backward) into float64. The config keeps a Python float."""
    cfg = CFG.replace(dtype="float32", temperature=np.float64(0.5), ln_eps=np.float64(1e-5))
    assert type(cfg.temperature) is float and type(cfg.ln_eps) is float
    model = Model(cfg, debug=True)                    # debug mode checks every tap and grad's dtype
    ids = np.array([[1, 2, 3, 4]])
    model.forward(ids, np.array([[2, 3, 4, 5]]))
    model.backward()
    assert {a.dtype for a in model.tap_grads.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("prompt, uniforms, error, pattern", [
    (np.array([5.7, 6.2]), None, TypeError, "integer token ids, got dtype float64"),
    (np.array([[1, 2]]), None, ValueError, r"1-D sequence of token ids, got shape \(1, 2\)"),
    (np.array([1, 2]), np.zeros(1), ValueError, "1 uniform draws for 3 tokens"),
])
def test_generate_rejects_bad_prompts_and_short_uniform_streams(model, prompt, uniforms, error, pattern):
    from manual.sampling import generate
    with pytest.raises(error, match=pattern):
        generate(model, prompt, 3, uniforms=uniforms)
