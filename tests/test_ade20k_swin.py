"""configs/ade20k/swin_tiny-upernet.yaml end to end on the CPU: its encoder weights downloaded as
safetensors from a local HTTP server (as timm publishes them on the Hugging Face hub), two AdamW
steps on the real ADE20K samples, then `sceneparse eval`. Swin is shrunk (one block per stage,
16 channels) so that it runs in seconds; everything else is the shipped config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from sceneparse.cli.main import main
from test_download import FileServer
from test_voc_cityscapes import need_shared

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ade20k" / "swin_tiny-upernet.yaml"
SMALL_SWIN = {"depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "embed_dim": 16}


def test_swin_upernet_config_downloads_its_weights_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    samples = need_shared("ade20k_samples")
    torch.manual_seed(0)
    imagenet = timm.create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN).state_dict()
    save_file({k: v.contiguous() for k, v in imagenet.items()}, tmp_path / "model.safetensors")
    server = FileServer()
    server.files["/timm/swin/resolve/main/model.safetensors"] = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setenv("SCENEPARSE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    options = "{drop_path_rate: 0.3, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], embed_dim: 16}"
    try:
        assert main(["train", str(CONFIG), f"data.root={samples}", f"output_dir={run}",
                     f"model.encoder_weights={server.url}/timm/swin/resolve/main/model.safetensors",
                     f"model.encoder_options={options}", "model.decoder_options={fpn_dim: 32}",
                     "data.train_split=val", "data.val_split=train",  # the samples: 5 val images, 1 train
                     "data.crop_size=64", "data.num_workers=0", "train.iterations=2", "train.val_every=0",
                     "train.log_every=1", "train.lr_encoder=0"]) == 0
    finally:
        server.close()
    assert [path for path, _, _ in server.log] == ["/timm/swin/resolve/main/model.safetensors"]
    saved = torch.load(run / "last.pt", weights_only=True)
    state, optimizer = saved["model"]["state_dict"], saved["train_state"]["optimizer"]
    # AdamW at encoder lr 0: the encoder is still exactly the downloaded ImageNet weights
    key = "encoder.body.layers_2.blocks.0.attn.qkv.weight"
    assert torch.equal(state[key], imagenet["layers.2.blocks.0.attn.qkv.weight"])
    assert all("exp_avg" in s for s in optimizer["state"].values())
    groups = {g["name"]: g for g in optimizer["param_groups"]}
    assert (groups["decoder"]["weight_decay"], groups["decoder"]["betas"]) == (0.01, (0.9, 0.999))
    # step i runs at schedule position i - 1: linear warm-up i/1500 times poly (power 1.0, 2 iterations)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in steps] == pytest.approx([6e-5 * i / 1500 * (1 - (i - 1) / 2) for i in (1, 2)])
    assert [r["lr_encoder"] for r in steps] == [0.0, 0.0]
    # Swin's relative position tables are exempt from weight decay, as timm declares them
    tables = [k for k in state if k.endswith("relative_position_bias_table")]
    one_d = [k for k, v in state.items() if k.startswith("encoder.") and v.ndim <= 1]
    assert len(tables) == 4 and len(groups["encoder_no_decay"]["params"]) == len(one_d) + len(tables)
    assert main(["eval", "--model", str(run / "last.pt"), "--config", str(run / "config.yaml"),
                 "--output", str(run / "eval"), "--workers", "0"]) == 0
    capsys.readouterr()
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["num_images"] == 1 and len(report["classes"]) == 150
