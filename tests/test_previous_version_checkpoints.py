"""Checkpoints written by refvision 0.1.0 (tests/fixtures/v0.1.0: RefConv on timm's test_resnet, its
training form and its deploy form) load with the current code and keep their meaning."""

from pathlib import Path

import timm
import torch

from refvision import reparameterize
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.nn import RefConv
from refvision.surgery.convert import converted_layers

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1.0"


def test_refconv_checkpoints_of_0_1_0_load_and_fold_to_their_deploy_form() -> None:
    train, train_hparams = load_task_checkpoint(FIXTURES / "refconv-train.ckpt")
    deploy, deploy_hparams = load_task_checkpoint(FIXTURES / "refconv-deploy.ckpt")
    # 0.1.0 wrote the method's options flat in `conv`.
    assert train_hparams["conv"] == {"kind": "refconv", "select": "kxk", "map_k": 3, "init": "default"}
    assert deploy_hparams["conv"] == {"kind": "none"}
    layers = converted_layers(train.model)
    assert layers and all(type(layer) is RefConv and layer.map_k == 3 for _, layer in layers)
    assert not converted_layers(deploy.model)

    folded = reparameterize(train.model).state_dict()
    expected = deploy.model.state_dict()
    assert folded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(folded[key], value), key

    vanilla = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    vanilla.load_state_dict(expected, strict=True)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(vanilla.eval()(x), deploy.model.eval()(x), rtol=0, atol=0)
