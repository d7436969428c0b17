"""Tests for fedalign.moe.layout: the pure-data MoE view of a flat parameter dictionary."""

from __future__ import annotations

import json

import pytest
import torch

from fedalign.moe import ExpertSlice, MoELayerLayout, MoELayout

Tensor = torch.Tensor
E = 3  # experts per layer in the synthetic layouts


def _fused_layer() -> MoELayerLayout:
    """A transformers-5 style layer: experts are rows of two stacked tensors."""
    return MoELayerLayout(
        name="fused",
        num_experts=E,
        top_k=2,
        hidden_size=4,
        router_params=("fused.gate.weight",),
        experts=tuple(
            (ExpertSlice("fused.up", e, e + 1), ExpertSlice("fused.down", e, e + 1))
            for e in range(E)
        ),
    )


def _modular_layer() -> MoELayerLayout:
    """A Switch / upcycled style layer: each expert owns whole tensors."""
    return MoELayerLayout(
        name="modular",
        num_experts=E,
        top_k=1,
        hidden_size=4,
        router_params=("modular.router.weight", "modular.router.bias"),
        experts=tuple(
            (ExpertSlice(f"modular.experts.{e}.w"), ExpertSlice(f"modular.experts.{e}.b"))
            for e in range(E)
        ),
    )


def _layout() -> MoELayout:
    return MoELayout(layers=(_fused_layer(), _modular_layer()))


def _state(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    state = {
        "fused.gate.weight": rand(E, 4),
        "fused.up": rand(E, 6, 4),
        "fused.down": rand(E, 4, 3),
        "modular.router.weight": rand(E, 4),
        "modular.router.bias": rand(E),
        "other.weight": rand(5, 5),
    }
    for e in range(E):
        state[f"modular.experts.{e}.w"] = rand(2, 4)
        state[f"modular.experts.{e}.b"] = rand(2)
    return state


def _clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_expert_vector_concatenates_slices_in_order() -> None:
    """Fused experts read rows ``e`` of each tensor; modular experts read whole tensors."""
    state = _state()
    fused, modular = _layout().layers
    vector = fused.expert_vector(state, 1)
    expected = torch.cat([state["fused.up"][1].reshape(-1), state["fused.down"][1].reshape(-1)])
    assert torch.equal(vector, expected)
    assert vector.shape == (6 * 4 + 4 * 3,)
    vector = modular.expert_vector(state, 2)
    expected = torch.cat([state["modular.experts.2.w"].reshape(-1), state["modular.experts.2.b"]])
    assert torch.equal(vector, expected)
    matrix = fused.expert_matrix(state)
    assert matrix.shape == (E, 36)
    assert torch.equal(matrix[1], fused.expert_vector(state, 1))


@pytest.mark.parametrize("layer_index", [0, 1])
def test_write_back_of_read_vector_is_bitwise_identity(layer_index: int) -> None:
    """``write_expert_vector(expert_vector(state))`` leaves every tensor bitwise equal."""
    layer = _layout().layers[layer_index]
    state = _state()
    reference = _clone(state)
    for e in range(E):
        layer.write_expert_vector(state, e, layer.expert_vector(state, e))
    _assert_same(state, reference)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_write_changes_exactly_one_expert_and_copies_on_write(layer_index: int) -> None:
    """Writing expert 1 changes only its slices; the caller's tensors are never mutated."""
    layer = _layout().layers[layer_index]
    state = _state()
    originals = dict(state)  # the same tensor objects
    reference = _clone(state)
    new = layer.expert_vector(state, 1) + 1.0
    layer.write_expert_vector(state, 1, new)
    assert torch.equal(layer.expert_vector(state, 1), new)
    for e in (0, 2):
        assert torch.equal(layer.expert_vector(state, e), layer.expert_vector(reference, e))
    for name in set(state) - layer.expert_param_names():
        assert torch.equal(state[name], reference[name]), name
    # copy-on-write: the tensors that were in the dictionary before are untouched
    _assert_same(originals, reference)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_write_keeps_stored_dtype(layer_index: int) -> None:
    """A float64 vector written into a float32 state keeps float32 (both storage styles)."""
    layer = _layout().layers[layer_index]
    state = _state()
    vector = layer.expert_vector(state, 0).double() * 2
    layer.write_expert_vector(state, 0, vector)
    for s in layer.experts[0]:
        assert state[s.param].dtype == torch.float32, s.param
    assert torch.equal(layer.expert_vector(state, 0), vector.float())


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("layer_index", [0, 1])
def test_wrong_vector_length_raises_and_leaves_state_untouched(
    layer_index: int, delta: int
) -> None:
    """A too short or too long vector raises ValueError before anything is written."""
    layer = _layout().layers[layer_index]
    state = _state()
    reference = _clone(state)
    size = layer.expert_vector(state, 0).numel()
    with pytest.raises(ValueError, match="expert vector has"):
        layer.write_expert_vector(state, 0, torch.zeros(size + delta))
    _assert_same(state, reference)


def test_name_sets_and_layer_lookup() -> None:
    """Router and expert name sets cover every layer; an unknown layer name is a KeyError."""
    layout = _layout()
    assert layout.router_param_names() == {
        "fused.gate.weight",
        "modular.router.weight",
        "modular.router.bias",
    }
    expected_experts = {"fused.up", "fused.down"}
    expected_experts |= {f"modular.experts.{e}.{p}" for e in range(E) for p in "wb"}
    assert layout.expert_param_names() == expected_experts
    assert layout.layer("modular") is layout.layers[1]
    with pytest.raises(KeyError, match="nope"):
        layout.layer("nope")


def test_to_dict_from_dict_round_trip_through_json() -> None:
    """``from_dict(json(to_dict()))`` gives back an equal layout (slices and None bounds kept)."""
    layout = _layout()
    data = json.loads(json.dumps(layout.to_dict()))
    back = MoELayout.from_dict(data)
    assert back == layout
    assert back.layers[0].experts[2][0] == ExpertSlice("fused.up", 2, 3)
    assert back.layers[1].experts[0][0] == ExpertSlice("modular.experts.0.w", None, None)


def test_restrict_drops_names_but_keeps_layer_shape() -> None:
    """``restrict`` keeps only the given tensors; layers, E, top-k and H stay."""
    layout = _layout()
    keep = {"fused.gate.weight", "fused.down", "modular.experts.1.w"}
    restricted = layout.restrict(keep)
    assert len(restricted.layers) == 2
    fused, modular = restricted.layers
    assert (fused.num_experts, fused.top_k, fused.hidden_size) == (E, 2, 4)
    assert fused.router_params == ("fused.gate.weight",)
    assert modular.router_params == ()
    assert all(s.param == "fused.down" for slices in fused.experts for s in slices)
    assert [len(slices) for slices in fused.experts] == [1, 1, 1]
    assert [len(slices) for slices in modular.experts] == [0, 1, 0]
    assert restricted.router_param_names() | restricted.expert_param_names() == keep
    state = _state()
    assert modular.expert_vector(state, 0).numel() == 0
    assert torch.equal(modular.expert_vector(state, 1), state["modular.experts.1.w"].reshape(-1))
    # the original is a frozen value and is not changed
    assert layout == _layout()
