"""fastssl.supcon (supervised contrastive loss) vs fastssl.reference.supcon."""
import pytest
import torch

import fastssl
from fastssl import reference
from helpers import kernels
from family_helpers import DTYPES, compare


def _labels(n):
    y = torch.randint(0, max(1, n // 4), (n,))
    if n > 2:
        y[-1] = 10_000  # a singleton class: an anchor without positives (excluded)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (3, 33), (257, 20)])
def test_forward_backward(n, d, dtype):
    z = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = _labels(n)
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    compare("supcon",
            lambda a, lab, t: fastssl.supcon(a, lab, t, backend="cpp"),
            lambda a, lab, t: reference.supcon(a, lab, t),
            [z, y, temp], dtype)


def test_hand_checked_two_pairs():
    # Two classes of two unit vectors at right angles: S has 1/t on... each anchor's single
    # positive and one of two negatives; checked against the formula written out.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    t = 0.5
    # anchor 0: others have logits [2, 0, 0]; positive 2 -> -log(e^2 / (e^2 + 2))
    expect = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2))
    torch.testing.assert_close(fastssl.supcon(z, y, t), expect)


def test_no_positive_anywhere_is_zero_with_zero_grad():
    z = torch.randn(5, 7, requires_grad=True)
    loss = fastssl.supcon(z, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_label_dtypes_and_opcheck():
    z = torch.randn(9, 6)
    y = torch.tensor([3, 1, 3, 1, 7, 7, 3, 0, 0])
    ref = reference.supcon(z, y)
    for dt in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(fastssl.supcon(z, y.to(dt)), ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.fastssl.supcon_fwd,
                          (z.requires_grad_(), y, torch.tensor(10.0), True))


def test_module():
    crit = fastssl.SupConLoss(temperature=0.2)
    z, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    torch.testing.assert_close(crit(z, y), reference.supcon(z, y, 0.2), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    z = torch.randn(6, 8)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        fastssl.supcon(z, y[:5])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        fastssl.supcon(z, y[:, None])
    with pytest.raises(TypeError, match="integer"):
        fastssl.supcon(z, y.float())
    with pytest.raises(TypeError, match="integer"):
        fastssl.supcon(z, y.bool())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastssl.supcon(z, [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="temperature"):
        fastssl.supcon(z, y, temperature=-0.1)
    with pytest.raises(ValueError, match="2-D"):
        fastssl.supcon(z[None], y)
    with pytest.raises(ValueError, match="device"):
        fastssl.supcon(z, y.to("meta"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (37, 20)])
def test_triton_interpreter(n, d, dtype):
    z = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    with kernels("triton"):
        compare("supcon[triton]",
                lambda a, lab, t: fastssl.supcon(a, lab, t, backend="triton"),
                lambda a, lab, t: reference.supcon(a, lab, t),
                [z, _labels(n), temp], dtype)
