"""Selection: exact budgets, the tie-breaking order against a NumPy reference, baselines, layers and summaries."""

import json
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jaxforget as jf
from jaxforget import selection
from jaxforget.selection import (
    last_layer,
    last_layers_holding,
    layers_in_call_order,
    mask_summary,
    select_layers,
    select_random,
    select_top,
)

# One jitted function each, so that repeated shapes and static arguments reuse the compiled program.
top = jax.jit(select_top, static_argnames=("fraction", "largest", "per_layer", "magnitude"))
random = jax.jit(select_random, static_argnames=("fraction", "per_layer"))


def tiny_chunks():
    """Counting 5 entries at a time (not 2**18), so that trees of a few entries take every path of the chunked
    counts: one chunk, a loop over chunks, a remainder. Traced (not cached) programs see it."""
    return mock.patch.object(selection, "_CHUNK", 5)


SHAPES = [(1,), (3,), (2, 3), (5,), (2, 2, 2)]
# Few distinct values, so that ties (and -0.0 against 0.0) are the rule rather than the exception.
VALUES = [-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, np.inf, -np.inf, np.nan]


@st.composite
def score_trees(draw, shapes=SHAPES, values=VALUES):
    """A nested dict of 1 to 3 float leaves (float32 or float64) with many tied values."""
    leaves = []
    for _ in range(draw(st.integers(1, 3))):
        shape = draw(st.sampled_from(shapes))
        data = draw(st.lists(st.sampled_from(values), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        leaves.append(np.asarray(data, draw(st.sampled_from([np.float32, np.float64]))).reshape(shape))
    tree = {"first": leaves[0]}
    if len(leaves) > 1:
        tree["rest"] = {f"layer{i}": leaf for i, leaf in enumerate(leaves[1:])}
    return tree


def reference(scores, fraction, *, largest=True, per_layer=False, magnitude=False):
    """The documented ranking in NumPy: by value (NaN above inf, -0.0 equal to 0.0), ties to the lower flat index
    for the largest and to the higher one for the smallest; k = round(fraction * n) globally or per leaf."""

    def choose(flat):
        values = np.abs(flat) if magnitude else flat
        index = np.arange(flat.size)
        order = np.lexsort((-index, values))  # ascending; among equal values the higher index first
        k = round(fraction * flat.size)
        chosen = np.zeros(flat.size, bool)
        chosen[order[flat.size - k :] if largest else order[:k]] = True
        return chosen

    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(scores)]
    if per_layer:
        return [choose(x.ravel()).reshape(x.shape) for x in leaves]
    flat = choose(np.concatenate([x.ravel() for x in leaves]))
    pieces = np.split(flat, np.cumsum([x.size for x in leaves])[:-1])
    return [piece.reshape(x.shape) for piece, x in zip(pieces, leaves, strict=True)]


def leaves_of(mask):
    return [np.asarray(m) for m in jax.tree.leaves(mask)]


# ---------------------------------------------------------------------------------------------------------------
# Properties on random pytrees.


@settings(max_examples=25, deadline=None)
@given(
    scores=score_trees(),
    fraction=st.floats(0.001, 1.0),
    largest=st.booleans(),
    per_layer=st.booleans(),
    magnitude=st.booleans(),
)
def test_select_top_takes_exactly_k_in_the_documented_order(scores, fraction, largest, per_layer, magnitude):
    options = dict(fraction=fraction, largest=largest, per_layer=per_layer, magnitude=magnitude)
    with tiny_chunks():  # a new jit: traced under the patch
        mask = jax.jit(select_top, static_argnames=list(options))(scores, **options)
    got = leaves_of(mask)
    assert jax.tree.structure(mask) == jax.tree.structure(scores)
    assert all(g.dtype == bool and g.shape == np.shape(s) for g, s in zip(got, jax.tree.leaves(scores), strict=True))
    sizes = [g.size for g in got]
    if per_layer:
        assert [int(g.sum()) for g in got] == [round(fraction * n) for n in sizes]
    else:
        assert sum(int(g.sum()) for g in got) == round(fraction * sum(sizes))
    expected = reference(scores, **options)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@settings(max_examples=10, deadline=None)
@given(scores=score_trees(), data=st.data())
def test_largest_and_smallest_selections_are_disjoint(scores, data):
    fraction_largest = data.draw(st.floats(0.01, 0.99))
    fraction_smallest = data.draw(st.floats(0.005, 1.0 - fraction_largest))
    largest = leaves_of(top(scores, fraction=fraction_largest))
    smallest = leaves_of(top(scores, fraction=fraction_smallest, largest=False))
    n = sum(m.size for m in largest)
    assert sum(int(m.sum()) for m in largest) == round(fraction_largest * n)
    assert sum(int(m.sum()) for m in smallest) == round(fraction_smallest * n)
    # Disjointness holds when the two counts fit in n; rounding can break that even when the fractions sum to <= 1
    # (n = 3, fractions 0.5 and 0.5: two entries each).
    assume(round(fraction_largest * n) + round(fraction_smallest * n) <= n)
    assert not any((a & b).any() for a, b in zip(largest, smallest, strict=True))


@settings(max_examples=6, deadline=None)
@given(
    params=score_trees(shapes=[(8, 8), (64,), (4, 4, 5)], values=[0.0]),
    fraction=st.floats(0.15, 0.85),
    per_layer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_select_random_takes_exactly_k_and_depends_only_on_the_key(params, fraction, per_layer, seed):
    key, other = jax.random.split(jax.random.key(seed))
    mask = leaves_of(random(params, key=key, fraction=fraction, per_layer=per_layer))
    sizes = [m.size for m in mask]
    if per_layer:
        assert [int(m.sum()) for m in mask] == [round(fraction * n) for n in sizes]
    else:
        assert sum(int(m.sum()) for m in mask) == round(fraction * sum(sizes))
    again = leaves_of(random(params, key=key, fraction=fraction, per_layer=per_layer))
    different = leaves_of(random(params, key=other, fraction=fraction, per_layer=per_layer))
    assert all(np.array_equal(a, b) for a, b in zip(mask, again, strict=True))
    # At least 64 entries with 10 to n - 10 selected: two keys agree with probability below 1e-10.
    assert not all(np.array_equal(a, b) for a, b in zip(mask, different, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Fixed cases.


def test_select_top_on_large_leaves_matches_the_reference():
    """Leaves larger than a counting chunk (2**18), with and without ties at the threshold, in float32."""
    rng = np.random.default_rng(0)
    scores = {
        "continuous": rng.standard_normal((600, 500)).astype(np.float32),
        "tied": rng.integers(-20, 20, 3 * 2**18 + 5).astype(np.float32),
        "small": rng.standard_normal(7).astype(np.float32),
    }
    for kwargs in [dict(fraction=0.01), dict(fraction=0.3, largest=False, per_layer=True, magnitude=True)]:
        got = leaves_of(top(scores, **kwargs))
        for g, e in zip(got, reference(scores, **kwargs), strict=True):
            np.testing.assert_array_equal(g, e)


def test_special_values_rank_as_documented():
    scores = jnp.array([np.nan, 1.0, -0.0, 0.0, -np.inf, np.inf])
    np.testing.assert_array_equal(top(scores, fraction=2 / 6), [True, False, False, False, False, True])
    # Smallest two: -inf, then of the tied zeros the one with the higher index.
    np.testing.assert_array_equal(top(scores, fraction=2 / 6, largest=False), [0, 0, 0, 1, 1, 0])
    # By magnitude -inf ties with inf and NaN stays on top: the lower index of the tie wins.
    np.testing.assert_array_equal(top(scores, fraction=2 / 6, magnitude=True), [1, 0, 0, 0, 1, 0])


def test_select_random_is_uniform():
    """Each of 10 entries is chosen with probability k/n = 0.3 over 4000 keys (4 standard errors)."""
    keys = jax.random.split(jax.random.key(0), 4000)
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    masks = jax.jit(jax.vmap(lambda k: select_random(params, 0.3, k)))(keys)
    counts = np.concatenate([np.asarray(m).reshape(4000, -1) for m in jax.tree.leaves(masks)], axis=1)
    assert (counts.sum(1) == 3).all()
    np.testing.assert_allclose(counts.mean(0), 0.3, atol=4 * np.sqrt(0.3 * 0.7 / 4000))


def zero_variables(model=None, input_shape=(1, 28, 28, 1)):
    """Variables (zeros) with a model's structure, from shapes only: no compile."""
    model = model or jf.CNN()
    shapes = jax.eval_shape(lambda k: jf.init_model(model, k, input_shape), jax.random.key(0))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def cnn_params():
    return zero_variables()["params"]


def test_select_layers_takes_whole_modules_and_leaves():
    params = cnn_params()
    mask = select_layers(params, "Dense_1")
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for (path, leaf), param in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params), strict=True):
        assert leaf.dtype == jnp.bool_ and leaf.shape == param.shape
        assert bool(leaf.all()) == bool(leaf.any()) == (path[0].key == "Dense_1")
    mixed = select_layers(params, ["Conv_0/kernel", "Dense_0"])
    assert mask_summary(mixed)["selected"] == params["Conv_0"]["kernel"].size + sum(
        x.size for x in jax.tree.leaves(params["Dense_0"])
    )
    assert mask_summary(select_layers(params, list(params)))["fraction"] == 1.0


def test_select_layers_lists_the_available_names_for_an_unknown_one():
    with pytest.raises(ValueError, match=r"\['Dense_7'\].*available names.*'Conv_0', 'Conv_0/bias'"):
        select_layers(cnn_params(), ["Dense_1", "Dense_7"])


class _ElevenDense(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        del train
        for _ in range(11):
            x = nn.Dense(3)(x)
        return x


@pytest.mark.parametrize(
    "model, input_shape, expected",
    [
        (jf.CNN(), (1, 28, 28, 1), "Dense_1"),
        (jf.ResNet18(width=2, stage_sizes=(1, 1)), (1, 8, 8, 3), "Dense_0"),
        # Sorted keys would put "Dense_10" before "Dense_2": call order decides.
        (_ElevenDense(), (1, 3), "Dense_10"),
    ],
)
def test_last_layer_is_the_last_module_with_parameters_to_run(model, input_shape, expected):
    variables = zero_variables(model, input_shape)
    params = jax.tree.map(lambda a: a, variables["params"])  # tree.map sorts the keys
    inputs = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    name = last_layer(jf.logits_fn_for(model, variables.get("batch_stats")), params, inputs)
    assert name == expected
    assert mask_summary(select_layers(params, name))["selected"] == sum(x.size for x in jax.tree.leaves(params[name]))


def test_layers_in_call_order_and_the_last_layers_that_hold_a_budget():
    model = jf.CNN()
    variables = zero_variables(model, (1, 28, 28, 1))
    params = jax.tree.map(lambda a: a, variables["params"])
    layers = layers_in_call_order(jf.logits_fn_for(model), params, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    assert layers == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    last = sum(x.size for x in jax.tree.leaves(params["Dense_1"]))  # 1,290: 0.31% of the CNN
    assert last_layers_holding(params, layers, last) == ["Dense_1"]
    assert last_layers_holding(params, layers, last + 1) == ["Dense_0", "Dense_1"]
    assert last_layers_holding(params, layers, 10**9) == layers
    with pytest.raises(ValueError, match="count=0"):
        last_layers_holding(params, layers, 0)


def test_without_a_linen_model_the_layers_are_ordered_by_their_last_read():
    # A plain function of a dict: a layer is the parent path of its leaves, placed where the program last reads it.
    # The dict's keys sort "head" before "trunk"; the program reads the trunk first.
    params = {"head": {"w": np.ones((4, 2)), "b": np.zeros(2)}, "trunk": {"w": np.ones((3, 4))}}
    logits_fn = lambda p, x: jnp.tanh(x @ p["trunk"]["w"]) @ p["head"]["w"] + p["head"]["b"]  # noqa: E731
    assert layers_in_call_order(logits_fn, params, np.zeros((1, 3))) == ["trunk", "head"]
    assert last_layer(logits_fn, params, np.zeros((1, 3))) == "head"
    with pytest.raises(ValueError, match="reads none of params"):
        last_layer(lambda p, x: x * 2.0, {"w": np.zeros((3, 2))}, np.zeros((1, 3)))


def test_mask_summary_counts_per_leaf_and_in_total():
    mask = {"conv": {"kernel": np.array([[True, False], [False, False]])}, "bias": np.array([True, True, False])}
    summary = mask_summary(mask)
    assert summary == {
        "selected": 3,
        "total": 7,
        "fraction": 3 / 7,
        "layers": {
            "bias": {"selected": 2, "total": 3, "fraction": 2 / 3},
            "conv/kernel": {"selected": 1, "total": 4, "fraction": 0.25},
        },
    }
    json.dumps(summary)  # plain Python numbers


# ---------------------------------------------------------------------------------------------------------------
# Errors, raised before any compute, naming the argument.


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_fraction_outside_the_unit_interval_is_rejected(fraction):
    scores = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        select_top(scores, fraction)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        select_random(scores, fraction, jax.random.key(0))


def test_non_float_scores_are_rejected():
    with pytest.raises(ValueError, match="scores must be floating point; got int"):
        select_top({"w": jnp.arange(4)}, 0.5)


def test_empty_trees_are_rejected():
    with pytest.raises(ValueError, match="scores has no leaves"):
        select_top({}, 0.5)
    with pytest.raises(ValueError, match="params has no leaves"):
        select_layers({}, "Dense_0")


def test_mask_summary_rejects_a_non_boolean_mask():
    with pytest.raises(ValueError, match=r"mask leaf \['b'\] has dtype float32, but masks must be boolean"):
        mask_summary({"a": np.ones(2, bool), "b": np.ones(2, np.float32)})
