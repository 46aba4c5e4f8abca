"""mha.scaled_dot_product_attention and its backward on numpy arrays:
random cases over every option against a float64 oracle under the
project's tolerance rule; the array rule (float32 in place, others
converted once, the rest refused); errors; the GIL released and many
threads at once."""

import threading
import time

import numpy as np
import pytest

import mha
from reference import attention, attention_grads, within_rule

RNG = np.random.default_rng(1234)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def case(i):
    """Random case i: shapes and every option the API has."""
    r = np.random.default_rng(i)
    B, Hkv = int(r.integers(1, 3)), int(r.integers(1, 3))
    rep = int(r.choice([1, 2, 3])) if i % 3 == 0 else 1
    L, S = int(r.integers(1, 40)), int(r.integers(1, 40))
    D, Dv = int(r.choice([8, 16, 64])), int(r.choice([8, 16, 64]))
    c = dict(q=randn(B, Hkv * rep, L, D), k=randn(B, Hkv, S, D), v=randn(B, Hkv, S, Dv), opts={}, ref={})
    kind = i % 7
    if kind == 1:
        c["opts"]["is_causal"] = True
        c["ref"]["causal"] = "top_left"
    elif kind == 2:
        c["opts"]["causal"] = c["ref"]["causal"] = "bottom_right"
    elif kind == 3:
        m = r.random((L, S)) > 0.3
        c["opts"]["attn_mask"] = c["ref"]["mask"] = m
    elif kind == 4:
        m = r.standard_normal((B, 1, L, S)).astype(np.float32)
        c["opts"]["attn_mask"] = c["ref"]["mask"] = m
    elif kind == 5:
        w = (int(r.integers(0, 6)), int(r.integers(-1, 4)))
        c["opts"]["window"] = c["ref"]["window"] = w
        c["opts"]["softcap"] = c["ref"]["softcap"] = 5.0
    elif kind == 6:
        a = np.abs(r.standard_normal(Hkv * rep)).astype(np.float32)
        c["opts"]["alibi_slopes"] = c["ref"]["alibi"] = a
        c["opts"]["scale"] = c["ref"]["scale"] = 0.3
    if rep > 1:
        c["opts"]["enable_gqa"] = True
    return c


@pytest.mark.parametrize("i", range(70))
def test_forward_against_float64(i):
    c = case(i)
    out, lse = mha.scaled_dot_product_attention(c["q"], c["k"], c["v"], return_lse=True, **c["opts"])
    ref64, _ = attention(c["q"], c["k"], c["v"], np.float64, **c["ref"])
    plain32, _ = attention(c["q"], c["k"], c["v"], np.float32, **c["ref"])
    ok, err, limit = within_rule(out, ref64, plain32, 2)
    assert ok, f"error {err:.3g} > limit {limit:.3g}"
    assert lse.shape == out.shape[:-1]


@pytest.mark.parametrize("i", range(0, 70, 2))
def test_backward_against_float64(i):
    c = case(i)
    dout = randn(*c["q"].shape[:-1], c["v"].shape[-1])
    grads = mha.scaled_dot_product_attention_backward(dout, c["q"], c["k"], c["v"], **c["opts"])
    ref64 = attention_grads(c["q"], c["k"], c["v"], dout, np.float64, **c["ref"])
    plain32 = attention_grads(c["q"], c["k"], c["v"], dout, np.float32, **c["ref"])
    for name, g, r64, r32 in zip("qkv", grads, ref64, plain32):
        ok, err, limit = within_rule(g, r64, r32, 3)
        assert ok, f"d{name}: error {err:.3g} > limit {limit:.3g}"


@pytest.mark.parametrize("i", range(1, 70, 6))
def test_backward_from_lse_and_from_stats(i):
    """Both saved forms: lse (renormalised first) and the row statistics."""
    c = case(i)
    dout = randn(*c["q"].shape[:-1], c["v"].shape[-1])
    out, lse, stats = mha.scaled_dot_product_attention(c["q"], c["k"], c["v"], return_lse=True, return_stats=True,
                                                       **c["opts"])
    ref64 = attention_grads(c["q"], c["k"], c["v"], dout, np.float64, **c["ref"])
    plain32 = attention_grads(c["q"], c["k"], c["v"], dout, np.float32, **c["ref"])
    for saved in (dict(lse=lse), dict(stats=stats)):
        grads = mha.scaled_dot_product_attention_backward(dout, c["q"], c["k"], c["v"], output=out, **saved,
                                                          **c["opts"])
        for name, g, r64, r32 in zip("qkv", grads, ref64, plain32):
            ok, err, limit = within_rule(g, r64, r32, 3)
            assert ok, f"{list(saved)[0]}: d{name}: error {err:.3g} > limit {limit:.3g}"


def test_return_stats():
    q, k, v = randn(2, 3, 20, 16, scale=4), randn(2, 3, 25, 16, scale=4), randn(2, 3, 25, 16)
    mask = np.ones((20, 25), dtype=bool)
    mask[4] = False  # a row that sees nothing
    out, lse = mha.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    out2, (row_max, row_sum) = mha.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_stats=True)
    assert np.array_equal(out, out2)  # 20 rows: both run the tiled driver
    assert row_max.shape == row_sum.shape == lse.shape
    assert np.all(row_max[:, :, 4] == -np.inf) and np.all(row_sum[:, :, 4] == 0)
    seen = row_sum > 0
    # The maximum's own term is 1, but for max's rounding to float32 where
    # the exact scores are used (large logits): within an ulp of |max|.
    assert np.all(row_sum[seen] >= np.exp(-np.spacing(np.abs(row_max[seen]))))
    from_stats = row_max[seen].astype(np.float64) + np.log(row_sum[seen].astype(np.float64))
    assert np.allclose(from_stats, lse[seen], rtol=4e-7, atol=4e-7)
    *_, lse3, stats3 = mha.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True, return_stats=True)
    assert np.allclose(lse3, lse, rtol=4e-7, atol=4e-7) and np.array_equal(stats3[0], row_max)


@pytest.mark.parametrize("stats, exc, words", [
    ([1, 2], TypeError, "(row_max, row_sum) pair"),
    ((np.zeros(5, np.float32), np.zeros(5, np.float32)), ValueError, "row_max) has 5 values"),
])
def test_bad_stats(stats, exc, words):
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    out = mha.scaled_dot_product_attention(q, k, v)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        mha.scaled_dot_product_attention_backward(out, q, k, v, output=out, stats=stats)


def test_large_logits():
    q, k, v = randn(1, 2, 33, 64, scale=20), randn(1, 2, 47, 64, scale=20), randn(1, 2, 47, 64)
    out = mha.scaled_dot_product_attention(q, k, v)
    ok, err, limit = within_rule(out, attention(q, k, v, np.float64)[0], attention(q, k, v, np.float32)[0], 2)
    assert ok, f"error {err:.3g} > limit {limit:.3g}"


def test_shapes_2d_3d_and_5d():
    q, k, v = randn(2, 3, 4, 5, 8), randn(2, 3, 4, 6, 8), randn(2, 3, 4, 6, 8)
    out5 = mha.scaled_dot_product_attention(q, k, v)
    out4 = mha.scaled_dot_product_attention(q.reshape(6, 4, 5, 8), k.reshape(6, 4, 6, 8), v.reshape(6, 4, 6, 8))
    assert out5.shape == (2, 3, 4, 5, 8) and np.array_equal(out5.reshape(6, 4, 5, 8), out4)
    assert mha.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]).shape == (5, 8)
    assert mha.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]).shape == (4, 5, 8)


def test_fully_masked_row_is_zero_not_nan():
    q, k, v = randn(1, 1, 3, 8), randn(1, 1, 4, 8), randn(1, 1, 4, 8)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    out, lse = mha.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert np.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == -np.inf and np.all(np.isfinite(out))


def test_float32_is_read_in_place():
    """The library reads the caller's memory: a float32 input is not copied,
    even as a transposed view ([B, L, H, D] memory seen as [B, H, L, D])."""
    q = randn(2, 6, 3, 8).transpose(0, 2, 1, 3)  # strided view, not contiguous
    k, v = randn(2, 3, 6, 8), randn(2, 3, 6, 8)
    before = mha.functional._arrays.floats(q, "query")
    assert before is q  # the rule hands the array itself to the library
    out = mha.scaled_dot_product_attention(q, k, v)
    assert np.array_equal(out, mha.scaled_dot_product_attention(np.ascontiguousarray(q), k, v))


def test_no_copy_of_float32_inputs():
    """What a call allocates, traced: for float32 inputs (contiguous or a
    strided view) only the output and lse; a float64 input adds exactly one
    float32 copy of itself."""
    import tracemalloc
    B, H, L, D = 2, 4, 256, 64
    q = randn(B, L, H, D).transpose(0, 2, 1, 3)  # strided
    k, v = randn(B, H, L, D), randn(B, H, L, D)
    outputs = B * H * L * D * 4 + B * H * L * 4
    mha.scaled_dot_product_attention(q, k, v)  # warm up
    for inputs, extra in (((q, k, v), 0), ((q.astype(np.float64), k, v), B * H * L * D * 4)):
        tracemalloc.start()
        mha.scaled_dot_product_attention(*inputs)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert outputs + extra <= peak < outputs + extra + 64 * 1024, (peak, outputs, extra)


def test_other_floats_are_converted_once():
    q64, k16 = RNG.standard_normal((1, 2, 4, 8)), RNG.standard_normal((1, 2, 4, 8)).astype(np.float16)
    v = randn(1, 2, 4, 8)
    out = mha.scaled_dot_product_attention(q64, k16, v[..., ::-1])  # negative strides: converted
    ref = mha.scaled_dot_product_attention(q64.astype(np.float32), k16.astype(np.float32),
                                           np.ascontiguousarray(v[..., ::-1]))
    assert out.dtype == np.float32 and np.array_equal(out, ref)


def checked_path_refused(monkeypatch):
    """Makes the checked path (its _Problem) raise, for calls that must not
    take it."""
    def refuse(*args, **kw):
        raise AssertionError("the checked path ran")
    monkeypatch.setattr(mha.functional, "_Problem", refuse)


def plain_cases():
    """(query, key, value, options) the library reads as they are."""
    q, k, v = randn(2, 4, 9, 16), randn(2, 4, 11, 16), randn(2, 4, 11, 24)
    return [
        (q, k, v, {}),
        (q[0], k[0], v[0], dict(is_causal=True)),  # 3-D, top-left causal
        (q[0, 1], k[0, 1], v[0, 1], dict(scale=0.25)),  # 2-D
        (randn(2, 9, 4, 16).transpose(0, 2, 1, 3), k, v, dict(scale=2, num_threads=1)),  # strided, int scale
        (q, k[:, :2], v[:, :2], dict(enable_gqa=True, num_threads=2)),
        (q[:, :, :1], k, v, {}),  # one row: split-K
        (q, np.broadcast_to(randn(1, 1, 11, 16), k.shape), v, {}),  # stride 0, read-only
    ]


@pytest.mark.parametrize("n", range(7))
def test_plain_calls_go_straight_to_the_library(monkeypatch, n):
    """A call with no mask or extras on float32 arrays of 2 to 4 dimensions
    that the library can read as they are skips the checked path's Python,
    with its results to the bit."""
    q, k, v, opts = plain_cases()[n]
    checked = mha.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)[0]  # return_lse: checked
    checked_path_refused(monkeypatch)
    out = mha.scaled_dot_product_attention(q, k, v, **opts)
    assert out.shape == checked.shape and out.dtype == np.float32 and np.array_equal(out, checked)


@pytest.mark.parametrize("change, words", [
    (dict(query=np.ones((1, 1, 2, 4))), None),  # float64: converted
    (dict(value=np.ones((1, 1, 2, 4), dtype=np.float32)[..., ::-1]), None),  # negative strides: copied
    (dict(query=np.ones((1, 1, 1, 2, 4), dtype=np.float32), key=np.ones((1, 1, 1, 2, 4), dtype=np.float32),
          value=np.ones((1, 1, 1, 2, 4), dtype=np.float32)), None),  # 5-D
    (dict(scale=np.float32(0.5)), None),
    (dict(num_threads=np.int64(1)), None),
    (dict(key=[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), "same number of dimensions"),
    (dict(num_threads=2000), "num_threads must be in 0..1024"),
])
def test_what_the_plain_path_leaves_to_the_checked_one(monkeypatch, change, words):
    """Whatever needs converting or checking goes the checked path, which
    converts it or names what is wrong."""
    made = []
    problem = mha.functional._Problem
    monkeypatch.setattr(mha.functional, "_Problem", lambda *a: made.append(1) or problem(*a))
    args = dict(query=np.ones((1, 1, 2, 4), dtype=np.float32), key=np.ones((1, 1, 2, 4), dtype=np.float32),
                value=np.ones((1, 1, 2, 4), dtype=np.float32))
    args.update(change)
    if words:
        with pytest.raises((TypeError, ValueError), match=words):
            mha.scaled_dot_product_attention(**args)
    else:
        assert np.all(mha.scaled_dot_product_attention(**args) == 1)
    assert made == [1]


def test_plain_calls_hold_no_references():
    """The plain path's C lets go of everything it took, on every way out:
    computed, declined (float64), refused by the library, not finite."""
    import sys
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    bad_q = q.copy()
    bad_q[0, 0, 0, 0] = np.nan
    calls = [((q, k, v), None), ((q.astype(np.float64), k, v), None), ((q, k[..., :4], v), ValueError),
             ((bad_q, k, v), ValueError)]
    for args, exc in calls:
        before = [sys.getrefcount(a) for a in args]
        for _ in range(50):
            if exc:
                with pytest.raises(exc):
                    mha.scaled_dot_product_attention(*args)
            else:
                mha.scaled_dot_product_attention(*args)
        assert [sys.getrefcount(a) for a in args] == before


@pytest.mark.parametrize("bad, exc, words", [
    (dict(query=np.ones((1, 1, 2, 4), dtype=np.int32)), TypeError, "query must hold real floating-point"),
    (dict(key=np.ones((1, 1, 2, 4), dtype=np.complex64)), TypeError, "key must hold real floating-point"),
    (dict(value=np.ones((1, 1, 3, 4), dtype=np.float32)), ValueError, "value"),
    (dict(key=np.ones((1, 1, 2, 5), dtype=np.float32)), ValueError, "key"),
    (dict(query=np.ones((2, 4), dtype=np.float32)), ValueError, "same number of dimensions"),
    (dict(attn_mask=np.ones((3, 3), dtype=bool)), ValueError, "attn_mask has shape (3, 3)"),
    (dict(attn_mask=np.ones((2, 2), dtype=np.int64)), TypeError, "attn_mask must be bool"),
    (dict(attn_mask=np.ones((2, 2), dtype=bool), is_causal=True), ValueError, "exclude each other"),
    (dict(causal="diagonal"), ValueError, "causal must be"),
    (dict(window=(-5, 0)), ValueError, "window"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(num_threads=-1), ValueError, "num_threads"),
    (dict(compute_dtype="float16"), ValueError, "compute_dtype"),
])
def test_bad_arguments(bad, exc, words):
    args = dict(query=np.ones((1, 1, 2, 4), dtype=np.float32), key=np.ones((1, 1, 2, 4), dtype=np.float32),
                value=np.ones((1, 1, 2, 4), dtype=np.float32))
    args.update(bad)
    with pytest.raises(exc, match=None) as info:
        mha.scaled_dot_product_attention(**args)
    assert words in str(info.value), str(info.value)


def test_nan_names_the_input():
    """By default NaN or Inf reaching a score (query, key, a float mask)
    raises, found through the log-sum-exps; check_finite="all" also reads
    the output, for NaN in the value; None lets NaN through as PyTorch."""
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    v[0, 1, 3, 2] = np.nan
    out = mha.scaled_dot_product_attention(q, k, v)  # the value is not read twice by default
    assert np.isnan(out[0, 1, :, 2]).all() and np.isfinite(out[0, 0]).all()
    with pytest.raises(ValueError, match=r"value holds nan at index \(0, 1, 3, 2\)"):
        mha.scaled_dot_product_attention(q, k, v, check_finite="all")
    v[0, 1, 3, 2] = 0
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="key holds nan"):
        mha.scaled_dot_product_attention(q, k, v)
    q[0, 1, 2, 5] = np.nan
    with pytest.raises(ValueError, match=r"query holds nan at index \(0, 1, 2, 5\)"):
        mha.scaled_dot_product_attention(q, k, v)
    assert np.isnan(mha.scaled_dot_product_attention(q, k, v, check_finite=None)).any()
    # Inf against keys all negative there makes a row's every score -Inf,
    # which only a row with no key to see may have: here every row has one.
    q, k = randn(1, 2, 4, 8), -np.abs(randn(1, 2, 5, 8))
    q[0, 0, 1, 0] = np.inf
    for opts in ({}, dict(is_causal=True), dict(return_stats=True)):
        with pytest.raises(ValueError, match=r"query holds inf at index \(0, 0, 1, 0\)"):
            mha.scaled_dot_product_attention(q, k, v, **opts)
    mask = np.zeros((4, 5), dtype=np.float32)
    mask[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"attn_mask holds nan"):
        mha.scaled_dot_product_attention(randn(1, 2, 4, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8), attn_mask=mask)


def test_bfloat16_compute():
    q, k, v = randn(1, 2, 16, 64), randn(1, 2, 16, 64), randn(1, 2, 16, 64)
    out = mha.scaled_dot_product_attention(q, k, v, compute_dtype="bfloat16")
    ref = attention(q, k, v, np.float64)[0]
    assert np.max(np.abs(out - ref)) < 0.05  # bf16 has 8 bits of mantissa


def in_threads(n, work):
    """work(0) .. work(n - 1) on n Python threads at once; the exceptions
    they raised."""
    errors = []

    def run(i):
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_at_once():
    """Eight Python threads call at once, on 1 and 2 library threads: each
    gets the same bits as a call alone."""
    q, k, v = randn(4, 8, 256, 64), randn(4, 8, 256, 64), randn(4, 8, 256, 64)
    alone = mha.scaled_dot_product_attention(q, k, v, num_threads=1)
    results = [None] * 8

    def work(i):
        results[i] = mha.scaled_dot_product_attention(q, k, v, num_threads=1 + i % 2)

    errors = in_threads(8, work)
    assert not errors, errors
    assert all(np.array_equal(r, alone) for r in results), "same bits on every thread count and thread"


def test_the_gil_is_released():
    """While one thread is inside a long libmha call, this one keeps running
    Python: it counts at more than a third of its solo rate for the call's
    duration.  Holding the GIL would allow at most one switch interval
    (5 ms) of counting before the call began."""
    q, k, v = randn(8, 8, 768, 64), randn(8, 8, 768, 64), randn(8, 8, 768, 64)

    def count_while(thread):  # the same loop alone and during the call
        n = 0
        while thread.is_alive():
            n += 1
        return n

    sleeper = threading.Thread(target=time.sleep, args=(0.1,))
    sleeper.start()
    rate = count_while(sleeper) / 0.1
    started, span = threading.Event(), {}

    def call():
        started.set()
        t0 = time.perf_counter()
        mha.scaled_dot_product_attention(q, k, v, num_threads=1)
        span["t"] = time.perf_counter() - t0

    worker = threading.Thread(target=call)
    worker.start()
    started.wait()
    n = count_while(worker)
    worker.join()
    assert span["t"] > 0.05, f"the call took {span['t']:.3f} s, too short to tell"
    print(f"GIL test: counted {n / (rate * span['t']):.2f} of the solo rate")
    assert n > rate * span["t"] / 3, f"counted {n} in {span['t']:.3f} s at a solo rate of {rate:.0f}/s"


# ---- outputs that take the memory of earlier ones (mha/_arrays.py) ----

def big_case(seed, L=128):
    """q, k, v whose output (2 x 8 x L x 128 floats: 1 MiB at L = 128) is
    as large as the spare arrays' threshold."""
    r = np.random.default_rng(seed)
    return [r.standard_normal((2, 8, L, 128)).astype(np.float32) for _ in range(3)]


def test_a_freed_output_is_reused_and_right():
    q, k, v = big_case(1)
    first = mha.scaled_dot_product_attention(q, k, v)
    address = first.ctypes.data
    del first
    from mha import _arrays
    assert any(a.ctypes.data == address for a in _arrays._spare)  # kept, and free: nothing refers to it
    again = mha.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert again.ctypes.data == address  # its memory serves again
    ref64, _ = attention(q, k, v, np.float64, causal="top_left")
    plain32, _ = attention(q, k, v, np.float32, causal="top_left")
    ok, err, limit = within_rule(again, ref64, plain32, 2)
    assert ok, f"error {err} over {limit}"



def test_an_output_still_referred_to_is_never_reused():
    q, k, v = big_case(2)
    held = mha.scaled_dot_product_attention(q, k, v)
    row = mha.scaled_dot_product_attention(q, k, v)[0, 0]  # a view alone keeps its array
    copies = (held.copy(), row.copy())
    grads = mha.scaled_dot_product_attention_backward(held, q, k, v)
    outs = [mha.scaled_dot_product_attention(q * 2, k, v) for _ in range(3)] + list(grads)
    for o in outs:
        assert not np.shares_memory(o, held) and not np.shares_memory(o, row)
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            assert not np.shares_memory(a, b)
    assert np.array_equal(held, copies[0]) and np.array_equal(row, copies[1])


def test_outputs_start_on_a_cache_line():
    """Outputs new and reused start on 64-byte lines (mha/_arrays.py) from
    ALIGN_MIN_BYTES on."""
    from mha import _arrays
    for n in (1024, 1025, 5000):  # 4 KiB, the threshold, and past it
        assert _arrays.empty((n,)).ctypes.data % 64 == 0, n
    for L in (4, 128):  # 16 KB, and 1 MiB: the spare arrays' threshold
        q, k, v = big_case(5, L)
        for _ in range(2):  # the second time from the spare arrays
            out = mha.scaled_dot_product_attention(q, k, v)
            grads = mha.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v)
            for a in (out, *grads):
                assert a.ctypes.data % 64 == 0, f"L = {L}: {a.ctypes.data % 64} bytes into a line"
            del out, grads


def test_spare_arrays_stay_within_their_limits():
    from mha import _arrays
    q, k, v = big_case(3)
    held = [mha.scaled_dot_product_attention(q, k, v) for _ in range(_arrays.SPARE_COUNT + 4)]
    assert len(_arrays._spare) <= _arrays.SPARE_COUNT
    assert sum(a.nbytes for a in _arrays._spare) <= _arrays.SPARE_BYTES
    addresses = {h.ctypes.data for h in held}
    assert len(addresses) == len(held)
    del held
    again = mha.scaled_dot_product_attention(q, k, v)
    assert again.ctypes.data in addresses or len(_arrays._spare) == 0


def test_threads_never_share_an_output():
    q, k, v = big_case(4)
    want = mha.scaled_dot_product_attention(q, k, v)
    results = [[] for _ in range(4)]

    def work(i):
        for n in range(6):
            results[i].append(mha.scaled_dot_product_attention(q, k, v))
            if n % 2:
                results[i].pop(0)  # let some go, so others take their memory

    errors = in_threads(4, work)
    assert not errors, errors
    live = [o for r in results for o in r]
    for i, a in enumerate(live):
        assert np.array_equal(a, want)
        for b in live[i + 1:]:
            assert not np.shares_memory(a, b)
