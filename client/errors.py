"""A site's errors stay at the site: the coordinator gets a category, the site's log the details.

Flower sends the text of any exception a ClientApp raises back to the coordinator in the error reply
(``"<class ...>:<'message'>"``), where it lands in ``metrics.json``, the audit's wire record, the
checkpoint and the run log. A data error's message names the site's file, its line and sometimes a
row's content or a label value. :func:`make_site_errors_mod` (the outermost mod) logs the full error
and traceback at the site and raises a :class:`~fedtune.common.site_errors.SiteError` that names
only the category, so nothing of the site's data or file system crosses the wire.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedtune.common.config import ConfigError
from fedtune.common.site_config import site_config
from fedtune.common.site_errors import SiteError, category_of
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

log = logging.getLogger("fedtune.site")


def make_site_errors_mod(log_dir: str | Path | None = None) -> Mod:
    """The outermost site mod: any exception becomes a :class:`SiteError`, its details logged here.

    Parameters
    ----------
    log_dir
        Simulation: the folder where simulated site ``i`` appends its errors to ``site-i.log``
        (deployment: the site process's own log, which stays on the site's machine).
    """

    def site_errors_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(msg, ctxt)
        except SiteError:
            raise
        except Exception as err:
            category = category_of(err)
            where = f"round {msg.metadata.group_id or '?'} {msg.metadata.message_type}"
            log.error("Site error (%s, %s): %s", category, where, err, exc_info=err)
            if log_dir is not None:
                _append(Path(log_dir), ctxt, f"[{category}] {where}: {type(err).__name__}: {err}\n")
            raise SiteError(category) from None

    return site_errors_mod


def _append(log_dir: Path, ctxt: Context, line: str) -> None:
    try:
        site = site_config(ctxt.node_config).label(ctxt.node_id)
    except ConfigError:  # the error being logged may be this one
        site = str(ctxt.node_id)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"site-{site}.log").open("a", encoding="utf-8") as f:
        f.write(line)
