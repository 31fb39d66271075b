"""fastssl.clip_loss (symmetric CLIP loss) vs fastssl.reference.clip_loss."""
import pytest
import torch

import fastssl
from fastssl import reference
from helpers import kernels
from family_helpers import DTYPES, compare


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(1, 5), (3, 33), (257, 20), (300, 48)])
def test_forward_backward(b, d, dtype):
    image = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    text = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    compare("clip_loss",
            lambda i, t, s: fastssl.clip_loss(i, t, s, backend="cpp"),
            lambda i, t, s: reference.clip_loss(i, t, s),
            [image, text, scale], dtype)


@pytest.mark.parametrize("normalize", [True, False])
def test_float_scale_and_normalize(normalize):
    image, text = torch.randn(7, 12), torch.randn(7, 12)
    scale = 3.0 if normalize else 0.5
    torch.testing.assert_close(fastssl.clip_loss(image, text, scale, normalize=normalize),
                               reference.clip_loss(image, text, scale, normalize=normalize),
                               rtol=1e-5, atol=1e-5)


def test_module_learns_scale():
    crit = fastssl.CLIPLoss(init_temperature=0.07)
    image = torch.randn(9, 16, requires_grad=True)
    text = torch.randn(9, 16, requires_grad=True)
    loss = crit(image, text)
    torch.testing.assert_close(loss, reference.clip_loss(image, text, 1 / 0.07), rtol=1e-4,
                               atol=1e-5)
    loss.backward()
    s = torch.tensor(1 / 0.07).log().requires_grad_()
    reference.clip_loss(image.detach(), text.detach(), s.exp()).backward()
    torch.testing.assert_close(crit.log_scale.grad, s.grad, rtol=1e-4, atol=1e-6)


def test_nan_and_opcheck():
    image, text = torch.randn(5, 9), torch.randn(5, 9)
    torch.library.opcheck(torch.ops.fastssl.clip_fwd,
                          (image.requires_grad_(), text.requires_grad_(), torch.tensor(4.0),
                           True))
    bad = text.detach().clone()
    bad[1, 1] = float("inf")
    assert torch.isnan(fastssl.clip_loss(image.detach(), bad, 2.0))


def test_bad_inputs():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        fastssl.clip_loss(image, torch.randn(4, 9), 10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fastssl.clip_loss(image, text, 0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fastssl.clip_loss(image, text, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="one element"):
        fastssl.clip_loss(image, text, torch.ones(2))
    with pytest.raises(TypeError, match="same dtype"):
        fastssl.clip_loss(image, text.bfloat16(), 10.0)
    with pytest.raises(TypeError):
        fastssl.clip_loss(image.int(), text.int(), 10.0)
    with pytest.raises(NotImplementedError, match="logit_bias"):
        fastssl.clip_loss(image, text, 10.0, logit_bias=torch.tensor(-10.0))
    with pytest.raises(ValueError, match="backend"):
        fastssl.clip_loss(image, text, 10.0, backend="gpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d", [(1, 5), (37, 20)])
def test_triton_interpreter(b, d, dtype):
    image = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    text = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    with kernels("triton"):
        compare("clip_loss[triton]",
                lambda i, t, s: fastssl.clip_loss(i, t, s, backend="triton"),
                lambda i, t, s: reference.clip_loss(i, t, s),
                [image, text, scale], dtype)
