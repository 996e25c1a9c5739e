"""Networks and losses: shapes, gradient flow, NaN masking."""

from __future__ import annotations

import pytest
import torch

from landmark3d.losses import heatmap_mse, masked_l1
from landmark3d.networks import CoarseRegressor, PatchUNet, build_fine_models, fine_model_routes


def _all_params_have_grad(model: torch.nn.Module) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_coarse_regressor_shape_and_gradients() -> None:
    torch.manual_seed(0)
    model = CoarseRegressor(5, widths=(4, 8, 8, 16), layers=(1, 1, 1, 1))
    x = torch.randn(2, 1, 32, 40, 36)
    y = model(x)
    assert y.shape == (2, 5, 3)
    target = torch.zeros(2, 5, 3)
    target[0, 1] = float("nan")
    masked_l1(y, target).backward()
    assert _all_params_have_grad(model)


def test_coarse_regressor_rejects_tiny_input() -> None:
    model = CoarseRegressor(1, widths=(4, 4, 4, 4), layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="32"):
        model(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError):
        CoarseRegressor(0)


def test_resnet34_layout_full_width_parameter_count() -> None:
    model = CoarseRegressor(5)
    n = sum(p.numel() for p in model.parameters())
    assert 60e6 < n < 70e6  # 3D ResNet-34 is ~63 M parameters


def test_patch_unet_shape_and_gradients() -> None:
    torch.manual_seed(0)
    model = PatchUNet(2, channels=(4, 8, 16))
    x = torch.randn(2, 1, 16, 16, 24)
    y = model(x)
    assert y.shape == (2, 2, 16, 16, 24)
    heatmap_mse(y, torch.rand_like(y)).backward()
    assert _all_params_have_grad(model)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 1, 16, 16, 18))


def test_build_fine_models_and_routes() -> None:
    names = ["chin", "mand.l", "mand_l", "occ bone"]
    per = build_fine_models(names, "per_landmark", channels=(2, 4))
    routes = fine_model_routes(names, "per_landmark")
    assert len(per) == 4 and set(per.keys()) == {k for k, _ in routes.values()}
    assert all(ch == 0 for _, ch in routes.values())
    assert routes["mand.l"][0] != routes["mand_l"][0]
    shared = build_fine_models(names, "shared", channels=(2, 4))
    sroutes = fine_model_routes(names, "shared")
    assert list(shared.keys()) == ["shared"]
    assert [sroutes[n] for n in names] == [("shared", i) for i in range(4)]
    out = shared["shared"](torch.zeros(1, 1, 8, 8, 8))
    assert out.shape == (1, 4, 8, 8, 8)
    with pytest.raises(ValueError):
        fine_model_routes(names, "sometimes")


def test_masked_l1_hand_value_and_nan_ignored() -> None:
    pred = torch.tensor(
        [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[0.5, 0.5, 0.5], [9.0, 9.0, 9.0]]], requires_grad=True
    )
    nan = float("nan")
    target = torch.tensor([[[0.0, 0.0, 0.0], [nan, nan, nan]], [[0.0, 1.0, 0.5], [nan, 1.0, 1.0]]])
    loss = masked_l1(pred, target)
    # present: (0,0): 1+2+3 = 6 ; (1,0): 0.5+0.5+0 = 1 ; mean over 2 present landmarks
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[0, 1] == 0) and torch.all(pred.grad[1, 1] == 0)
    # changing the prediction of a missing landmark does not change the loss
    pred2 = pred.detach().clone()
    pred2[1, 1] = 123.0
    assert masked_l1(pred2, target).item() == pytest.approx(3.5)


def test_masked_l1_all_missing_is_zero_with_graph() -> None:
    pred = torch.ones(1, 2, 3, requires_grad=True)
    loss = masked_l1(pred, torch.full((1, 2, 3), float("nan")))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None


def test_heatmap_mse_masks_nan_and_mask() -> None:
    pred = torch.zeros(2, 2, 2, 2, 2)
    target = torch.ones(2, 2, 2, 2, 2)
    target[0, 1] = float("nan")
    target[1, 0] = 3.0
    # present channels: (0,0) err 1, (1,0) err 9, (1,1) err 1 -> mean 11/3
    assert heatmap_mse(pred, target).item() == pytest.approx(11 / 3)
    mask = torch.tensor([[True, True], [False, True]])
    assert heatmap_mse(pred, target, mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        heatmap_mse(pred, target, torch.ones(2, 3, dtype=torch.bool))
