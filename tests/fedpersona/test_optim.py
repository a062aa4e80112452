"""The server's optimizer (fedpersona/optim.py): SGD, heavy-ball momentum, Adam on the cohort's mean update."""

import pytest
import torch

from fedpersona.optim import ServerOptimizer


def test_fedavgm_is_heavy_ball_momentum():
    w = {"w": torch.zeros(3)}
    d1, d2 = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 2.0, 0.0])
    opt = ServerOptimizer("fedavgm", 0.5, momentum=0.9)
    w1 = opt.step(w, {"w": d1})
    torch.testing.assert_close(w1["w"], 0.5 * d1)
    w2 = opt.step(w1, {"w": d2})
    torch.testing.assert_close(w2["w"], 0.5 * d1 + 0.5 * (0.9 * d1 + d2))
    again = ServerOptimizer("fedavgm", 0.5, momentum=0.9)
    again.load_state_dict(opt.state_dict())  # the momentum survives a checkpoint
    torch.testing.assert_close(again.step(w2, {"w": d2})["w"], opt.step(w2, {"w": d2})["w"])
    # momentum 0 is plain SGD
    plain = ServerOptimizer("fedavgm", 0.5, momentum=0.0)
    torch.testing.assert_close(plain.step(plain.step(w, {"w": d1}), {"w": d2})["w"], 0.5 * (d1 + d2))


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="server.optimizer"):
        ServerOptimizer("lion", 1.0)
