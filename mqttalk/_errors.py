"""One exception tree. Each error knows its exit code and renders as one line; the CLI maps them once."""

from __future__ import annotations

# Exit codes, shared by every command (documented in README and `mqttalk --help`).
EXIT_OK = 0
EXIT_ERROR = 1  # anything else that went wrong
EXIT_USAGE = 2  # bad input: flags, URL, message
EXIT_TIMEOUT = 3  # a wait ran out: no message / no peer within the time given
EXIT_NOT_BOUND = 4  # no channel for this directory
EXIT_BROKER = 5  # broker unreachable or refused us
EXIT_QUEUED = 6  # a message was kept in the outbox, not yet acknowledged by the broker
EXIT_EMPTY = 7  # pair: nobody is in the channel, nothing joined (a URL naming another broker or prefix?)


class MqttalkError(Exception):
    """Base of every error mqttalk raises on purpose."""

    exit_code = EXIT_ERROR
    label = "error"  # how the CLI introduces the line: "mqttalk: error: ..."

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The one line a user sees."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MqttalkError):
    """The input given to mqttalk is wrong (a flag, a name, a message)."""

    exit_code = EXIT_USAGE


class BadJoinURL(UsageError):
    """A join URL that cannot be parsed or does not name a channel."""


class BadMessage(UsageError):
    """A message that cannot be sent: empty, unknown kind, missing or wrong typed fields, too big."""


class NameTaken(UsageError):
    """Another live peer in the channel already uses this name."""


class EmptyChannel(MqttalkError):
    """`pair`: nobody is in the channel the join URL names (no presence, no roster): nothing was joined."""

    exit_code = EXIT_EMPTY


class NotBound(MqttalkError):
    """No channel/peer given by flag or environment, and none recorded for this directory."""

    exit_code = EXIT_NOT_BOUND


class BrokerUnreachable(MqttalkError):
    """The broker could not be reached (DNS, refused, no answer within the connect timeout)."""

    exit_code = EXIT_BROKER


class BrokerRefused(MqttalkError):
    """The broker answered but refused us (credentials, authorisation, client id)."""

    exit_code = EXIT_BROKER


class SessionBusy(BrokerRefused):
    """Another process of this peer holds its broker session (a live `recv --wait`, `listen`, ...)."""


class TimedOut(MqttalkError):
    """A bounded wait ran out."""

    exit_code = EXIT_TIMEOUT


class Queued(MqttalkError):
    """The message is safe in the local outbox but the broker has not acknowledged it yet."""

    exit_code = EXIT_QUEUED
    label = "QUEUED"

    def __init__(self, message_id: str, reason: str) -> None:
        super().__init__(
            f"id={message_id} not sent yet: {reason}",
            "it is kept and goes out with the next mqttalk command that reaches the broker",
        )
        self.message_id = message_id


class StoreError(MqttalkError):
    """The local state (the message store, the state directory) cannot be read or written: damaged,
    read-only, or the disk is full. The line names the file and what to do."""
