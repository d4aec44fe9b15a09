"""Where the heads meet the features on the autograd graph (``split_at_features``): the edges into the
features and the leaves each loss reaches, read against the model's own structure, and the graphs that
cannot be split."""

import pytest
import torch

from gradsurgery.sources._feature_graph import split_at_features


def trunk_and_heads(num_tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(num_tasks))
    with torch.no_grad():
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    return trunk, heads, torch.randn(5, 4, generator=gen)


def test_each_loss_owns_its_edges_into_z_and_its_head_parameters():
    trunk, heads, x = trunk_and_heads()
    z = torch.tanh(trunk(x))
    losses = [head(z).pow(2).mean() for head in heads]
    split = split_at_features(losses, [z])
    assert split is not None
    for i, head in enumerate(heads):
        assert split.reached[i] == {id(head.weight), id(head.bias)}
        assert [(k, j) for _, k, j in split.edges[i]] == [(1, 0)]  # addmm(bias, z, Wᵀ): z is its input 1
        node, k, _ = split.edges[i][0]
        assert node.next_functions[k][0] is z.grad_fn


def test_a_head_reading_z_twice_has_an_edge_for_each_read():
    trunk, heads, x = trunk_and_heads(2)
    z = torch.tanh(trunk(x))
    losses = [heads[0](z * z).mean(), heads[1](z).mean()]
    split = split_at_features(losses, [z])
    assert split is not None
    assert [len(edges) for edges in split.edges] == [2, 1]  # z * z: both inputs of the product


def test_features_from_one_node_are_told_apart_by_output_number():
    trunk, heads, x = trunk_and_heads(2)
    first, second = torch.tanh(trunk(x)).chunk(2, dim=1)
    head = torch.nn.Linear(3, 1)
    losses = [head(first).mean(), head(second * 2).mean()]
    split = split_at_features(losses, [first, second])
    assert split is not None
    assert [{j for _, _, j in edges} for edges in split.edges] == [{0}, {1}]
    assert split.reached[0] == split.reached[1] == {id(head.weight), id(head.bias)}  # a shared head's leaves


def test_a_leaf_feature_is_reached_through_its_accumulator():
    _, heads, x = trunk_and_heads(2)
    w = torch.nn.Parameter(torch.randn(4, 6))
    z = x @ w
    losses_leaf = [head(w.sum(0, keepdim=True)).mean() for head in heads]
    split = split_at_features(losses_leaf, [w])
    assert split is not None
    assert all(len(edges) == 1 and edges[0][2] == 0 for edges in split.edges)
    assert split_at_features([head(z).mean() for head in heads], [z]) is not None


@pytest.mark.parametrize(
    "kind",
    [
        "shared node",
        "the same loss twice",
        "tied weight",
        "trunk penalty",
        "input read directly",
        "hook on z",
    ],
)
def test_graphs_that_do_not_split_at_z(kind):
    trunk, heads, x = trunk_and_heads(2)
    x = x.requires_grad_(kind == "input read directly")
    z = torch.tanh(trunk(x))
    if kind == "shared node":
        h = torch.relu(z)
        losses = [head(h).mean() for head in heads]
    elif kind == "the same loss twice":
        loss = heads[0](z).mean() + heads[1](z).mean()
        losses = [loss.reshape(()), loss.reshape(())]
    elif kind == "tied weight":
        losses = [heads[0](z).mean(), (heads[1](z) + (z @ trunk.weight).sum()).mean()]
    elif kind == "trunk penalty":
        losses = [heads[0](z).mean() + trunk.bias.pow(2).sum(), heads[1](z).mean()]
    elif kind == "input read directly":
        losses = [heads[0](z).mean() + x.sum(), heads[1](z).mean()]
    else:  # a gradient hook on z sees the heads' summed gradient: it cannot be applied per task
        z.register_hook(lambda grad: grad * 2)
        losses = [head(z).mean() for head in heads]
    assert split_at_features(losses, [z]) is None


def test_a_feature_downstream_of_another_is_not_split():
    trunk, heads, x = trunk_and_heads(2)
    z = torch.tanh(trunk(x))
    h = torch.tanh(z * 3)
    losses = [heads[0](h).mean() + z[:, 0].mean(), heads[1](h).mean() + z[:, 1].mean()]
    assert split_at_features(losses, [z, h]) is None
    assert split_at_features(losses, [h, z]) is None
    leaf = torch.nn.Parameter(torch.randn(5, 6))
    below = leaf * 2
    assert split_at_features([heads[0](below).mean(), heads[1](leaf).mean()], [below, leaf]) is None
