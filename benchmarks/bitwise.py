"""Outputs of the benchmark nets, to check that a change of structure changed no bit of behaviour.

    python benchmarks/bitwise.py --write before.pt     # at the old commit (see --help for importing it)
    python benchmarks/bitwise.py --against before.pt   # at the new one: exit 1 and the differing rows if any

Each net (cpu_inference's VGG MNIST, ResNet-18 CIFAR, torchvision ResNet-18; random weights, fixed seeds) is
converted in every way the CPU runtime can run it here (default, float32 layers, each exact int8 mode, torch
neurons) and run on a fixed input; the file holds every output and every threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NETS = ("vgg_mnist", "resnet18_cifar", "torchvision_resnet18")


def variants():
    import snnconv
    from snnconv.runtime import integer_spikes as int8

    float32 = sorted(snnconv.passes.OPTIONAL - {"integer_spikes"})
    yield "default", {}, {}
    yield "float32", {"passes": float32}, {}
    yield "torch_neurons", {"backend": "torch"}, {}
    for mode in int8.MODES:
        if int8.exact(mode):
            yield f"int8_{mode}", {}, {"SNNCONV_INT8": mode}


@contextlib.contextmanager
def environment(**env: str):
    """The environment itself, not snnconv.config.Context: the old tree compared against may predate it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _model(net: str):
    """cpu_inference's net with random weights (its VGG takes trained ones where a benchmark cached them)."""
    from cpu_inference import _net
    from mnist_models import vgg_mnist

    if net != "vgg_mnist":
        return _net(net)
    torch.manual_seed(0)
    return vgg_mnist().eval(), (1, 28, 28)


def outputs(nets=NETS, T: int = 4, batch: int = 8) -> dict[str, torch.Tensor]:
    import snnconv

    found = {}
    for net in nets:
        model, shape = _model(net)
        g = torch.Generator().manual_seed(1)
        calib, x = torch.rand(32, *shape, generator=g), torch.rand(batch, *shape, generator=g)
        for name, options, env in variants():
            with environment(**env):
                snn = snnconv.convert(model, T=T, calib=calib, **options)
            found[f"{net}/{name}/output"] = snn(x)
            for layer, theta in snn.thresholds().items():
                found[f"{net}/{name}/threshold/{layer}"] = theta
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="save this tree's outputs here")
    group.add_argument("--against", help="compare this tree's outputs with a saved file")
    p.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    a = p.parse_args()
    torch.set_num_threads(1)  # the same reduction order in both runs
    found = outputs(a.nets)
    if a.write:
        torch.save(found, a.write)
        print(f"wrote {len(found)} tensors to {a.write}")
        return 0
    saved = torch.load(a.against, weights_only=True)
    differ = sorted(k for k in saved.keys() & found.keys() if not torch.equal(saved[k], found[k]))
    only = sorted(saved.keys() ^ found.keys())
    for k in differ:
        print(f"differs: {k} (max |diff| {(saved[k] - found[k]).abs().max().item():.3g})")
    for k in only:
        print(f"in one run only: {k}")
    print(
        f"{len(saved.keys() & found.keys()) - len(differ)} of {len(saved.keys() | found.keys())} tensors bitwise equal"
    )
    return 1 if differ or only else 0


if __name__ == "__main__":
    sys.exit(main())
