"""Alignment (layers, frames, the wav2vec grid) and the fusion interfaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from teachers import AddHConv, CHConv, HConv, WeightedSum, align_frames, align_layers, load_upstream, wav2vec_num_frames
from teachers.interfaces import hconv_layer_counts


def test_wav2vec_num_frames_matches_the_model_grid():
    assert wav2vec_num_frames(16000) == 49
    assert wav2vec_num_frames(400) == 1 and wav2vec_num_frames(399) == 0 and wav2vec_num_frames(0) == 0
    model = load_upstream(tiny_config("hubert")).model
    sizes = torch.arange(300, 40000, 37)
    expected = model._get_feat_extract_output_lengths(sizes)
    assert [wav2vec_num_frames(int(s)) for s in sizes] == expected.tolist()


def test_align_layers_keeps_ends_and_interpolates_linearly():
    h = torch.randn(3, 2, 4, 5)
    out = align_layers(h, 5)
    assert out.shape == (5, 2, 4, 5)
    torch.testing.assert_close(out[0], h[0], rtol=0, atol=0)
    torch.testing.assert_close(out[-1], h[-1], rtol=0, atol=0)
    torch.testing.assert_close(out[1], (h[0] + h[1]) / 2)  # positions 0, .5, 1, 1.5, 2
    torch.testing.assert_close(out[3], (h[1] + h[2]) / 2)
    assert align_layers(h, 3) is h
    deep = align_layers(torch.randn(13, 1, 2, 3), 25)
    assert deep.shape == (25, 1, 2, 3)


def test_align_frames_uses_only_valid_frames():
    h = torch.randn(2, 3, 10, 4)
    lengths = torch.tensor([10, 6, 3])
    h[:, 1, 6:] = 1e6  # padding garbage must not leak into item 1
    h[:, 2, 3:] = -1e6
    out, new_lengths = align_frames(h, lengths, [7, 9, 3])
    assert out.shape == (2, 3, 9, 4) and new_lengths.tolist() == [7, 9, 3]
    for b, (n, m) in enumerate([(10, 7), (6, 9)]):
        alone = F.interpolate(h[:, b, :n].transpose(1, 2), size=m, mode="linear", align_corners=False).transpose(1, 2)
        torch.testing.assert_close(out[:, b, :m], alone)
    torch.testing.assert_close(out[:, 2, :3], h[:, 2, :3], rtol=0, atol=0)  # equal count: exact copy
    assert out[:, 0, 7:].abs().max() == 0 and out[:, 2, 3:].abs().max() == 0
    assert out[:, 1].abs().max() < 10
    same, _ = align_frames(h, lengths, 5)
    assert same.shape[2] == 5
    with pytest.raises(ValueError, match="2 frame counts for a batch of 3"):
        align_frames(h, lengths, [4, 5])


def test_weighted_sum_starts_as_average_and_uses_softmax():
    h = torch.randn(4, 2, 3, 6)
    ws = WeightedSum(4, 6)
    assert ws.output_dim == 6
    torch.testing.assert_close(ws(h), h.mean(dim=0))
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    torch.testing.assert_close(ws(h), (w[:, None, None, None] * h).sum(0))
    with pytest.raises(ValueError, match=r"expected \(L=4, B, T, D\)"):
        ws(torch.randn(3, 2, 3, 6))


@pytest.mark.parametrize(
    "layers,dim,params,out_dim,counts",
    [(13, 768, 4_424_832, 768, [13, 5, 2]), (25, 1024, 6_990_165, 1023, [25, 9, 3])],
)
def test_hconv_sizes_match_the_paper(layers, dim, params, out_dim, counts):
    hconv = HConv(layers, dim)
    assert sum(p.numel() for p in hconv.parameters()) == params
    assert hconv.output_dim == out_dim and hconv.layer_counts == counts
    assert hconv(torch.randn(layers, 1, 2, dim)).shape == (1, 2, out_dim)


def test_hconv_depth_is_integer_log():
    assert hconv_layer_counts(3) == [3, 1]
    assert len(hconv_layer_counts(243)) - 1 == 5  # float log gives 4.999... here
    assert len(hconv_layer_counts(242)) - 1 == 4
    with pytest.raises(ValueError, match="at least 3 layers"):
        HConv(2, 16)


def _hconv_by_hand(hconv: HConv, h: torch.Tensor) -> torch.Tensor:
    """Independent HConv: per frame, conv over the layer axis, ReLU, channel-major flatten."""
    layers, batch, frames, dim = h.shape
    out = torch.empty(batch, frames, hconv.output_dim)
    for b in range(batch):
        for t in range(frames):
            x = h[:, b, t, :].T.unsqueeze(0)  # (1, D channels, L positions)
            for conv in hconv.convs:
                x = torch.relu(F.conv1d(x, conv.weight, conv.bias, stride=3, padding=2))
            out[b, t] = x[0].reshape(-1)  # (C, L_final) row by row
    return out


def test_hconv_matches_per_frame_computation():
    torch.manual_seed(0)
    hconv = HConv(13, 16)
    h = torch.randn(13, 2, 3, 16)
    assert hconv.layer_counts == [13, 5, 2] and hconv.output_dim == 16
    torch.testing.assert_close(hconv(h), _hconv_by_hand(hconv, h))
    # Frames are independent: changing one frame leaves the others untouched.
    h2 = h.clone()
    h2[:, 0, 1] += 5
    torch.testing.assert_close(hconv(h2)[:, [0, 2]], hconv(h)[:, [0, 2]])


def test_chconv_is_projection_then_hconv():
    torch.manual_seed(0)
    parts = [torch.randn(5, 2, 3, 8), torch.randn(5, 2, 3, 12)]
    chconv = CHConv(5, [8, 12], 10)
    expected = _hconv_by_hand(chconv.hconv, chconv.projection(torch.cat(parts, dim=-1)))
    torch.testing.assert_close(chconv(parts), expected)
    torch.testing.assert_close(chconv(torch.cat(parts, dim=-1)), expected)
    assert chconv.output_dim == 10 and chconv.projection.weight.shape == (10, 20)
    with pytest.raises(ValueError, match="expected sum of"):
        chconv(torch.randn(5, 2, 3, 19))


def test_add_hconv_sums_models():
    torch.manual_seed(0)
    same = [torch.randn(5, 1, 2, 9), torch.randn(5, 1, 2, 9)]
    add = AddHConv(5, [9, 9])
    assert add.projections is None
    torch.testing.assert_close(add(same), _hconv_by_hand(add.hconv, same[0] + same[1]))
    torch.testing.assert_close(add(torch.cat(same, dim=-1)), add(same))
    with pytest.raises(ValueError, match="give proj_dim"):
        AddHConv(5, [9, 6])
    mixed = [torch.randn(5, 1, 2, 9), torch.randn(5, 1, 2, 6)]
    proj = AddHConv(5, [9, 6], proj_dim=8)
    summed = proj.projections[0](mixed[0]) + proj.projections[1](mixed[1])
    torch.testing.assert_close(proj(mixed), _hconv_by_hand(proj.hconv, summed))
    assert proj.output_dim == 8
