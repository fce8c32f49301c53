import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moco_engine.config import ModelConfig
from moco_engine.encoders import (
    MomentumEncoder,
    SplitBatchNorm,
    build_backbone,
    build_encoder,
    momentum_at,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def perturbed(net: nn.Module) -> nn.Module:
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    return other


def test_key_encoder_starts_as_a_copy_without_gradients():
    query = small_net()
    key = MomentumEncoder(query)
    for pq, pk in zip(query.parameters(), key.encoder.parameters()):
        assert torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
        assert not pk.requires_grad


@pytest.mark.parametrize("m", [1.0, 0.0, 0.9, 0.999])
def test_ema_update_equals_the_formula(m):
    query = small_net()
    key = MomentumEncoder(perturbed(query))
    before = [p.clone() for p in key.encoder.parameters()]
    key.update(query, m)
    for k0, q, k1 in zip(before, query.parameters(), key.encoder.parameters()):
        if m == 1.0:
            assert torch.equal(k1, k0)
        elif m == 0.0:
            assert torch.equal(k1, q)
        else:
            assert torch.allclose(k1, m * k0 + (1 - m) * q, atol=1e-6)


def test_ema_leaves_bn_buffers_to_the_key_encoder():
    query = small_net()
    key = MomentumEncoder(query)
    query[1].running_mean.fill_(3.0)
    key.update(query, 0.5)
    assert torch.equal(key.encoder[1].running_mean, torch.zeros(8))


def test_cosine_momentum_rises_to_one():
    assert momentum_at(0.99, "constant", 50, 100) == 0.99
    assert momentum_at(0.99, "cosine", 0, 100) == pytest.approx(0.99)
    assert momentum_at(0.99, "cosine", 50, 100) == pytest.approx(0.995)
    assert momentum_at(0.99, "cosine", 100, 100) == pytest.approx(1.0)


def reference_split_bn(x, bn: nn.BatchNorm2d, splits: int):
    parts = []
    for part in torch.tensor_split(x, splits):  # contiguous slices, as DDP splits a batch
        mean = part.mean(dim=(0, 2, 3), keepdim=True)
        var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        parts.append((part - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    return torch.cat(parts)


@pytest.mark.parametrize("n, path", [(12, "forward"), (12, "one_pass"), (13, "forward")])  # 13: ragged
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_bn_normalises_each_slice_on_its_own(n, path, memory_format):
    # "forward" on CPU is the per-slice path; "one_pass" is the form a GPU takes, run here on CPU.
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(n, 3, 5, 5) * 3 + 1).contiguous(memory_format=memory_format).requires_grad_()
    out = bn(x) if path == "forward" else bn._one_pass(x, 4)
    ref = reference_split_bn(x, bn, 4)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format)  # no layout change for the next conv
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, bn.weight, bn.bias])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, bn.weight, bn.bias])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)
    # Running statistics: the mean of the slices' momentum updates (from 0 and 1).
    means = torch.stack([part.mean(dim=(0, 2, 3)) for part in torch.tensor_split(x.detach(), 4)])
    variances = torch.stack([part.var(dim=(0, 2, 3)) for part in torch.tensor_split(x.detach(), 4)])
    assert torch.allclose(bn.running_mean, (0.1 * means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, (0.9 + 0.1 * variances).mean(0), atol=1e-4)
    bn.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.allclose(bn(x), plain(x))


def test_split_bn_on_head_features_and_in_the_mlp_bn_head():
    torch.manual_seed(0)
    bn = SplitBatchNorm(5, num_splits=2, affine=False)
    x = torch.randn(8, 5) * 2 + 3
    out = bn(x)
    for i in range(2):
        part = x[4 * i : 4 * i + 4]
        ref = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + bn.eps)
        assert torch.allclose(out[4 * i : 4 * i + 4], ref, atol=1e-5)
    enc = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False, head="mlp_bn", hidden_dim=32, dim=8, bn_splits=2))
    head_bns = [m for m in enc.head if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(head_bns) == 2 and all(isinstance(m, SplitBatchNorm) for m in head_bns)
    assert enc(torch.randn(6, 3, 32, 32)).shape == (6, 8)


def test_split_bn_momentum_none_and_no_running_stats():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    cumulative = SplitBatchNorm(3, num_splits=2, momentum=None)
    cumulative(x)  # the first update of a cumulative average replaces the initial statistics
    means = torch.stack([part.mean(dim=(0, 2, 3)) for part in x.chunk(2)]).mean(0)
    assert torch.allclose(cumulative.running_mean, means, atol=1e-6)
    one_pass = SplitBatchNorm(3, num_splits=2, momentum=None)
    one_pass._one_pass(x, 2)
    assert torch.allclose(one_pass.running_mean, means, atol=1e-6)
    stateless = SplitBatchNorm(3, num_splits=2, track_running_stats=False)
    ref = torch.cat([F.batch_norm(part, None, None, stateless.weight, stateless.bias, True) for part in x.chunk(2)])
    assert torch.allclose(stateless(x), ref, atol=1e-6)


def test_split_bn_with_one_split_is_plain_batchnorm():
    x = torch.randn(8, 3, 4, 4)
    bn, plain = SplitBatchNorm(3, 1), nn.BatchNorm2d(3)
    assert torch.allclose(bn(x), plain(x))


def test_cifar_stem_and_heads():
    net, width = build_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and width == 512
    enc = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False, head="linear", dim=24, bn_splits=2))
    assert isinstance(enc.head, nn.Linear) and enc.head.out_features == 24
    assert any(isinstance(m, SplitBatchNorm) for m in enc.modules())
    z = enc(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 24) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    mlp = build_encoder(ModelConfig(arch="resnet18", head="mlp", hidden_dim=0, dim=8)).head
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [512, 8]
