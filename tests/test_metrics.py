"""The probe-free kNN view of an encoder: hand-checkable votes, and ACC/ASR on a toy encoder."""

from __future__ import annotations

import torch
from torch import nn

from securetl.interfaces import LabeledSet, RunContext
from securetl.metrics import TriggerEval, knn_evaluate, knn_predict


def test_knn_votes_are_weighted_by_similarity():
    # three bank points at 0 degrees (label 0), two at 90 degrees (label 1)
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0], [0.01, 1.0]])
    bank_y = torch.tensor([0, 0, 0, 1, 1])
    # all five vote: label 1's two votes, from right beside the query, outweigh label 0's three from 80 degrees
    near_1 = torch.tensor([[0.17, 0.98]])
    assert knn_predict(near_1, bank, bank_y, num_classes=2, k=5, t=0.1).tolist() == [1]
    # with equal similarity to both groups, the group with more votes wins
    middle = torch.tensor([[1.0, 1.0]])
    assert knn_predict(middle, bank, bank_y, num_classes=2, k=5, t=0.1).tolist() == [0]
    # k=1 is the nearest neighbour
    assert knn_predict(torch.tensor([[0.1, 1.0]]), bank, bank_y, 2, k=1).tolist() == [1]


class MeanColour(nn.Module):
    """A toy encoder: the image's mean colour."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _solid(colour, n):
    return (torch.tensor(colour).view(1, 3, 1, 1).expand(n, 3, 4, 4) * 255).to(torch.uint8).contiguous()


def test_knn_evaluate_scores_a_trigger_that_moves_embeddings_to_the_target():
    red, green, blue = (1.0, 0.1, 0.1), (0.1, 1.0, 0.1), (0.1, 0.1, 1.0)
    bank = LabeledSet(
        torch.cat([_solid(c, 10) for c in (red, green, blue)]), torch.arange(3).repeat_interleave(10)
    )
    test = LabeledSet(
        torch.cat([_solid(c, 4) for c in (red, green, blue)]), torch.arange(3).repeat_interleave(4)
    )
    not_target = lambda y: y != 0  # noqa: E731

    def make_red(x):
        return torch.tensor(red).view(1, 3, 1, 1).expand_as(x).clone()

    triggers = [
        TriggerEval("encoder", make_red, 0, not_target, "non-target"),
        TriggerEval("data", lambda x: x, 0, not_target, "non-target"),
    ]
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=3, progress=False)
    out = knn_evaluate(MeanColour(), bank, test, triggers, ctx)
    assert out["knn_acc"] == 1.0
    assert out["knn_asr/encoder"] == out["knn_asr"] == 1.0  # the first trigger is the headline one
    assert out["knn_asr/data"] == 0.0  # a trigger that changes nothing leaves every image in its class
