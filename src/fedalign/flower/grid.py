"""A Flower Grid whose ``send_and_receive`` looks for replies every ``poll_interval`` seconds.

Flower's deployment Grid (``flwr.superlink.grid.HttpGrid``, flwr 1.41/1.42) pushes the
messages, then asks the SuperLink for the replies and, while some are missing, sleeps a fixed
3 s between asks: a reply waits on average 1.5 s (up to 3 s) before the ServerApp sees it,
every round. :class:`PolledGrid` wraps any Grid and implements ``send_and_receive`` with the
same two public Grid calls (``push_messages``, then ``pull_messages`` until every reply is in
or the timeout passes), sleeping ``poll_interval`` between asks; every other method is the
wrapped Grid's. Replies are returned in the order they arrived, as Flower's are.

Asked this often, the SuperLink usually hands over a reply while its node is still
uploading the reply's objects, and Flower's ``HttpGrid.pull_messages`` then waits 1 s before
asking for a missing object again; :func:`quicker_reply_pulls` (called by the ServerApp)
makes that wait 0.02 s, doubling up to 0.2 s (:mod:`fedalign.flower.backoff`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedalign.flower.backoff import PullObjectsChanged, shorten_pull_backoff

DEFAULT_POLL_INTERVAL = 0.1
"""Seconds between the ServerApp's requests for missing replies (``flower.poll-interval``)."""


class PolledGrid(Grid):
    """``grid`` with ``send_and_receive`` polling every ``poll_interval`` seconds.

    Parameters
    ----------
    grid : Grid
        The Grid Flower hands to the ServerApp.
    poll_interval : float, default 0.1
        Seconds between ``pull_messages`` calls while replies are missing.
    """

    def __init__(self, grid: Grid, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0 (got {poll_interval})")
        self.grid = grid
        self.poll_interval = poll_interval

    # --------------------------------------------------------------- delegated
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # --------------------------------------------------------------------- ours
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` seconds
        (None: wait for all), asking every ``poll_interval`` seconds."""
        messages = list(messages)
        waiting = {message_id for message_id in self.push_messages(messages) if message_id}
        del messages
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        return replies


def quicker_reply_pulls() -> bool:
    """Shorten the retry wait of Flower's deployment Grid for reply objects (this
    process); False, with a warning, when its ``pull_objects`` is not the one known."""
    from flwr.superlink.grid import http_grid

    try:
        shorten_pull_backoff(http_grid)
    except PullObjectsChanged as error:
        log(WARNING, "replies keep Flower's 1 s retry wait for missing objects: %s", error)
        return False
    return True
