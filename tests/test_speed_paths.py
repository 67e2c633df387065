"""The speed options give the predictions of plain fp32 eager: bf16 autocast, channels-last,
torch.compile, CUDA graphs (the last on CUDA only).

The model is a small real Segmenter trained for a few steps to map colours to classes, so its
predictions mean something (high accuracy) and most pixels have a clear winning class; a reduced
precision path that broke the network would show up as disagreement.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from sceneparse.engine.infer import Predictor

NUM_CLASSES = 3
SIZE = 32
CELL = 8  # label blocks of CELL x CELL pixels, one class colour each
COLOURS = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.float32)



def colour_blocks(n: int, gen: torch.Generator):
    """uint8 images N x 3 x SIZE x SIZE of noisy class-coloured blocks, and their labels."""
    blocks = SIZE // CELL
    labels = torch.randint(0, NUM_CLASSES, (n, blocks, blocks), generator=gen)
    labels = labels.repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)
    images = COLOURS[labels].permute(0, 3, 1, 2) + 25 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def trained():
    from sceneparse.data.transforms import normalize
    from sceneparse.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", "c1", NUM_CLASSES, encoder_options={"out_indices": (0, 1, 2)})
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        images, labels = colour_blocks(4, gen)
        loss = F.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.eval()
    images, labels = colour_blocks(4, torch.Generator().manual_seed(5))
    return model, images, labels


def predict_all(predictor: Predictor, images) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.stack([predictor.probabilities(img) for img in images])
    return probs, probs.argmax(1)


def test_bf16_autocast_predicts_like_fp32(trained):
    model, images, labels = trained
    probs32, pred32 = predict_all(Predictor(copy.deepcopy(model)), images)
    probs16, pred16 = predict_all(Predictor(copy.deepcopy(model), amp_dtype=torch.bfloat16), images)
    assert (pred32 == labels).float().mean() > 0.9  # the model learnt the task
    assert (probs16 - probs32).abs().max() > 1e-4  # bf16 really ran (it is not bit-identical)
    assert (pred16 == pred32).float().mean() >= 0.995


def test_channels_last_matches_plain(trained):
    model, images, _ = trained
    plain, _ = predict_all(Predictor(copy.deepcopy(model)), images)
    cl_predictor = Predictor(copy.deepcopy(model), channels_last=True)
    weight = cl_predictor.model.encoder.body.conv1[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    cl, _ = predict_all(cl_predictor, images)
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-5)


def _have_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "clang++", "c++"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_compiler(), reason="torch.compile (inductor, CPU) needs a C++ compiler: none found")
def test_compiled_predictor_matches_eager(trained):
    from torch._dynamo.utils import counters

    model, images, _ = trained
    eager = Predictor(copy.deepcopy(model))
    compiled = Predictor(copy.deepcopy(model), compile=True)
    graphs_before = counters["stats"]["unique_graphs"]
    # 32 x 32: a multiple of the encoder's stride, so encoder and decoder run (compiled) on their
    # own; 30 x 28: not one, so the whole Segmenter runs (its own compiled graph, padding inside).
    for image in (images[0], images[1][:, :30, :28]):
        torch.testing.assert_close(compiled.probabilities(image), eager.probabilities(image), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= graphs_before + 3  # encoder, decoder, Segmenter: compiled
    with pytest.raises(ValueError, match="compile must be"):
        Predictor(copy.deepcopy(model), compile="fastest")


@pytest.mark.slow
@pytest.mark.skipif(not _have_compiler(), reason="torch.compile (inductor, CPU) needs a C++ compiler: none found")
def test_compile_with_dynamic_shapes_trains_and_predicts(trained):
    """Sizes that change (CSAIL's per-batch scales, eval images): dynamic=True gives symbolic sizes
    from the first call, as torch's automatic dynamic shapes do from the second size on. The
    Segmenter's padding arithmetic must lower (a `%` of a size did not, in torch 2.11 to 2.14)."""
    from sceneparse.engine.train import segmentation_loss

    eager, model = copy.deepcopy(trained[0]).train(), copy.deepcopy(trained[0]).train()
    compiled = torch.compile(model, dynamic=True)
    criterion = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    for size in ((30, 28), (26, 36)):  # padded to the stride inside (one graph), and cropped back
        x, y = torch.randn(2, 3, *size, generator=gen), torch.randint(0, NUM_CLASSES, (2, *size), generator=gen)
        outputs = []
        for net in (eager, compiled):
            out = net(x)
            segmentation_loss(out, y, criterion, 0.4).backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
        assert outputs[0].shape == (2, NUM_CLASSES, *size)
    grads = {name: p.grad for name, p in eager.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-4, msg=name)
    eager.eval(), model.eval()
    with torch.no_grad():
        for size in ((31, 29), (27, 21)):
            x = torch.randn(1, 3, *size, generator=gen)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")
def test_cuda_graph_replay_matches_eager(trained):
    from sceneparse.engine.bench import cuda_graph_replay

    device = torch.device("cuda")
    model = copy.deepcopy(trained[0]).to(device).eval()
    x = torch.randn(2, 3, SIZE, SIZE, device=device)
    with torch.no_grad():
        eager = model(x).clone()

    def forward():
        with torch.no_grad():
            return model(x)

    replay, output = cuda_graph_replay(forward, device)
    x.copy_(torch.randn(2, 3, SIZE, SIZE, device=device))  # new data in the captured input
    replay()
    with torch.no_grad():
        torch.testing.assert_close(output, model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(output, eager)
