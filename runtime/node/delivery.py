"""Requests a node sent whose arrival is not proven yet, checked against what the receiving
model node reports.

dora drops messages without a word (see :mod:`mofa_omni.node.integrity`); the last request
sent shows no gap, since nothing comes after it. A model node reports, in the scheduler's
status, which stream number it expects next on each input (:class:`Delivery`): a report
made well after a request was sent that still expects that request's number proves it never
arrived. :class:`Awaiting` keeps the requests sent on one numbered output to one input of one
node, and says which of them such a report shows lost, so that the sender asks again (up to a
limit) or ends the request in an explicit error. The gateway's bridge does the same for its
routes; this is the single-route form a conversation node needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mofa_omni.scheduler.messages import Delivery

# A report this long after sending has seen the request, if it came: dora delivers in
# milliseconds, the node's main thread may lag behind a busy CPU.
ARRIVAL_NS = 2_000_000_000
RESENDS = 2  # times a lost request (or the end of its reply) is sent again, then an error


@dataclass(slots=True)
class _Sent:
    seq: int
    sent_ns: int
    resends: int = 0


@dataclass(frozen=True, slots=True)
class Lost:
    """A request a report proved lost: ``again`` if it may be sent again, else give up."""

    request_id: str
    again: bool


class Awaiting:
    """Requests sent to ``node``'s input ``input_id``, each until its answer begins."""

    def __init__(self, node: str, input_id: str, resends: int = RESENDS):
        self.node, self.input_id, self.resends = node, input_id, resends
        self._sent: dict[str, _Sent] = {}

    def sent(self, request_id: str, seq: int | None, now_ns: int) -> None:
        """``request_id`` went out as message ``seq`` of the output (None: not numbered, so
        not checked)."""
        if seq is None:
            return
        resends = self._sent[request_id].resends if request_id in self._sent else 0
        self._sent[request_id] = _Sent(seq, now_ns, resends)

    def arrived(self, request_id: str) -> None:
        """Its answer began (or it ended otherwise): nothing more to prove."""
        self._sent.pop(request_id, None)

    def waiting(self) -> list[str]:
        return list(self._sent)

    def check(self, delivery: Delivery) -> list[Lost]:
        """The requests ``delivery`` (the node's latest report) shows never arrived; each is
        forgotten here until sent again."""
        expected = delivery.received.get(self.input_id, 0)  # nothing yet: it expects the first
        lost = []
        for request_id, sent in list(self._sent.items()):
            if delivery.at_ns >= sent.sent_ns + ARRIVAL_NS and expected <= sent.seq:
                again = sent.resends < self.resends
                if again:
                    sent.resends += 1
                    sent.sent_ns = delivery.at_ns  # not checked again before it is resent
                else:
                    del self._sent[request_id]
                lost.append(Lost(request_id, again))
        return lost
