"""The networks the accuracy benchmarks train on CPU and cache in .cache/: MNIST (one epoch), digits (30),
Fashion-MNIST (Debian's `dataset-fashion-mnist`: a VGG and a ResNet with a stem max pool, a few epochs; two
small ViTs written as timm writes them, one with eager softmax attention and nn.GELU, one with
F.scaled_dot_product_attention and F.gelu; an EfficientNet-style SiLU CNN with squeeze-and-excitation gates)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv import QCFS
from snnconv.data import load_mnist

CACHE = Path(__file__).resolve().parent.parent / ".cache"
_ROOT = Path(__file__).resolve().parent.parent
MNIST = next(
    (
        p
        for p in (_ROOT.parent / "shared" / "data" / "mnist", _ROOT.parent.parent / "shared" / "data" / "mnist")
        if p.is_dir()
    ),
    _ROOT.parent / "shared" / "data" / "mnist",
)  # beside the checkout or one level up
FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def _act(qcfs_levels: int | None) -> nn.Module:
    return nn.ReLU(inplace=True) if qcfs_levels is None else QCFS(qcfs_levels, threshold=4.0)


def vgg_mnist(hw: int = 28, qcfs_levels: int | None = None) -> nn.Module:
    """VGG-style: 4 conv-BN-act, 2 max pools, a hidden linear-act: 5 neuron layers."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), _act(qcfs_levels)]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (hw // 4) ** 2, 128),
        _act(qcfs_levels),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + 3 residual blocks (7 neuron layers), global average pool, linear head."""

    def __init__(self, hw: int = 28):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class StemPoolResNet(nn.Module):
    """Conv-BN-ReLU stem, 2x2 max pool, four basic residual blocks (9 neuron layers), global average pool."""

    def __init__(self, hw: int = 28):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 64, 1), _Block(64, 128, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class Attention(nn.Module):
    """Multi-head self-attention written as timm's eager path: one qkv Linear, unbind, softmax(q k^T * scale) v."""

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x


class SdpaAttention(Attention):
    """The same attention through F.scaled_dot_product_attention, q, k, v taken by indexing (timm's fused path)."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x


class Mlp(nn.Module):
    """Linear -> nn.GELU() -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FunctionalGeluMlp(Mlp):
    """The same MLP with F.gelu in forward instead of the nn.GELU module."""

    def forward(self, x):
        x = self.fc1(x)
        x = F.gelu(x)
        x = self.fc2(x)
        return x


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_layer=Attention, mlp_layer=Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """A small ViT written as timm writes it: conv patch embedding, a cls token, learned position embedding,
    pre-norm blocks, final LayerNorm, linear head on the cls token. Patch 7 on 28x28: 16 patches + cls."""

    def __init__(
        self,
        hw: int = 28,
        patch: int = 7,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
        attn_layer=Attention,
        mlp_layer=Mlp,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (hw // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, mlp_ratio, attn_layer, mlp_layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, N, C]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class SqueezeExcite(nn.Module):
    """EfficientNet's squeeze-and-excitation: mean over H, W, 1x1 reduce, SiLU, 1x1 expand, sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_reduce(s)
        s = F.silu(s)
        s = self.conv_expand(s)
        return x * s.sigmoid()


class DepthwiseSeparable(nn.Module):
    """EfficientNet's first block (expansion 1): 3x3 depthwise-BN-SiLU, SE, 1x1 project-BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(cin, max(8, cin // 4))
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_dw(x)))
        x = self.se(x)
        return self.bn2(self.conv_pw(x))


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand-BN-SiLU, 3x3 depthwise-BN-SiLU, SE, 1x1 project-BN, residual where shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(mid, max(8, cin // 4))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = x + shortcut
        return x


class SiLUSENet(nn.Module):
    """EfficientNet/MobileNetV3-style: conv-BN-SiLU stem (28x28), a depthwise-separable block (stride 2, 14x14)
    and three MBConv blocks (one stride 2, 7x7; two residual), all with SE; 1x1 conv-BN-SiLU head, global
    average pool, linear classifier."""

    def __init__(self, hw: int = 28):
        super().__init__()
        self.conv_stem = nn.Conv2d(1, 24, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.act1 = nn.SiLU(inplace=True)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(24, 32, 2),
            InvertedResidual(32, 32, 1),
            InvertedResidual(32, 64, 2),
            InvertedResidual(64, 64, 1),
        )
        self.conv_head = nn.Conv2d(64, 128, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(128)
        self.act2 = nn.SiLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.bn2(self.conv_head(x)))
        return self.classifier(self.global_pool(x).flatten(1))


FACTORIES = {
    "vgg": vgg_mnist,
    "resnet": SmallResNet,
    "vgg_qcfs4": lambda hw=28: vgg_mnist(hw, qcfs_levels=4),
    "resnet_pool": StemPoolResNet,
    "vit": VisionTransformer,
    "vit_sdpa": lambda hw=28: VisionTransformer(hw, attn_layer=SdpaAttention, mlp_layer=FunctionalGeluMlp),
    "silu_se": SiLUSENet,
}
# by data, or (arch, data); the small ViTs (no convolutional prior) need more epochs than the CNNs
EPOCHS = {"digits": 30, "mnist": 1, "fashion": 3, ("vit", "fashion"): 10, ("vit_sdpa", "fashion"): 10}
SUBSET: dict = {}  # (arch, data) -> training images used (the first n of a fixed shuffle), where not all


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def dataset(name: str, data_dir: Path = MNIST):
    if name == "digits":
        return digits_data()
    root = FASHION if name == "fashion" else data_dir
    return load_mnist(root, "train"), load_mnist(root, "test")


def trained(arch: str, data: str = "mnist", data_dir: Path = MNIST, seed: int = 0, device: str = "cpu") -> nn.Module:
    """Train once (Adam, batch 64, cosine learning rate from 1e-3, on `device`; initial weights and batch
    order from `seed`) and cache the state_dict; later calls load it."""
    hw = 8 if data == "digits" else 28
    torch.manual_seed(seed)
    model = FACTORIES[arch](hw)
    epochs = EPOCHS.get((arch, data), EPOCHS[data])
    subset = SUBSET.get((arch, data))
    path = CACHE / f"{arch}_{data}_e{epochs}_s{seed}{f'_n{subset}' if subset else ''}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    (x, y), _ = dataset(data, data_dir)
    if subset:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:subset]
        x, y = x[keep], y[keep]
    x, y, model = x.to(device), y.to(device), model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if data == "fashion" else None
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if epochs > 1:
            print(f"  {arch}/{data} epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for idx in torch.randperm(len(x), device=device).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
    print(f"trained {arch} on {data} for {epochs} epoch(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    CACHE.mkdir(exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return model.cpu().eval()
