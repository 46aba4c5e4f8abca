"""mha.MultiheadAttention beyond the golden files: weights by any
family's names, decoding with a KVCache against one causal forward,
safetensors round trips, info, the layer used from several threads, and
every bad input a clear exception."""

import threading

import numpy as np
import pytest

import mha

RNG = np.random.default_rng(7)


def llama_layer(E=64, heads=8, kv=2):
    layer = mha.MultiheadAttention(E, heads, bias=False, batch_first=True, num_kv_heads=kv, rope="half")
    weights = {name: (RNG.standard_normal(shape) / np.sqrt(E)).astype(np.float32)
               for name, shape in layer.weight_shapes().items()}
    layer.load_state_dict(weights)
    return layer, weights


def test_state_dict_round_trip_and_names():
    layer, weights = llama_layer()
    assert list(weights) == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    got = layer.state_dict()
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


def test_decode_equals_one_causal_forward():
    layer, _ = llama_layer()
    x = RNG.standard_normal((2, 12, 64)).astype(np.float32)
    full, _ = layer(x, x, x, need_weights=False, is_causal=True)
    with mha.KVCache(layer, batch=2, capacity=16) as cache:
        parts = [layer.decode(x[:, :5], cache)] + [layer.decode(x[:, t:t + 1], cache) for t in range(5, 12)]
        assert len(cache) == 12 and cache.capacity == 16
    assert np.max(np.abs(np.concatenate(parts, axis=1) - full)) < 1e-5


def test_int8_and_bfloat16_caches_against_float32():
    layer, _ = llama_layer()
    x = RNG.standard_normal((2, 40, 64)).astype(np.float32)
    outs, rows = {}, {}
    for dtype in ("float32", "bfloat16", "int8"):
        with mha.KVCache(layer, batch=2, capacity=40, dtype=dtype) as cache:
            assert cache.dtype == dtype
            outs[dtype] = np.concatenate([layer.decode(x[:, :30], cache)] +
                                         [layer.decode(x[:, t:t + 1], cache) for t in range(30, 40)], axis=1)
            rows[dtype] = cache.read()
            assert rows[dtype][0].shape == (2, layer.num_kv_heads, 40, layer.head_dim)
            assert cache.read(38)[1].shape[2] == 2
    k32, v32 = rows["float32"]
    for got, want in zip(rows["int8"], (k32, v32)):  # each row within max |row| / 254
        bound = np.abs(want).max(axis=-1, keepdims=True) * (1 / 254 + 1.2e-7)
        assert np.all(np.abs(got - want) <= bound)
    scale = max(1.0, np.abs(outs["float32"]).max())
    assert np.abs(outs["int8"] - outs["float32"]).max() <= 2e-2 * scale
    assert np.abs(outs["bfloat16"] - outs["float32"]).max() <= 2e-2 * scale


def test_cache_dtype_and_read_errors():
    layer, _ = llama_layer()
    with pytest.raises(ValueError, match='"int8"'):
        mha.KVCache(layer, dtype="float16")
    with mha.KVCache(layer, capacity=4, dtype="int8") as cache:
        with pytest.raises(ValueError, match="cannot read tokens 0 .. 2 of a cache holding 0"):
            cache.read(0, 2)


def test_closed_cache_and_full_cache():
    layer, _ = llama_layer()
    cache = mha.KVCache(layer, capacity=4)
    x = RNG.standard_normal((1, 3, 64)).astype(np.float32)
    layer.decode(x, cache)
    with pytest.raises(ValueError, match="do not fit"):
        layer.decode(x, cache)
    cache.truncate(1)
    assert len(cache) == 1
    cache.close()
    cache.close()  # twice is harmless
    with pytest.raises(mha.MhaError, match="the KV cache is closed"):
        layer.decode(x, cache)
    with pytest.raises(mha.MhaError, match="closed"):
        len(cache)


def test_unset_weights_are_named():
    layer = mha.MultiheadAttention(16, 2)
    x = np.zeros((3, 1, 16), dtype=np.float32)
    with pytest.raises(mha.MhaError, match='weight "in_proj_weight" was never set'):
        layer(x, x, x)


def test_bad_inputs():
    layer = mha.MultiheadAttention(16, 2)
    layer.load_state_dict({"in_proj_weight": np.ones((48, 16)), "out_proj.weight": np.ones((16, 16))})
    x = np.zeros((3, 2, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="query has 8 features; the layer expects 16"):
        layer(x[..., :8], x, x)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 2\)"):
        layer(x, x, x, attn_mask=np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(3, 3\)"):
        layer(x, x, x, key_padding_mask=np.zeros((3, 3), dtype=bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        layer(x, x, x, attn_mask=np.zeros((3, 3), dtype=np.int32))
    with pytest.raises(KeyError, match="not a weight"):
        layer.load_state_dict({"nonsense": np.ones(3)})
    with pytest.raises(ValueError, match="needs 256 values"):
        layer.load_state_dict({"out_proj.weight": np.ones((4, 4))})
    with pytest.raises(mha.MhaError, match="training = True"):
        layer.backward(x)
    bad = x.copy()
    bad[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match=r"query holds nan at index \(0, 1, 3\)"):
        layer(bad, bad, bad)
    with pytest.raises(ValueError, match="dropout"):
        mha.MultiheadAttention(16, 2, dropout=0.1)
    with pytest.raises(ValueError, match="num_heads"):
        mha.MultiheadAttention(16, 3)


@pytest.mark.parametrize("tokens", [16, 20])
def test_nonfinite_in_the_last_output_row_is_found(tokens):
    """The output is read for NaN in blocks of 64 floats and a tail: Inf
    in the last token's query reaches only the last output row, which
    ends a full block with 16 tokens of 8 features and sits in the tail
    with 20.  Self-attention's backward hands one gradient
    array for query, key and value, read once."""
    layer = mha.MultiheadAttention(8, 2, batch_first=True)
    layer.load_state_dict({name: (RNG.standard_normal(shape) / 3).astype(np.float32)
                           for name, shape in layer.weight_shapes().items()})
    x = RNG.standard_normal((1, tokens, 8)).astype(np.float32)
    out, _ = layer(x, x, x, need_weights=False, is_causal=True)
    assert np.isfinite(out).all()
    q = x.copy()
    q[0, -1, 5] = np.inf
    with pytest.raises(ValueError, match=rf"query holds inf at index \(0, {tokens - 1}, 5\)"):
        layer(q, x, x, need_weights=False, is_causal=True)
    layer.training = True
    layer(x, x, x, need_weights=False, is_causal=True)
    dy = np.zeros_like(x)
    dy[0, -1, 0] = np.nan
    with pytest.raises(ValueError, match=r"grad_output holds nan"):
        layer.backward(dy)


def test_one_layer_from_many_threads():
    layer, _ = llama_layer()
    x = RNG.standard_normal((2, 20, 64)).astype(np.float32)
    alone, _ = layer(x, x, x, need_weights=False)
    results = [None] * 6

    def work(i):
        results[i] = layer(x, x, x, need_weights=False)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, alone) for r in results)


def test_safetensors_round_trip(tmp_path):
    tensors = {"a": RNG.standard_normal((2, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c": np.array([True, False]), "d": RNG.standard_normal(4).astype(np.float16),
               "e": RNG.standard_normal((1, 2)), "empty": np.zeros((0, 3), dtype=np.float32)}
    path = tmp_path / "t.safetensors"
    mha.save_safetensors(path, tensors, {"note": "round trip"})
    back = mha.load_safetensors(path)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        mha.save_safetensors(path, {"x": np.zeros(2, dtype=np.complex64)})
    (tmp_path / "notes.txt").write_text("not tensors\n")
    with pytest.raises(ValueError, match="not a safetensors file"):
        mha.load_safetensors(tmp_path / "notes.txt")
    with pytest.raises(OSError):
        mha.load_safetensors(tmp_path / "missing.safetensors")


def test_info():
    i = mha.info(768, 12, num_kv_heads=4)
    assert i["head_dim"] == 64 and i["kv_cache_bytes_per_token"] == 2048
    assert i["kv_cache_bytes_per_token_mha"] == 6144
    with pytest.raises(ValueError, match="not divisible"):
        mha.info(768, 10)


def test_training_forwards_reuse_tapes_no_backward_claimed(tapes_made):
    """With training = True, a forward whose record the next forward
    replaces (no backward asked for it) hands its tape to a later forward:
    two tapes serve any number of calls, and the last call's backward is
    that call's own."""
    layer, _ = llama_layer()
    layer.training = True
    xs = [RNG.standard_normal((2, 6, 64)).astype(np.float32) for _ in range(5)]
    for x in xs:
        layer(x, x, x, need_weights=False)
    assert len(tapes_made) == 2
    dy = RNG.standard_normal((2, 6, 64)).astype(np.float32)
    last = layer.backward(dy)
    fresh, _ = llama_layer()
    fresh.load_state_dict(layer.state_dict())
    fresh.training = True
    fresh(xs[-1], xs[-1], xs[-1], need_weights=False)
    assert all(np.array_equal(a, b) for a, b in zip(last, fresh.backward(dy)))
