"""The compiled extension loads, registers torch.ops.npr, and its first op matches the reference."""
import pytest
import torch

import npr
from npr import _ext, ref


def test_extension_built():
    assert _ext.available(), "npr._C missing: " + str(_ext._IMPORT_ERROR)


@pytest.mark.parametrize("shape", [(1, 8), (3, 77), (2, 5, 576), (17, 1), (4, 1031)])
def test_rms_norm_matches_reference(shape):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    y = torch.ops.npr.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, ref.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_opcheck():
    x, w = torch.randn(4, 64), torch.randn(64)
    torch.library.opcheck(torch.ops.npr.rms_norm.default, (x, w, 1e-5))


def test_rms_norm_bad_input_names_problem():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.npr.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.npr.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6)


def test_wrapper_falls_back_for_other_dtypes():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    assert npr.ops.rms_norm(x, w, 1e-6).dtype == torch.bfloat16
