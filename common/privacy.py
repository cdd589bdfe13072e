"""Client-level differential privacy accounting: ε of federated rounds at a fixed δ.

Mechanism
---------
Each round the server samples a fraction ``q`` of the sites (the sampling rate, sampled sites /
total sites). Every sampled site's whole update is clipped to L2 norm ``C`` (``dp-clipping-norm``)
and Gaussian noise of standard deviation ``σ·C`` is added to the sum, where ``σ`` is the noise
multiplier (``dp-noise-multiplier``). Per round that is the sampled Gaussian mechanism with respect
to adding or removing one whole site (a plain Gaussian mechanism when ``q == 1``); the rounds
compose. Sampling is accounted as Poisson sampling with rate ``q``, the standard approximation for
DP-FedAvg (McMahan et al., 2018). ε depends on ``σ``, ``q``, the number of rounds and δ
(``dp-delta``) only, never on ``C``, which sets the scale of both the clipping and the noise.

The maths (:func:`compute_epsilon`, :func:`noise_for_epsilon`) is pure and delegates to Google's
``dp-accounting``: ``"rdp"`` uses ``dp_accounting.rdp.RdpAccountant()`` (Rényi DP, default orders),
``"pld"`` uses ``dp_accounting.pld.PLDAccountant()`` (privacy loss distributions, tighter and
slower). The bookkeeping, as in opacus, is a separate :class:`PrivacyAccountant` that records one
``(noise_multiplier, sampling_rate)`` pair per round and saves and restores itself as a JSON-able
dict.

Recomputing ε from a saved state
--------------------------------
:meth:`PrivacyAccountant.state_dict` names the library, the accountant and the mechanism, so ε can
be recomputed with ``dp-accounting`` alone (composition is commutative, so equal rounds are
composed together)::

    import collections, json, dp_accounting as dpa
    state = json.load(open("privacy.json"))  # PrivacyAccountant.state_dict(), written with json.dump
    acc = dpa.rdp.RdpAccountant() if state["accountant"] == "rdp" else dpa.pld.PLDAccountant()
    for (sigma, q), rounds in collections.Counter(map(tuple, state["history"])).items():
        g = dpa.GaussianDpEvent(sigma)
        acc.compose(g if q == 1 else dpa.PoissonSampledDpEvent(q, g), rounds)
    print(acc.get_epsilon(state["delta"]))

``dp-accounting`` logs a warning whenever a fractional Rényi order fails to converge and is left
out of the minimum over orders (harmless); these warnings are silenced while this module computes.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dp_accounting

ACCOUNTANTS = ("rdp", "pld")
"""Valid ``accountant`` names."""

_STATE_KEYS = ("noise_multiplier", "delta", "accountant", "history")
_MAX_NOISE_MULTIPLIER = 2.0**14
_RELATIVE_TOLERANCE = 1e-3
_ACCOUNTANT_CLASSES = {"rdp": "dp_accounting.rdp.RdpAccountant", "pld": "dp_accounting.pld.PLDAccountant"}


# --- validation -----------------------------------------------------------------------------------


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"`dp-noise-multiplier` must be a finite number >= 0 (noise std in units of "
            f"`dp-clipping-norm`, e.g. 1.0), got {noise_multiplier!r}."
        )


def _check_sampling_rate(sampling_rate: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(
            f"The sampling rate (sampled sites / total sites, set by `fraction-train`) must be in (0, 1], "
            f"got {sampling_rate!r}."
        )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(
            f"`dp-delta` must be in (0, 1); use a value below 1 / number of sites (e.g. 1e-5), got {delta!r}."
        )


def _check_rounds(rounds: int) -> None:
    if not (isinstance(rounds, numbers.Integral) and rounds >= 0):
        raise ValueError(
            f"The number of rounds (`num-server-rounds`) must be an integer >= 0, got {rounds!r}."
        )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; valid accountants: {', '.join(ACCOUNTANTS)}.")


def _check_target_epsilon(target_epsilon: float) -> None:
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(
            f"`dp-target-epsilon` must be a finite number > 0 (e.g. 8.0), got {target_epsilon!r}."
        )


# --- maths ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    """Silence ``dp-accounting``'s per-order convergence warnings (logged through absl) for a block."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """The DP event of one round: the sampled Gaussian mechanism (plain Gaussian when q == 1)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def _epsilon_of_history(history: Sequence[tuple[float, float]], *, delta: float, accountant: str) -> float:
    """ε at ``delta`` of the rounds in ``history``, each a ``(noise_multiplier, sampling_rate)`` pair.

    Equal rounds are composed together as one ``SelfComposedDpEvent`` (composition is commutative),
    the groups into one accountant, so the cost grows with the number of distinct pairs only.
    """
    if not history:
        return 0.0
    if any(noise_multiplier == 0 for noise_multiplier, _ in history):
        return math.inf
    counts = collections.Counter(history)
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    with _quiet_dp_accounting():
        for (noise_multiplier, sampling_rate), rounds in counts.items():
            acc.compose(
                dp_accounting.SelfComposedDpEvent(_round_event(noise_multiplier, sampling_rate), rounds)
            )
        return float(acc.get_epsilon(delta))


def compute_epsilon(
    *, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε of ``rounds`` rounds of the sampled Gaussian mechanism at ``delta``.

    Parameters
    ----------
    noise_multiplier : float
        σ, the noise std divided by the clipping norm (``dp-noise-multiplier``); 0 means no privacy.
    sampling_rate : float
        q in (0, 1], sampled sites / total sites per round.
    rounds : int
        Rounds composed (>= 0).
    delta : float
        δ in (0, 1) (``dp-delta``).
    accountant : str
        ``"rdp"`` (Rényi DP) or ``"pld"`` (privacy loss distributions: tighter, slower).

    Returns
    -------
    float
        ε; 0.0 for no rounds, ``math.inf`` for a zero noise multiplier.

    Raises
    ------
    ValueError
        On an input outside its range or an unknown accountant (names the run-config key).
    """
    _check_noise_multiplier(noise_multiplier)
    _check_sampling_rate(sampling_rate)
    _check_rounds(rounds)
    _check_delta(delta)
    _check_accountant(accountant)
    return _epsilon_of_history(
        [(noise_multiplier, sampling_rate)] * rounds, delta=delta, accountant=accountant
    )


def noise_for_epsilon(
    *, target_epsilon: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier whose ε after ``rounds`` rounds is at most ``target_epsilon``.

    ε shrinks monotonically as σ grows: σ is doubled from 1 until ε <= target, then bisected until
    the bracket is within a relative 1e-3. The upper end is returned, so its ε never exceeds the
    target and any σ below ``0.999 ×`` the result exceeds it.

    Parameters
    ----------
    target_epsilon : float
        ε to reach, > 0 (``dp-target-epsilon``).
    sampling_rate : float
        q in (0, 1], sampled sites / total sites per round.
    rounds : int
        Rounds to run (>= 0).
    delta : float
        δ in (0, 1) (``dp-delta``).
    accountant : str
        ``"rdp"`` or ``"pld"``.

    Returns
    -------
    float
        The noise multiplier σ (0.0 when ``rounds == 0``).

    Raises
    ------
    ValueError
        On an invalid input (names the run-config key), or when even σ = 16384 does not reach the target.
    """
    _check_target_epsilon(target_epsilon)
    _check_sampling_rate(sampling_rate)
    _check_rounds(rounds)
    _check_delta(delta)
    _check_accountant(accountant)
    if rounds == 0:
        return 0.0

    def epsilon(noise_multiplier: float) -> float:
        history = [(noise_multiplier, sampling_rate)] * rounds
        return _epsilon_of_history(history, delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    while (high_epsilon := epsilon(high)) > target_epsilon:
        if high >= _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"`dp-target-epsilon`={target_epsilon} is out of reach: even noise multiplier {high:g} gives "
                f"ε={high_epsilon:.4g} over {rounds} rounds (`{accountant}` accountant); raise "
                f"`dp-target-epsilon` or `dp-delta`, or run fewer rounds."
            )
        low, high = high, 2 * high
    while high - low > _RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


# --- bookkeeping ----------------------------------------------------------------------------------


class PrivacyAccountant:
    """Running ε of a federated run: one ``(noise_multiplier, sampling_rate)`` entry per round.

    Parameters
    ----------
    noise_multiplier : float
        σ of every round (``dp-noise-multiplier``).
    delta : float
        δ at which ε is reported (``dp-delta``).
    accountant : str
        ``"rdp"`` or ``"pld"``.

    Raises
    ------
    ValueError
        On an invalid input (names the run-config key).

    Examples
    --------
    >>> acc = PrivacyAccountant(noise_multiplier=1.0, delta=1e-5)
    >>> for _ in range(10):
    ...     acc.step(0.1)
    >>> round(acc.epsilon(), 3)
    3.442
    """

    def __init__(self, *, noise_multiplier: float, delta: float, accountant: str = "rdp") -> None:
        _check_noise_multiplier(noise_multiplier)
        _check_delta(delta)
        _check_accountant(accountant)
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self._history: list[tuple[float, float]] = []

    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return len(self._history)

    @property
    def history(self) -> list[tuple[float, float]]:
        """A copy of the recorded ``(noise_multiplier, sampling_rate)`` pairs, one per round."""
        return list(self._history)

    def step(self, sampling_rate: float) -> None:
        """Record one round in which a fraction ``sampling_rate`` of the sites was sampled.

        Raises
        ------
        ValueError
            If ``sampling_rate`` is outside (0, 1].
        """
        _check_sampling_rate(sampling_rate)
        self._history.append((self.noise_multiplier, sampling_rate))

    def epsilon(self) -> float:
        """ε at ``delta`` of all recorded rounds composed (0.0 before the first round)."""
        return _epsilon_of_history(self._history, delta=self.delta, accountant=self.accountant)

    def would_exceed(self, target_epsilon: float, sampling_rate: float) -> bool:
        """Whether one more round at ``sampling_rate`` would take ε above ``target_epsilon``.

        Raises
        ------
        ValueError
            On an invalid ``target_epsilon`` (``dp-target-epsilon``) or ``sampling_rate``.
        """
        _check_target_epsilon(target_epsilon)
        _check_sampling_rate(sampling_rate)
        history = [*self._history, (self.noise_multiplier, sampling_rate)]
        return _epsilon_of_history(history, delta=self.delta, accountant=self.accountant) > target_epsilon

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot, self-describing enough to recompute ε with dp-accounting alone."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(entry) for entry in self._history],
            "library": f"dp-accounting {importlib.metadata.version('dp-accounting')}",
            "mechanism": (
                "client-level sampled Gaussian mechanism, add/remove one site: each history entry "
                "[sigma, q] is dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)) "
                "(GaussianDpEvent(sigma) alone when q == 1), all composed into "
                f"{_ACCOUNTANT_CLASSES[self.accountant]}(); epsilon = get_epsilon(delta)"
            ),
        }

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> PrivacyAccountant:
        """Restore an accountant saved by :meth:`state_dict` (``library`` and ``mechanism`` are informative).

        Raises
        ------
        ValueError
            If a key is missing or a value is invalid.
        """
        missing = [key for key in _STATE_KEYS if key not in d]
        if missing:
            raise ValueError(
                f"Privacy accountant state lacks {', '.join(missing)}; "
                f"pass a dict saved by PrivacyAccountant.state_dict()."
            )
        acc = cls(noise_multiplier=d["noise_multiplier"], delta=d["delta"], accountant=d["accountant"])
        for entry in d["history"]:
            noise_multiplier, sampling_rate = entry
            _check_noise_multiplier(noise_multiplier)
            _check_sampling_rate(sampling_rate)
            acc._history.append((noise_multiplier, sampling_rate))
        return acc
