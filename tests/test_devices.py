"""neoxja.devices: every accepted and refused device and dtype form (CUDA forms with a faked GPU count)."""

from __future__ import annotations

import pytest
import torch

from neoxja import devices
from neoxja.devices import available_devices, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", -1, CPU, "auto", None])
def test_cpu_forms(no_gpu: None, device) -> None:
    assert resolve_device(device) == (torch.device("cpu:0") if device == "cpu:0" else CPU)


def test_none_is_the_callers_default(two_gpus: None) -> None:
    assert resolve_device(None) == CPU
    assert resolve_device(None, default="auto") == torch.device("cuda")
    assert resolve_device(None, default=1) == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (0, torch.device("cuda", 0)),
        (1, torch.device("cuda", 1)),
        ("cuda", torch.device("cuda")),
        ("cuda:1", torch.device("cuda", 1)),
        (torch.device("cuda", 0), torch.device("cuda", 0)),
        ("auto", torch.device("cuda")),
        (-1, CPU),
    ],
)
def test_cuda_forms_with_gpus(two_gpus: None, device, expected: torch.device) -> None:
    assert resolve_device(device) == expected


@pytest.mark.parametrize("device", [0, "cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_without_a_gpu_is_refused(no_gpu: None, device) -> None:
    with pytest.raises(ValueError, match="sees no CUDA GPU") as info:
        resolve_device(device)
    message = str(info.value)
    assert message.startswith(f"device={device!r} ")
    assert message.endswith("available here: 'auto', 'cpu', -1")  # no 0, no 'cuda'


@pytest.mark.parametrize("device", [2, "cuda:2", "cuda:7", torch.device("cuda", 5)])
def test_a_gpu_past_the_last_is_refused(two_gpus: None, device) -> None:
    with pytest.raises(ValueError) as info:
        resolve_device(device)
    assert str(info.value) == (
        f"device={device!r} is not available; "
        "available here: 'auto', 'cpu', -1, 'cuda', 'cuda:0', 'cuda:1', 0, 1"
    )


@pytest.mark.parametrize(
    ("device", "why"),
    [
        ("mps", "is not available"),
        ("xpu", "is not available"),
        ("meta", "is not available"),
        (torch.device("meta"), "is not available"),
        ("banana", "is not a torch device"),
        ("", "is not a torch device"),
        (-2, "is not a device index"),
        (True, "is not a device"),
        (False, "is not a device"),
        (0.0, "is not a device"),
        (["cpu"], "is not a device"),
    ],
)
@pytest.mark.parametrize("gpus", ["no_gpu", "two_gpus"])
def test_other_devices_are_refused_with_the_choices(device, why: str, gpus: str, request) -> None:
    request.getfixturevalue(gpus)
    with pytest.raises(ValueError) as info:
        resolve_device(device)
    choices = ", ".join(map(repr, available_devices()))
    assert str(info.value).startswith(f"device={device!r} {why}")
    assert str(info.value).endswith(f"available here: {choices}")


def test_available_devices(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_devices() == ["auto", "cpu", -1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert available_devices() == ["auto", "cpu", -1, "cuda", "cuda:0", 0]
    assert all(resolve_device(device) is not None for device in available_devices())


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("torch.float32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("FP16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("auto", "auto"),
        (None, None),
    ],
)
def test_dtype_forms(dtype, expected) -> None:
    assert resolve_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", ["float8", "int8", "", torch.int64, torch.float64, 16, True])
def test_other_dtypes_are_refused_with_the_choices(dtype) -> None:
    with pytest.raises(ValueError) as info:
        resolve_dtype(dtype)
    assert str(info.value) == (
        f"dtype={dtype!r} is not supported; use one of {', '.join(devices.DTYPES)} or 'auto'"
    )


def test_pipelines_reexports_the_policy() -> None:
    from neoxja import pipelines

    assert pipelines.resolve_device is resolve_device and pipelines.resolve_dtype is resolve_dtype
