"""Byte-path stages: small sans-IO objects between the socket and the codec.

    socket ──recv──▶ stage ─▶ stage ─▶ codec (framing) ─▶ handler
    socket ◀─send─── stage ◀─ stage ◀─ codec (encode)  ◀─ handler

A connection composes the stages it needs when it is accepted (a PROXY
header parser, TLS: separate modules here); a plaintext connection has none
and runs the plain hot path.  A stage never sees a socket:

* ``receive(data)`` takes the bytes that arrived from the peer (as the stage
  nearer the socket passed them on) and returns what passes through to the
  next stage: possibly ``b""`` while it needs more;
* ``send(data)`` takes the bytes going out (``b""`` to ask only for what the
  stage itself wants to send, a handshake say) and returns the bytes for the
  stage nearer the socket;
* ``error`` set (a short reason) means the peer broke the stage's rules: the
  connection logs it and closes, without calling the handler again;
* ``ready`` false holds the handler back: ``connection_made`` waits until
  every stage is ready (a header parsed, a handshake done);
* ``done`` true: a one-shot stage has handed over for good (its last
  ``receive`` returned the bytes after it, none lost) and leaves the path;
  what its ``parting()`` returns (the auth gate's ``OK``) is queued as codec
  output, ahead of anything the handler sends;
* ``tell_peer`` true with ``error``: the reason also goes to the peer, in the
  codec's error frame (the auth gate's refusals); else it is only logged;
* ``eof`` true: the peer ended its stream inside the stage (TLS close_notify):
  the connection takes it as the peer's EOF; ``receive_eof()`` is called
  when the socket itself reaches EOF;
* ``finish()``: the connection is closing on purpose: bytes to send before
  its write side shuts (TLS close_notify), nearest the codec first;
* ``peer_cert``: the peer's verified certificate, if a stage has one (mTLS).
* ``defer_refusal(reason)``: a one-shot stage that refuses the peer (the
  PROXY header's address in protected mode) first offers the refusal to the
  stages after it (``inner``, set by the path); one that is not ready yet
  may take it and tell it once it is: TLS, inside TLS after the handshake,
  so the error frame is readable by a TLS client.
* ``peer`` set: the peer's address as the stage knows it; a stage that learns
  the client's real one (a PROXY header) sets it, the path hands it to the
  stages after it and the connection takes it as ``conn.peer`` (logged at
  debug level only if ``health_check``: a balancer checking on us).

The first stage of the list is the one nearest the socket.  A
:class:`StagePath` runs a connection's list both ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..codec import Buffer

__all__ = ["Stage", "StagePath"]

#: Output buffers at least this large pass through a lone stage unjoined.
SEND_UNJOINED = 64 * 1024


class Stage:
    """A stage that passes everything through; subclasses override what they need."""

    #: The peer broke this stage's rules (the reason, for the log); None: all well.
    error: str | None = None
    #: False while the handler must not be told of the connection yet.
    ready: bool = True
    #: True once a one-shot stage has handed over and may leave the path.
    done: bool = False
    #: With ``error``: send the reason to the peer as an error frame, too.
    tell_peer: bool = False
    #: The peer ended its stream inside this stage (TLS close_notify).
    eof: bool = False
    #: The peer's verified certificate (TLS with client certificates); else None.
    peer_cert: dict[str, Any] | None = None
    #: The peer's address as this stage knows it (None: the socket's).
    peer: Any = None
    #: With ``peer``: the connection is a balancer's health check.
    health_check: bool = False
    #: The stages after this one, nearest first (set by the path).
    inner: tuple[Stage, ...] = ()

    def receive(self, data: bytes) -> bytes:
        """Bytes from the peer in; what passes on to the next stage out."""
        return data

    def receive_eof(self) -> None:
        """The socket reached EOF (the peer's FIN)."""

    def finish(self) -> bytes:
        """The connection is closing: the stage's last bytes for the peer (or b"")."""
        return b""

    def parting(self) -> list[Buffer]:
        """Codec output a one-shot stage queues as it leaves the path (``done``)."""
        return []

    def send(self, data: bytes) -> bytes:
        """Bytes going out in (``b""``: only what the stage itself has); bytes out."""
        return data

    def send_buffer(self, data: Buffer) -> bytes:
        """``send`` for one large buffer, which a stage may take without a copy."""
        return self.send(bytes(data))

    def defer_refusal(self, reason: str) -> bool:
        """Take a refusal from a stage nearer the socket, to tell once ready; False: cannot."""
        return False

    def hand_refusal(self, reason: str) -> bool:
        """Offer ``reason`` to the stages after this one; True if one took it."""
        return any(stage.defer_refusal(reason) for stage in self.inner)


class StagePath:
    """One connection's stages, nearest the socket first, run in both directions."""

    __slots__ = ("eof", "error", "health_check", "parting", "peer", "stages", "tell_peer")

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        for i, stage in enumerate(stages):
            stage.inner = tuple(stages[i + 1:])
        #: The first violation any stage reported; nothing passes after it.
        self.error: str | None = None
        #: Whether that violation's reason goes to the peer as an error frame.
        self.tell_peer = False
        #: Codec output from stages that have just left the path, to queue first.
        self.parting: list[Buffer] = []
        #: The peer's address as the last stage to learn it said (None: the socket's).
        self.peer: Any = None
        self.health_check = False
        #: A stage saw the peer end its stream (TLS close_notify); noted as it receives.
        self.eof = False

    @property
    def ready(self) -> bool:
        """Every stage is ready: the handler may be told of the connection."""
        return all(stage.ready for stage in self.stages)

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        for stage in self.stages:
            if stage.peer_cert is not None:
                return stage.peer_cert
        return None

    def receive_eof(self) -> None:
        for stage in self.stages:
            stage.receive_eof()

    def finish(self) -> list[Buffer] | None:
        """Closing: every stage's last bytes, each through the stages nearer the socket."""
        data = b""
        for index in range(len(self.stages) - 1, -1, -1):
            data = self.stages[index].send(data) + self.stages[index].finish()
        return [data] if data else None

    def receive(self, data: bytes) -> bytes:
        """Bytes from the socket through every stage; what reaches the codec."""
        stages = self.stages
        done = False
        for i, stage in enumerate(stages):
            data = stage.receive(data)
            done = done or stage.done
            if stage.eof:
                self.eof = True
            if stage.peer is not None and stage.peer is not self.peer:
                self.peer = stage.peer
                self.health_check = stage.health_check
                for later in stages[i + 1:]:
                    later.peer = stage.peer
            if stage.error is not None:
                self.error = stage.error
                self.tell_peer = stage.tell_peer
                return b""
            if not data:
                break
        if done:  # (only a stage that received can have finished)
            for stage in stages:
                if stage.done:
                    self.parting += stage.parting()
            self.stages = [stage for stage in stages if not stage.done]
        return data

    def send(self, out: list[Buffer] | None) -> list[Buffer] | None:
        """Queued output through every stage, nearest the codec first."""
        stages = self.stages
        # (A large reply is a few buffers, a header and its payload; many buffers are
        # many small replies, which one join serves best: not even looked at.)
        if out and len(stages) == 1 and 1 < len(out) <= 4 and max(map(len, out)) >= SEND_UNJOINED:
            return self._send_unjoined(stages[0], out)
        data = b"".join(out) if out else b""
        for stage in reversed(stages):
            data = stage.send(data)
        return [data] if data else None

    @staticmethod
    def _send_unjoined(stage: Stage, out: list[Buffer]) -> list[Buffer] | None:
        """A large buffer goes through the stage as it is, not copied into one join
        (a 1 MiB echo is joined once less); the small ones around it are joined."""
        sent: list[Buffer] = []
        small: list[Buffer] = []
        for buffer in out:
            if len(buffer) < SEND_UNJOINED:
                small.append(buffer)
                continue
            if small:
                sent.append(stage.send(b"".join(small)))
                small = []
            sent.append(stage.send_buffer(buffer))
        if small:
            sent.append(stage.send(b"".join(small)))
        kept = [data for data in sent if data]
        return kept or None
