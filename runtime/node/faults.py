"""Messages dropped on purpose: the fault dora's silent drops cause, made to order.

dora 1.1.0 drops messages without a word (upstream issues #3397, #3439), rarely and
at random, so the code that finds and repairs a loss would go untested. A node
started with ``DROP_MESSAGES`` skips the messages it names when sending them: each
keeps its stream number, as a message dora dropped does, so the receiver's view is
the same.

    DROP_MESSAGES="chat:0"                 the first message on output ``chat``
    DROP_MESSAGES="result:final:0,result:final:2"
                                           the first and third *last* messages of a reply
                                           on ``result`` (metadata ``final``, true when absent)

For tests and drills; unset, nothing is dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mofa_omni.contract.errors import ConfigError

DROP_MESSAGES = "DROP_MESSAGES"


@dataclass(frozen=True, slots=True)
class DropRule:
    """Drop the ``nth`` (from 0) message on ``output`` -- counting only final ones if
    ``finals_only``."""

    output: str
    nth: int
    finals_only: bool = False


def parse_drops(text: str) -> tuple[DropRule, ...]:
    """The rules of a ``DROP_MESSAGES`` value; a malformed one is a :class:`ConfigError`."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        finals_only = len(fields) == 3 and fields[1] == "final"
        if len(fields) not in (2, 3) or (len(fields) == 3 and not finals_only) \
                or not fields[0] or not fields[-1].isdigit():
            raise ConfigError(f"{DROP_MESSAGES}: {part!r} is neither OUTPUT:N nor "
                              f"OUTPUT:final:N (N counts from 0)")
        rules.append(DropRule(fields[0], int(fields[-1]), finals_only))
    return tuple(rules)


class Dropper:
    """Decides, message by message, whether to drop what is being sent."""

    def __init__(self, rules: tuple[DropRule, ...] = ()):
        self.rules = rules
        self._sent: Counter[tuple[str, bool]] = Counter()  # (output, finals only) -> so far

    def drops(self, output: str, metadata: dict[str, Any] | None) -> bool:
        """Whether to drop this message (counted either way)."""
        if not self.rules:
            return False
        final = bool((metadata or {}).get("final", True))
        counted = [(output, False)] + ([(output, True)] if final else [])
        drop = any(rule.output == output and (rule.output, rule.finals_only) in counted
                   and self._sent[(rule.output, rule.finals_only)] == rule.nth
                   for rule in self.rules)
        self._sent.update(counted)
        return drop
