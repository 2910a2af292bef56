"""The front end on model code written the way real models are: shape checks, upsampling, sizes read from
tensors, TF "same" padding (Python arithmetic on sizes), parameter-only subgraphs, broadcasting residuals.
Each model converts, keeps its state_dict keys (strict load both ways) and approaches the ANN at large T on a
batch size other than the calibration's."""

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snnconv
from snnconv import ConversionError
from snnconv.trace import OPS, annotate, trace


def _bn(c, seed):
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
    return bn


def converts_and_agrees(model, shape=(3, 16, 16), T=256, tol=0.08, **kw):
    torch.manual_seed(0)
    model = model.eval()
    calib, x = torch.rand(64, *shape), torch.rand(5, *shape)  # test batch 5, calibration batches of 64
    snn = snnconv.convert(model, T=T, calib=calib, **kw)
    assert list(snn.state_dict()) == list(model.state_dict())
    snn.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(snn.state_dict(), strict=True)
    with torch.no_grad():
        ref, out = model(x), snn(x)
    assert out.shape == ref.shape
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    return snn


class AssertNet(nn.Module):
    """timm's BatchNormAct2d style: torch._assert on ranks and sizes inside forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), _bn(8, 1), nn.Linear(8, 4)

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        torch._assert(x.shape[1] == 3, "expected 3 channels")
        x = F.relu(self.bn(self.conv(x)))
        _, _, H, W = x.shape
        torch._assert(H == W, "square maps only")
        return self.fc(x.mean((2, 3)))


def test_shape_checks_dropped():
    gm = trace(AssertNet())
    assert all(OPS["assert"].functions[0] is not n.target for n in gm.graph.nodes)
    assert "_assert" not in gm.code
    converts_and_agrees(AssertNet())


class UpsampleNet(nn.Module):
    """HRNet-style fusion: a low-resolution branch upsampled (module and F.interpolate) and added."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, 2), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), _bn(8, 3), nn.ReLU())
        self.lat = nn.Conv2d(8, 8, 1)
        up = {"align_corners": False} if mode == "bilinear" else {}
        self.up = nn.Upsample(scale_factor=2, mode=mode, **up)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        low = self.down(h)
        kw = {"align_corners": False} if self.mode == "bilinear" else {}
        y = F.relu(h + self.up(self.lat(low))) + F.interpolate(low, size=h.shape[-2:], mode=self.mode, **kw)
        return self.fc(self.head(y))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample(mode):
    converts_and_agrees(UpsampleNet(mode))


class LiteStyle(nn.Module):
    """A third-party EfficientNet-Lite classifier: `bs = inputs.size(0)` at the top, `x.view(bs, -1)` at the end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), _bn(8, 4), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _bn(8, 5), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), _bn(16, 6))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, inputs):
        bs = inputs.size(0)
        x = self.pw(self.dw(self.stem(inputs)))
        x = self.avgpool(x)
        x = x.view(bs, -1)
        return self.fc(x)


def test_batch_size_from_the_input():
    snn = converts_and_agrees(LiteStyle())
    with torch.no_grad():  # and in step mode, one step at a time
        snn.step_mode = "s"
        out = snn(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 5)


class SizesNet(nn.Module):
    """Sizes read every way (x.size(0), x.shape[0], x.size()), reshapes using them, split/chunk, F.pad,
    torch.stack on a non-batch dim."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(2 * 8 * 8 * 8 + 8, 4)

    def forward(self, x):
        n, size = x.shape[0], x.size()
        h = F.relu(self.c1(x))
        a, b = torch.split(h, 4, dim=1)
        c, d = h.chunk(2, 1)
        a = F.relu(self.c2(F.pad(a, (1, 1, 1, 1))))
        h2 = torch.cat([a, b + c - d], 1)
        h2 = h2.reshape(x.size(0), 8, size[2], size[3])  # sizes from the input, not from h2
        h2 = F.avg_pool2d(F.relu(self.c3(h2)), 2)
        s = torch.stack([h2, h2 * 0.5], dim=1)  # [N, 2, 8, 8, 8]
        flat = s.view(n, -1)
        g = h2.view(size[0], 8, -1).mean(2)
        return self.fc(torch.cat([flat, g], 1))


def test_sizes_from_tensors():
    converts_and_agrees(SizesNet())


def test_whole_size_reshape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            h = F.relu(self.conv(x)).flatten(1)
            return self.fc(F.relu(h.view(x.size()).flatten(1)))

    converts_and_agrees(Net())


def _same_pad(size, k, s):  # timm's get_same_padding: Python arithmetic and max() on sizes
    return max((math.ceil(size / s) - 1) * s + (k - 1) + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """TF "same" padding computed from x.size() in forward (timm's tf_* models)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        ph, pw = _same_pad(ih, self.kernel_size[0], self.stride[0]), _same_pad(iw, self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    def forward(self, x):
        ih, iw = x.size()[-2:]
        ph, pw = _same_pad(ih, self.kernel_size, self.stride), _same_pad(iw, self.kernel_size, self.stride)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class TFSameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = Conv2dSame(3, 8, 3, stride=2), _bn(8, 7)
        self.pool = MaxPool2dSame(3, 2)
        self.c2 = Conv2dSame(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(F.relu6(self.bn1(self.c1(x))))
        x = F.relu(self.c2(x))
        return self.fc(x.view(x.size(0), -1))


def test_tf_same_padding_falls_back_to_concrete_shapes():
    with pytest.raises(ConversionError, match="cannot trace"):  # symbolic tracing alone cannot follow it
        trace(TFSameNet())
    gm = trace(TFSameNet(), torch.rand(2, 3, 19, 19))
    assert gm.meta["snn_concrete_shapes"]
    snn = converts_and_agrees(TFSameNet(), shape=(3, 19, 19))
    with pytest.raises(ConversionError, match=r"traced with concrete sizes .* \[N, 3, 19, 19\]"):
        snn(torch.rand(2, 3, 21, 21))  # the padding was computed for 19 x 19


class ScaledStdConv(nn.Conv2d):
    """NFNet's weight standardisation in forward: a subgraph of parameters only."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class NFStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = ScaledStdConv(3, 8, 3, padding=1), ScaledStdConv(8, 8, 3, padding=1)
        self.skip_gain = nn.Parameter(torch.tensor(0.7))
        self.alpha = 0.2
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h + F.relu(self.c2(h)) * self.alpha * self.skip_gain
        return self.fc(h.mean((2, 3)))


def test_parameter_only_subgraph():
    converts_and_agrees(NFStyle())


class Residual(nn.Module):
    """`g(pool(h)) + h`: the left operand [N, C, 1, 1] broadcasts against h [N, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.c1, self.g, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        y = F.relu(self.g(self.pool(h)) + h)
        y = F.relu(self.c2(y) + y)  # same shapes: this one may go in place
        return self.fc(y.mean((2, 3)))


def test_broadcasting_add_stays_out_of_place():
    import snnconv.passes as P

    without_fusion = sorted(P.OPTIONAL - {"residual_into_neuron"})
    code = converts_and_agrees(Residual(), passes=without_fusion).graph_module.code
    assert "g = self.g" in code and "add_(" in code
    assert code.count("add_(") == 1  # only the same-shape residual
    # by default both sums are their neuron's second input: the broadcasting one is added by the neuron first
    code = converts_and_agrees(Residual()).graph_module.code
    assert "add" not in code and " + " not in code
    assert re.search(r"relu_1\(g, _snn_relu\)", code) and re.search(r"relu_2\(\w+, _snn_relu_1\)", code), code


def test_unconvertible_ops_listed_in_one_error():
    """Smooth activations, norms, softmax and products convert now (passes/compensate.py); what mixes the samples
    of a batch, keeps recurrent state or has no known meaning is refused, every one listed in one error."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.silu, self.gn, self.lstm = nn.SiLU(), nn.GroupNorm(2, 8), nn.LSTM(8, 8)

        def forward(self, x):
            h = self.gn(self.silu(self.conv(x)))  # both convert
            h = h - h.mean(0)  # mixes the batch
            h = torch.cat((h, h[:1]), 0)  # picks a sample, joins along the batch
            s = self.lstm(h.mean((2, 3)).unsqueeze(0))[0][0]  # recurrent state
            return torch.softmax(torch.special.i0(s), -1)  # softmax converts; i0 is unknown

    with pytest.raises(ConversionError) as info:
        snnconv.convert(Net().eval(), T=4, calib=torch.rand(4, 3, 16, 16))
    msg = str(info.value)
    summary = msg.splitlines()[0]  # "Net: 5 op(s) cannot be converted ... (mean x1, getitem x1, ...)"
    assert msg.count("snnconv") == 0 and "5 op(s)" in summary, msg
    for op in ("mean", "getitem", "cat", "LSTM", "i0"):
        assert op in summary, op
    for op in ("SiLU", "GroupNorm", "softmax"):
        assert op not in summary, op


def test_tensor_made_from_the_batch_size_follows_the_folded_batch():
    """torch.zeros(x.size(0), 1) reads N from the input; where it meets the spikes ([T * N, ...]) it is broadcast
    over time like any step-invariant tensor (and with hoisting off, the size itself is T * N)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            h = F.relu(self.conv(x))
            return h.flatten(1) + torch.ones((x.size(0), 1)) * x.mean((1, 2, 3)).unsqueeze(1)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.rand(4, 3, 8, 8)
    for passes in (None, []):
        snn = snnconv.convert(model, T=64, calib=x, passes=passes)
        with torch.no_grad():
            assert torch.allclose(snn(x), model(x), atol=0.05), passes


def test_facts_recorded_once():
    gm = annotate(trace(LiteStyle().eval()), torch.rand(4, 3, 16, 16))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["size"].meta["snn_batch_value"] == "int"
    assert nodes["inputs"].meta["snn_batched"] and nodes["inputs"].meta["snn_shape"] == (2, 3, 16, 16)
    weights = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert all(not n.meta["snn_batched"] for n in weights)


class _OptionalMask(nn.Module):
    """forward(x, attn_mask=None) as timm's ViT writes it: the optional argument goes into an op as is."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 4)

    def forward(self, x, attn_mask=None, scale=1.0):
        x = torch.relu(self.conv(x) * scale)
        return self.fc(F.dropout(x.flatten(1), p=0.0) if attn_mask is None else x.flatten(1))


def test_optional_forward_arguments_take_their_defaults():
    gm = trace(_OptionalMask())
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]  # attn_mask, scale: constants
    converts_and_agrees(_OptionalMask(), T=128, tol=0.05)


class _Rolled(nn.Module):
    """Swin's shifted windows: torch.roll over the spatial dims (values move within each sample)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = torch.roll(torch.relu(self.conv(x)), shifts=(3, -2), dims=(2, 3))
        return self.fc(x.flip(3).flatten(1))


class _CachedTensor(nn.Module):
    """A tensor cached as a plain attribute and used in forward (timm's attention-bias cache at eval): fx lifts
    it into the graph as `_tensor_constant0`."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 4)
        self.cache = {"cpu": torch.linspace(-0.5, 0.5, 16)}

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x) + self.cache["cpu"]).flatten(1))


def test_roll_and_flip_within_samples_convert():
    converts_and_agrees(_Rolled(), T=128, tol=0.05)


def test_roll_over_the_batch_is_refused():
    class M(nn.Module):
        def forward(self, x):
            return torch.relu(torch.roll(x, 1, 0))

    with pytest.raises(ConversionError, match="roll"):
        snnconv.convert(M(), T=8, calib=torch.rand(4, 3, 8, 8))


def test_tensor_constants_lifted_by_fx_stay_and_keys_do_not_change():
    converts_and_agrees(_CachedTensor(), T=128, tol=0.05)


class _ShiftedWindowAttention(nn.Module):
    """Swin's shifted-window attention as timm writes it: roll, window partition (B read from the tensor,
    windows [B * nW, ws * ws, C]), attention over each window with the shift's mask (B_ // nW), softmax,
    window reverse (view(B, ...) of a [B * nW, ...] tensor), roll back."""

    def __init__(self, c=8, ws=4, heads=2, shift=2):
        super().__init__()
        self.ws, self.heads, self.shift = ws, heads, shift
        self.embed = nn.Conv2d(3, c, 4, stride=2, padding=1)  # 16x16 -> 8x8 tokens: 4 windows of 4x4
        self.qkv, self.proj, self.head = nn.Linear(c, 3 * c), nn.Linear(c, c), nn.Linear(c, 4)
        mask = torch.zeros(8, 8)  # Swin's shift mask: tokens from different regions do not attend to each other
        mask[-shift:, :] += 1
        mask[:, -shift:] += 2
        m = mask.view(2, ws, 2, ws).permute(0, 2, 1, 3).reshape(4, ws * ws)
        self.register_buffer("mask", (m.unsqueeze(1) != m.unsqueeze(2)).float() * -100.0)

    def forward(self, x):
        x = torch.relu(self.embed(x)).permute(0, 2, 3, 1)  # [B, H, W, C]
        B, H, W, C = x.shape
        ws, s, nW = self.ws, self.shift, self.mask.shape[0]
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn.view(B_ // nW, nW, self.heads, N, N) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, N, N).softmax(-1)
        x = self.proj((attn @ v).transpose(1, 2).reshape(B_, N, -1))
        x = x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        x = torch.relu(torch.roll(x, shifts=(s, s), dims=(1, 2)))
        return self.head(x.mean((1, 2)))


def test_window_attention_sizes_follow_the_folded_batch():
    """Sizes k times the batch (B_ = B * nW of the windows) are recorded with their factor and rebuilt from the
    reshaped tensor's own batch: size(0) // k_src * k (fold_batch_sizes), so partition, masked attention and
    reverse follow [T * N * nW, ...]; the SNN approaches the ANN as T grows."""
    torch.manual_seed(0)
    model = _ShiftedWindowAttention().eval()
    gm = annotate(trace(model), torch.rand(4, 3, 16, 16))
    ints = {n.meta["snn_batch_factor"] for n in gm.graph.nodes if n.meta.get("snn_batch_value") == "int"}
    assert ints == {1, 4}, ints  # B and B_ // nW; B_ = 4 B
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(5, 3, 16, 16)
    snn = snnconv.convert(model, T=16, calib=calib)
    assert list(snn.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        rel = {}
        for T in (16, 256):
            snn.T = T
            rel[T] = ((snn(x) - ref).norm() / ref.norm()).item()
    assert rel[256] < rel[16] and rel[256] < 0.01, rel


class _TableMlp(nn.Module):
    """A module applied to a constant table (timm's RelPosMlp: Linear -> ReLU -> Linear on log-spaced
    coordinates) whose output is added to the features: step-invariant, no neurons there."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 4)
        self.register_buffer("coords", torch.linspace(-1, 1, 16 * 16 * 2).view(16 * 16, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        bias = self.mlp(self.coords).t().reshape(1, 8, 16, 16)
        return self.fc(torch.relu(self.conv(x) + bias).flatten(1))


def test_modules_on_constants_are_constants():
    gm = annotate(trace(_TableMlp().eval()), torch.rand(4, 3, 16, 16))
    kinds = {n.target: n.meta["snn_kind"] for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds["mlp.0"] == kinds["mlp.1"] == kinds["mlp.2"] == "constant", kinds
    converts_and_agrees(_TableMlp(), T=128, tol=0.05)
