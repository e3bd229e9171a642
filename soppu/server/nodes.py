"""The message transport of a federation: which node is which user and holds which emulator,
and sending one message per node and collecting the replies.

A node introduces itself when first seen (HELLO: its user id, the emulators it holds); the
emulator is installed on the nodes that lack it; every other exchange goes through
`Nodes.exchange`, which returns the replies and, for the rest, why each failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from soppu import messages as m

Log = Callable[[str], None]


@dataclass
class Nodes:
    grid: Grid
    setup: m.Setup  # sent with every message: the data options, users and base model
    emulator_version: str
    log: Log = print
    wanted: int = 1  # nodes to wait for before a round
    wait: float = 120.0  # seconds to wait for them to connect
    users: dict[int, str] = field(default_factory=dict)  # node → its user
    has_emulator: set[int] = field(default_factory=set)

    def node_of(self) -> dict[str, int]:
        return {user: node for node, user in self.users.items()}

    def content(self, config: ConfigRecord) -> RecordDict:
        return RecordDict({m.SETUP: self.setup.to_record(), m.CONFIG: config})

    def meet(self) -> None:
        """Wait for nodes, then ask each new one which user it is and what it holds."""
        new = [n for n in self._connected() if n not in self.users]
        if not new:
            return
        config = ConfigRecord({"task": m.HELLO})
        replies, failed = self.exchange(new, "query", lambda _: self.content(config), 600)
        for node, reply in replies.items():
            user = str(reply.content[m.CONFIG]["user-id"])
            if user in self.users.values():
                self.log(f"node {node} says it is {user}, already served by another node: ignored")
                continue
            self.users[node] = user
            if self.emulator_version in list(reply.content[m.CONFIG]["emulators"]):
                self.has_emulator.add(node)
        for node, reason in failed.items():
            self.log(f"node {node} did not introduce itself: {reason}")

    def new_emulator(self, version: str) -> None:
        """The emulator changed (re-aligned): nobody holds this version until asked again."""
        self.emulator_version = version
        self.has_emulator.clear()  # `install_emulator` asks again who holds it

    def install_emulator(self, nodes: list[int], content: Callable[[], RecordDict]) -> None:
        """Send the emulator to nodes that lack it: one first, then ask the rest again,
        because nodes on one machine (a simulation) share the first one's disk cache."""
        lacking = [n for n in nodes if n not in self.has_emulator]
        if not lacking:
            return
        message = content()
        message[m.CONFIG]["task"] = m.INSTALL
        self._install(lacking[:1], message)
        sent = 1
        if len(lacking) > 1:
            self.users = {n: u for n, u in self.users.items() if n not in lacking[1:]}
            self.meet()  # re-asks the rest what they hold
            still = [n for n in lacking[1:] if n not in self.has_emulator]
            self._install(still, message)
            sent += len(still)
        self.log(
            f"emulator {self.emulator_version}: sent to {sent} node(s); "
            f"{len(lacking) - sent} found it in their machine's cache"
        )

    def exchange(
        self,
        nodes: list[int],
        message_type: str,
        content: Callable[[int], RecordDict | None],
        timeout: float,
        on_reply: Callable[[int, Message], None] | None = None,
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Send one message per node (none where `content` gives None) and collect replies as
        they come, until all are in or the timeout passes. Returns (replies, failures with
        their reasons)."""
        sent: dict[str, int] = {}
        for node in nodes:
            body = content(node)
            if body is None:
                continue
            message = Message(body, dst_node_id=node, message_type=message_type)
            for message_id in self.grid.push_messages([message]):
                sent[message_id] = node
        replies: dict[int, Message] = {}
        failed: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while sent and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(sent)):
                node = sent.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    failed[node] = self._error_reason(node, reply)
                    continue
                replies[node] = reply
                if on_reply is not None:
                    on_reply(node, reply)
            if sent:
                time.sleep(0.2)  # rounds take minutes; a slower poll leaves the CPU to clients
        for node in sent.values():
            failed[node] = f"no reply within {timeout:.0f} s"
        return replies, failed

    def _connected(self) -> list[int]:
        deadline = time.monotonic() + self.wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.wanted or time.monotonic() > deadline:
                if not nodes:
                    raise TimeoutError(f"no node connected within {self.wait:.0f} s")
                return nodes
            time.sleep(0.2)

    def _install(self, nodes: list[int], content: RecordDict) -> None:
        if not nodes:
            return
        replies, failed = self.exchange(nodes, "query", lambda _: content, 1800)
        self.has_emulator.update(replies)
        for node, reason in failed.items():
            self.log(f"node {node} could not install the emulator: {reason}")

    def _error_reason(self, node: int, reply: Message) -> str:
        if reply.error.code == m.NEEDS_EMULATOR:
            self.has_emulator.discard(node)  # it lost its cache; the next round reinstalls
        return (reply.error.reason or f"error {reply.error.code}").strip().splitlines()[-1]
