"""Losses and schedules against hand computations."""

import math

import pytest
import torch

from circuit_breakers import losses


def test_rerouting_loss_by_hand_with_padding():
    # 1 layer, batch 2, 3 tokens, hidden 2
    adapted = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[1.0, 1.0], [-1.0, 0.0], [9.0, 9.0]]]])
    frozen = torch.tensor([[[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # last token of each row is padding
    # cosines: 1, 1/sqrt2 | 1/sqrt2, -1 -> relu: 1, .7071, .7071, 0
    expected = (1 + 2 / math.sqrt(2) + 0) / 4
    assert losses.rerouting_loss(adapted, frozen, mask).item() == pytest.approx(expected, rel=1e-6)


def test_rerouting_loss_averages_over_layers():
    a = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # 2 layers, 1 row, 1 token
    f = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    assert losses.rerouting_loss(a, f, torch.ones(1, 1)).item() == pytest.approx(0.5)


def test_retain_loss_by_hand_with_padding():
    adapted = torch.tensor([[[[3.0, 4.0], [1.0, 1.0], [100.0, 0.0]]]])
    frozen = torch.tensor([[[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    assert losses.retain_loss(adapted, frozen, mask).item() == pytest.approx((5.0 + 1.0) / 2)


def test_relative_retain_loss_by_hand():
    adapted = torch.tensor([[[[3.0, 4.0], [1.0, 1.0], [100.0, 0.0]]]])
    frozen = torch.tensor([[[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    # |(3,2)| / |(0,2)| = sqrt(13)/2; |(0,1)| / |(1,0)| = 1; the padded token (frozen norm 0) is ignored
    expected = (math.sqrt(13) / 2 + 1.0) / 2
    assert losses.retain_loss(adapted, frozen, mask, "relative").item() == pytest.approx(expected, rel=1e-6)
    squared = (13 / 4 + 1.0) / 2
    assert losses.retain_loss(adapted, frozen, mask, "relative_squared").item() == pytest.approx(squared, rel=1e-6)
    zero = torch.zeros(1, 3)
    assert losses.retain_loss(adapted, frozen, zero, "relative").item() == 0.0
    with pytest.raises(ValueError, match="retain distance"):
        losses.retain_loss(adapted, frozen, mask, "l1")


def test_all_padding_batch_gives_zero_not_nan():
    a, f = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    zero = torch.zeros(3, 4)
    assert losses.rerouting_loss(a, f, zero).item() == 0.0
    assert losses.retain_loss(a, f, zero).item() == 0.0


def test_all_padding_row_does_not_change_the_mean():
    a, f = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    only_first = losses.rerouting_loss(a[:, :1], f[:, :1], mask[:1])
    assert losses.rerouting_loss(a, f, mask).item() == pytest.approx(only_first.item())


def test_centered_representation_removes_frozen_mean():
    frozen = torch.tensor([[[[10.0, 1.0], [10.0, -1.0]]]])
    a, f = losses.for_cosine(frozen.clone(), frozen, torch.ones(1, 2), "centered")
    assert torch.allclose(f, torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]]))
    assert torch.allclose(a, f)


def test_outlier_dimensions_and_exclusion():
    frozen = torch.zeros(1, 1, 3, 5)
    frozen[..., 3] = 100.0
    frozen[..., 1] = 50.0
    frozen[..., 0] = 1.0
    dims = losses.outlier_dimensions(frozen, torch.ones(1, 3), 2)
    assert dims == [1, 3]
    a, f = losses.for_cosine(frozen, frozen, torch.ones(1, 3), "no_outliers", dims)
    assert f[..., [1, 3]].abs().sum() == 0 and f[..., 0].sum() == 3.0


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # (c_cb, c_retain) at t = 0, T/2, T with alpha 10, m = 2
        ("dual", [(10.0, 0.0), (7.5, 2.5), (5.0, 5.0)]),
        ("cosine", [(10.0, 0.0), (5 * (1 + math.cos(math.pi / 4)), 5 * (1 - math.cos(math.pi / 4))), (5.0, 5.0)]),
        ("single", [(10.0, 1.0), (7.5, 1.0), (5.0, 1.0)]),
    ],
)
def test_schedules_at_0_half_and_end(schedule, expected):
    got = [losses.coefficients(t, 100, 10.0, schedule, decay_multiplier=2.0) for t in (0, 50, 100)]
    for (c_cb, c_r), (e_cb, e_r) in zip(got, expected):
        assert c_cb == pytest.approx(e_cb) and c_r == pytest.approx(e_r)


def test_dual_schedule_with_multiplier_one_reaches_zero():
    assert losses.coefficients(100, 100, 10.0, "dual", decay_multiplier=1.0) == (0.0, 10.0)
    assert losses.coefficients(150, 100, 10.0, "dual", decay_multiplier=1.0) == (0.0, 10.0)


def test_warmup_holds_retain_at_zero():
    assert losses.coefficients(3, 100, 10.0, "dual", warmup_steps=5)[1] == 0.0
    assert losses.coefficients(5, 100, 10.0, "dual", warmup_steps=5)[1] == pytest.approx(0.25)


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        losses.coefficients(0, 10, 1.0, "linear")


def test_a_given_count_divides_the_sum_so_chunks_add_up():
    """Chunked steps pass the whole batch's count: each chunk's loss is its share of the batch mean."""
    torch.manual_seed(0)
    a, f = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    mask = (torch.rand(4, 5) > 0.4).long()
    whole = losses.rerouting_loss(a, f, mask)
    count = mask.sum() * 2  # (layer, token) pairs of the whole batch
    parts = losses.rerouting_loss(a[:, :2], f[:, :2], mask[:2], count) + losses.rerouting_loss(
        a[:, 2:], f[:, 2:], mask[2:], count
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    for distance in ("l2", "relative", "relative_squared"):
        whole = losses.retain_loss(a, f, mask, distance)
        parts = losses.retain_loss(a[:, :1], f[:, :1], mask[:1], distance, count) + losses.retain_loss(
            a[:, 1:], f[:, 1:], mask[1:], distance, float(count)
        )
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    assert losses.rerouting_loss(a, f, torch.zeros_like(mask), 0).item() == 0.0  # nothing masked, count 0: 0, not NaN


def test_layer_weighted_rerouting_loss_by_hand():
    # layer 0: cosines 1 and 0 (mean 0.5); layer 1: cosines 1 and 1 (mean 1); one padded token ignored
    frozen = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]], [[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])
    adapted = torch.tensor([[[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]], [[[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    weights = torch.tensor([0.25, 0.75])
    assert losses.rerouting_loss(adapted, frozen, mask, layer_weights=weights).item() == pytest.approx(
        0.25 * 0.5 + 0.75 * 1.0
    )
    uniform = losses.rerouting_loss(adapted, frozen, mask, layer_weights=torch.tensor([0.5, 0.5]))
    assert uniform.item() == pytest.approx(losses.rerouting_loss(adapted, frozen, mask).item()) == pytest.approx(0.75)
    # a chunk's share: the count of the whole batch divides, weights still apply
    assert losses.rerouting_loss(adapted, frozen, mask, count=8.0, layer_weights=weights).item() == pytest.approx(
        (2 * 0.25 * 1 + 2 * 0.75 * 2) / 8
    )


def test_centered_with_a_batch_mean_from_summed_chunks_equals_the_whole_batch():
    """`center_sums` of two chunks add up to the whole batch's: the mean `for_cosine` removes is the same."""
    frozen = torch.tensor([[[[10.0, 1.0], [10.0, -1.0]], [[4.0, 3.0], [0.0, 0.0]]]])  # [1 layer, 2 rows, 2 tokens, 2]
    mask = torch.tensor([[1, 1], [1, 0]])
    sums = losses.center_sums(frozen[:, :1], mask[:1]) + losses.center_sums(frozen[:, 1:], mask[1:])
    assert sums.tolist() == [[24.0, 3.0, 3.0]]
    center = losses.center_from_sums(sums, frozen.dtype)
    assert center.shape == (1, 1, 1, 2) and center.flatten().tolist() == [8.0, 1.0]
    a, f = losses.for_cosine(frozen[:, 1:] + 1, frozen[:, 1:], mask[1:], "centered", center=center)
    assert f.tolist() == [[[[-4.0, 2.0], [-8.0, -1.0]]]] and torch.equal(a, f + 1)
    whole_a, whole_f = losses.for_cosine(frozen, frozen, mask, "centered")
    assert torch.equal(whole_f[:, 1:], f)
