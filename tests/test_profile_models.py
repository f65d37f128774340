"""`benchmarks/profile_models.py`: ops go to the kind the table names, and a bad model list is refused clearly."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import profile_models  # noqa: E402


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::convolution_backward", "convolution"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention kernel"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention kernel"),
        ("aten::native_group_norm_backward", "normalization"),
        ("aten::_fused_rms_norm", "normalization"),
        ("aten::gelu_backward", "activation"),
        ("aten::silu", "activation"),
        ("aten::copy_", "copies and layout"),
        ("aten::cat", "copies and layout"),
        ("aten::addcmul", "elementwise rest"),
        ("aten::sum", "elementwise rest"),
    ],
)
def test_each_op_is_counted_in_its_kind(op, kind):
    assert profile_models.op_kind(op) == kind


def test_an_unknown_model_group_is_refused_with_the_choices():
    result = subprocess.run(
        [sys.executable, "benchmarks/profile_models.py", "--quick", "--models", "unet,nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown model group(s) ['nope']; choose from ['unet', 'dit', 'mmdit', 'gqa']" in result.stderr
