"""transformers' beam-search selection, for many requests at once: `BeamGroups`.

One step of ``GenerationMixin._beam_search`` (transformers 5) for every request in a list of groups, on the
device, with the same float32 operations in the same order, so that the same candidates win:

- the next-token log-probabilities (float32 log-softmax) are added to each beam's running score, and the top
  ``max(2, 1 + eos tokens) * num_beams`` continuations of all beams are the candidates;
- a candidate ends (hits a stopping criterion) with an end-of-sequence token, at the new-token limit, or when
  the caller's check stops the request (then all of its candidates end);
- the best ``num_beams`` candidates that did not end run on; ended ones among the top ``num_beams`` join the
  finished hypotheses with score ``sum / generated_length ** length_penalty`` (unless ``early_stopping`` is True
  and every finished place is taken, or no running beam can do better any more);
- a request is done when no running beam can beat its worst finished hypothesis (transformers' heuristic,
  which reads ``early_stopping`` and ``length_penalty``), when ``early_stopping`` is True and it has
  ``num_beams`` finished hypotheses, or when all of its candidates ended. Its answer is the best hypothesis.

transformers runs one batch until every request in it is done; a done request's best hypothesis no longer changes, so
each request can stop (and free its slots) on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # transformers' mask value for scores that must not be chosen


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (groups, beams, ...) -> the beams `index` (groups, k) names, per group."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _penalty(lengths: Sequence[int], length_penalty: float, device) -> torch.Tensor:
    """length ** length_penalty per group, rounded to float32 as transformers' scalar division rounds it."""
    return torch.tensor([n**length_penalty for n in lengths], dtype=torch.float32, device=device)


class BeamGroups:
    """The beam-search state of `groups` requests of `num_beams` beams each (generated tokens only).

    Row g of every tensor is group g. ``running``/``finished``: (groups, num_beams, max_new) tokens;
    ``running_scores``: summed log-probabilities; ``finished_scores``: length-penalised, best first;
    ``unsatisfied``: transformers' "the running beams may still beat a finished one". ``steps`` and ``limits``
    (host lists): tokens generated so far and allowed.
    """

    def __init__(self, groups: int, num_beams: int, max_new: int, eos: Sequence[int], length_penalty: float,
                 early_stopping: bool | str, device):  # fmt: skip
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, float(length_penalty), early_stopping
        self.keep = max(2, 1 + len(eos)) * num_beams
        self.top_mask = torch.arange(self.keep, device=device) < num_beams
        self.eos = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        shape = (groups, num_beams)
        self.running = torch.zeros((*shape, max_new), dtype=torch.long, device=device)
        self.finished = torch.zeros_like(self.running)
        self.finished_length = torch.zeros(shape, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.finished_scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.unsatisfied = torch.ones((groups, 1), dtype=torch.bool, device=device)
        self.steps, self.limits = [0] * groups, [0] * groups

    def start(self, groups: list[int], limits: list[int]) -> None:
        """New requests in `groups`: only the first beam's score counts at the first step."""
        rows = torch.tensor(groups, device=self.running.device)
        self.running_scores[rows] = torch.tensor([0.0] + [NEG] * (self.num_beams - 1), device=rows.device)
        self.finished_scores[rows], self.is_finished[rows], self.unsatisfied[rows] = NEG, False, True
        for group, limit in zip(groups, limits, strict=True):
            self.steps[group], self.limits[group] = 0, limit

    def step(
        self,
        groups: list[int],
        log_probs: torch.Tensor,
        stop: Callable[[list[int], list[list[int]]], list[bool]] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """One token for the beams of `groups` from their next-token log-probabilities (len(groups), num_beams,
        vocab) in float32. Returns each group's parent beam of every new beam, and whether the group is done.
        ``stop(groups, tokens)`` gets the best candidate's tokens of every group and says which to stop."""
        rows = torch.tensor(groups, device=log_probs.device)
        count, beams, vocab = log_probs.shape
        steps = torch.tensor([self.steps[g] for g in groups], device=rows.device)
        at_limit = torch.tensor([self.steps[g] + 1 >= self.limits[g] for g in groups], device=rows.device)
        # candidates: the top `keep` continuations of all beams (transformers' _get_top_k_continuations)
        scores = (log_probs + self.running_scores[rows][:, :, None]).reshape(count, beams * vocab)
        top_scores, top_index = torch.topk(scores, k=self.keep)
        parents, tokens = top_index // vocab, top_index % vocab
        candidates = _gather(self.running[rows], parents)
        candidates.scatter_(2, steps.view(count, 1, 1).expand(count, self.keep, 1), tokens.unsqueeze(-1))
        hits = torch.isin(tokens, self.eos) | at_limit.unsqueeze(1)
        if stop is not None:
            best = [row[: self.steps[g] + 1] for g, row in zip(groups, candidates[:, 0].tolist(), strict=True)]
            hits |= torch.tensor(stop(groups, best), dtype=torch.bool, device=rows.device).unsqueeze(1)
        # the best unfinished candidates run on (_get_running_beams_for_next_iteration)
        running_scores = top_scores + hits.to(torch.float32) * NEG
        chosen = torch.topk(running_scores, k=beams)[1]
        self.running[rows] = _gather(candidates, chosen)
        self.running_scores[rows] = _gather(running_scores, chosen)
        # finished candidates among the top `num_beams` join the finished hypotheses (_update_finished_beams)
        just_finished = hits & self.top_mask.unsqueeze(0)
        lengths = [self.steps[g] + 1 for g in groups]
        final_scores = top_scores / _penalty(lengths, self.length_penalty, rows.device).unsqueeze(1)
        full = torch.all(self.is_finished[rows], dim=-1, keepdim=True) & (self.early_stopping is True)
        final_scores += full.to(torch.float32) * NEG
        final_scores += (~self.unsatisfied[rows]).to(torch.float32) * NEG
        final_scores += (~just_finished) * NEG
        merged_scores = torch.cat((self.finished_scores[rows], final_scores), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        candidate_lengths = torch.tensor(lengths, device=rows.device).unsqueeze(1).expand(count, self.keep)
        self.finished[rows] = _gather(torch.cat((self.finished[rows], candidates), dim=1), best)
        self.finished_length[rows] = _gather(torch.cat((self.finished_length[rows], candidate_lengths), 1), best)
        self.finished_scores[rows] = _gather(merged_scores, best)
        self.is_finished[rows] = _gather(torch.cat((self.is_finished[rows], just_finished), dim=1), best)
        for group in groups:
            self.steps[group] += 1
        done = self._update_unsatisfied(groups, rows) | hits.all(dim=-1)
        if self.early_stopping is True:
            done |= self.is_finished[rows].all(dim=-1)
        packed = torch.cat((_gather(parents, chosen), done.unsqueeze(1).long()), dim=1).tolist()
        return [row[:-1] for row in packed], [bool(row[-1]) for row in packed]

    def _update_unsatisfied(self, groups: list[int], rows: torch.Tensor) -> torch.Tensor:
        """transformers' _check_early_stop_heuristic; returns the groups it rules finished, (len(groups),)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            lengths = [self.limits[g] for g in groups]
        else:
            lengths = [self.steps[g] for g in groups]
        best_possible = self.running_scores[rows][:, :1] / _penalty(lengths, self.length_penalty, rows.device)[:, None]
        worst_finished = torch.where(
            self.is_finished[rows], torch.min(self.finished_scores[rows], dim=1, keepdim=True)[0], NEG
        )
        unsatisfied = self.unsatisfied[rows] & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)
        self.unsatisfied[rows] = unsatisfied
        return ~unsatisfied[:, 0]

    def newest(self, groups: list[int]) -> torch.Tensor:
        """The last token of every running beam of `groups`, (len(groups), num_beams)."""
        rows = torch.tensor(groups, device=self.running.device)
        last = torch.tensor([self.steps[g] - 1 for g in groups], device=rows.device)
        return self.running[rows].gather(2, last.view(-1, 1, 1).expand(-1, self.num_beams, 1))[..., 0]

    def best(self, group: int) -> list[int]:
        """The best finished hypothesis of a done group: its new tokens, an end-of-sequence token included."""
        return self.finished[group, 0, : int(self.finished_length[group, 0])].tolist()
