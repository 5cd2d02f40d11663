import pytest
import torch
import torch.nn.functional as F

import scalelm.model.loss as L
from scalelm.model.loss import IGNORE_INDEX, cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [4 * 2**20, 1000])  # one chunk, and 2 rows per chunk
def test_matches_f_cross_entropy(dtype, chunk, monkeypatch):
    monkeypatch.setitem(L.CHUNK_BYTES, "cpu", chunk)
    torch.manual_seed(0)
    x = (torch.randn(3, 13, 101) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 101, (3, 13))
    t[:, ::4] = IGNORE_INDEX
    loss = cross_entropy(x, t)
    loss.backward()
    g, x.grad = x.grad, None
    ref = F.cross_entropy(x.to(torch.promote_types(dtype, torch.float32)).view(-1, 101), t.view(-1),
                          ignore_index=IGNORE_INDEX)
    ref.backward()
    assert loss.dtype == ref.dtype and g.dtype == dtype
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(g, x.grad, **tol)


def test_all_ignored_is_nan_with_zero_gradient():
    x = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy(x, torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.isnan() and F.cross_entropy(x, torch.full((4,), IGNORE_INDEX)).isnan()
    assert x.grad.abs().max() == 0


def test_scales_with_upstream_gradient():
    x = torch.randn(5, 11, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    (3 * cross_entropy(x, t)).backward()
    g3, x.grad = x.grad, None
    cross_entropy(x, t).backward()
    torch.testing.assert_close(g3, 3 * x.grad)
