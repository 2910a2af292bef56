"""Small networks the tests convert (every supported op form appears in at least one), and a spike recorder."""

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision architectures that convert (random weights; the zoo, export and other tests share the list)
TORCHVISION_ZOO = [
    "resnet18",
    "mobilenet_v2",
    "shufflenet_v2_x0_5",
    "googlenet",
    "squeezenet1_1",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg11",
    "vgg16",
    "vgg16_bn",
    "alexnet",
    "squeezenet1_0",
    "densenet121",
    "inception_v3",
    "shufflenet_v2_x1_0",
    "mnasnet0_5",
    "regnet_x_400mf",
]


class ResCatNet(nn.Module):
    """Conv/BN stem, a residual block (`+=`, torch.add), a cat branch, max/avg pooling, view head."""

    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.a1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.a2 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.Conv2d(c, c // 2, 1)
        self.b2 = nn.Conv2d(c, c // 2, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(2 * c * 4 * 4, classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = F.relu(self.bn1(self.a1(x)))
        y = self.a2(y)
        y += x
        x = torch.relu(y)
        z = torch.cat([self.b1(x).relu(), F.relu6(self.b2(x))], dim=1)
        x = torch.add(x, z)
        x = F.adaptive_avg_pool2d(torch.clamp(x, min=0), 4)
        x = self.drop(x)
        x = torch.cat([x, x * 0.5], 1)
        return self.fc(x.view(x.size(0), -1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2)
    return model.eval()


def notebook_net(seed: int = 0, C: int = 8) -> nn.Module:
    """The seeds' notebook net (Linear-IF-Linear-IF) as its ANN: Linear-ReLU-Linear-ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(C, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).eval()


def record_spikes(snn, run):
    """(what run() returns, every neuron's outputs over all its calls during run(), concatenated)."""
    rec = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: rec.setdefault(n, []).append(o.clone()))
        for n, m in snn.neurons().items()
    ]
    try:
        y = run()
    finally:
        for h in hooks:
            h.remove()
    return y, {n: torch.cat(v) for n, v in rec.items()}


# a conversion that does not depend on T (no threshold search, no bias calibration) with binary spikes:
# for tests of something other than the accuracy methods (passes, runtimes, export), and for runs at
# another T than the conversion's
PLAIN = {"method": "percentile", "bias_calibration": False, "signed_spikes": False}
BINARY = {"signed_spikes": False}  # binary spikes: what the int8 layers, the CUDA kernel and NIR take


# ---- transformers and smooth-activation CNNs (passes/compensate.py), each written the ways people write them


class Attention(nn.Module):
    """timm's attention: one qkv projection, heads split by reshape + permute, q @ k^T, softmax, attn @ v;
    `mode` 'unbind' (timm), 'index' (qkv[0], qkv[1], qkv[2]) or 'sdpa' (F.scaled_dot_product_attention)."""

    def __init__(self, dim: int, heads: int, mode: str = "unbind"):
        super().__init__()
        self.heads, self.mode, self.scale = heads, mode, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.mode == "sdpa":
            x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        else:
            q, k, v = qkv.unbind(0) if self.mode == "unbind" else (qkv[0], qkv[1], qkv[2])
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TorchAttention(nn.Module):
    """nn.MultiheadAttention (its fused fast path in eval mode), batch first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mode: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TorchAttention(dim, heads) if mode == "mha" else Attention(dim, heads, mode)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.GELU() if mode == "unbind" else nn.GELU(approximate="tanh")
        self.functional = mode == "sdpa"

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        n2 = self.norm2
        h = self.fc1(F.layer_norm(x, x.shape[-1:], n2.weight, n2.bias) if self.functional else n2(x))
        return x + self.fc2(F.gelu(h) if self.functional else self.act(h))


class TinyViT(nn.Module):
    """Patch embedding, cls token (expand to the batch), position embedding, pre-norm blocks, head on x[:, 0]."""

    def __init__(self, mode: str = "unbind", dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 7, hw=28):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (hw // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mode) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, spelled: str):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)
        self.spelled = spelled

    def forward(self, x):
        s = self.reduce(x.mean((2, 3), keepdim=True))
        s = s * s.sigmoid() if self.spelled == "mul" else F.silu(s)
        return x * (self.expand(s).sigmoid() if self.spelled == "mul" else F.hardsigmoid(self.expand(s)))


class SiLUSENet(nn.Module):
    """EfficientNet/MobileNetV3-style: conv-BN-SiLU, a depthwise conv, squeeze-and-excitation gates, Hardswish."""

    def __init__(self, spelled: str = "mul"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            SqueezeExcite(16, spelled),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.Hardswish(),
            SqueezeExcite(32, spelled),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


MODERN_NETS = {
    "vit": lambda: TinyViT("unbind"),
    "vit_index": lambda: TinyViT("index"),
    "vit_sdpa": lambda: TinyViT("sdpa"),
    "vit_mha": lambda: TinyViT("mha"),
    "silu_se": lambda: SiLUSENet("mul"),
    "silu_se_functional": lambda: SiLUSENet("functional"),
}
