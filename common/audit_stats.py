"""Statistics of a canary privacy audit: attack AUC, TPR at low FPR and a one-run lower bound on ε.

The audit plants ``m`` canary records at one site and includes each in training independently with
probability 1/2. After training every canary gets a membership score (higher means more likely a
member, e.g. loss under the base model minus loss under the shared adapter). The functions here turn
those scores and the inclusion truth into audit statistics. They are pure: the same inputs always give
the same outputs.

:func:`one_run_epsilon` implements the (ε, δ) lower bound of Steinke, Nasr & Jagielski, "Privacy
Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846), with a Bonferroni correction
over the grid of guess counts that it searches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom
from sklearn.metrics import roc_auc_score, roc_curve

DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_EPSILON_TOLERANCE = 1e-6  # bisection stops once the bracket on ε is this narrow


@dataclass(frozen=True)
class OneRunAudit:
    """Result of :func:`one_run_epsilon`.

    Attributes
    ----------
    epsilon_lower_bound
        Lower bound on ε, valid with probability at least ``confidence`` for an (ε, ``delta``)-DP
        training run; 0.0 when no grid point is significant.
    confidence
        Confidence level of the bound (after the Bonferroni correction over the grid).
    delta
        δ of the null hypothesis "the training run is (ε, δ)-DP".
    guesses
        Number of non-abstaining guesses ``r = k_plus + k_minus`` at the grid point that attains the bound.
    correct
        Number of correct guesses ``v`` at that grid point.
    canaries
        Number of canaries ``m``.
    k_plus
        Number of highest-scoring canaries guessed "member" at that grid point.
    k_minus
        Number of lowest-scoring canaries guessed "non-member" at that grid point.
    grid_size
        Number of distinct ``(k_plus, k_minus)`` pairs searched; each was tested at level
        ``(1 - confidence) / grid_size``.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    guesses: int
    correct: int
    canaries: int
    k_plus: int
    k_minus: int
    grid_size: int


def _validated(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``scores`` as a finite float array and ``members`` as a bool array of the same length.

    Raises
    ------
    ValueError
        If either is not 1-D, they differ in length, they are empty, a score is not finite or
        ``members`` holds values other than booleans or 0/1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members)
    if scores.ndim != 1 or members.ndim != 1:
        raise ValueError(f"scores and members must be 1-D, got shapes {scores.shape} and {members.shape}.")
    if len(scores) != len(members):
        raise ValueError(f"scores has {len(scores)} entries but members has {len(members)}.")
    if len(scores) == 0:
        raise ValueError("scores and members are empty.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (no NaN or inf).")
    if members.dtype != np.bool_ and not np.isin(members, (0, 1)).all():
        raise ValueError("members must be booleans (or 0/1): True where the canary was included in training.")
    return scores, members.astype(bool)


def _validated_two_class(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_validated`, and also require at least one member and one non-member."""
    scores, members = _validated(scores, members)
    if members.all() or not members.any():
        raise ValueError("members holds only one class; the ROC needs both members and non-members.")
    return scores, members


def attack_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve of a membership-inference attack.

    Parameters
    ----------
    scores
        Membership score of each canary (1-D, finite); higher means more likely a member.
    members
        True where the canary was included in training (bool, or 0/1), same length as ``scores``.

    Returns
    -------
    float
        ROC AUC from :func:`sklearn.metrics.roc_auc_score`: 1.0 for perfect separation, 0.5 for chance,
        0.0 for perfectly inverted scores. Tied scores count one half.

    Raises
    ------
    ValueError
        If the inputs are malformed or ``members`` holds only one class.
    """
    scores, members = _validated_two_class(scores, members)
    return float(roc_auc_score(members, scores))


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate of the attack at a false-positive rate of at most ``fpr``.

    No interpolation is done: the result is the largest TPR among the deterministic thresholds on
    ``scores`` (the points of :func:`sklearn.metrics.roc_curve`) whose FPR is ``<= fpr``. Linear
    interpolation between ROC points would credit a randomised threshold and can only be higher, so this
    step-function reading is the conservative one. With ``fpr = 0`` it is the fraction of members scored
    strictly above every non-member.

    Parameters
    ----------
    scores
        Membership score of each canary (1-D, finite); higher means more likely a member.
    members
        True where the canary was included in training (bool, or 0/1), same length as ``scores``.
    fpr
        Largest false-positive rate allowed, in ``[0, 1]``.

    Returns
    -------
    float
        The TPR, in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the inputs are malformed, ``members`` holds only one class or ``fpr`` is outside ``[0, 1]``.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}.")
    scores, members = _validated_two_class(scores, members)
    fprs, tprs, _ = roc_curve(members, scores, drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def _p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Bound on ``P[at least `correct` of `guesses` guesses are right]`` for an (ε, δ)-DP run.

    The main theorem of Steinke, Nasr & Jagielski (2023) for (ε, δ)-DP, as computed by the paper's own
    reference code (Appendix D): with ``q = e^ε / (1 + e^ε)`` and ``B ~ Binomial(r, q)``,
    ``P[W >= v] <= P[B >= v] + 2 m δ max_{1 <= i <= v} P[v - i <= B < v] / i``.
    """
    q = expit(epsilon)
    p_value = binom.sf(correct - 1, guesses, q)
    if delta > 0 and correct > 0:
        widths = np.arange(1, correct + 1)
        window_mass = np.cumsum(binom.pmf(correct - widths, guesses, q))
        p_value += 2 * canaries * delta * float(np.max(window_mass / widths))
    return min(float(p_value), 1.0)


def _epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, level: float) -> float:
    """Edge, found by bisection, of the ε whose p-value is below ``level``; 0.0 if ε = 0 is not rejected.

    The p-value rises with ε (strictly for δ = 0; the δ term need not be monotone). The returned ε is
    the rejected end of the final bracket (width at most ``_EPSILON_TOLERANCE``), so its own p-value is
    ``< level``, which is all the validity argument in :func:`one_run_epsilon` needs.
    """
    if _p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    rejected, accepted = 0.0, 1.0
    while _p_value(canaries, guesses, correct, accepted, delta) < level:
        rejected, accepted = accepted, 2 * accepted
    while accepted - rejected > _EPSILON_TOLERANCE:
        middle = (rejected + accepted) / 2
        if _p_value(canaries, guesses, correct, middle, delta) < level:
            rejected = middle
        else:
            accepted = middle
    return rejected


def _guess_grid(canaries: int, guess_counts: Sequence[int] | None) -> list[tuple[int, int]]:
    """Distinct ``(k_plus, k_minus)`` pairs: for each guess count ``r``, balanced and one-sided guesses."""
    if guess_counts is None:
        guess_counts = sorted({max(1, round(f * canaries)) for f in DEFAULT_GUESS_FRACTIONS})
    if len(guess_counts) == 0:
        raise ValueError("guess_counts is empty.")
    grid: dict[tuple[int, int], None] = {}
    for count in guess_counts:
        if int(count) != count or not 1 <= count <= canaries:
            raise ValueError(f"each guess count must be an integer in [1, {canaries}], got {count}.")
        count = int(count)
        grid[(count - count // 2, count // 2)] = None
        grid[(count, 0)] = None
    return list(grid)


def one_run_epsilon(
    scores: np.ndarray,
    members: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
) -> OneRunAudit:
    """Lower bound on ε from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

    The auditor guesses "member" for the ``k_plus`` highest-scoring canaries and "non-member" for the
    ``k_minus`` lowest-scoring ones, abstaining on the rest: ``r = k_plus + k_minus`` guesses, ``v`` of
    them correct. Ties in ``scores`` are broken by canary index (a stable sort), which does not depend on
    inclusion. For a training run that is (ε, δ)-DP with respect to each canary, with the canaries
    included independently with probability 1/2 and the guesses a function of the trained model only,
    the paper's main theorem (in the form its Appendix D reference code computes) bounds, for every v::

        P[W >= v] <= f_ε(v) = P[B >= v] + 2 m δ max_{1 <= i <= v} P[v - i <= B < v] / i,
        B ~ Binomial(r, e^ε / (1 + e^ε)),

    where ``W`` is the number of correct guesses. For δ = 0 this is exactly the stochastic dominance of
    ``W`` by ``Binomial(r, e^ε / (1 + e^ε))``. For each grid point the test of "the run is (ε, δ)-DP"
    rejects when ``f_ε(v) < α`` and the grid point's bound is ``sup{ε : f_ε(v) < α}`` (computed by
    bisection, rounding down). The result is the largest bound over the grid.

    Why this is a valid ``confidence``-level lower bound:

    * An (ε₀, δ)-DP run is (ε, δ)-DP for every ε >= ε₀, so ``P[W >= v] <= g(v) = inf_{ε >= ε₀} f_ε(v)``.
      With ``2 m δ <= 1`` every ``f_ε`` is non-increasing in v (the δ term grows by at most
      ``2 m δ P[B = v]`` while ``P[B >= v]`` drops by ``P[B = v]``), hence so is ``g``, and a tail bound
      that is non-increasing in v gives ``P[g(W) < α] <= α``. A grid point's bound exceeds the true ε₀
      only if ``f_ε(v) < α`` for some ε > ε₀, i.e. only if ``g(v) < α``: probability at most α.
    * The grid point is chosen after seeing which guesses were correct, so each of the ``G`` grid points
      is tested at ``α = (1 - confidence) / G`` (Bonferroni); by the union bound the largest of the ``G``
      bounds exceeds ε₀ with probability at most ``1 - confidence``. (The paper's experiments take the
      best of several guess counts without this correction, which slightly overstates the confidence.)

    Parameters
    ----------
    scores
        Membership score of each canary (1-D, finite); higher means more likely a member. Must be
        computed without using the inclusion truth.
    members
        True where the canary was included in training (bool, or 0/1), same length as ``scores``.
    delta
        δ of the audited guarantee; ``0 <= delta <= 1 / (2 m)`` (beyond that the δ term is no longer
        monotone in v and the argument above does not apply).
    confidence
        Probability, in ``(0, 1)``, that the bound does not exceed the true ε.
    guess_counts
        Total guess counts ``r`` to search, each an integer in ``[1, m]``; each gives a balanced pair
        ``(ceil(r / 2), floor(r / 2))`` and a one-sided pair ``(r, 0)``. Default: ``round(f m)`` (at least
        1) for ``f`` in :data:`DEFAULT_GUESS_FRACTIONS`.

    Returns
    -------
    OneRunAudit
        The bound and the grid point that attains it (the first in grid order on ties, e.g. when the
        bound is 0.0).

    Raises
    ------
    ValueError
        If the inputs are malformed or a parameter is out of range.
    """
    scores, members = _validated(scores, members)
    canaries = len(scores)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if not 0.0 <= delta <= 1.0 / (2 * canaries):
        raise ValueError(f"delta must be in [0, 1 / (2 m)] = [0, {1.0 / (2 * canaries):.3g}], got {delta}.")
    grid = _guess_grid(canaries, guess_counts)
    level = (1.0 - confidence) / len(grid)
    by_score = members[np.argsort(scores, kind="stable")]
    audits = []
    for k_plus, k_minus in grid:
        correct = int(by_score[canaries - k_plus :].sum() + (~by_score[:k_minus]).sum())
        guesses = k_plus + k_minus
        audits.append(
            OneRunAudit(
                epsilon_lower_bound=_epsilon_lower_bound(canaries, guesses, correct, delta, level),
                confidence=confidence,
                delta=delta,
                guesses=guesses,
                correct=correct,
                canaries=canaries,
                k_plus=k_plus,
                k_minus=k_minus,
                grid_size=len(grid),
            )
        )
    return max(audits, key=lambda audit: audit.epsilon_lower_bound)
