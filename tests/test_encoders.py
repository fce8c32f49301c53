import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moco_engine.config.schema import ModelConfig
from moco_engine.method import norms
from moco_engine.method.backbones import build_backbone
from moco_engine.method.encoders import MomentumEncoder, build_encoder
from moco_engine.method.norms import SplitBatchNorm, split_bn
from moco_engine.method.schedules import momentum_at
from moco_engine.tools.opcount import count_ops


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


def split_slices(n: int, splits: int, form: str, channels_last: bool = False) -> list[Tensor]:
    """The sample indices of each slice of split-BN's ``form``: strided (slice k is samples k,
    k + s, ...) for an even batch of the strided form (and of the grouped form, but for a
    channels_last batch), else contiguous (as DDP splits a batch, tensor_split's sizes for a
    ragged one)."""
    if n % splits == 0 and (form == "strided" or (form == "grouped" and not channels_last)):
        return [torch.arange(k, n, splits) for k in range(splits)]
    return list(torch.tensor_split(torch.arange(n), splits))


def reference_split_bn(x, bn: nn.BatchNorm2d, slices: list[Tensor]):
    out = torch.empty_like(x)
    for idx in slices:
        part = x[idx]
        mean = part.mean(dim=(0, 2, 3), keepdim=True)
        var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        out[idx] = (part - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return out


@pytest.mark.parametrize("n, impl", [(12, "per_slice"), (12, "one_pass"), (12, "strided"), (12, "grouped"),
                                     (13, "per_slice"), (13, "strided"), (13, "grouped")])  # 13: ragged, always per slice
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_bn_normalises_each_slice_on_its_own(n, impl, memory_format):
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4, form=impl)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(n, 3, 5, 5) * 3 + 1).contiguous(memory_format=memory_format).requires_grad_()
    out = bn(x)
    slices = split_slices(n, 4, impl, memory_format == torch.channels_last)
    ref = reference_split_bn(x, bn, slices)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format)  # no layout change for the next conv
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, bn.weight, bn.bias])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, bn.weight, bn.bias])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)
    # Running statistics: the mean of the slices' momentum updates (from 0 and 1).
    means = torch.stack([x.detach()[idx].mean(dim=(0, 2, 3)) for idx in slices])
    variances = torch.stack([x.detach()[idx].var(dim=(0, 2, 3)) for idx in slices])
    assert torch.allclose(bn.running_mean, (0.1 * means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, (0.9 + 0.1 * variances).mean(0), atol=1e-4)
    assert bn.num_batches_tracked == 1
    bn.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.allclose(bn(x), plain(x))


@pytest.mark.parametrize("impl", ["per_slice", "strided", "grouped"])
def test_split_bn_on_head_features_and_in_the_mlp_bn_head(impl):
    torch.manual_seed(0)
    bn = SplitBatchNorm(5, num_splits=2, form=impl, affine=False)
    x = torch.randn(8, 5) * 2 + 3
    out = bn(x)
    for idx in split_slices(8, 2, impl):
        part = x[idx]
        ref = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + bn.eps)
        assert torch.allclose(out[idx], ref, atol=1e-5)
    enc = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False, head="mlp_bn", hidden_dim=32, dim=8, bn_splits=2,
                                    bn_split_form=impl), (3, 32, 32))
    head_bns = [m for m in enc.head if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(head_bns) == 2 and all(isinstance(m, SplitBatchNorm) for m in head_bns)
    assert all(m.form == impl for m in enc.modules() if isinstance(m, SplitBatchNorm))
    assert enc(torch.randn(6, 3, 32, 32)).shape == (6, 8)


@pytest.mark.parametrize("impl", ["per_slice", "one_pass", "strided", "grouped"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_bn_momentum_none_and_no_running_stats(impl, memory_format):
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 4, 4) * 2 + 1).contiguous(memory_format=memory_format)
    slices = split_slices(8, 2, impl, memory_format == torch.channels_last)
    cumulative = SplitBatchNorm(3, num_splits=2, form=impl, momentum=None)
    cumulative(x)  # the first update of a cumulative average replaces the initial statistics
    means = torch.stack([x[idx].mean(dim=(0, 2, 3)) for idx in slices]).mean(0)
    assert torch.allclose(cumulative.running_mean, means, atol=1e-6)
    stateless = SplitBatchNorm(3, num_splits=2, form=impl, track_running_stats=False)
    out = stateless(x)
    for idx in slices:
        ref = F.batch_norm(x[idx], None, None, stateless.weight, stateless.bias, True)
        assert torch.allclose(out[idx], ref, atol=1e-6)
    assert stateless.running_mean is None


def test_split_bn_grouped_reads_and_writes_channels_last_without_a_copy():
    """The grouped form's whole forward and backward: one group norm each way, no copy, and
    the ReLU after it out of place (in place on its view, autograd would copy the base)."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    split_bn(layer, 4, "grouped")
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    counts = count_ops(lambda: layer(x).sum().backward())
    names = counts.by_name
    assert names["aten.native_group_norm.default"] == 1 and names["aten.native_group_norm_backward.default"] == 1
    assert not any(op in names for op in ("aten.clone.default", "aten.copy_.default", "aten.contiguous.default"))
    assert not layer[2].inplace


def test_split_bn_grouped_compiles_to_the_same_numbers():
    """Compile-friendly (Issue 34): dynamo and AOT autograd trace the grouped form, running
    statistics included, with nothing changed."""
    torch.manual_seed(0)
    layers = [split_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), 4, "grouped")
              .to(memory_format=torch.channels_last) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(16, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(layers[0], backend="aot_eager")
    for out in (compiled(x), layers[1](x)):
        out.sum().backward()
    assert torch.equal(layers[0][0].weight.grad, layers[1][0].weight.grad)
    assert torch.equal(layers[0][1].running_var, layers[1][1].running_var)


def test_the_native_group_norm_the_grouped_form_calls_has_the_schema_it_expects():
    """aten's native group norm is no public API: an upgrade that changes its arguments or results
    fails here, naming the change."""
    change = norms.changed_group_norm()
    assert change is None, f"torch {torch.__version__}'s native group norm changed: {change}"


def test_split_bn_with_one_split_is_plain_batchnorm():
    x = torch.randn(8, 3, 4, 4)
    bn, plain = SplitBatchNorm(3, 1), nn.BatchNorm2d(3)
    assert torch.allclose(bn(x), plain(x))


def test_cifar_stem_and_heads():
    net, width = build_backbone(ModelConfig(arch="resnet18", cifar_stem=True), (3, 32, 32))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and width == 512
    enc = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False, head="linear", dim=24, bn_splits=2), (3, 32, 32))
    assert isinstance(enc.head, nn.Linear) and enc.head.out_features == 24
    assert any(isinstance(m, SplitBatchNorm) for m in enc.modules())
    z = enc(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 24) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    mlp = build_encoder(ModelConfig(arch="resnet18", head="mlp", hidden_dim=0, dim=8), (3, 32, 32)).head
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [512, 8]


@pytest.mark.parametrize("impl", ["per_slice", "one_pass", "strided", "grouped"])
def test_split_bn_takes_sequences_n_c_l(impl):
    """(N, C, L) input (a sequence's channels): each slice normalised on its own statistics."""
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2, form=impl, affine=False)
    x = torch.randn(8, 3, 5) * 3 + 1
    out = bn(x)
    slices = split_slices(8, 2, impl)
    for idx in slices:
        part = x[idx]
        ref = (part - part.mean((0, 2), keepdim=True)) / torch.sqrt(part.var((0, 2), unbiased=False, keepdim=True) + bn.eps)
        assert torch.allclose(out[idx], ref, atol=1e-5)
