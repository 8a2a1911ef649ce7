"""Exact byte accounting of optimizer state, peers' helper objects included."""

import torch

import flora
from flora_experiments.memory import optimizer_state_bytes, parameter_bytes, tensor_bytes


def test_adamw_state_is_two_moments_and_the_step_counters():
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    numel = 16 * 8 + 8
    assert optimizer_state_bytes(opt) == 2 * 4 * numel + 2 * 4  # float32 step tensors


def test_flora_agrees_with_its_own_count():
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 8))
    opt = flora.Flora(model.named_parameters(), rank=4)
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == opt.state_bytes() > 0


class Projector:  # like GaLore's: a matrix kept on an object in the state
    def __init__(self):
        self.ortho_matrix = torch.zeros(10, 3)
        self.rank = 3


def test_objects_views_and_parameters():
    base = torch.zeros(100)
    assert tensor_bytes({"a": base, "b": base[:10], "c": [base.view(10, 10)]}) == 400
    assert tensor_bytes({"p": Projector(), "n": None, "s": "text"}) == 120
    p = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["alias"] = p  # a state that refers to its parameter is not charged
    opt.state[p]["proj"] = Projector()
    assert optimizer_state_bytes(opt) == 120
    q = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    assert parameter_bytes([p, q]) == 32 and parameter_bytes([p, q], trainable_only=True) == 20
