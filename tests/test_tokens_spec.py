"""``--tokens SPEC``: what it parses to, its canonical text, and the one-line refusals."""

from __future__ import annotations

import pytest

from mdmf_cache.errors import ConfigError
from mdmf_cache.tokens import TokenInfo, TokenSpec


@pytest.mark.parametrize("text, layers, grid, canonical", [
    ("last", ("last",), None, "last"),
    ("4,8,12", ("4", "8", "12"), None, "4,8,12"),
    (" 04, 8 ,12@7x7", ("4", "8", "12"), (7, 7), "4,8,12@7x7"),
    ("map@4x4", ("map",), (4, 4), "map@4x4"),
])
def test_a_spec_parses_to_its_layers_and_grid(text, layers, grid, canonical):
    spec = TokenSpec.parse(text)
    assert (spec.layers, spec.grid, spec.text) == (layers, grid, canonical)
    assert spec.arrays == tuple(f"tokens_{p}" for p in layers)
    assert TokenSpec.parse(spec.text) == spec


@pytest.mark.parametrize("text, words", [
    ("", "name one or more layers"), ("4,,8", "name one or more layers"), ("first", "'first' is not a layer"),
    ("0", "'0' is not a layer"), ("last@7", "HxW"), ("last@0x7", "HxW"), ("map,last", "stands alone"),
    ("4,4", "named twice"),
])
def test_a_bad_spec_is_one_line_naming_what_is_wrong(text, words):
    with pytest.raises(ConfigError, match=words) as e:
        TokenSpec.parse(text)
    assert "\n" not in str(e.value)


def test_token_info_counts_the_class_token_and_round_trips_its_attrs():
    vit = TokenInfo("4,8,12", ("4", "8", "12"), (14, 14), True, 512)
    rn = TokenInfo("map", ("map",), (7, 7), False, 2048)
    assert (vit.patches, rn.patches) == (197, 49)
    assert TokenInfo.from_attrs(vit.to_attrs()) == vit
