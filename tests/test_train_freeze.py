"""``[train] freeze``: the weights named stay as loaded, BatchNorm statistics included."""

import pytest
import torch
from torch import nn

from mmchat.errors import MMChatError
from mmchat.training.freeze import freeze_named, hold_frozen


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({
            "image": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)),
            "voice": nn.Linear(4, 4)})
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.encoders["image"](x) + self.encoders["voice"](x))


def train_once(net):
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.train()
    hold_frozen(net)
    loss = net(torch.randn(16, 4) * 3 + 1).square().mean()
    loss.backward()
    opt.step()


def test_frozen_part_keeps_weights_and_batchnorm_statistics_and_the_rest_trains():
    torch.manual_seed(1)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    held = freeze_named(net, ["encoders.image"])
    assert held == ["encoders.image.0.weight", "encoders.image.0.bias",
                    "encoders.image.1.weight", "encoders.image.1.bias"]
    train_once(net)
    after = net.state_dict()
    for name, value in before.items():
        if name.startswith("encoders.image."):
            assert after[name].equal(value), name  # running_mean/var and the batch count too
        elif not name.endswith("num_batches_tracked"):
            assert not after[name].equal(value), name
    assert not net.encoders["image"].training and net.head.training


def test_a_single_weight_can_be_frozen_and_its_module_still_trains_the_other():
    net = Net()
    bias = net.head.bias.clone()
    assert freeze_named(net, ["head.bias."]) == ["head.bias"]
    train_once(net)
    assert net.head.bias.equal(bias) and net.head.training  # half frozen: not held


def test_a_name_that_is_no_part_of_the_model_is_refused_with_the_parts():
    with pytest.raises(MMChatError, match=r"'encoders\.imag'.*encoders\.image, "
                                          r"encoders\.voice, head"):
        freeze_named(Net(), ["encoders.imag"])
