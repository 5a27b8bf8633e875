"""How a step's global batch is cut over ranks: contiguous equal blocks, groups across ranks, trees across ranks."""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import ConfigError, load_config
from flowgrove.parallel import rank_share
from flowgrove.training.rollout import NoiseSource


def _cfg(name: str, *extra: str):
    return load_config(None, list(extra), method=name)


def test_chain_blocks_are_contiguous_and_a_group_may_span_ranks():
    cfg = _cfg("dancegrpo", "rollout.prompts_per_step=3", "rollout.group_size=4")  # 12 samples
    shares = [rank_share.rank_share(cfg, 4, r) for r in range(4)]
    assert [(s.start, s.size, s.total, s.parts, s.part, s.span) for s in shares] == [
        (0, 3, 12, 4, 0, 1), (3, 3, 12, 4, 1, 1), (6, 3, 12, 4, 2, 1), (9, 3, 12, 4, 3, 1)]
    # sample j belongs to drawn prompt j // 4: rank 1 holds samples 3..5 = prompt 0's last, prompt 1's first two
    assert shares[1].positions.tolist() == [0, 1] and shares[1].roots.tolist() == [0, 1, 1]
    one = rank_share.rank_share(cfg, 1, 0)
    assert one.positions.tolist() == [0, 1, 2] and one.roots.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_trees_go_whole_to_ranks_or_span_them_when_fewer_than_ranks():
    cfg = _cfg("branchgrpo", "rollout.prompts_per_step=4")
    assert [rank_share.rank_share(cfg, 2, r).positions.tolist() for r in range(2)] == [[0, 1], [2, 3]]
    cfg = _cfg("branchgrpo", "rollout.prompts_per_step=2")
    shares = [rank_share.rank_share(cfg, 4, r) for r in range(4)]  # each tree on two ranks
    assert [(s.positions.tolist(), s.part, s.parts, s.span, s.member) for s in shares] == [
        ([0], 0, 2, 2, 0), ([0], 0, 2, 2, 1), ([1], 1, 2, 2, 0), ([1], 1, 2, 2, 1)]
    rows = [rank_share.member_rows(10, s) for s in shares[:2]]
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and rows[0].dtype == torch.long
    rank_share.check_global_batch(cfg, 4)  # two trees on four ranks: each tree spans two
    with pytest.raises(ValueError, match="11 stored transitions do not split evenly over its 2 ranks"):
        rank_share.member_rows(11, shares[0])


def test_gathered_copies_of_a_spanning_tree_are_kept_once():
    rows = torch.arange(8.0).view(4, 2)  # the two blocks' rows, two columns each
    gathered = rows[[0, 1, 0, 1, 2, 3, 2, 3]]  # 4 ranks x 2 rows [8, 2], span 2: ranks 0, 1 and 2, 3 hold the same
    assert torch.equal(rank_share.unique_blocks(gathered, 4, 2), rows)
    leaves = torch.arange(12.0).view(6, 2)[:, None, :].expand(6, 3, 2)  # [world * B, 3, 2] with B = 1: 3-D rows
    assert torch.equal(rank_share.unique_blocks(leaves, 6, 3), leaves[[0, 3]])
    assert rank_share.unique_blocks(gathered, 4, 1) is gathered


@pytest.mark.parametrize("name, extra, world, words", [
    ("dancegrpo", ["rollout.prompts_per_step=3", "rollout.group_size=3"], 2,
     "rollout.prompts_per_step=3 x rollout.group_size=3 = 9 samples per step do not split evenly over 2 ranks"),
    ("branchgrpo", ["rollout.prompts_per_step=3"], 2, "rollout.prompts_per_step=3 trees per step do not split evenly"),
    ("branchgrpo", ["rollout.prompts_per_step=2"], 3, "or a divisor of it"),
])
def test_a_batch_that_does_not_split_is_a_one_line_error(name, extra, world, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as err:
        rank_share.check_global_batch(_cfg(name, *extra), world)
    assert "\n" not in str(err.value)
    rank_share.check_global_batch(_cfg(name, *extra), 1)  # one process takes any batch


def test_each_rank_draws_its_rows_of_the_one_process_noise():
    whole = torch.randn((6, 2, 3), generator=torch.Generator().manual_seed(5))
    parts = [NoiseSource(torch.Generator().manual_seed(5), 3, r).randn(torch.Size((2, 2, 3))) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert NoiseSource(torch.Generator(), 1, 0).randn(torch.Size((2, 3))) is None  # one rank: the step draws itself
