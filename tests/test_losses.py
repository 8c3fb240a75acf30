import pytest
import torch
import torch.nn.functional as F

from distill.training.losses import distill_loss


def _naive(pred, tgt, lengths, w):
    """Loop over layers, items and valid frames; no masking tricks."""
    total = 0.0
    for k in range(pred.shape[0]):
        l1_sum, cos_sum, n = 0.0, 0.0, 0
        for b in range(pred.shape[1]):
            for t in range(int(lengths[b])):
                p, q = pred[k, b, t], tgt[k, b, t]
                l1_sum += (p - q).abs().mean().item()
                cos = torch.dot(p, q) / (p.norm().clamp(min=1e-8) * q.norm().clamp(min=1e-8))
                cos_sum += -F.logsigmoid(cos).item()
                n += 1
        total += l1_sum / n + w * cos_sum / n
    return total


def test_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(3, 4, 7, 5, generator=g), torch.randn(3, 4, 7, 5, generator=g)
    lengths = torch.tensor([7, 3, 5, 1])
    loss, parts = distill_loss(pred, tgt, lengths, cos_weight=0.5)
    assert loss.item() == pytest.approx(_naive(pred, tgt, lengths, 0.5), rel=1e-5)
    assert set(parts) == {f"{n}/{k}" for n in ("l1", "cos", "loss") for k in range(3)}


def test_padding_frames_change_nothing():
    g = torch.Generator().manual_seed(1)
    pred, tgt = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    lengths = torch.tensor([6, 4])
    base, _ = distill_loss(pred, tgt, lengths)
    pred2, tgt2 = pred.clone(), tgt.clone()
    pred2[:, 1, 4:] = 1e3  # garbage in the padding of item 1
    tgt2[:, 1, 4:] = -7.0
    padded = torch.cat([pred2, torch.zeros(2, 2, 5, 4)], dim=2)  # and extra padded frames
    padded_t = torch.cat([tgt2, torch.ones(2, 2, 5, 4)], dim=2)
    loss, _ = distill_loss(padded, padded_t, lengths)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)


def test_gradient_is_zero_on_padding():
    pred = torch.randn(1, 2, 5, 3, requires_grad=True)
    loss, _ = distill_loss(pred, torch.randn(1, 2, 5, 3), torch.tensor([5, 2]))
    loss.backward()
    assert torch.all(pred.grad[:, 1, 2:] == 0)
    assert torch.any(pred.grad[:, 1, :2] != 0)


def test_shape_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match=r"same \(K, B, T, D\) shape") as err:
        distill_loss(torch.zeros(2, 1, 5, 3), torch.zeros(2, 1, 4, 3), torch.tensor([4]))
    assert "\n" not in str(err.value)


def test_bf16_predictions_give_an_fp32_loss_equal_to_upcast_inputs():
    g = torch.Generator().manual_seed(2)
    pred, tgt = torch.randn(2, 2, 6, 8, generator=g).bfloat16(), torch.randn(2, 2, 6, 8, generator=g)
    lengths = torch.tensor([6, 3])
    loss, _ = distill_loss(pred, tgt, lengths)
    reference, _ = distill_loss(pred.float(), tgt, lengths)
    assert loss.dtype == torch.float32 and loss.item() == reference.item()
