"""UDP chat room client: log in, join a password-protected room, chat, send files.

Start the server on one PC (`python server.py`), then on each other PC:

    python client.py                                   # asks for the server's IP and port
    python client.py --host 192.168.1.10 --port 9999   # asks neither
    python client.py --find                            # lists the servers on this network
    python client.py --gui                             # the same chat in a window (tkinter)

At the `Server IP` prompt, `?` searches the network: one FIND datagram broadcast to every
host, and a list of the servers that answered. When standard input is not a terminal, every
answer (the password too) is read as a plain line and end of input means exit:

    printf '/login\\nalice\\nsecret\\njuara\\nhello\\nexit\\n' \\
        | python client.py --host 127.0.0.1 --port 9999

How it is built, in the order this file reads: `Event`, everything the client tells its
user, in one stream; `ClientProtocol`, the protocol with no socket, thread or clock (fed
datagrams and the time, it says what to send; getting back in after a lost session is one
of its states); `FileTransfers`, files both ways on the session's second channel;
`ChatClient`, the protocol plus a UDP socket and one network thread; discovery; the
terminal face and the command table it shares with the window face (--gui); `main`.
The packet format, the channel and the toy ciphers (XOR and Caesar only hide text from a
casual glance) are defined once, in encryption_helper.py.

A SAY datagram, as this client sends it (XOR-scrambled payload, readable header):

    55 43 06 05 00 04 00 07  00 00 00 07 00 00 00 02   "UC" v6 SAY flags=TAGGED len=7 seq=7 ack=2
    00 00 00 00 3e 1a 2c 5e  5e 77 90 12 cc c1 4f bd   sack=0, token, CRC-32, then the payload:
    49 4c 5a 58 12 0a 60                               [5]"hi :)" XORed with the key "II2120",
    20 e8 14 30 52 5f 66 bf  13 19 a3 bb b0 95 73 58   and the tag (K of PROTOCOL.md's example)
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import getpass
import hashlib
import hmac
import math
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import unicodedata

import auth
import encryption_helper as wire
from encryption_helper import MAX_TEXT_BYTES, NO_TOKEN, Channel, PacketType, Refused, describe_size

try:
    # Linux and macOS: the line being typed is drawn again below a message printed above it
    import readline
except ImportError:
    readline = None
try:
    # POSIX: to turn the terminal's echo off between questions, and back on at the end
    import termios
except ImportError:
    termios = None
try:
    # Unix only: asking the kernel for the addresses of each network interface
    import fcntl
except ImportError:
    fcntl = None

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9999
# Seconds: a thread blocks at most MAX_WAIT, so that Ctrl+C and shutdown are prompt. Before
# login nothing is measured yet: a try each FIRST_CONTACT_RETRY. Once the session is lost, a
# try at getting back in each REJOIN_EVERY, waiting up to ELSEWHERE_PATIENCE for an old
# session of ours to time out on the server.
MAX_WAIT, FIRST_CONTACT_RETRY, REJOIN_EVERY, ELSEWHERE_PATIENCE = 0.5, 1.0, 2.0, 60.0
# characters this client asks of a new account's password (the server takes any)
MIN_PASSWORD = 4
# The most iterations of the slow hash a server may ask (600,000 take about 0.4 s): more
# would keep the client hashing for a minute.
MAX_ITERATIONS = 60_000_000
# Requests the server never did when it says it stops, and which may wait for a rejoin.
RESENDABLE = {PacketType.SAY, PacketType.PRIVATE, PacketType.JOIN, PacketType.ROOMS, PacketType.WHO}
# Refusals of a LOGIN that end by themselves: a lockout, a busy server, an old session of
# ours that the server keeps until it times out (we came back from a new address).
WORTH_WAITING = {"busy", "full", "stale-cookie", "slow-down", "stopping", "locked",
                 "logged-in-elsewhere"}


@dataclasses.dataclass
class Timing:
    """How patient the client is. Tests shorten these; the defaults suit a lab."""

    # Before login: try once a second, for this long; then "Server not responding". At
    # 30% loss each way a try fails about half the time, and all ten fail once in a thousand.
    # Logged in: a PING after `heartbeat_every` of quiet, so the server keeps us; nothing
    # heard for `lost_contact_after` while waiting: a warning, for `give_up_after`: the
    # session is lost. `exit` waits `goodbye_timeout` for the server's goodbye.
    connect_timeout: float = 10.0
    heartbeat_every: float = 5.0
    lost_contact_after: float = 15.0
    give_up_after: float = 45.0
    initial_rto: float = wire.RtoEstimator.INITIAL
    min_rto: float = wire.RtoEstimator.FLOOR
    max_rto: float = wire.RtoEstimator.CEILING
    goodbye_timeout: float = 3.0


@dataclasses.dataclass(frozen=True)
class Event:
    """One thing to tell the user (or a waiting caller): the client's single stream out.

    From the server: "chat", "private", "history", "join", "leave" and the FILE_EVENTS,
    `more` holding the fields after the text. Made by the client: "notice" (`text` is a
    finished line), "transfer" (`more` is (the Transfer as it was, the live one)), "state"
    (`text` is the new state), and "answer" (`more` is (request number, fields or error)).
    """

    kind: str
    # unix time: the server's stamp, or the client's clock for its own events
    time: float
    room: str = ""
    user: str = ""
    text: str = ""
    more: tuple = ()


# --- What can go wrong, in words a student understands (a refusal is wire.Refused) ---


class ChatError(Exception):
    """Something the user should be told about; str() is the message."""


class ServerNotResponding(ChatError):
    """No answer: the server is not running, or not at that address, or the keys differ."""


class SessionLost(ChatError):
    """The session ended before the server answered: it may or may not have done it."""


class ConnectionClosed(ChatError):
    """The client was closed, or gave up on the server."""


class FileProblem(ChatError):
    """A file that cannot be sent or saved; str() says why."""


SESSION_LOST = "The server does not know this session (was it restarted?). Log in again."
KEY_MISMATCH = ("The server's reply fails its checksum: server and client keys differ? "
                "Both must use the same --cipher and --key.")
NOT_SENT = "Not back in the chat; not sent."


# --- The protocol, without sockets, threads or clock -----------------------------------
#
# The life of a line typed, "hi": ChatClient.say -> ClientProtocol.request (SAY queued on
# the session's Channel, numbered 7) -> the network thread's poll() -> Channel.poll ->
# encode_packet -> sock.send. The server's OK [7, "to lobby, 2 others"] comes back through
# receive() -> Channel.receive (in order, acknowledged) -> receive_answer, which finds
# request 7 in `pending` and puts Event("answer") and the own line Event("chat") out.


class Requests:
    """Numbered requests, their answers and the timers (`poll`): the transport half of
    ClientProtocol, and all its state. Before login a request goes one at a time, sent
    again once a second (stop-and-wait: a Channel with a window of 1); after it, on the
    session's Channel (a window of 32: a paste of twenty lines flows without waiting).
    Each request gets a ticket, which its Event("answer") names; our own requests (a
    PING) have ticket 0.
    """

    # The datagram being read: check_welcome checks its tag.
    datagram = b""

    def __init__(self, cipher, timing: Timing | None = None, now: float = 0.0, loss: float = 0.0,
                 trace=None, server: str = "the server", downloads: str = "downloads",
                 rejoin: bool = True):
        self.cipher, self.timing, self.trace = cipher, timing or Timing(), trace
        self.server, self.rejoin = server, rejoin
        # Simulated loss (--loss) makes each try less likely to get through: try longer.
        tries = self.timing.connect_timeout / FIRST_CONTACT_RETRY / (1 - loss) ** 2
        self.connect_tries = max(1, math.ceil(tries))
        self.state, self.closed_reason, self.events, self.outbox = "not logged in", "", [], []
        self.token, self.tickets, self.unreachable, self.wall_offset = NO_TOKEN, 0, 0, 0.0
        self.now = self.last_heard = self.last_sent = now
        # the requests sent, by sequence number: (ticket, type, fields); those held while
        # getting back in, (ticket, type, fields) too. Before login, numbers go on across
        # tries (PROTOCOL.md 9).
        self.pending, self.held, self.next_stranger_seq = {}, [], 1
        self.name = self.room = self.file_stream = None
        self.channel = self.new_channel()
        self.files = FileTransfers(downloads, lambda *both: self.emit("transfer", more=both),
                                   lambda number, *answer: self.send(PacketType.FILE_CANCEL,
                                                                     [str(number), *answer]))
        # Getting back in: the last login and room with their passwords, the refusal told
        # already, when to try next and since when; back in a room its past comes again:
        # the time of the newest line shown.
        self.login, self.joined, self.told, self.retry_at, self.since = (), (), "", 0.0, 0.0
        self.returning, self.shown_until, self.last_second = False, 0.0, set()
        # SRP-6a (PROTOCOL.md 4): M2 expected by the M1 sent, with the login it would make
        # (name, x, salt, iterations) and its key K; that login, once M2 checked; a rejoin's
        # secret a. From K: the session's keys (wire.session_keys); a RESET's proof.
        self.proofs, self.login_try, self.rejoin_key = {}, (), 0
        self.keys, self.reset_proof = wire.SessionKeys(b"", b"", b""), b""

    def new_channel(self, token: bytes = NO_TOKEN, flags: int = 0) -> Channel:
        """A session's channel; before login a stop-and-wait one, a try a second (every
        REJOIN_EVERY s to get back in)."""
        if token != NO_TOKEN:
            timing = self.timing
            rto = wire.RtoEstimator(timing.initial_rto, timing.min_rto, timing.max_rto)
            channel = Channel(self.cipher, token, rto=rto, ack_delay=wire.ACK_DELAY,
                              ack_every=wire.ACK_EVERY, flags=flags)
            # every packet of the session tagged: the server drops any other with our token
            channel.key = self.keys.to_server
            return channel
        back = self.state == "reconnecting"
        retry, tries = (REJOIN_EVERY, 10**9) if back else (FIRST_CONTACT_RETRY, self.connect_tries)
        return Channel(self.cipher, window=1, max_sends=tries,
                            first_seq=self.next_stranger_seq,
                            rto=wire.RtoEstimator(retry, retry, retry))

    @property
    def logged_in(self) -> bool:
        return self.token != NO_TOKEN

    def emit(self, kind: str, room="", user="", text="", more=()) -> None:
        self.events.append(Event(kind, self.now + self.wall_offset, room, user or "", text,
                                 tuple(more)))

    def notice(self, text: str) -> None:
        self.emit("notice", text=text)

    def answer(self, ticket: int, result) -> None:
        """Give request `ticket` its answer: its fields, or the error that ended it."""
        if ticket:
            self.emit("answer", more=(ticket, result))

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.emit("state", text=state)

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def trace_packet(self, direction: str, data: bytes, note: str = "") -> None:
        """--verbose: trace one datagram; the line is only put together when someone reads it."""
        if self.trace:
            self.trace(f"[trace] {direction:<3} {wire.describe_datagram(data)}{note}")

    # --- Requests ---

    def request(self, ptype: PacketType, fields=(), now: float = 0.0) -> int:
        """Queue a request; return its ticket, which its "answer" event names."""
        self.now, self.tickets = now, self.tickets + 1
        if self.state == "closed":
            raise ConnectionClosed(self.closed_reason)
        if self.state == "reconnecting" and ptype in RESENDABLE:
            # the first line kept says so, or it would seem to go nowhere (and be typed again)
            if ptype == PacketType.SAY and PacketType.SAY not in [held[1] for held in self.held]:
                self.notice("[INFO] Not back in yet: what you type waits, and goes once back in.")
            self.held.append((self.tickets, ptype, tuple(fields)))
        elif self.state == "reconnecting" and ptype != PacketType.BYE:
            raise Refused("not-sent", "Not in the chat right now; not sent.")
        elif not self.logged_in and ptype in RESENDABLE | {PacketType.FILE_OFFER}:
            raise SessionLost(SESSION_LOST)
        else:
            self.send_request(self.tickets, ptype, fields)
        return self.tickets

    def forget(self, ticket: int) -> bool:
        """Drop a held request whose asker stopped waiting; False if it is not held."""
        kept = [held for held in self.held if held[0] != ticket]
        found, self.held = len(kept) < len(self.held), kept
        return found

    def send(self, ptype: PacketType, fields) -> None:
        """Send a request of our own (ticket 0: nobody waits for its answer)."""
        self.send_request(0, ptype, fields)

    def send_request(self, ticket: int, ptype: PacketType, fields) -> None:
        """Put a request on the channel, or raise Refused if it cannot go."""
        if ptype == PacketType.HELLO:
            # padding: the server answers no HELLO under 640 bytes (no amplification)
            fields = ["." * (wire.MIN_HELLO_SIZE - wire.HEADER_SIZE - 2)]
        sent = list(fields)
        if ptype == PacketType.JOIN:
            # the room's password, sealed with this session's key: a listener cannot read it
            sent[1] = wire.seal_text(self.keys.seal, sent[1])
        payload = wire.pack_fields(*sent)
        if len(payload) > wire.MAX_PAYLOAD:
            raise Refused("too-long", "That is too long to send in one packet; not sent.")
        if self.channel.idle():
            # silence counts from when we start waiting
            self.last_heard = max(self.last_heard, self.now)
        if not (seq := self.channel.send(ptype, payload)):
            raise Refused("busy", "Too many lines are waiting to be sent; not sent.")
        self.pending[seq] = (ticket, ptype, tuple(fields))
        self.next_stranger_seq = seq + 1 if not self.logged_in else self.next_stranger_seq


    # --- Time ---

    def poll(self, now: float) -> list[bytes]:
        """Return the datagrams to send now; keep alive, warn, retry or give up as time says."""
        self.now = now
        if self.state == "closed":
            return []
        if self.state == "connected" and self.channel.idle():
            if now - self.last_sent >= self.timing.heartbeat_every:
                # so the server knows we are here
                self.send(PacketType.PING, ())
        if self.state == "reconnecting" and not self.pending and now >= self.retry_at:
            self.send(PacketType.HELLO, ())
        out, self.outbox = self.outbox + self.channel.poll(now), []
        if self.file_stream is not None:
            self.files.fill(self.file_stream)
            out += self.file_stream.poll(now)
        for data in out:
            self.trace_packet("out", data)
        self.last_sent = now if out else self.last_sent
        self.check_contact(now)
        return out

    def check_contact(self, now: float) -> None:
        """Warn when the server has gone quiet while we wait for it; give up after a while."""
        streams = [self.channel] + ([self.file_stream] if self.file_stream else [])
        silence = now - self.last_heard
        if self.state == "lost contact" and silence < self.timing.lost_contact_after:
            self.set_state("connected")
            self.notice("[INFO] In contact with the server again.")
        if self.channel.failed and not self.logged_in:
            self.fail_pending(ServerNotResponding(f"Server not responding at {self.server}"))
        elif not self.logged_in or all(stream.idle() for stream in streams):
            return
        elif any(stream.failed for stream in streams) or silence >= self.timing.give_up_after:
            self.give_up(f"Lost contact with the server for {silence:.0f} s")
        elif silence >= self.timing.lost_contact_after and self.state == "connected":
            self.set_state("lost contact")
            self.notice("[WARN] Lost contact with the server... still trying.")

    def give_up(self, reason: str) -> None:
        """No answer for too long: a session is lost (and got back if we can); else close."""
        if self.logged_in and self.unreachable:
            reason = f"The server at {self.server} has stopped (nothing is listening on its port)"
        if self.logged_in:
            self.notice(f"[WARN] {reason}.")
            self.lose_session(SessionLost(f"{reason}."), told=True)
        else:
            self.closed_reason = f"{reason}; giving up."
            self.fail_pending(ConnectionClosed(self.closed_reason))
            self.set_state("closed")

    def next_wakeup(self) -> float:
        """Return when poll() next has work to do."""
        wakeups = [self.channel.next_wakeup(), 0.0 if self.outbox else math.inf]
        if self.state == "connected":
            wakeups.append(self.last_sent + self.timing.heartbeat_every)
        if self.state == "reconnecting" and not self.pending:
            wakeups.append(self.retry_at)
        if self.file_stream is not None:
            wakeups.append(self.file_stream.next_wakeup())
        return min(wakeups)


class ClientProtocol(Requests):
    """One user's side of the chat: datagrams and the time in, datagrams and Events out.

    Entry points: `request(type, fields, now)` queues a request and returns its ticket;
    `receive(datagram, now)`; `poll(now)` returns what to send now; `next_wakeup()`;
    `port_unreachable()`, the OS's ICMP report; `log_out()`. Out: `take_events()`.

    `state`: "not logged in", "connected", "lost contact" (the server silent),
    "reconnecting" or "closed". A session lost by a RESET, a "stop" or a long silence goes
    to "reconnecting" when a login is remembered (in memory only): HELLO -> LOGIN (marked
    "rejoin", so that it never pushes a newer login out) -> JOIN of the last room, tried
    every REJOIN_EVERY s; what the user asks for meanwhile is held, and sent once back in.
    """

    # --- What the server sends ---

    def receive(self, data: bytes, now: float) -> None:
        """Take one datagram from the server."""
        self.now, self.datagram = now, data
        try:
            packet = wire.decode_packet(data, self.cipher)
        except wire.PacketError as error:
            self.trace_packet("in ", data, f": bad datagram, dropped ({error})")
            if isinstance(error, wire.ChecksumError) and not self.logged_in:
                # every answer is unreadable
                self.fail_pending(ServerNotResponding(KEY_MISMATCH))
            return
        if self.logged_in and not (packet.token == self.token and self.authentic(data, packet)):
            return self.trace_packet("in ", data, ": not from our session's server, dropped")
        self.last_heard, self.unreachable = now, 0
        files = bool(packet.flags & wire.FLAG_FILE_STREAM)
        stream = self.file_stream if files else self.channel
        if packet.type == PacketType.RESET and self.logged_in:
            # the server has no session with the token it echoes, and proved it is ours
            self.trace_packet("in ", data)
            return self.lose_session(SessionLost(SESSION_LOST))
        if packet.type == PacketType.RESET or not expected(packet, self.token, stream):
            return self.trace_packet("in ", data, ": not for this session, dropped")
        outcome, ready = stream.receive(packet, now)
        self.trace_packet("in ", data, "" if outcome in ("in order", "unsequenced") else
                          ": " + outcome)
        self.deliver(ready, files)

    def deliver(self, ready: list[wire.Packet], files: bool) -> None:
        """Hand what a stream put in order to its handler: chunks, EVENTs, answers."""
        for got in ready:
            if files and got.seq and got.type == PacketType.FILE_CHUNK:
                self.files.receive_chunk(got.payload)
            elif not files and got.type == PacketType.EVENT:
                self.receive_event(got)
            elif not files and got.type in (PacketType.OK, PacketType.ERROR):
                self.receive_answer(got)

    def authentic(self, data: bytes, packet: wire.Packet) -> bool:
        """Is this packet with our token from our server? Anyone can read the token off the
        wire; only the two ends know K. So a packet must carry the tag made from K; a RESET,
        which a restarted server cannot tag, the proof our login's answer sealed for us."""
        if packet.type == PacketType.RESET:
            return secrets.compare_digest(packet.payload, self.reset_proof)
        return wire.tagged_by(data, self.keys.to_client)

    def receive_answer(self, packet: wire.Packet) -> None:
        """An OK or ERROR, found by the request number in its first field: the answer to a
        request of the user's, or of ours; note what it changes, show our own line."""
        try:
            seq, *fields = wire.unpack_fields(packet.payload)
            ticket, ptype, asked = self.pending.pop(int(seq))
        except (wire.PacketError, ValueError, KeyError):
            # unreadable, or a late answer to something given up on
            return
        result = fields
        if packet.type == PacketType.ERROR:
            result = Refused(*fields[:2]) if len(fields) >= 2 else Refused("error", "Refused.")
        elif ptype == PacketType.LOGIN and len(asked) > 3:
            result = self.check_welcome(asked, fields, packet.token)
        if ptype == PacketType.FILE_OFFER:
            self.files.answered(ticket, result)
        self.answer(ticket, result)
        if isinstance(result, list):
            self.accepted(ticket, ptype, asked, result, packet.token)
        if not ticket and self.state == "reconnecting":
            self.step_back(ptype, result, asked)

    def prove(self, challenge: list, cookie: str, name: str, A: str, a: int, x: int,
              *rejoin: str) -> tuple:
        """Return LOGIN's second step for the server's [salt, iterations, B]; expect its M2."""
        M1, M2, K = login_proofs(name, x, a, challenge)
        self.proofs = {M1: (M2, (name, x, *challenge[:2]), K)}
        return (cookie, name, A, M1, *rejoin)

    def check_welcome(self, asked: tuple, fields: list, token: bytes):
        """Return the welcome of a LOGIN's second step without its M2, if M2 proves that the
        server holds our verifier (a fake server cannot make it); else a refusal."""
        expected, self.login_try = self.proofs.pop(asked[3], None), ()
        unreadable = Refused("bad-reply", "The server's welcome could not be read.")
        if not (expected and len(fields) == 5 and token != NO_TOKEN):
            return unreadable
        if not secrets.compare_digest(fields[3].encode(), expected[0].encode()):
            return Refused("bad-proof", "The server could not prove that it holds your "
                                        "account: not logged in (is it the real server?).")
        login, keys = expected[1], wire.session_keys(expected[2])
        try:
            proof = bytes.fromhex(wire.open_text(keys.seal, fields[4]))
        except (wire.PacketError, ValueError):
            return unreadable
        # M2 proves K; the welcome's tag, made from K, proves the token and the reset proof.
        if len(proof) != 16 or not wire.tagged_by(self.datagram, keys.to_client):
            return unreadable
        self.login_try, self.reset_proof, self.keys = login, proof, keys
        return fields[:3]

    def accepted(self, ticket: int, ptype: PacketType, asked: tuple, fields: list, token: bytes):
        """The server did what we asked: note what that changes, show our own line."""
        if ptype == PacketType.LOGIN and len(asked) > 3:
            self.start_session(token, fields[0])
            # the user's login, not ours getting back in: the one to remember (x, no password)
            if ticket:
                self.login, self.joined, self.returning = self.login_try, (), False
        elif ptype == PacketType.JOIN:
            # a room the user chose: all its past is news
            self.room, self.joined, self.returning = fields[0], asked, self.returning and not ticket
        elif ptype == PacketType.SAY:
            self.emit("chat", self.room or "", self.name, asked[0])
        elif ptype == PacketType.PRIVATE:
            self.emit("private", "", self.name, asked[1], more=(asked[0],))
        elif ptype == PacketType.BYE:
            self.log_out()

    def receive_event(self, packet: wire.Packet) -> None:
        try:
            event = read_event(packet.payload)
        except (wire.PacketError, ValueError):
            # unreadable: skipped
            return
        if event.kind == "stop":
            # a last ACK at once, so the server knows we heard
            cumulative, bitmap = self.channel.acknowledgement()
            ack = wire.Packet(PacketType.ACK, 0, cumulative, bitmap, self.token)
            self.outbox.append(wire.encode_packet(ack, self.cipher, key=self.channel.key))
            self.notice("[INFO] The server was stopped.")
            self.lose_session(SessionLost("The server was stopped."), stopped=True)
        elif event.kind == "replaced":
            self.notice("[INFO] You logged in elsewhere; this client is logged out.")
            self.login = ()
            self.lose_session(SessionLost("You logged in elsewhere."), told=True)
        elif event.kind == "file":
            # told first, then the download starts
            self.events.append(event)
            self.files.offer_arrived(event.user, list(event.more))
        elif event.kind in wire.FILE_EVENTS and self.files.event(event):
            # a transfer of ours ended: its own event says so
            return
        elif event := self.fresh(event):
            self.events.append(event)

    def fresh(self, event: Event) -> Event | None:
        """Return a server event to show, or None for the room's past shown already.

        Back in after a loss, the room's history comes again. A line before the newest one
        shown was shown (of that second, times being whole seconds, only the lines seen),
        and our own lines were shown as we said them; a later one is news from the gap.
        """
        if event.kind == "history" and self.returning:
            seen = event.time == self.shown_until and (event.user, event.text) in self.last_second
            own = event.user.lower() == (self.name or "").lower()
            if own or event.time < self.shown_until or seen:
                return None
            event = dataclasses.replace(event, kind="chat")
        if event.kind in ("chat", "history", "join", "leave") and event.time >= self.shown_until:
            if event.time > self.shown_until:
                self.shown_until, self.last_second = event.time, set()
            self.last_second.add((event.user, event.text))
        return event

    # --- Sessions: start, end, get back in ---

    def start_session(self, token: bytes, name: str) -> None:
        """Logged in: from now on, everything goes on the session's two channels."""
        self.end_requests(Refused("not-sent", "Sent while logging in; not sent."))
        self.token, self.name = token, name
        self.channel = self.new_channel(token)
        self.file_stream = self.new_channel(token, wire.FLAG_FILE_STREAM)
        if self.state != "reconnecting":
            self.set_state("connected")

    def end_requests(self, error, stopped: bool = False) -> None:
        """Answer every request waiting with `error`, but a BYE, which is answered (the session
        is over, as it asked); what a stopped server never did is held for the rejoin."""
        waiting, self.pending = self.pending, {}
        for ticket, ptype, fields in waiting.values():
            if stopped and ticket and ptype in RESENDABLE:
                self.held.append((ticket, ptype, fields))
                continue
            if ptype == PacketType.FILE_OFFER:
                self.files.answered(ticket, error)
            self.answer(ticket, ["goodbye"] if ptype == PacketType.BYE else error)
        self.channel = self.new_channel()

    def fail_pending(self, error: ChatError) -> None:
        """Before login: every request waiting gets `error`, and a try later, getting back in."""
        self.end_requests(error)
        self.retry_at = self.now + REJOIN_EVERY

    def lose_session(self, error: SessionLost, stopped: bool = False, told: bool = False) -> None:
        """The session ended without our asking: get back in if we can, else it is over."""
        back = self.rejoin and bool(self.login)
        self.end_requests(error, stopped and back)
        self.token, self.name, self.room, self.file_stream = NO_TOKEN, None, None, None
        self.files.end_all("the session ended")
        if back and self.state != "reconnecting":
            self.set_state("reconnecting")
            self.notice("[INFO] Trying to get back in (exit to stop)...")
            self.retry_at, self.since, self.told = self.now, self.now, ""
            self.channel = self.new_channel()
        elif not back and self.state != "closed":
            if not told:
                self.notice(f"[WARN] {error}")
            self.set_state("not logged in")

    def step_back(self, ptype: PacketType, result, asked: tuple) -> None:
        """Getting back in: take the answer to our HELLO, LOGIN or JOIN; send what comes next."""
        done, code = isinstance(result, list), getattr(result, "code", "")
        # A lockout ends, and so does an old session of ours that the server keeps at our
        # old address (a new Wi-Fi, say) until it times out: worth waiting for.
        patient = code in WORTH_WAITING and (code != "logged-in-elsewhere"
                                             or self.now - self.since < ELSEWHERE_PATIENCE)
        if ptype == PacketType.HELLO and done:
            self.rejoin_key = secrets.randbits(256)
            self.send(PacketType.LOGIN, (result[0], self.login[0], public_key(self.rejoin_key)))
        elif ptype == PacketType.LOGIN and done and len(asked) == 3:
            self.prove_again(result, asked)
        elif ptype == PacketType.LOGIN and done:
            self.notice(f"[INFO] Back in as {self.name}.")
            self.returning = bool(self.joined)
            self.send(PacketType.JOIN, self.joined) if self.joined else self.back_in()
        elif ptype == PacketType.JOIN and (done or code):
            room, self.joined = self.joined[0], self.joined if done else ()
            self.notice(f"[INFO] In {result[0]} again." if done else
                        f"[WARN] Not back in {room}: {result.text} Type /join {room} to try again.")
            self.back_in()
        elif code and not patient:
            self.notice(f"[WARN] Could not get back in: {result.text}")
            self.log_out(NOT_SENT)
        else:
            # not answering yet, or lost again half-way: try again soon, from the top
            self.retry_at = self.now + REJOIN_EVERY
            if code in ("locked", "logged-in-elsewhere") and code != self.told:
                self.told = code
                self.notice(f"[WARN] Not back in yet: {result.text} (still trying)")

    def prove_again(self, challenge: list, asked: tuple) -> None:
        """Getting back in: LOGIN's second step with the x kept from the user's login (no
        password, and no slow hash, needed); an account made anew means logging in again."""
        name, x, *made = self.login
        try:
            if challenge[:2] != made:
                raise Refused("bad-reply", "The account was made anew; log in again.")
            self.send(PacketType.LOGIN, self.prove(challenge, *asked, self.rejoin_key, x, "rejoin"))
        except Refused as refusal:
            self.notice(f"[WARN] Could not get back in: {refusal.text}")
            self.log_out(NOT_SENT)

    def back_in(self) -> None:
        """Back in the chat: send what the user asked for meanwhile, in order."""
        self.set_state("connected")
        held, self.held = self.held, []
        for ticket, ptype, fields in held:
            try:
                self.send_request(ticket, ptype, fields)
            except Refused as refusal:
                # too long, or too many waiting: that one is not sent
                self.answer(ticket, refusal)

    def log_out(self, why: str = "Logged out; not sent.") -> None:
        """The session is over by our choice (BYE), or we gave up getting back in."""
        for ticket, *_ in self.held:
            self.answer(ticket, Refused("not-sent", why))
        self.login, self.held = (), []
        self.lose_session(Refused("not-sent", why), told=True)

    def port_unreachable(self) -> None:
        """The OS reported an ICMP "port unreachable": nobody listens there (yet). Before
        login two with nothing heard between mean no server. In a session it is only a hint,
        since anyone on the LAN can forge one: we ask the server (a PING, resent as usual),
        and only its silence ends the session (check_contact); the give-up then says why."""
        self.unreachable += 1
        if self.trace:
            self.trace('[trace] in  ICMP "port unreachable": a hint, the server is asked')
        if self.state == "reconnecting":
            return
        if self.logged_in and self.channel.idle():
            self.send(PacketType.PING, ())
        elif not self.logged_in and self.unreachable >= 2 and self.pending:
            self.fail_pending(ServerNotResponding(f"Server not responding at {self.server} "
                                                  "(nothing is listening on that port)"))


def read_server_key(text: str) -> int:
    """Return the server's key Y from HELLO's answer; 0, 1 or -1 mod N would make Z known."""
    if not re.fullmatch(r"[0-9a-f]{1,512}", text) or not 1 < int(text, 16) < wire.SRP_N - 1:
        raise Refused("bad-reply", "The server sent no key of the group: not a chat server?")
    return int(text, 16)


def registration(fields: list[str], Y: int) -> tuple[list[str], int]:
    """Return REGISTER's [cookie, name, salt, iterations, verifier] with A = g^a and the tag
    added, and Z = Y^a: the key of the tags, which the server finds as A^y."""
    a = secrets.randbits(256)
    fields = [*fields, public_key(a)]
    Z = pow(Y, a, wire.SRP_N)
    return [*fields, wire.register_tag(Z, fields)], Z


def public_key(a: int) -> str:
    """Return SRP's A = g^a mod N in hex: a LOGIN's first step sends it, a kept secret."""
    return format(pow(wire.SRP_G, a, wire.SRP_N), "x")


def read_challenge(challenge: list) -> tuple[bytes, int]:
    """Return the salt and iterations of a LOGIN's [salt, iterations, B] (or a HELLO's
    iterations, salt ''); a number of iterations no lab PC hashes in a minute is refused."""
    try:
        salt, iterations = bytes.fromhex(challenge[0]), int(challenge[1])
    except (ValueError, IndexError):
        raise Refused("bad-reply", "The server's answer could not be read.") from None
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise Refused("bad-reply", f"The server asks for {iterations} iterations of the hash.")
    return salt, iterations


def login_proofs(name: str, x: int, a: int, challenge: list) -> tuple[str, str, bytes]:
    """Return SRP's M1 and M2 in hex, and the key K, for the server's [salt, iterations, B]."""
    salt, A = read_challenge(challenge)[0], pow(wire.SRP_G, a, wire.SRP_N)
    try:
        B = int(challenge[2], 16)
        S = wire.srp_client(x, a, A, B)
        K, M1, M2 = wire.srp_proofs(name, salt, A, B, S)
        return M1.hex(), M2.hex(), K
    except ValueError:
        raise Refused("bad-reply", "The server's answer could not be read.") from None


def expected(packet: wire.Packet, token: bytes, stream: Channel | None) -> bool:
    """Could this packet be for us now? Before login (no token) only answers, numbered 0;
    after it, packets with our token on a stream we have, and no unsequenced one but ACK."""
    if token == NO_TOKEN:
        return packet.seq == 0 and packet.type in (PacketType.OK, PacketType.ERROR)
    ours = packet.token == token and stream is not None
    return ours and (packet.seq != 0 or packet.type == PacketType.ACK)


def read_event(payload: bytes) -> Event:
    """Return an EVENT's fields [kind, unix time, room, user, text, *more] as an Event."""
    kind, when, room, user, text, *more = wire.unpack_fields(payload)
    # nan and inf fail too: no clock shows such times
    if not -1e10 < float(when) < 1e10:
        raise ValueError(f"time {when!r} out of range")
    return Event(kind, float(when), room, user, text, tuple(more))


# --- Files: sending and receiving, without sockets -----------------------------------
#
# `/send bob notes.pdf`, `/share slides.pdf`. How a file travels, alice to bob:
#
#     alice                               server                                bob
#       FILE_OFFER [bob, name, size, sha] ->
#                                   <- OK [re, 7]   (or ERROR: too big, no such user...)
#                                            EVENT "file" [..., 7, name, size, sha] ->
#                                                      <- FILE_CANCEL [7, "accept"] (/accept 7)
#       FILE_CHUNK [7, 0, data]  ~~~~>  transfers/7.part  ~~~~>  FILE_CHUNK [7, 0, data]
#       FILE_CHUNK [7, 1152, ...] ~~~>    (on disk)        ~~~>  downloads/name.part
#                          <- EVENT "file-done" [..., 7]         SHA-256 checked, renamed
#
# Chunks go on the session's second channel, whose packets carry FLAG_FILE_STREAM: a
# channel delivers in order, so on one channel a chat line sent after a lost chunk would
# wait for that chunk's resend (head-of-line blocking; QUIC gives each stream its own
# numbers for the same reason). The receiver writes NAME.part, checks the SHA-256 once
# every byte is there, and only then renames it: a crash leaves at most a .part file.
# A name comes from another user, so it is treated as hostile (`safe_file_name`), and
# nothing is written before the user accepts (the server sends no chunk before that).

# A saved file's name is cut to 200 bytes: room is left for " (12)" and ".part". Windows will
# not create a file with a reserved name, whatever its extension ("con.txt" too), nor one
# with a FORBIDDEN character; a name loses the UNPRINTABLE Unicode categories everywhere.
SAFE_NAME_BYTES = 200
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                  *(f"{port}{n}" for port in ("COM", "LPT")
                    for n in "0123456789\u00b9\u00b2\u00b3")}
FORBIDDEN = set('<>:"/\\|?*')
UNPRINTABLE = {"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"}
# Types a double-click runs (Windows, macOS, Linux desktops): saved with HARMLESS added, so
# that "tugas.pdf.exe" (Windows hides ".exe") opens as nothing. Not .py: the course's own.
EXECUTABLE_TYPES = set("""exe bat cmd com scr pif cpl msi msp ps1 psm1 vbs vbe js jse wsf wsh hta
    lnk url scf reg inf jar sh bash run desktop app command appimage""".split())
HARMLESS = ".download"


@dataclasses.dataclass(eq=False)
class Transfer:
    """One file on its way, to or from us: what /files and the progress bar show.

    `direction` "send" or "receive"; `peer` whom to ("bob", "the room") or from; `path` the
    file read, or the NAME.part written and then the final name; `number` the server's id
    (0 until it takes the offer); `done_bytes` queued or written; `state` offered, moving,
    done, failed or cancelled; `note` how it ended, and `said` the server's words when it
    cancelled it; `last_seq` the file stream's number of the last chunk sent.
    """

    direction: str
    peer: str
    name: str
    size: int
    sha256: str
    path: str
    number: int = 0
    done_bytes: int = 0
    state: str = "offered"
    note: str = ""
    said: str = ""
    file: object = None
    last_seq: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("offered", "moving")

    @property
    def percent(self) -> int:
        return self.done_bytes * 100 // self.size if self.size else 100 * (self.state == "done")


def safe_file_name(name: str) -> str:
    """Return `name` made safe to save: no folders, drives, devices, controls; not too long.

    >>> safe_file_name("../../etc/passwd"), safe_file_name("C:\\\\x"), safe_file_name("con.txt")
    ('passwd', 'x', '_con.txt')
    """
    # the last part: no folder, "..", drive
    name = re.split(r"[/\\]", unicodedata.normalize("NFC", name).replace("\0", ""))[-1]
    name = "".join("_" if ch in FORBIDDEN else ch for ch in name if not unprintable(ch))
    # Windows drops trailing dots and spaces; a leading dot hides a file
    name = name.strip(" .") or "file"
    if name.split(".")[0].upper().rstrip(" ") in RESERVED_NAMES:
        name = "_" + name
    return shorten(name, SAFE_NAME_BYTES)


def executable(name: str) -> bool:
    """Is the type of `name` one a double-click runs? ("x.EXE", "x .exe", "résumé.scr")"""
    return "." in name and name.rsplit(".", 1)[1].strip().lower() in EXECUTABLE_TYPES


def unprintable(character: str) -> bool:
    """Is it a control, a format character (bidi overrides...), unassigned, or a line break?
    Emoji's zero-width joiner and variation selector are kept: they are part of the emoji."""
    return unicodedata.category(character) in UNPRINTABLE and character not in "\u200d\ufe0f"


def shorten(name: str, limit: int) -> str:
    """Return `name` cut to `limit` UTF-8 bytes, its extension kept when it is short."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, extension = os.path.splitext(name)
    if len(extension.encode("utf-8")) > 20:
        stem, extension = name, ""
    room = limit - len(extension.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(" .")
    return (stem or "file") + extension


def unused_path(folder: str, name: str, also: str = "") -> str:
    """Return folder/name, or folder/name (1), (2)... : the first that does not exist yet
    (nor with `also` after it: a download's NAME.part)."""
    stem, extension = os.path.splitext(name)
    candidate, number = os.path.join(folder, name), 0
    while os.path.lexists(candidate) or (also and os.path.lexists(candidate + also)):
        number += 1
        candidate = os.path.join(folder, f"{stem} ({number}){extension}")
    return candidate


def file_sha256(path: str) -> str:
    """Return the SHA-256 of a file, read in pieces (a big file is never all in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(wire.MB), b""):
            digest.update(piece)
    return digest.hexdigest()


def prepare_upload(to: str, path: str) -> Transfer:
    """Check a file we are asked to send and hash it; raise FileProblem if it cannot go."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileProblem(f"No such file: {path}")
    if os.path.isdir(path):
        raise FileProblem(f"{path} is a folder; send the files in it one by one (or a .zip of it).")
    try:
        size, sha = os.path.getsize(path), file_sha256(path)
    except OSError as error:
        raise FileProblem(f"Cannot read {path}: {error.strerror or error}") from None
    name = shorten(os.path.basename(path), wire.MAX_FILE_NAME_BYTES)
    return Transfer("send", to or "the room", name, size, sha, path)


def offer_fields(transfer: Transfer) -> list[str]:
    """Return a FILE_OFFER's fields: [to ('' = the room), name, size, SHA-256]."""
    to = "" if transfer.peer == "the room" else transfer.peer
    return [to, transfer.name, str(transfer.size), transfer.sha256]


def naming_the_user(refusal: Refused, user: str) -> Refused:
    """Return the refusal, naming the user if there is no such user: the server never echoes
    a name it does not know (it may be anything), but the one who typed it may see it."""
    if refusal.code == "unknown-user":
        return Refused(refusal.code, f"No such user: {printable(user)}.")
    return refusal


class FileTransfers:
    """A client's files, both ways: uploads read from disk, downloads checked and named.

    Narrow interface: `emit(then, live)` reports a change (started, another whole percent,
    ended: the transfer as it was, shown later on another thread, and the live one),
    `cancel(number)` tells the server a transfer of ours stopped, `cancel(number, "accept")`
    that we take an offer. Entry points: `answered` (the server's answer to an offer),
    `fill` (chunks into the file stream while it has room), `offer_arrived`, `answer_offer`
    and `receive_chunk` (a file coming to us), `event` (the server cancelled one),
    `cancel_mine`, `end_all`. `offers` by ticket, `transfers` in order; `accept_files`: take
    every offer unasked (only for scripts that opt in, such as the benchmarks).
    """

    def __init__(self, downloads: str, emit, cancel, accept_files: bool = False):
        self.downloads, self.report, self.cancel = downloads, emit, cancel
        self.accept_files = accept_files
        self.offers: dict[int, Transfer] = {}
        self.transfers: list[Transfer] = []

    def emit(self, transfer: Transfer) -> None:
        self.report(dataclasses.replace(transfer), transfer)

    def find(self, number: int) -> Transfer | None:
        return next((t for t in self.transfers if t.active and t.number == number), None)

    def answered(self, ticket: int, result) -> None:
        """The server answered an offer: OK [id] starts the upload; a refusal ends it."""
        transfer = self.offers.pop(ticket, None)
        taken = isinstance(result, list) and result and result[0].isdigit()
        if transfer is None or (transfer.state != "offered" and not taken):
            return
        if not taken:
            why = naming_the_user(result, transfer.peer) if isinstance(result, Refused) else result
            return self.end(transfer, "failed", str(why) if isinstance(why, Exception) else "no")
        transfer.number = int(result[0])
        if transfer.state != "offered":
            # cancelled before the server answered
            return self.cancel(transfer.number)
        self.start(transfer, lambda: open(transfer.path, "rb"), "cannot read it")

    def start(self, transfer: Transfer, opener, trouble: str) -> None:
        """Open the transfer's file and let bytes move; an empty download is done at once."""
        if transfer not in self.transfers:
            self.transfers.append(transfer)
        try:
            transfer.file = opener()
        except OSError as error:
            return self.end(transfer, "failed", f"{trouble}: {error.strerror or error}", tell=True)
        transfer.state = "moving"
        self.emit(transfer)
        if transfer.direction == "receive" and transfer.size == 0:
            self.check(transfer)

    def fill(self, stream: Channel) -> None:
        """Put chunks of the files being sent into the file stream, in turn, while it has room."""
        uploads = [t for t in self.transfers if t.direction == "send" and t.state == "moving"]
        moving = [t for t in uploads if t.done_bytes < t.size]
        while moving and len(stream.waiting) < wire.FILL:
            moving = [t for t in moving if self.send_chunk(stream, t) and t.done_bytes < t.size]
        for transfer in uploads:
            if transfer.done_bytes >= transfer.size and stream.delivered(transfer.last_seq):
                self.end(transfer, "done", "the server has it all")

    def send_chunk(self, stream: Channel, transfer: Transfer) -> bool:
        """Read the next chunk from disk and queue it; False if the file could not be read."""
        want = wire.chunk_length(transfer.size, transfer.done_bytes)
        try:
            data, why = transfer.file.read(want), "the file got shorter while it was sent"
        except OSError as error:
            data, why = b"", f"cannot read it: {error.strerror or error}"
        if len(data) != want:
            self.end(transfer, "failed", why, tell=True)
            return False
        chunk = wire.pack_chunk(transfer.number, transfer.done_bytes, data)
        transfer.last_seq = stream.send(PacketType.FILE_CHUNK, chunk)
        self.advance(transfer, want)
        return True

    def advance(self, transfer: Transfer, count: int) -> None:
        """Count bytes moved; report each whole percent reached."""
        before = transfer.percent
        transfer.done_bytes += count
        if transfer.percent != before:
            self.emit(transfer)

    def offer_arrived(self, sender: str, more: list[str]) -> None:
        """An EVENT "file" [id, name, size, sha]: an offer that waits for /accept or /decline."""
        readable = len(more) == 4 and more[0].isdigit() and more[2].isdigit()
        if readable and wire.SHA_HEX.fullmatch(more[3]):
            transfer = Transfer("receive", sender, more[1], int(more[2]), more[3], "", int(more[0]))
            self.transfers.append(transfer)
            if self.accept_files:
                self.answer_offer(transfer.number, True)

    def answer_offer(self, number: int, accept: bool) -> Transfer | None:
        """Accept (make NAME.part, ask for the chunks) or decline the offer numbered (0: the
        newest); return it, or None if no such offer waits."""
        transfer = next((t for t in reversed(self.transfers) if t.direction == "receive"
                         and t.state == "offered" and number in (0, t.number)), None)
        if transfer and not accept:
            self.end(transfer, "cancelled", "you declined it", tell=True)
        elif transfer:
            # First: a part that cannot be made says no again with FILE_CANCEL [id].
            self.cancel(transfer.number, "accept")
            self.start(transfer, lambda: self.create_part(transfer),
                       f"cannot save in {self.downloads}")
        return transfer

    def create_part(self, transfer: Transfer):
        """Create NAME.part (or NAME (1).part...) and return it open for writing. O_EXCL: the
        system refuses to open a file that exists, so two downloads of one name, or a file
        someone put there, are never written over."""
        os.makedirs(self.downloads, exist_ok=True)
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_BINARY", 0)
        while True:
            name = safe_file_name(transfer.name)
            name = unused_path(self.downloads, name + HARMLESS * executable(name), ".part")
            transfer.path = name + ".part"
            # 0o644 (less the umask): a file from someone else is never made executable;
            # FileExistsError: another download took that name a moment ago
            with contextlib.suppress(FileExistsError):
                return os.fdopen(os.open(transfer.path, flags, 0o644), "r+b")

    def receive_chunk(self, payload: bytes) -> None:
        """A FILE_CHUNK from the file stream: write it where its offset says."""
        try:
            number, offset, data = wire.unpack_chunk(payload)
        except wire.PacketError:
            return
        transfer = self.find(number)
        # none: cancelled, failed or unknown; its chunks still in flight are dropped
        if transfer is None or transfer.direction != "receive" or transfer.state != "moving":
            return
        fits = offset < transfer.size and len(data) == wire.chunk_length(transfer.size, offset)
        if offset % wire.CHUNK_SIZE or not fits:
            return self.end(transfer, "failed", "a chunk did not fit the file", tell=True)
        try:
            # chunks come in order; a seek would empty the file's write buffer for each one
            if transfer.file.tell() != offset:
                transfer.file.seek(offset)
            transfer.file.write(data)
        except OSError as error:
            # a full disk, say: this file fails, the chat goes on
            return self.end(transfer, "failed", f"cannot write it: {error.strerror or error}",
                            tell=True)
        self.advance(transfer, len(data))
        if transfer.done_bytes >= transfer.size:
            self.check(transfer)

    def check(self, transfer: Transfer) -> None:
        """Every byte is there: compare the SHA-256, then give the file its real name."""
        try:
            transfer.file.close()
            if file_sha256(transfer.path) != transfer.sha256:
                return self.end(transfer, "failed",
                                "its SHA-256 does not match: the file arrived damaged", tell=True)
            final = unused_path(*os.path.split(transfer.path[: -len(".part")]))
            # the name says "complete" only now
            os.rename(transfer.path, final)
        except OSError as error:
            # a full disk, or a virus scanner holding the file (Windows)
            return self.end(transfer, "failed", f"cannot save it: {error.strerror or error}",
                            tell=True)
        transfer.path = final
        renamed = f"; an executable type, so {HARMLESS} was added"
        self.end(transfer, "done", "SHA-256 checked" + renamed * executable(final[:-len(HARMLESS)]))

    def end(self, transfer: Transfer, state: str, note: str, tell: bool = False) -> None:
        """Finish a transfer; a download's partial file is removed unless it is done."""
        if not transfer.active:
            return
        transfer.state, transfer.note = state, note
        if transfer.file is not None:
            transfer.file.close()
        if transfer.direction == "receive" and state != "done" and transfer.path.endswith(".part"):
            # never made, or already gone: nothing to remove
            with contextlib.suppress(OSError):
                os.remove(transfer.path)
        self.emit(transfer)
        if tell and transfer.number:
            self.cancel(transfer.number)

    def event(self, event: Event) -> bool:
        """An EVENT "file-cancelled" [id] ends a transfer of ours: True, for the transfer's
        own event says so, in the server's words (they name the file, and say why)."""
        number = int(event.more[0]) if event.more and wire.whole_number(event.more[0]) else 0
        if event.kind != "file-cancelled" or not (mine := self.find(number)):
            return False
        mine.said = event.text
        self.end(mine, "cancelled", event.text)
        return True

    def cancel_mine(self, number: int = 0) -> list[Transfer]:
        """Stop our transfers (all, or the one numbered); return them. The server is told."""
        stopped = [t for t in [*self.offers.values(), *self.transfers]
                   if t.active and number in (0, t.number)]
        for transfer in stopped:
            self.end(transfer, "cancelled", "you cancelled it", tell=True)
        # an offer stays in `offers`: its id, once answered, is cancelled too
        return stopped

    def end_all(self, why: str) -> None:
        """The session ended: every transfer with it (the server forgets them too)."""
        for transfer in [*self.offers.values(), *self.transfers]:
            self.end(transfer, "failed", why)
        self.offers.clear()


# --- The network layer: the socket and one thread ----------------------------------------


class ChatClient:
    """One user's connection to the chat server: ClientProtocol, a socket and a thread.

    Each blocking method sends one request and returns the server's answer, or raises
    Refused (the server said no) or a ChatError (no answer, session lost, closed); `submit`
    sends one without waiting and returns a Future. Every other Event goes to `on_event`,
    called on the network thread, or, without one, into the queue `events`.

        with ChatClient("127.0.0.1", 9999) as client:
            client.login("alice", "secret")
            client.join("lobby", "juara")
            client.say("hello")
    """

    def __init__(self, host: str, port: int, cipher: str = wire.DEFAULT_CIPHER,
                 key: str | None = None, *, timing: Timing | None = None, loss: float = 0.0,
                 seed: int | None = None, on_event=None, trace=None, downloads: str = "downloads",
                 rejoin: bool = True, accept_files: bool = False):
        self.host, self.port, self.timing = host, port, timing or Timing()
        self.events: queue.Queue = queue.Queue()
        self.on_event = on_event or self.events.put
        self.protocol = ClientProtocol(wire.make_cipher(cipher, key), self.timing, time.monotonic(),
                                       loss, trace, f"{host}:{port}", downloads, rejoin)
        self.protocol.wall_offset = time.time() - time.monotonic()
        # True only in scripts that opt in: every file offered is saved unasked.
        self.protocol.files.accept_files = accept_files
        # the protocol is shared by the callers' threads and ours; futures by ticket
        self.lock, self.futures = threading.Lock(), {}
        self.closed, self.closed_reason = threading.Event(), ""
        sock = connect_udp(host, port)
        dropped = functools.partial(self.protocol.trace_packet, note=": LOST (simulated)")
        self.sock = wire.LossySocket(sock, loss, seed, dropped, side="client") if loss else sock
        # A request queued by another thread must not wait for the network thread's timer:
        # it sends a byte to one end of a socket pair, whose other end select() watches.
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self.run_network, name="chat-network", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    name = property(lambda self: self.protocol.name)
    room = property(lambda self: self.protocol.room)
    state = property(lambda self: self.protocol.state)
    logged_in = property(lambda self: self.protocol.logged_in)

    # --- Requests: what the user can do ---

    def register(self, name: str, password: str) -> str:
        """Create an account; return the server's "Registration successful.". The password
        stays here: the server is sent the salt, the iterations it asked, and v = g^x; and
        A = g^a, tagged under Z = Y^a: only the holder of the server's key y can match it."""
        def attempt(cookie: str, iterations: str, server_key: str) -> list[str]:
            rounds, Y = read_challenge(["", iterations])[1], read_server_key(server_key)
            with self.lock:
                self.protocol.notice(f"Registering at server {wire.fingerprint(Y)}: "
                                     "compare it with the server's banner.")
            record = auth.new_verifier(name, password, (wire.SRP_N, wire.SRP_G), rounds)
            fields, Z = registration(
                [cookie, name, record["salt"], iterations, record["verifier"]], Y)
            answer = self.call(PacketType.REGISTER, *fields)
            if not hmac.compare_digest(answer[0].encode(),
                                       wire.register_tag(Z, [fields[-1], answer[-1]]).encode()):
                raise Refused("bad-reply", "The answer is not from the server with that "
                                           "fingerprint: a fake server? Nothing is registered.")
            return answer
        return self.with_cookie(attempt)[-1]

    def login(self, name: str, password: str) -> str:
        """Log in by SRP-6a, the password never sent; return the welcome text. The slow hash
        runs here, on the caller's thread; later requests go on the session's channel."""
        def attempt(cookie: str, *_) -> list[str]:
            a = secrets.randbits(256)
            challenge = self.call(PacketType.LOGIN, cookie, name, public_key(a))
            salt, iterations = read_challenge(challenge)
            x = auth.password_key(name, password, salt, iterations)
            with self.lock:
                fields = self.protocol.prove(challenge, cookie, name, public_key(a), a, x)
            return self.call(PacketType.LOGIN, *fields)
        return self.with_cookie(attempt)[-1]

    def join(self, room: str, password: str) -> str:
        """Enter a room (created with this password if new); return the server's words."""
        return self.call(PacketType.JOIN, room, password)[-1]

    def say(self, text: str) -> str:
        return self.call(PacketType.SAY, text)[-1]

    def private(self, user: str, text: str) -> str:
        try:
            return self.call(PacketType.PRIVATE, user, text)[-1]
        except Refused as refusal:
            raise naming_the_user(refusal, user) from None

    def rooms(self) -> list[tuple[str, int]]:
        """Return every room and how many are in it (a last '+N', N more rooms that did not
        fit in the answer, is left out)."""
        fields = self.call(PacketType.ROOMS)
        return [(fields[i], int(fields[i + 1])) for i in range(0, len(fields) - 1, 2)]

    def who(self) -> tuple[str, list[str]]:
        """Return your room's name and its members (a last '+N': N more did not fit)."""
        room, *members = self.call(PacketType.WHO)
        return room, members

    def hello(self) -> str:
        """Ask for a cookie: proof for the server that we really are at our address."""
        return self.call(PacketType.HELLO)[0]

    def with_cookie(self, attempt) -> list[str]:
        """HELLO, then attempt(cookie, iterations, server key); again if the cookie went stale."""
        try:
            return attempt(*(self.call(PacketType.HELLO) + ["", "", ""])[:3])
        except Refused as refusal:
            if refusal.code != "stale-cookie":
                raise
        return attempt(*(self.call(PacketType.HELLO) + ["", "", ""])[:3])

    def send_file(self, to: str, path: str) -> Transfer:
        """Offer a file to `to` ('' = the room); return it once the server took the offer:
        the network thread then sends it from disk, and "transfer" events say how far it got."""
        transfer = prepare_upload(to, path)
        try:
            self.call(PacketType.FILE_OFFER, *offer_fields(transfer), transfer=transfer)
        except Refused as refusal:
            raise naming_the_user(refusal, to) from None
        return transfer

    def cancel_files(self, number: int = 0) -> list[Transfer]:
        """Stop our transfers (all, or the one numbered); the server and the others are told."""
        with self.lock:
            stopped = self.protocol.files.cancel_mine(number)
        # the network thread tells the server, and hands the events on, in order
        self.wake()
        return stopped

    def answer_offer(self, number: int = 0, accept: bool = True) -> Transfer | None:
        """Accept (or decline) the file offered as `number` (0: the newest); None if no such."""
        with self.lock:
            offer = self.protocol.files.answer_offer(number, accept)
        self.wake()
        return offer

    def transfers(self) -> list[Transfer]:
        """Return this session's transfers: in progress first, then those ended."""
        with self.lock:
            files = self.protocol.files
            return sorted([*files.offers.values(), *files.transfers], key=lambda t: not t.active)

    def bye(self) -> None:
        """End the session politely; a server that is gone or has forgotten us is fine."""
        if self.closed.is_set() or threading.current_thread() is self.thread:
            return
        if self.logged_in and self.state != "reconnecting":
            with contextlib.suppress(ChatError, Refused, concurrent.futures.TimeoutError):
                result_within(self.submit(PacketType.BYE), self.timing.goodbye_timeout)
        with self.lock:
            self.protocol.log_out()
        self.wake()

    def call(self, ptype: PacketType, *fields: str, transfer: Transfer | None = None) -> list[str]:
        """Send a request and wait for its answer; return its fields or raise its error."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("a blocking call from the network thread would wait for ever")
        # By then the server has answered, or the protocol has given up on it.
        patience = self.timing.give_up_after + self.timing.connect_timeout + 5
        future = self.submit(ptype, *fields, transfer=transfer)
        try:
            return result_within(future, patience)
        except concurrent.futures.TimeoutError:
            with self.lock:
                held = self.protocol.forget(future.ticket)
            if held:
                # it waited for a rejoin that has not come: now it never goes
                raise Refused("not-sent", "Not back in the chat yet; not sent.") from None
            raise ServerNotResponding(f"Server not responding at {self.host}:{self.port}") from None

    def submit(self, ptype: PacketType, *fields: str, transfer: Transfer | None = None):
        """Queue a request without waiting; return a Future for its fields, or its error.
        A FILE_OFFER names its `transfer`, which starts once the offer is taken."""
        if ptype in (PacketType.SAY, PacketType.PRIVATE) and wire.oversize_text(fields[-1]):
            # the server would refuse it: no need to send it
            raise Refused("too-long", wire.oversize_text(fields[-1]))
        future = concurrent.futures.Future()
        with self.lock:
            if self.closed.is_set():
                raise ConnectionClosed(self.closed_reason or "The connection is closed.")
            future.ticket = self.protocol.request(ptype, fields, time.monotonic())
            self.futures[future.ticket] = future
            if transfer:
                self.protocol.files.offers[future.ticket] = transfer
        self.wake()
        return future

    # --- The network thread: the only reader of the socket ---

    def run_network(self) -> None:
        """Send what the protocol says, sleep until its next timer or a datagram or a wake-up
        (MAX_WAIT at most), take what came; until closed."""
        try:
            while not self.closed.is_set():
                with self.lock:
                    outgoing = self.protocol.poll(time.monotonic())
                    wait = min(max(self.protocol.next_wakeup() - time.monotonic(), 0), MAX_WAIT)
                for data in outgoing:
                    self.send_datagram(data)
                self.settle()
                for key, _ in self.selector.select(wait):
                    self.drain_wakeups() if key.fileobj is self.wake_reader else self.receive_all()
                self.settle()
        except (OSError, ValueError) as error:
            # the selector or a socket closed under us: we are shutting down (if not, say so)
            if not self.closed.is_set():
                self.close(f"Internal error in the client: {error!r}")
        except Exception as error:
            # a bug, ours or a callback's: say so and stop, never hang
            self.close(f"Internal error in the client: {error!r}")

    def receive_all(self) -> None:
        while True:
            try:
                data = self.sock.recv(wire.RECV_BUFFER)
            except BlockingIOError:
                return
            except (ConnectionRefusedError, ConnectionResetError):
                # An ICMP "port unreachable" for something we sent: nobody listens there
                # (yet). On Windows it shows up as ConnectionResetError. Not fatal.
                with self.lock:
                    self.protocol.port_unreachable()
                continue
            with self.lock:
                self.protocol.receive(data, time.monotonic())

    def send_datagram(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (ConnectionRefusedError, ConnectionResetError):
            with self.lock:
                self.protocol.port_unreachable()
        except OSError as error:
            # e.g. no route to the host for now: as if lost
            self.protocol.trace_packet("out", data, f": not sent ({error})")

    def settle(self) -> None:
        """Hand what the protocol produced to its takers, outside the lock: the rest to
        on_event (first: one's own line is shown before its call returns), then answers."""
        with self.lock:
            events = self.protocol.take_events()
            answered = [(self.futures.pop(e.more[0], None), e.more[1]) for e in events
                        if e.kind == "answer"]
        for event in events:
            if event.kind != "answer":
                self.on_event(event)
        resolve(answered)
        if self.protocol.state == "closed" and not self.closed.is_set():
            self.close(self.protocol.closed_reason)

    def wake(self) -> None:
        # OSError: closing, or woken many times over already: a full pair is awake enough
        with contextlib.suppress(OSError):
            self.wake_writer.send(b"!")

    def drain_wakeups(self) -> None:
        # BlockingIOError (an OSError): nothing more to read
        with contextlib.suppress(OSError):
            while self.wake_reader.recv(1024):
                pass

    def close(self, reason: str = "") -> None:
        """Close the socket and stop the thread; `reason` says why, if not by choice."""
        if self.closed.is_set():
            return
        self.closed_reason = reason
        self.closed.set()
        if reason:
            self.on_event(Event("notice", time.time(), text=f"[WARN] {reason}"))
        self.wake()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=2 * MAX_WAIT + 1)
        with self.lock:
            # no partial file left behind
            self.protocol.files.end_all("the client was closed")
            waiting, self.futures = list(self.futures.values()), {}
        # outside the lock: a callback may call us
        resolve([(future, ConnectionClosed(reason or "The connection is closed."))
                 for future in waiting])
        for sock in (self.selector, self.sock, self.wake_reader, self.wake_writer):
            sock.close()


def resolve(answered: list[tuple]) -> None:
    """Give each (future, answer) its answer: fields as its result, an error as its exception."""
    for future, result in answered:
        # none, or one its asker cancelled: nobody waits for it
        if future is None or not future.set_running_or_notify_cancel():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


def result_within(future: concurrent.futures.Future, seconds: float):
    """Return the future's result, waiting `seconds` at most - in steps of MAX_WAIT: on
    Windows, before Python 3.14, Ctrl+C cannot interrupt a thread waiting for a lock."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return future.result(timeout=max(min(MAX_WAIT, deadline - time.monotonic()), 0.0))
        except concurrent.futures.TimeoutError:
            if time.monotonic() >= deadline:
                raise


def connect_udp(host: str, port: int) -> socket.socket:
    """Return a non-blocking UDP socket connect()ed to the server.

    connect() on a UDP socket sends nothing: it fixes the peer, so that send() needs no
    address, the system drops datagrams from anyone else, and an ICMP "port unreachable"
    for what we sent is reported to us (recv raises ConnectionRefusedError).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((host, port))
    except (OSError, OverflowError) as error:
        sock.close()
        reason = getattr(error, "strerror", None) or error
        raise ServerNotResponding(f"Cannot reach {host}:{port}: {reason}") from None
    sock.setblocking(False)
    return sock


# --- Finding a server: one question to the whole network -------------------------------
#
# A datagram sent to a broadcast address reaches every host on the network, which TCP
# cannot do: a connection has exactly two ends. So a client that does not know the
# server's address asks everyone, and whoever runs a chat server answers. Only when
# asked: on many networks a broadcast is noticed.

# seconds a search listens (a LAN answers within milliseconds), and the FINDs sent in that
# time, a third of it apart, as DHCP resends its DISCOVER
SEARCH_TIME, SEARCH_TRIES = 1.0, 3
NOTHING_FOUND = "no server answered on this network; type its IP"
# Anyone on the LAN can answer a FIND: with several answers the student chooses, knowingly.
SEVERAL_FOUND = ("several servers answered: a classmate's program can pose as one, so choose "
                 "yours by comparing the list with the banner on the server's PC")
OTHER_KEYS_ONLY = "no server with this --cipher and --key answered; start the client with theirs"
# A datagram to 255.255.255.255 reaches every host on the link it leaves by, and no router
# forwards it. But a system sends it only where a route leads (the default route, if any):
# a lab network with no default route is reached by its own broadcast address instead.
LIMITED_BROADCAST = "255.255.255.255"
# Linux's requests for an interface's address and netmask (<linux/sockios.h>).
SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B


@dataclasses.dataclass(frozen=True)
class FoundServer:
    """A chat server that answered a FIND: its name, the IP its answer came from (the one
    to type), its port, how many members are logged in, and its key's fingerprint."""

    name: str
    host: str
    port: int
    online: int
    fingerprint: str = ""

    def __str__(self) -> str:
        return (f"{printable(self.name)}  {self.host}:{self.port}  {self.online} online  "
                f"{printable(self.fingerprint)}")


class ServerSearch:
    """One search of the network, without sockets: the FIND to send, and what answers say.

    The FIND carries a number drawn for this search, and an answer must name it (in its
    ack field and its first field): answers to an earlier search, and stray datagrams,
    are not taken for servers. A server that hears the FIND twice is listed once.
    """

    def __init__(self, cipher, number: int | None = None):
        # any number but 0, a request's; servers in the order they answered; those whose
        # answer was scrambled with another key
        self.cipher, self.number = cipher, number or 1 + secrets.randbelow(2**32 - 1)
        self.found: dict[tuple[str, int], FoundServer] = {}
        self.other_key: set[tuple[str, int]] = set()

    def request(self) -> bytes:
        """Return the FIND datagram, padded to MIN_FIND_SIZE bytes (shorter ones are dropped)."""
        # the field's 2-byte length, then dots
        padding = "." * (wire.MIN_FIND_SIZE - wire.HEADER_SIZE - 2)
        packet = wire.Packet(PacketType.FIND, self.number, payload=wire.pack_fields(padding))
        return wire.encode_packet(packet, self.cipher)

    def receive(self, data: bytes, address: tuple[str, int]) -> FoundServer | None:
        """Take a datagram that came back; return the server it tells of, if it is a new one."""
        try:
            packet = wire.decode_packet(data, self.cipher)
            number, name, port, online, key = wire.unpack_fields(packet.payload, 5)
        except wire.ChecksumError:
            # a chat server whose key differs from ours
            return self.other_key.add(address)
        except wire.PacketError:
            return None
        if (packet.type != PacketType.OK or packet.ack != self.number or number != str(self.number)
                or not (wire.whole_number(port) and wire.whole_number(online))
                or not 0 < int(port) < 65536
                or (address[0], int(port)) in self.found):
            return None
        server = self.found[address[0], int(port)] = FoundServer(name, address[0], int(port),
                                                                 int(online), key)
        return server

    def servers(self) -> list[FoundServer]:
        return list(self.found.values())


def broadcast_addresses() -> list[str]:
    """Return where a search is sent: each network's broadcast address, then 255.255.255.255."""
    networks = linux_networks() if fcntl and hasattr(socket, "if_nameindex") else []
    networks = networks or [(address, "255.255.255.0") for address in host_addresses()]
    found = [broadcast_of(address, netmask) for address, netmask in networks
             if not address.startswith("127.")]
    return list(dict.fromkeys([address for address in found if address] + [LIMITED_BROADCAST]))


def linux_networks() -> list[tuple[str, str]]:
    """Return (address, netmask) of each IPv4 interface, asked of the Linux kernel: it knows
    them without any route, where the host name may resolve to nothing useful."""
    found = []
    # the kernel wants a socket; nothing is sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            # struct ifreq: the name, then room
            request = struct.pack("16s24x", name.encode()[:15])
            # OSError: no IPv4 address on it, or it went away meanwhile
            with contextlib.suppress(OSError):
                found.append(tuple(socket.inet_ntoa(fcntl.ioctl(sock, ask, request)[20:24])
                                   for ask in (SIOCGIFADDR, SIOCGIFNETMASK)))
    return found


def host_addresses() -> list[str]:
    """Elsewhere (Windows, macOS): the addresses this host's own name resolves to."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        # a host name that does not resolve, or cannot be encoded
        return []
    return sorted({info[4][0] for info in infos}, key=socket.inet_aton)


def broadcast_of(address: str, netmask: str) -> str:
    """Return the broadcast address of `address`'s network: its host bits all set to one
    ("" for a /31 or /32, which has none)."""
    host_bits = ~int.from_bytes(socket.inet_aton(netmask), "big") & 0xFFFFFFFF
    network = int.from_bytes(socket.inet_aton(address), "big")
    return socket.inet_ntoa((network | host_bits).to_bytes(4, "big")) if host_bits > 1 else ""


def search_network(search: ServerSearch, targets: list[str], port: int, wait: float = SEARCH_TIME,
                   tries: int = SEARCH_TRIES) -> ServerSearch:
    """Send the search's FIND to each target `tries` times within `wait` s; collect the answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Without SO_BROADCAST the system refuses to send to a broadcast address (EACCES):
        # asking every host at once has to be meant.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        start = time.monotonic()
        for attempt in range(tries):
            for target in targets:
                # OSError: e.g. 255.255.255.255 with no default route, "unreachable"
                with contextlib.suppress(OSError):
                    sock.sendto(search.request(), (target, port))
            until = start + wait * (attempt + 1) / tries
            while (left := until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    search.receive(*sock.recvfrom(wire.RECV_BUFFER))
                except TimeoutError:
                    break
                except ConnectionResetError:
                    # Windows: "port unreachable" came back for a FIND
                    continue
    return search


def find_servers(port: int, cipher, show) -> list[FoundServer]:
    """Search every network this PC is on; `show` what answered, or that nothing did."""
    show(f"Searching this network for chat servers on port {port}...")
    search = search_network(ServerSearch(cipher), broadcast_addresses(), port)
    for address, other_port in sorted(search.other_key):
        show(f"{address}:{other_port} answered, but uses another --cipher or --key")
    if not search.found:
        show(OTHER_KEYS_ONLY if search.other_key else NOTHING_FOUND)
    elif len(search.found) > 1:
        show(SEVERAL_FOUND)
    return search.servers()


def pick_server(answer: str, found: list[FoundServer]) -> tuple[str, int | None] | None:
    """Return (host, port if known) for an answer to the Server IP prompt; None if no choice.
    Enter takes the one server found (127.0.0.1 if none; never one of several), a number one
    from the list, anything else is an address."""
    if not answer and len(found) > 1:
        return None
    if not answer:
        return (found[0].host, found[0].port) if found else (DEFAULT_HOST, None)
    if found and wire.whole_number(answer):
        chosen = found[int(answer) - 1] if 0 < int(answer) <= len(found) else None
        return (chosen.host, chosen.port) if chosen else None
    ports = [server.port for server in found if server.host == answer]
    return answer, ports[0] if ports else None


# --- How an event reads: one renderer for both faces ------------------------------------

# Characters that reorder the text after them on screen (bidi embeddings, overrides and
# isolates): a name or message could make what follows read backwards ("Trojan Source").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Return `text` safe for a terminal: what could move the cursor or change the terminal
    (ESC starts every escape sequence; C1 controls, DEL, a lone surrogate, bidi controls)
    becomes '?', a tab four spaces, and a line break starts an indented line.

    A security filter, not a nicety: everything from the network passes through it.
    """
    for line_break in ("\r\n", "\r", "\u2028", "\u2029"):
        text = text.replace(line_break, "\n")
    return without_controls(text).replace("\n", "\n    ")


def without_controls(text: str) -> str:
    """Return `text` with every control but a line break as '?', a tab as four spaces."""
    unsafe = {"Cc", "Cs"}
    return "".join("?" if c != "\n" and (unicodedata.category(c) in unsafe or c in BIDI_CONTROLS)
                   else c for c in text.replace("\t", "    "))


# Our own codes (the colours, the bell at a line's end): the only controls the terminal is sent.
OWN_CODES = re.compile("(\x1b\\[(?:1;33|35|0)m|\a$)")


def screen_text(text: str, width: int = 0) -> str:
    """Return a line as it may reach the screen: the last check at its door, whichever way the
    text came, and with `width`, broken into rows of at most that many columns, each row after
    a line's first indented. A terminal wrapping a long line itself would start a row at column
    0 with whatever the sender put there: a forged `[07:36] bob: ...` or `[WARN] ...`."""
    rows = []
    for line in text.split("\n"):
        row, used = "", 0
        for piece in OWN_CODES.split(line):
            if OWN_CODES.fullmatch(piece):
                row += piece
                continue
            for c in without_controls(piece):
                # a wide character (CJK, most emoji) takes two columns; a combining one,
                # counted as one, only makes the row end early: it never overflows
                wide = 2 if unicodedata.east_asian_width(c) in "WF" else 1
                if width and used + wide > width:
                    rows, row, used = rows + [row], "    ", 4
                row, used = row + c, used + wide
        rows.append(row)
    return "\n".join(rows)


def format_event(event: Event, me: str | None = None) -> str:
    """Return an event as the one line the user sees: `[HH:MM] alice: text` and the like."""
    # HH:MM on this PC's clock
    clock, text = time.strftime("%H:%M", time.localtime(event.time)), printable(event.text)
    mine = bool(me) and event.user.lower() == me.lower()
    user = "you" if mine else printable(event.user)
    if event.kind == "private" and mine:
        return f"[{clock}] -> {printable(event.more[0] if event.more else '')}: {text}"
    if event.kind == "transfer":
        return describe_transfer(event.more[0], final=True)
    # (a notice may quote the server: printable() above made its text safe too)
    shapes = {"chat": f"[{clock}] {user}: {text}", "private": f"[{clock}] {user} (private): {text}",
              "history": f"[history] [{clock}] {user}: {text}", "join": f"[{clock}] {user} joined",
              "leave": f"[{clock}] {user} left" + (f" ({text})" if text else ""), "notice": text,
              **{kind: f"[{clock}] {text}" for kind in wire.FILE_EVENTS}}
    return shapes.get(event.kind, f"[{clock}] {event.kind}: {user} {text}")


def line_marks(event: Event, me: str | None) -> tuple[str, ...]:
    """Return a line's marks (terminal colours, window tags): own, private, mention, history."""
    mine = bool(me) and event.user.lower() == me.lower()
    marks = {"own": mine and event.kind in ("chat", "private"), "history": event.kind == "history",
             "mention": event.kind == "chat" and not mine and names_me(event.text, me),
             "private": event.kind == "private"}
    return tuple(mark for mark, applies in marks.items() if applies)


def names_me(text: str, name: str | None) -> bool:
    """Does `text` mention `name` as a word, in any case ("hi Alice!", "@alice")?"""
    word = rf"(?<!\w){re.escape(name or '')}(?!\w)"
    return bool(name) and re.search(word, text, re.IGNORECASE) is not None


def describe_transfer(transfer: Transfer, final: bool = False) -> str:
    """Return a transfer in one line: as its event shows it (`final`), or as /files lists it."""
    name, size, peer = transfer.name, describe_size(transfer.size), transfer.peer
    receiving, number = transfer.direction == "receive", transfer.number
    lines = {"done": f"saved {transfer.path} ({size}, {transfer.note})" if receiving
             else f"sent {name} ({size}) to {peer}",
             "cancelled": transfer.said or f"cancelled: {name} ({transfer.note})",
             "failed": f"{name} not {'saved' if receiving else 'sent'}: {transfer.note}"
                       + ("; the partial file was removed" if receiving else ""),
             "moving": f"{name}: {transfer.percent}% of {size}" if transfer.done_bytes or receiving
             else f"sending {name} ({size}) to {peer} as number {number}"}
    if final:
        return printable(lines.get(transfer.state, name))
    how = f"{transfer.percent}%" if transfer.state == "moving" else transfer.state
    how += f" ({transfer.note})" if transfer.note and not transfer.active else ""
    # no number: the server never took it
    return printable(f"{'#' + str(number) + ' ' if number else ''}{name} "
                     f"{'<-' if receiving else '->'} {peer}, {size}: {how}")


def split_message(text: str, limit: int = MAX_TEXT_BYTES) -> list[str]:
    """Return `text` as messages of at most `limit` bytes of UTF-8, cut at the last space
    that fits (else between characters, never inside one); spaces at a cut are dropped."""
    parts = []
    while len(text.encode("utf-8")) > limit:
        # never half a character
        fits = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
        space = len(fits) if text[len(fits)].isspace() else fits.rfind(" ")
        cut = space if space > 0 and fits[:space].strip() else len(fits)
        part, text = text[:cut].rstrip(), text[cut:].lstrip()
        parts += [part] if part else []
    return parts + ([text] if text.strip() else [])


def describe_arrival(joined: str, members: list[str], me: str | None) -> str:
    """Return `joined lobby: bob, carol and 3 others here`, from the JOIN reply and WHO's list
    (whose last entry "+N" says N more did not fit in its answer)."""
    more = int(members.pop()[1:]) if members and members[-1].startswith("+") else 0
    others = [printable(name) for name in members if name.lower() != (me or "").lower()]
    if len(others) + more > 3:
        others, more = others[:2], more + len(others[2:])
    if more:
        others.append(f"{more} other{'s' if more > 1 else ''}")
    who = ", ".join(others[:-1]) + " and " + others[-1] if len(others) > 1 else "".join(others)
    return f"{printable(joined.split(',')[0])}: {who or 'nobody else'} here"


# --- The terminal ---------------------------------------------------------------------

# ANSI colours (SGR): a line that names me, a private message; then back to plain. The
# terminal beeps, or flashes its window, when it prints BELL.
BOLD_YELLOW, MAGENTA, PLAIN, BELL = "\x1b[1;33m", "\x1b[35m", "\x1b[0m", "\a"


class EndOfInput(Exception):
    """The user pressed Ctrl+D / Ctrl+Z, or the script ran out of lines."""


class Terminal:
    """The keyboard on a thread of its own; the screen shared by every thread.

    input() blocks, and on Windows nothing but Enter wakes it. So a thread of its own
    reads each line and hands it over through a queue, and `ask` waits on that queue in
    steps of MAX_WAIT, calling `alive()` between steps (it may raise to stop waiting): a
    Ctrl+C always gets through, and a client that lost its server ends without waiting
    for Enter. A line shown while the user types is printed above the prompt, and the
    prompt and what was typed so far (readline knows it) are printed again below it.
    """

    def __init__(self, interactive: bool, color: bool = False, bell: bool = False):
        self.interactive, self.color, self.bell = interactive, color, bell
        self.asks, self.answers, self.lock = queue.Queue(), queue.Queue(), threading.Lock()
        # the prompt on screen now ("" if none), and whether secret; a question is with the
        # keyboard thread; the input is over; lines kept back while a room is entered
        self.prompt, self.secret, self.outstanding, self.ended = "", False, False, False
        self.held: list[str] | None = None
        self.alive, self.restored = lambda: None, False
        threading.Thread(target=self.read_lines, name="keyboard", daemon=True).start()

    def read_lines(self) -> None:
        """The keyboard thread: answer each question put on `asks`; None at the end."""
        while True:
            prompt, secret = self.asks.get()
            try:
                answer = self.read_answer(prompt, secret)
            except (EOFError, OSError, ValueError, KeyboardInterrupt):
                answer = None
            with self.lock:
                self.prompt = ""
            # until the next question: keys typed now may be its password
            self.echo(False)
            self.answers.put(answer)
            if answer is None:
                return

    def read_answer(self, prompt: str, secret: bool) -> str:
        if not self.interactive:
            if not (line := sys.stdin.readline()):
                raise EOFError
            return line.rstrip("\r\n")
        with self.lock:
            self.prompt, self.secret = prompt, secret
        if secret:
            return getpass.getpass(prompt)
        self.echo(True)
        return input(prompt)

    def echo(self, on: bool) -> None:
        """Let the terminal show the keys typed, or not (POSIX): between two questions keys
        typed ahead are not shown, for they may be the password the next prompt asks."""
        with self.lock:
            if not (termios and self.interactive) or (self.restored and not on):
                return
            with contextlib.suppress(termios.error, OSError, ValueError):
                mode = termios.tcgetattr(sys.stdin.fileno())
                # [3]: the local flags
                mode[3] = mode[3] | termios.ECHO if on else mode[3] & ~termios.ECHO
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, mode)

    def restore(self) -> None:
        """Give the terminal back with echo on, for good (Ctrl+C at a password prompt)."""
        self.echo(True)
        self.restored = True

    def ask(self, prompt: str, secret: bool = False) -> str:
        """Return the next line the user types; raise EndOfInput at its end."""
        if self.ended:
            raise EndOfInput
        if not self.outstanding:
            self.asks.put((prompt, secret))
            self.outstanding = True
        elif self.prompt and self.prompt != prompt:
            # an abandoned question: its line answers this one, so show this one's prompt
            self.show("", again=prompt)
        while True:
            self.alive()
            with contextlib.suppress(queue.Empty):
                answer = self.answers.get(timeout=MAX_WAIT)
                break
        self.outstanding = False
        if answer is None:
            self.ended = True
            raise EndOfInput
        return answer

    def show(self, text: str, again: str | None = None) -> None:
        """Print a line above the prompt; then the prompt (or `again`) and what was typed."""
        with self.lock:
            shown = readline and self.prompt and not self.secret
            typed = readline.get_line_buffer() if shown else ""
            wipe = "\r" + " " * (len(self.prompt) + len(typed)) + "\r" if self.prompt else ""
            self.prompt = self.prompt if again is None else again
            text = screen_text(text, self.interactive and shutil.get_terminal_size().columns - 1)
            # OSError: a program reading our output stopped, or the terminal closed (EIO)
            with contextlib.suppress(OSError):
                sys.stdout.write(wipe + (text + "\n" if text else "") + self.prompt + typed)
                sys.stdout.flush()

    def show_event(self, event: Event, me: str | None) -> None:
        """Show an event (on the network thread): coloured, with the bell when it names me."""
        if not worth_a_line(event):
            return
        line, marks = format_event(event, me), line_marks(event, me)
        colour = MAGENTA if "private" in marks else BOLD_YELLOW if "mention" in marks else ""
        line = f"{colour}{line}{PLAIN}" if colour and self.color else line
        line += BELL if self.bell and ("mention" in marks or marks == ("private",)) else ""
        with self.lock:
            if self.held is not None and event.kind not in ("notice", "transfer"):
                return self.held.append(line)
        self.show(line)

    def hold(self) -> None:
        """Keep the room's lines back for now (its history comes before the JOIN's answer)."""
        with self.lock:
            self.held = []

    def release(self, first: str | None) -> None:
        """Show `first`, then the lines held back, in the order they came."""
        with self.lock:
            held, self.held = self.held or [], None
        for line in ([first] if first else []) + held:
            self.show(line)


def worth_a_line(event: Event) -> bool:
    """Does the terminal print this event? Not a state (a notice says it), not a refused
    offer (the refusal says it), and a file's progress only at 25, 50 and 75%."""
    transfer = event.more[0] if event.kind == "transfer" else None
    if event.kind == "state" or (transfer and not transfer.number):
        return False
    if transfer is None or transfer.state != "moving":
        return True
    # the server took our offer: "sending ... as number N"
    starting = transfer.direction == "send" and not transfer.done_bytes
    return starting or (transfer.done_bytes > 0 and transfer.percent in (25, 50, 75))


def use_color(stream, environ, platform: str = sys.platform) -> bool:
    """May we colour what goes to `stream`? Only a terminal, never with NO_COLOR set
    (no-color.org) or TERM=dumb; on Windows only in Windows Terminal, which reads ANSI."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    if platform == "win32" and "WT_SESSION" not in environ:
        return False
    return hasattr(stream, "isatty") and stream.isatty()


# --- Commands: one table for the terminal and the window --------------------------------
#
# A face is anything with `show(text)` and `ask(prompt, secret=False)`: the Terminal, or
# the window. run_command reads a typed line the same way for both.

HELP = f"""Commands:
  /help - this list
  /rooms - rooms and how many are in each
  /who - who is in your room
  /join ROOM - go to another room (asks its password; a new room gets the one you give)
  /msg USER TEXT - a private message to one user
  /send USER FILE - send a file to one user ("quotes" optional around a name with spaces)
  /share FILE - send a file to everyone in your room
  /accept or /decline - the newest file offered to you (/accept N: number N); nothing is saved
    before you accept, and an offer lapses after a minute
  /files - files in progress and finished; /cancel stops yours (/cancel N: number N)
  exit or /quit - leave
Anything else is sent to everyone in your room. A line over {MAX_TEXT_BYTES} bytes (UTF-8) goes as
several messages, cut between words. Start a line with // to send one beginning with /."""
# what leaves the chat, typed alone on a line
EXIT_WORDS = ("exit", "/quit", "/exit")


def run_command(client: ChatClient, line: str, face) -> bool:
    """Do what a typed line asks; return False when the user asked to leave."""
    if line.strip().lower() in EXIT_WORDS:
        return False
    command, _, rest = line.partition(" ") if line.startswith("/") else ("say", "", line)
    if line.startswith("//"):
        # "//etc is a folder" says "/etc is a folder"
        command, rest = "say", line[1:]
    try:
        if command.lower() in COMMANDS:
            COMMANDS[command.lower()](client, rest.strip() if command != "say" else rest, face)
        elif command != "say":
            face.show(f"Unknown command {command.lower()}; type /help for the list.")
    except (Refused, ServerNotResponding, SessionLost, FileProblem) as error:
        # that line failed; the chat goes on
        face.show(printable(str(error)))
    return True


def send_lines(client: ChatClient, text: str, face) -> None:
    """Send a line without waiting for its answer: pasted lines flow, in order. A line too
    long for one message goes as several. Our own line is shown once the server took it."""
    for part in split_message(text):
        future = client.submit(PacketType.SAY, part)
        future.add_done_callback(lambda done, part=part: report_unsent(done, part, face))


def report_unsent(done: concurrent.futures.Future, part: str, face) -> None:
    """Say when a line sent without waiting was not taken (or maybe not)."""
    error, shown = done.exception(), printable(part if len(part) <= 40 else part[:37] + "...")
    if isinstance(error, SessionLost):
        # the server may have had it before it went
        face.show(f"maybe not sent: {shown} (contact was lost before the server answered)")
    elif isinstance(error, (Refused, ChatError)) and not isinstance(error, ConnectionClosed):
        face.show(f"not sent: {shown} ({printable(str(error))})")


def send_private(client: ChatClient, rest: str, face) -> None:
    """/msg USER TEXT, in several messages if long; `-> bob: text` once each is accepted."""
    user, _, text = rest.partition(" ")
    if not user or not text.strip():
        return face.show("Usage: /msg USER TEXT")
    for part in split_message(text):
        client.private(user, part)


def join_room(client: ChatClient, room: str, face) -> None:
    """/join ROOM: say what is wrong before asking a password, and whether the room is new."""
    if not room:
        face.show("Usage: /join ROOM")
    elif not auth.valid_username(room):
        face.show("Room names are 1-20 letters, digits, '_', '.' or '-' (no spaces).")
    elif room.lower() == (client.room or "").lower():
        face.show(f"You are in {printable(client.room or '')} already.")
    else:
        new = "" if room.lower() in [name.lower() for name, _ in client.rooms()] else "new room "
        # Enter alone sends nothing: an empty password would count as a wrong one
        if password := face.ask(f"Password for {new}{room}: ", secret=True):
            enter_room(client, room, password, face)
        else:
            face.show(f"Not joined: {room} needs its password.")


def enter_room(client: ChatClient, room: str, password: str, face, then: str = "") -> None:
    """JOIN, then WHO: say where we are and who is here; then the room's history and news."""
    line = None
    getattr(face, "hold", lambda: None)()
    try:
        line = client.join(room, password)
        if line.startswith("joined"):
            line = describe_arrival(line, client.who()[1], client.name) + "." + then
    finally:
        getattr(face, "release", lambda first: face.show(first) if first else None)(line)


def show_rooms(client: ChatClient, rest: str, face) -> None:
    for name, count in client.rooms():
        face.show(f"  {printable(name)}  ({count} here)")


def show_who(client: ChatClient, rest: str, face) -> None:
    room, members = client.who()
    face.show(printable(f"In {room}: {', '.join(members)}"))


def send_file(client: ChatClient, rest: str, face) -> None:
    """/send USER FILE: the server's answer, and then the progress, come as transfer events."""
    user, _, path = rest.partition(" ")
    if not user or not path.strip():
        face.show('Usage: /send USER FILE   (e.g. /send bob "my notes.pdf")')
    else:
        client.send_file(user, unquote(path))


def share_file(client: ChatClient, rest: str, face) -> None:
    """/share FILE: to everyone else in the room."""
    client.send_file("", unquote(rest)) if rest else face.show("Usage: /share FILE")


def list_files(client: ChatClient, rest: str, face) -> None:
    transfers = client.transfers()
    for transfer in transfers:
        face.show("  " + describe_transfer(transfer))
    if not transfers:
        face.show("No files sent or received yet.")


def cancel_files(client: ChatClient, rest: str, face) -> None:
    # /files shows them as #3
    number = rest.lstrip("#")
    if number and not wire.whole_number(number):
        face.show("Usage: /cancel, or /cancel N with N as /files shows it")
    elif not client.cancel_files(int(number) if number else 0):
        face.show(f"No transfer numbered {number}." if number
                  else "No file of yours is on its way.")


def answer_offer(client: ChatClient, rest: str, face, accept: bool = True) -> None:
    """/accept or /decline, the newest offer or /accept N."""
    number = rest.lstrip("#")
    if number and not wire.whole_number(number):
        face.show(f"Usage: /{'accept' if accept else 'decline'}, or with N as the offer says it")
    elif not client.answer_offer(int(number or 0), accept):
        face.show(f"No file offer numbered {number} waits." if number else "No file offer waits.")


def unquote(text: str) -> str:
    """Return a path as typed: quotes around it dropped, ~ expanded; backslashes kept (Windows)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return os.path.expanduser(text)


COMMANDS = {"say": send_lines, "/help": lambda client, rest, face: face.show(HELP),
            "/rooms": show_rooms, "/who": show_who, "/join": join_room, "/msg": send_private,
            "/send": send_file, "/share": share_file, "/files": list_files, "/cancel": cancel_files,
            "/accept": answer_offer,
            "/decline": lambda client, rest, face: answer_offer(client, rest, face, False)}


# --- The window: python client.py --gui -----------------------------------------------
#
# The terminal's ChatClient and run_command, drawn with Tk widgets instead of print(). Tk
# is not thread-safe: only the thread that made the window may touch a widget. So the
# network thread's on_event only puts each Event on a queue, and so does the one worker
# thread, which makes the calls that wait for the server (log in, join, a typed line) one
# at a time, in order. The Tk thread draws, never waits, and empties the queue with after().

# tkinter and its themed widgets, imported by load_tkinter() only when a window is wanted.
tk = ttk = None
NO_TKINTER = ("The window needs tkinter, which this Python lacks (Debian/Ubuntu: sudo apt install "
              "python3-tk; Fedora: sudo dnf install python3-tkinter). Using the terminal instead.")
# Milliseconds between looks at the queue: quick to the eye, idle for the CPU.
POLL_EVERY = 50
# How the marks of line_marks (and of the client's notices) look; a later tag wins.
LINE_TAGS = {"notice": {"foreground": "#505050"}, "warn": {"foreground": "#b00020"},
             "history": {"foreground": "#707070"}, "own": {"foreground": "#1f5fbf"},
             "mention": {"background": "#fff1b8"}, "private": {"background": "#fde0ef"},
             "line": {"lmargin2": 24}}


def load_tkinter() -> None:
    """Import tkinter, or raise ImportError where this Python has none."""
    global tk, ttk
    # Submodules are imported by name: only that makes them usable as tkinter.ttk and so on.
    import tkinter
    import tkinter.filedialog  # noqa: F401
    import tkinter.simpledialog  # noqa: F401
    import tkinter.ttk
    tk, ttk = tkinter, tkinter.ttk


def grid(widget, row: int = 0, column: int = 0, **options):
    widget.grid(row=row, column=column, **options)
    return widget


def fill(listbox, lines: list[str]) -> None:
    listbox.delete(0, "end")
    listbox.insert("end", *lines)


def notice_marks(text: str) -> tuple[str, ...]:
    """Return the tag of a line of the client's own: a warning in red, else plain grey."""
    return ("warn",) if text.startswith(("[WARN]", "[ERROR]", "not sent")) else ("notice",)


class ChatWindow:
    """One window with two frames, log in and chat, over one ChatClient. The Tk thread
    runs the widgets' callbacks and what is put on `inbox`; the worker thread runs what is
    put on `jobs`, and `show` and `ask`: the face that run_command uses."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, options=None):
        # What each ChatClient is made with (cipher, key...); the transfers on their way.
        self.options, self.client, self.moving = options or {}, None, {}
        # Functions to call, for the Tk thread and for the worker; what dialogs answered.
        self.inbox, self.jobs, self.answers = queue.Queue(), queue.Queue(), queue.Queue()
        self.chatting = self.closing = self.finished = False
        self.root = tk.Tk()
        self.root.title("UDP chat")
        ttk.Style(self.root).theme_use("clam")
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self.root.report_callback_exception = self.report_error
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        # Both frames share one place; the one on top shows. The window asks room for the
        # larger, and may not shrink below it: smaller, something would be cut.
        self.chat, self.login = self.make_chat(), self.make_login(host, port)
        self.status = ttk.Label(self.root, text="not logged in", relief="sunken")
        self.status.grid(row=1, column=0, sticky="ew")
        self.root.update_idletasks()
        self.root.minsize(self.root.winfo_reqwidth(), self.root.winfo_reqheight())
        threading.Thread(target=self.work, name="chat-worker", daemon=True).start()
        self.poll_id = self.root.after(POLL_EVERY, self.poll)
        self.show_frame(False)

    def make_login(self, host: str, port: int):
        """The first frame: server IP and port (or Find servers), name, password."""
        frame = grid(ttk.Frame(self.root, padding=16), sticky="nsew")
        frame.grid_anchor("n")
        labels = ("Server IP", "Port", "Username", "Password", "Password again\n(to register)")
        self.host, self.port, self.name, self.password, self.again = entries = [
            ttk.Entry(frame, width=24, show="*" if "Pass" in label else "") for label in labels]
        for row, entry in enumerate(entries):
            grid(ttk.Label(frame, text=labels[row]), row, sticky="w", padx=(0, 8))
            grid(entry, row, 1, sticky="ew", pady=3).insert(0, (host, str(port), "", "", "")[row])
            # Enter logs in, except in the second password field, which is there to register.
            entry.bind("<Return>", lambda event: self.enter(event.widget is self.again))
        # Filled by Find servers: a click on one puts its IP and port in the fields.
        self.servers, self.found = grid(tk.Listbox(frame, width=34, height=6), 1, 2, rowspan=4,
                                        padx=8), []
        self.servers.bind("<<ListboxSelect>>", self.choose_server)
        grid(ttk.Button(frame, text="Find servers", command=self.search), 0, 2, padx=(8, 0))
        grid(ttk.Button(frame, text="Register", command=lambda: self.enter(True)), 5, pady=8)
        grid(ttk.Button(frame, text="Log in", command=self.enter), 5, 1, sticky="e")
        self.reply = grid(ttk.Label(frame, wraplength=480), 6, columnspan=3, sticky="w")
        return frame

    def make_chat(self):
        """The chat frame: the messages, rooms and members at the side, the input line, files."""
        frame = grid(ttk.Frame(self.root, padding=6), sticky="nsew")
        frame.columnconfigure(0, weight=1)
        frame.rowconfigure(0, weight=1)
        self.messages = grid(tk.Text(frame, width=56, height=18, wrap="word", state="disabled",
                                     font="TkDefaultFont", padx=6, pady=4), sticky="nsew")
        scrollbar = grid(ttk.Scrollbar(frame, command=self.messages.yview), 0, 1, sticky="ns")
        self.messages["yscrollcommand"] = scrollbar.set
        for tag, options in LINE_TAGS.items():
            self.messages.tag_configure(tag, **options)
        side = grid(ttk.Frame(frame, padding=(6, 0, 0, 0)), 0, 2, rowspan=2, sticky="ns")
        grid(ttk.Label(side, text="Rooms (click to join)"), sticky="w")
        grid(ttk.Label(side, text="Members (double-click:\na private message)"), 2, sticky="w")
        self.rooms, self.members = [grid(tk.Listbox(side, width=22, height=7,
                                                    exportselection=False), row) for row in (1, 3)]
        self.rooms.bind("<ButtonRelease-1>", self.pick_room)
        self.members.bind("<Double-Button-1>", self.pick_member)
        self.entry = grid(ttk.Entry(frame), 1, columnspan=2, sticky="ew", pady=6)
        self.entry.bind("<Return>", self.submit)
        files = grid(ttk.Frame(frame), 2, columnspan=3, sticky="ew")
        grid(ttk.Button(files, text="Send file...", command=self.pick_file))
        # The newest file offered to us; /accept N and /decline N are typed.
        grid(ttk.Button(files, text="Accept file", command=lambda: self.jobs.put(
            lambda: self.run_line("/accept"))), 0, 1)
        self.bar = grid(ttk.Progressbar(files, length=120), 0, 2, padx=6)
        self.bar_label = grid(ttk.Label(files, text="No file on its way", width=20), 0, 3)
        grid(ttk.Button(files, text="Log out", command=self.log_out), 0, 4)
        return frame

    def show_frame(self, chatting: bool) -> None:
        self.chatting = chatting
        (self.chat if chatting else self.login).tkraise()
        (self.entry if chatting else self.name).focus_set()

    def poll(self) -> None:
        """Tk thread: call what the other threads put on the inbox; look again in a moment."""
        # First: a bug below must not stop the polling.
        self.poll_id = self.root.after(POLL_EVERY, self.poll)
        while not self.finished and not self.inbox.empty():
            self.inbox.get()()

    def work(self) -> None:
        """The worker thread: one job at a time, until None; what goes wrong is shown."""
        while (job := self.jobs.get()) is not None:
            try:
                job()
            # A refusal, an unreadable file, a bad key; a bug too: the window stays alive.
            except Exception as error:
                self.show(str(error) or repr(error))

    def show(self, text: str) -> None:
        """run_command's face, and any thread's: a line for the user, drawn by `say`."""
        self.inbox.put(functools.partial(self.say, text))

    def ask(self, prompt: str, secret: bool = False) -> str:
        """run_command's face: the answer typed into a small dialog; Refused if cancelled."""
        self.inbox.put(lambda: self.answers.put(tk.simpledialog.askstring(
            "UDP chat", prompt, parent=self.root, show="*" if secret else "")))
        if (answer := self.answers.get()) is None:
            raise Refused("cancelled", "Cancelled.")
        return answer

    # --- The worker thread's jobs: calls that wait for the server. Then the Tk thread's part.

    def log_in_as(self, register: bool, host: str, port: int, name: str, password: str) -> None:
        """REGISTER; or LOGIN, then /join the lobby as the terminal does, the password asked."""
        if self.client:
            self.client.close()
        self.client = ChatClient(host, port, **self.options, on_event=lambda event:
                                 self.inbox.put(functools.partial(self.draw, event)))
        if register:
            return self.show(self.client.register(name, password))
        welcome = self.client.login(name, password)
        self.inbox.put(lambda: self.show_frame(True))
        self.show(welcome)
        self.run_line(f"/join {wire.LOBBY}")

    def run_line(self, line: str) -> None:
        """A line typed in the chat, read by the terminal's own command parser."""
        if not run_command(self.client, line, self):
            return self.inbox.put(self.close)
        if line.startswith("/join"):
            self.refresh_lists()

    def refresh_lists(self) -> None:
        rooms = [f"{name} ({count})" if count >= 0 else name for name, count in self.client.rooms()]
        members = self.client.who()[1] if self.client.room else []
        self.inbox.put(functools.partial(fill, self.rooms, rooms))
        self.inbox.put(functools.partial(fill, self.members, members))

    def enter(self, register: bool = False) -> None:
        """Register or Log in, if the fields pass the terminal's checks (the port: the worker)."""
        port, password = self.port.get().strip(), self.password.get()
        if register and len(password) < MIN_PASSWORD:
            return self.say(f"Too short: a password has at least {MIN_PASSWORD} characters.")
        if register and self.again.get() != password:
            # Else a typo makes an account nobody can enter.
            self.again.delete(0, "end")
            return self.say("The two passwords differ; type it again.")
        self.say("Registering..." if register else "Logging in...")
        host, name = self.host.get().strip() or DEFAULT_HOST, self.name.get().strip()
        self.jobs.put(lambda: self.log_in_as(register, host, wire.port_number(port), name,
                                             password))

    def search(self) -> None:
        """Find servers on the port typed: the search listens a while, so on the worker."""
        port = self.port.get().strip()
        options = self.options
        cipher = wire.make_cipher(options.get("cipher", wire.DEFAULT_CIPHER), options.get("key"))
        self.jobs.put(lambda: self.inbox.put(functools.partial(
            self.show_servers, find_servers(wire.port_number(port), cipher, self.show))))

    def show_servers(self, found: list) -> None:
        self.found = found
        fill(self.servers, [str(server) for server in found])
        if found:
            self.say(("Several servers answered: " if len(found) > 1 else "")
                     + "Click a server in the list to use it.")

    def choose_server(self, event=None) -> None:
        for index in self.servers.curselection():
            server = self.found[index]
            chosen = (server.host, str(server.port))
            for entry, text in zip((self.host, self.port), chosen, strict=True):
                entry.delete(0, "end")
                entry.insert(0, text)

    def say(self, text: str) -> None:
        """Tell the user: under the log in form, or as a line of the chat."""
        if self.chatting:
            self.add_line(text, notice_marks(text))
        else:
            self.reply.configure(text=screen_text(text))

    def add_line(self, text: str, marks: tuple[str, ...] = ()) -> None:
        """Append a line; keep the newest in sight, unless the user scrolled up to read."""
        following = self.messages.yview()[1] >= 0.999
        self.messages.configure(state="normal")
        # wrapped rows of a line are indented ("line"): none passes for a line of its own
        self.messages.insert("end", screen_text(text) + "\n", (*marks, "line"))
        self.messages.configure(state="disabled")
        if following:
            self.messages.see("end")

    def submit(self, event=None) -> None:
        line = self.entry.get()
        self.entry.delete(0, "end")
        self.jobs.put(lambda: self.run_line(line))

    def pick_room(self, event=None) -> None:
        for index in self.rooms.curselection():
            room = self.rooms.get(index).rsplit(" (", 1)[0]
            self.jobs.put(functools.partial(self.run_line, f"/join {room}"))

    def pick_member(self, event=None) -> None:
        for index in self.members.curselection():
            self.entry.delete(0, "end")
            self.entry.insert(0, f"/msg {self.members.get(index)} ")
            self.entry.focus_set()

    def pick_file(self) -> None:
        """Send file: to the member chosen in the list (a choice then undone), else the room."""
        to = next((self.members.get(index) for index in self.members.curselection()), "")
        self.members.selection_clear(0, "end")
        path = tk.filedialog.askopenfilename(parent=self.root, title=f"Send to {to or 'the room'}")
        # Not '' (or an empty tuple): not cancelled. Hashing it takes a while: on the worker.
        if path:
            self.jobs.put(lambda: self.client.send_file(to, path))

    def draw(self, event: Event) -> None:
        """Draw an Event of the network thread: a line, the status bar, or the progress bar."""
        client, me = self.client, self.client.name
        if event.kind == "state":
            # A session over for good (not got back by itself) takes us back to log in.
            if event.text in ("not logged in", "closed") and self.chatting:
                self.log_out()
            return self.status.configure(text=f"{client.host}:{client.port}: {event.text}")
        if event.kind == "transfer":
            return self.show_transfer(event, me)
        marks = notice_marks(event.text) if event.kind == "notice" else line_marks(event, me)
        self.add_line(format_event(event, me), marks)
        if event.kind in ("join", "leave"):
            self.jobs.put(self.refresh_lists)

    def show_transfer(self, event: Event, me: str | None) -> None:
        """One bar for all the files on their way: their bytes done of their bytes in all."""
        # The live Transfer tells one transfer from another; its end is told once (None).
        transfer, live = event.more
        if transfer.active:
            self.moving[id(live)] = live
        elif self.moving.get(id(live), live) is not None:
            self.moving[id(live)] = None
            self.add_line(format_event(event, me), notice_marks(transfer.note))
        moving = [each for each in self.moving.values() if each and each.active]
        size = sum(each.size for each in moving)
        percent = 100 * sum(each.done_bytes for each in moving) // max(size, 1)
        self.bar.configure(value=percent if moving else 0)
        self.bar_label.configure(text=f"{percent}% of {len(moving)} file(s)" if moving
                                 else "No file on its way")

    def log_out(self) -> None:
        """Log out, from the chat: BYE, so the session ends now, not at the server's timeout."""
        # On a lab PC, the next student must not log in as us.
        for entry in (self.password, self.again):
            entry.delete(0, "end")
        self.show_frame(False)
        self.jobs.put(self.client.bye)

    def run(self) -> int:
        """Show the window until it is closed; Ctrl+C in the terminal closes it too."""
        while not self.finished:
            try:
                self.root.mainloop()
            except KeyboardInterrupt:
                self.close()
        print("[INFO] Connection closed.")
        return 0

    def close(self) -> None:
        """The close button, exit, or Ctrl+C: hide at once, log out, then end."""
        if not self.closing:
            self.closing = True
            self.root.withdraw()
            # Stop the worker and its question; BYE on a thread of its own: the worker may be busy.
            self.jobs.put(None)
            self.answers.put(None)
            threading.Thread(target=self.say_goodbye, name="goodbye", daemon=True).start()

    def say_goodbye(self) -> None:
        """BYE, so the room sees us leave now, not at the server's timeout; then close."""
        if self.client:
            self.client.bye()
            self.client.close()
        self.inbox.put(self.finish)

    def finish(self) -> None:
        self.finished = True
        self.root.after_cancel(self.poll_id)
        self.root.destroy()

    def report_error(self, kind, error, trace) -> None:
        """Tk's hook for an error in a callback: Ctrl+C (which strikes there) closes the window."""
        if kind is KeyboardInterrupt:
            return self.close()
        tk.Tk.report_callback_exception(self.root, kind, error, trace)


def run_window(args: argparse.Namespace) -> int | None:
    """Run the chat in a window; return None, having said why, when no window can open here."""
    options = {name: getattr(args, name) for name in ("cipher", "key", "loss", "seed", "downloads")}
    options["trace"] = print if args.verbose else None
    try:
        load_tkinter()
        window = ChatWindow(args.host or DEFAULT_HOST, args.port or DEFAULT_PORT, options)
    except ImportError:
        print(NO_TKINTER)
        return None
    # No display to open a window on: a remote login without X, say.
    except tk.TclError as error:
        print(f"No window can open here ({error}). Using the terminal instead.")
        return None
    return window.run()



# --- The terminal's conversation: choose, log in, enter the lobby, chat, leave -----------


def converse(client: ChatClient, terminal: Terminal) -> None:
    """Ask /register or /login until the user logs in, chats and leaves."""
    while True:
        choice = terminal.ask("Type /register or /login (exit to quit): ").strip().lower()
        if choice in EXIT_WORDS:
            return
        if choice.lstrip("/") == "register":
            register(client, terminal)
        elif choice.lstrip("/") == "login":
            if log_in(client, terminal) and chat(client, terminal):
                return
        elif choice:
            terminal.show("Please type /register or /login.")


def register(client: ChatClient, terminal: Terminal) -> None:
    """Username (an empty one goes back), then a new password, typed twice alike."""
    name = terminal.ask("Username: ").strip()
    if name and not auth.valid_username(name):
        return terminal.show("Usernames are 1-20 letters, digits, '_', '.' or '-'.")
    while name and (password := terminal.ask(
            f"Password (at least {MIN_PASSWORD} characters): ", secret=True)):
        if len(password) < MIN_PASSWORD:
            terminal.show(f"Too short: a password has at least {MIN_PASSWORD} characters.")
        elif terminal.ask("Password again: ", secret=True) != password:
            terminal.show("The two passwords differ; type it again.")
        else:
            return show_answer(terminal, client.register, name, password)


def show_answer(terminal: Terminal, request, *fields: str) -> bool:
    """Make a request and show the server's words, its answer or refusal; True if it did it."""
    try:
        terminal.show(printable(request(*fields)))
        return True
    except Refused as refusal:
        terminal.show(printable(refusal.text))
        return False


def log_in(client: ChatClient, terminal: Terminal) -> bool:
    """Username (an empty one goes back), password, then the lobby's password."""
    name = terminal.ask("Username: ").strip()
    if not name or not show_answer(terminal, client.login, name,
                                   terminal.ask("Password: ", secret=True)):
        return False
    hint = "Try again, or press Enter alone to go on without a room."
    # Enter alone sends nothing: an empty password would count as a wrong one.
    while password := terminal.ask(f"Room password for {wire.LOBBY}: ", secret=True):
        try:
            enter_room(client, wire.LOBBY, password, terminal, then=" Type /help for commands.")
            return True
        except Refused as refusal:
            terminal.show(printable(refusal.text))
            if refusal.code == "locked":
                # asking again would not help now
                break
        # the hint, once
        terminal.show(hint) if hint else None
        hint = ""
    terminal.show("You are in no room: /join ROOM enters one, /rooms lists them, exit leaves.")
    return True


def chat(client: ChatClient, terminal: Terminal) -> bool:
    """Read lines and act on them; True when the user leaves, False to log in again."""
    def still_in() -> None:
        check_alive(client)
        if client.state == "not logged in":
            # lost, and not getting back in: the notices said why
            raise SessionLost(SESSION_LOST)

    terminal.alive = still_in
    try:
        while run_command(client, terminal.ask("> "), terminal):
            pass
        client.bye()
        return True
    except SessionLost:
        return False
    finally:
        terminal.alive = functools.partial(check_alive, client)


def check_alive(client: ChatClient) -> None:
    if client.closed.is_set():
        raise ConnectionClosed(client.closed_reason)


# --- Starting from the command line ---------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="UDP chat room client. Asks the server's IP and port unless both are given.",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who captures "
               "the traffic can read it. Server and client must use the same --cipher and --key.")
    parser.add_argument("--host",
                        help=f"server IP address (asked if not given; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=wire.port_number,
                        help=f"server UDP port (asked if not given; default {DEFAULT_PORT})")
    # --cipher, --key, --loss, --seed
    wire.add_shared_options(parser)
    parser.add_argument("--verbose", action="store_true", help="trace every packet in and out")
    parser.add_argument("--find", action="store_true",
                        help="list the chat servers on this network (on --port), one per line, "
                             "and exit (status 1 if none answered)")
    parser.add_argument("--gui", action="store_true",
                        help="chat in a window instead of the terminal (needs tkinter)")
    parser.add_argument("--downloads", default="downloads",
                        help="folder for the files others send you (default: ./downloads)")
    return parser.parse_args(argv)


def ask_address(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int]:
    """Return the server's (host, port): from the command line, or asked."""
    host, found_port = (args.host, None) if args.host else ask_host(args, terminal)
    port, default_port = args.port, found_port or DEFAULT_PORT
    while port is None:
        answer = terminal.ask(f"Server port [{default_port}]: ").strip() or str(default_port)
        try:
            port = wire.port_number(answer)
        except argparse.ArgumentTypeError:
            terminal.show("A port is a whole number from 1 to 65535.")
    return host, port


def ask_host(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int | None]:
    """Ask for the server's IP until there is one; `?` searches the network (on --port) first."""
    found: list[FoundServer] = []
    while True:
        default = found[0].host if found else DEFAULT_HOST
        hint = "" if found else " (? searches the network)"
        several = f"Server number (1-{len(found)}) or IP: " if len(found) > 1 else ""
        answer = terminal.ask(several or f"Server IP [{default}]{hint}: ").strip()
        if answer == "?":
            cipher = wire.make_cipher(args.cipher, args.key)
            found = find_servers(args.port or DEFAULT_PORT, cipher, terminal.show)
            for number, server in enumerate(found, 1):
                terminal.show(f"{number}) {server}")
        elif chosen := pick_server(answer, found):
            return chosen
        else:
            terminal.show(f"Type a number from 1 to {len(found)}, an IP address, "
                          "or ? to search again.")


def print_servers_found(args: argparse.Namespace) -> int:
    """--find: one line per server, `IP:PORT  name  N online`; the rest on stderr."""
    try:
        found = find_servers(args.port or DEFAULT_PORT, wire.make_cipher(args.cipher, args.key),
                             functools.partial(print, file=sys.stderr))
    except (ValueError, OSError) as error:
        # a key the cipher cannot use; no network at all
        print(f"[ERROR] {error}", file=sys.stderr)
        return 1
    for server in found:
        print(f"{server.host}:{server.port}  {printable(server.name)}  {server.online} online  "
              f"{printable(server.fingerprint)}")
    # as ping does: a script can tell "none" from "some"
    return 0 if found else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A Windows console with a legacy code page cannot show every character: show a
    # replacement rather than crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.find:
        return print_servers_found(args)
    if args.gui and (status := run_window(args)) is not None:
        return status
    return chat_in_terminal(args)


def hang_up(signum, frame) -> None:
    """SIGHUP, the "hang-up" of the serial-line days: the terminal window was closed. It
    logs out as Ctrl+C does, so the room sees us leave at once."""
    raise KeyboardInterrupt


def chat_in_terminal(args: argparse.Namespace) -> int:
    """The terminal client, from the server's address to goodbye; return the exit status."""
    interactive = sys.stdin.isatty()
    terminal = Terminal(interactive, use_color(sys.stdout, os.environ),
                        bell=interactive and sys.stdout.isatty())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, hang_up)
    made, status = [], 1
    try:
        host, port = ask_address(args, terminal)
        trace = terminal.show if args.verbose else None
        made.append(ChatClient(host, port, args.cipher, args.key, loss=args.loss, seed=args.seed,
                               downloads=args.downloads, trace=trace,
                               on_event=lambda event: terminal.show_event(event, made[0].name)))
        terminal.alive = functools.partial(check_alive, made[0])
        # Is anyone there? Better to know before asking for a password.
        made.append(made[0].hello())
        terminal.show(f"Connected to the chat server at {host}:{port}.")
        converse(made[0], terminal)
        status = 0
    except (EndOfInput, KeyboardInterrupt):
        status = 0
    except ConnectionClosed:
        # the reason was shown when it happened
        pass
    except (ChatError, Refused, ValueError) as error:
        # ValueError: a key the cipher cannot use
        terminal.show(f"[ERROR] {printable(str(error))}")
    return say_goodbye(made, terminal, status)


def say_goodbye(made: list, terminal: Terminal, status: int) -> int:
    """Log out if logged in, close the socket, give the terminal back; return `status`."""
    with contextlib.suppress(KeyboardInterrupt):
        if made:
            made[0].bye()
            made[0].close()
    terminal.restore()
    # Only a server that answered was connected. On a terminal the cursor may be on the
    # prompt's line: a new line first.
    if len(made) > 1:
        terminal.show(("\n" if terminal.interactive else "") + "[INFO] Connection closed.")
    return status


if __name__ == "__main__":
    sys.exit(main())
