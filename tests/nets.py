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
