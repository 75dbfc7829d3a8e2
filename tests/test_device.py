import pytest
import torch

from models.device import resolve_device, resolve_dtype
from models.errors import ConfigError


def test_auto_is_cpu_fp32_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        return
    device = resolve_device("auto")
    assert device.type == "cpu"
    assert resolve_dtype("auto", device) == torch.float32


def test_explicit_dtypes_and_bad_values():
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_dtype("float8")
    with pytest.raises(ConfigError):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
