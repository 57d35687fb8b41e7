"""Model registry, initial weights and safe loading."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision

from catdog.models import (
    ARCHITECTURES,
    InitError,
    batchnorm_folded,
    build_model,
    head_prefix,
    load_weights_file,
    sequential_cnn,
    split_parameters,
)
from catdog.storage import Storage


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_outputs_two_logits(arch):
    model = build_model(arch, "scratch").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    backbone, head = split_parameters(model, arch)
    assert head and backbone
    assert head[-1].shape == (2,)  # the replaced classifier's bias


def batchnorm_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_batchnorm_keeps_the_scores_and_leaves_the_model_it_copied(arch):
    """Statistics and affine parameters far from BatchNorm's initial ones (a fold of mean 0, variance 1
    is nearly the identity and would hide a wrong formula); 1e-4 of the logits' largest magnitude is
    float rounding."""
    torch.manual_seed(0)  # the initial weights: a fixed model, not one per run
    model = build_model(arch, "scratch").eval()
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.5, generator=generator)
        bn.running_var.uniform_(0.2, 2.0, generator=generator)
        bn.weight.data.normal_(1, 0.3, generator=generator)
        bn.bias.data.normal_(0, 0.3, generator=generator)
    before = batchnorm_layers(model)
    folded = batchnorm_folded(model)
    assert before > 0 and batchnorm_layers(folded) == 0 and batchnorm_layers(model) == before
    x = torch.randn(4, 3, 64, 64, generator=generator).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    scale = expected.abs().max()  # logits far from zero, so that the tolerance means something
    assert scale > 1e-2 and torch.allclose(got, expected, rtol=0, atol=1e-4 * scale), (got - expected).abs().max()


def test_a_model_fx_cannot_trace_is_scored_unfolded_with_a_warning(caplog):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # control flow on a value: fx cannot trace it

    model = DataDependent()
    assert batchnorm_folded(model) is model and not model.training
    assert "scoring DataDependent without folding BatchNorm" in caplog.text


def test_sequential_cnn_is_a_plain_sequential_with_a_linear_head():
    model = sequential_cnn()
    assert type(model) is torch.nn.Sequential
    assert isinstance(model[int(head_prefix("sequential_cnn").rstrip("."))], torch.nn.Linear)


def test_unknown_architecture():
    with pytest.raises(InitError, match="unknown architecture 'vgg16'"):
        build_model("vgg16")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_init_from_a_torchvision_state_dict_loads_the_backbone(tmp_path, arch):
    reference = getattr(torchvision.models, arch)(weights=None)  # 1000-class head, random weights
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    model = build_model(arch, str(path))
    ours, theirs = model.state_dict(), reference.state_dict()
    prefix = head_prefix(arch)
    shared = [k for k in theirs if not k.startswith(prefix)]
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    head_weight = [k for k in ours if k.startswith(prefix) and k.endswith("weight")][0]
    assert ours[head_weight].shape[0] == 2


def test_init_from_weights_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(InitError, match="weights do not fit resnet18"):
        build_model("resnet18", str(path))


def test_imagenet_offline_fails_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    # No network here (and none in CI); make sure of it for the test's sake.
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable"))
    )
    with pytest.raises(InitError) as info:
        build_model("resnet18", "imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "empty-torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "init: scratch" in message


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model("resnet18", "imagenet")
    assert torch.equal(model.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": _Payload(str(marker))}))
    with pytest.raises(InitError, match="refused to load weights"):
        load_weights_file(Storage(), str(path))
    assert not marker.exists()
    with pytest.raises(InitError, match="refused to load weights"):
        build_model("resnet18", str(path))
    assert not marker.exists()
