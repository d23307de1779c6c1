"""scripts/kernel_emulation.py: the torch emulation of the fused kernels' rounding (the evidence behind the F1 tf32
state update) is exact with rounding off and kernel-like with it on."""
import pytest
import torch
from script_loader import load_script


@pytest.fixture(scope="module")
def emulation():
    return load_script("scripts/kernel_emulation.py")


@pytest.mark.parametrize("normalize", [False, True])
def test_no_rounding_equals_the_float64_reference(emulation, normalize):
    x = emulation.draw(seed=1, normalize=normalize, T=150)
    ref = emulation.reference_grads(*x, normalize)
    got = emulation.emulate_draw(x, normalize, ((), None), dt=torch.float64)
    for name in ("o", "final", "dq", "dk", "dv", "dw", "dlam", "dinit"):
        err = ((got[name] - ref[name]).norm() / ref[name].norm()).item()
        assert err < 1e-10, (name, err)


def test_kernel_rounding_gives_bf16_sized_errors(emulation):
    x = emulation.draw(seed=2, normalize=False, T=150)
    ref = emulation.reference_grads(*x, False)
    got = emulation.emulate_draw(x, False, emulation.KERNEL)
    for name in ("o", "dq", "dk", "dv"):
        err = ((got[name].double() - ref[name]).norm() / ref[name].norm()).item()
        assert 1e-4 < err < 2e-2, (name, err)  # rounding is on, and at bf16's size


def test_tf32_rounding_keeps_ten_mantissa_bits(emulation):
    x = torch.tensor([1 + 2.0**-10, 1 + 2.0**-12, 1 + 2.0**-11 + 2.0**-13])
    assert emulation.tf32(x).tolist() == [1 + 2.0**-10, 1.0, 1 + 2.0**-10]


def test_statistics_table(emulation, capsys):
    assert emulation.main(["--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "| torch path |" in out and "| kernel, tf32 Kw in F1 |" in out and "2 draws" in out
