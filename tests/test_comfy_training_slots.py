"""comfy_training.tensor_slots: the flat list the ComfyUI backend checks for inference tensors at every training
step instead of walking the UNet's modules (host time: the step is host-bound). It must name exactly what
named_parameters and named_buffers name, and reach the tensor that is there now."""

import torch

from i2vedit_core.backends import comfy_training
from i2vedit_core.tiny import tiny_unet


def test_slots_are_the_models_parameters_and_buffers():
    unet = tiny_unet(seed=0)
    unet.register_buffer("extra_state", torch.zeros(3))
    slots = comfy_training.tensor_slots(unet)
    names = [name for name, _, _, _ in slots]
    assert sorted(names) == sorted([n for n, _ in unet.named_parameters()] + [n for n, _ in unet.named_buffers()])
    parameters = dict(unet.named_parameters())
    for name, module, attr, is_parameter in slots:
        assert getattr(module, attr) is (parameters[name] if is_parameter else unet.get_buffer(name))
    assert {is_parameter for name, _, _, is_parameter in slots if name == "extra_state"} == {False}


def test_a_shared_parameter_is_listed_once():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert [name for name, _, _, _ in comfy_training.tensor_slots(model)] == ["0.weight", "0.bias"]


def test_the_switch_lists_the_slots_once():
    switch = comfy_training.Switch(lora=None)
    model = torch.nn.Linear(2, 2)
    assert switch.tensor_slots(model) is switch.tensor_slots(model)
