"""Drawing a round's sites before the round, so the coordinator can prepare exactly those sites.

Flower's legacy strategies sample inside ``configure_fit`` / ``configure_evaluate``, after the
coordinator's before-fit stages. :class:`RoundSampler` is Flower's :class:`SimpleClientManager`
(same pool, same ``random.sample`` draw) whose next samples can be drawn ahead: the stage
:func:`fedtune.server.stages.draw_round_sites` draws this round's training (and evaluation)
sample, the base-model check then reaches only those sites, and the strategy's own ``sample`` calls
receive the drawn sites in order. With 10,000 simulated hospitals and 10 sampled per round a round
thus messages 10 sites, not every connected one.
"""

from __future__ import annotations

import logging
from collections import deque

from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

log = logging.getLogger(__name__)


class RoundSampler(SimpleClientManager):
    """Flower's client manager whose next ``sample`` calls can be drawn ahead with :meth:`draw`."""

    def __init__(self) -> None:
        super().__init__()
        self._drawn: deque[list[ClientProxy]] = deque()

    def draw(self, num_clients: int, min_num_clients: int | None = None) -> list[ClientProxy]:
        """Draw a sample now (as :meth:`sample` would) and keep it for the next :meth:`sample` call."""
        drawn = super().sample(num_clients, min_num_clients)
        self._drawn.append(drawn)
        return drawn

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """The oldest drawn sample when it has ``num_clients`` sites (and no criterion), else a new draw.

        A drawn sample of another size (sites joined or left since :meth:`draw`) is dropped and the
        sites are drawn again, as Flower would.
        """
        if self._drawn:
            drawn = self._drawn.popleft()
            if criterion is None and len(drawn) == num_clients:
                return drawn
            log.info("%d site(s) drawn ahead, %d asked for: drawing again.", len(drawn), num_clients)
        return super().sample(num_clients, min_num_clients, criterion)
