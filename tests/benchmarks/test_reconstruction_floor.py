"""benchmarks/reconstruction_floor.py: the exact pass's arithmetic floor, against counts made by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from adaptive_kv.reconstruction import ReconstructionRequest

_spec = importlib.util.spec_from_file_location(
    "reconstruction_floor", Path(__file__).resolve().parents[2] / "benchmarks" / "reconstruction_floor.py")
reconstruction_floor = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = reconstruction_floor  # its dataclass looks its module up
_spec.loader.exec_module(reconstruction_floor)

SHAPE = reconstruction_floor.Shape.of_config("tiny", LlamaConfig(
    hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4))


def test_one_chunk_floor_is_the_hand_count():
    # per token: 2 x (q 8x8 + o 8x8 + k 8x4 + v 8x4 + MLP 3 x 8x16) = 2 x 576 = 1152; a pair: 4 x 8 = 32
    # plain, 4 tokens: 4 x 1152 + (1+2+3+4) causal pairs x 32 = 4608 + 320 = 4928
    # pass, 2 prompt + 4 context = 6 queries: 6 x 1152 + (6 x 4 context + 21 own pairs) x 32 = 8352,
    #   and the max's logits again: 6 x 4 x 16 = 384
    request = ReconstructionRequest((1, 2, 3, 4), (5, 6), (7, 8, 9), chunk=16)
    assert reconstruction_floor.floor(SHAPE, request) == pytest.approx((4928 + 8352 + 384) / 4928)
    assert reconstruction_floor.floor(SHAPE, request, fused_max=True) == pytest.approx((4928 + 8352) / 4928)


def test_every_chunk_counts_against_the_whole_context():
    # 20 context tokens in chunks of 16: 2 + 16 = 18 queries, then 3 + 8 (overlap) + 4 = 15 queries
    # plain: 20 x 1152 + 210 x 32 = 23040 + 6720 = 29760
    # chunk 1: 18 x 1152 + (18 x 20 + 171) x 32 + 18 x 20 x 16 = 20736 + 16992 + 5760 = 43488
    # chunk 2: 15 x 1152 + (15 x 20 + 120) x 32 + 15 x 20 x 16 = 17280 + 13440 + 4800 = 35520
    request = ReconstructionRequest(tuple(range(20)), (5, 6), (7, 8, 9), chunk=16)
    assert reconstruction_floor.floor(SHAPE, request) == pytest.approx((29760 + 43488 + 35520) / 29760)


@pytest.mark.parametrize("text", ["big:1,2,3", "big", ":1,2,3,4,5", "big:1,2,0,4,5", "big:1,2,x,4,5"])
def test_a_malformed_shape_is_refused_naming_the_option(text):
    with pytest.raises(ValueError, match="--shape must be NAME:hidden,intermediate,heads,kv_heads,head_dim"):
        reconstruction_floor.Shape.parse(text)


def test_a_shape_reads_like_its_config():
    parsed = reconstruction_floor.Shape.parse("tiny:8,16,2,1,4")
    assert (parsed.linear_per_token, parsed.attention_per_pair) == (SHAPE.linear_per_token, SHAPE.attention_per_pair)
