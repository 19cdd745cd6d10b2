"""UDP chat room client: log in, join a password-protected room, chat.

Start the server on one PC (`python server.py`), then on each other PC:

    python client.py                                   # asks for the server's IP and port
    python client.py --host 192.168.1.10 --port 9999   # asks neither
    python client.py --find                            # lists the servers on this network
    python client.py --gui                             # the same chat in a window (tkinter)

At the `Server IP` prompt, `?` searches the network: one FIND datagram broadcast to every
host, and a list of the servers that answered.

When standard input is not a terminal, every answer (the password too) is read as a plain
line and end of input means exit, so a session can be scripted:

    printf '/login\\nalice\\nsecret\\njuara\\nhello\\nexit\\n' | python client.py --host 127.0.0.1 --port 9999

How it is built:

* `ClientProtocol` is the protocol with no socket and no thread: it is fed datagrams and
  the time, and says what to send. Tests and the notebook drive it directly.
* Before login there is no session, so requests (HELLO, REGISTER, LOGIN) go one at a
  time, each sent again once a second until answered: stop-and-wait, which is the
  reliable `Channel` with a window of 1. After login every request - a line typed, a
  paste of twenty, /who - goes on the session's channel with a window of 32: lines flow
  without waiting for each other's replies, in the order typed, each delivered once.
  Each reply names the request it answers. What the server pushes (messages, joins,
  leaves) comes back on the same channel, in order.
* `ChatClient` wraps the protocol with the socket and one network thread, the only
  reader of the socket. Its UDP socket is connect()ed to the server, so the operating
  system drops datagrams from anyone else.
* `Terminal` keeps the keyboard on its own thread, so that arriving messages are printed
  above the line being typed and Ctrl+C works on Windows too. `Screen` decides how each
  message looks (one's own, private, naming the user); `Conversation` asks and commands.
* `ChatWindow` (--gui) is the same client with Tk widgets for a face: its `Conversation`
  and `ChatClient` are the terminal's. Only the Tk thread touches a widget; the others
  post what they have on a queue that the window empties with after().

The packet format, the channel and the toy ciphers are defined once, in
encryption_helper.py. The XOR and Caesar ciphers only hide text from a casual glance:
they are teaching toys.

A SAY datagram, as this client sends it (XOR-scrambled payload, readable header):

    55 43 04 05 00 00 00 07  00 00 00 07 00 00 00 02   "UC" v4 SAY flags=0 len=7 seq=7 ack=2
    00 00 00 00 3e 1a 2c 5e  5e 77 90 12 d5 41 e2 e8   sack=0, token, CRC-32, then the payload:
    49 4c 5a 58 12 0a 60                               [5]"hi :)" XORed with the key "II2120"
"""

import argparse
import binascii
import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import getpass
import hashlib
import math
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata

import auth
from encryption_helper import (
    ACK_DELAY,
    ACK_EVERY,
    CHUNK_SIZE,
    DEFAULT_CIPHER,
    FILE_EVENTS,
    FILL,
    FLAG_FILE_STREAM,
    HEADER_SIZE,
    LIMITED_BROADCAST,
    LOBBY,
    MAX_FILE_NAME_BYTES,
    MAX_PAYLOAD,
    MAX_TEXT_BYTES,
    MB,
    MIN_FIND_SIZE,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    RECV_BUFFER,
    SHA_HEX,
    Channel,
    ChecksumError,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    WakeUp,
    add_shared_options,
    chunk_length,
    decode_packet,
    describe_datagram,
    describe_size,
    encode_packet,
    local_interfaces,
    make_cipher,
    oversize_text,
    pack_chunk,
    pack_fields,
    port_number,
    unpack_chunk,
    unpack_fields,
    whole_number,
)

try:  # Linux and macOS: lets a message printed above the prompt redraw what was typed
    import readline
except ImportError:  # Windows has no readline, and needs none
    readline = None
try:  # Linux and macOS: to give the terminal back as we found it (echo on) after Ctrl+C
    import termios
except ImportError:
    termios = None

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999
MAX_WAIT = 0.5  # seconds any thread blocks at most, so Ctrl+C and shutdown are prompt
FIRST_CONTACT_RETRY = 1.0  # seconds between tries before login: nothing is measured yet
REJOIN_EVERY = 2.0  # seconds between tries to log back in after the session was lost
ELSEWHERE_PATIENCE = 60.0  # seconds a rejoin waits for an old session of ours (30 s of silence) to end
OWN_LINES_KEPT = 50  # own lines remembered, not to show them again as the room's past after a rejoin
MIN_PASSWORD = 4  # characters this client asks of a new account's password (the server takes any)



@dataclasses.dataclass
class Timing:
    """How patient the client is. Tests shorten these; the defaults suit a lab."""

    # Before login: try once a second, for this long; then "Server not responding". At
    # 30% loss each way a try fails about half the time, and all ten fail once in a thousand.
    connect_timeout: float = 10.0
    heartbeat_every: float = 5.0  # say PING after this much quiet, so the server keeps us
    lost_contact_after: float = 15.0  # nothing heard this long while waiting: warn the user...
    give_up_after: float = 45.0  # ...and this long: give up and close
    initial_rto: float = RtoEstimator.INITIAL
    min_rto: float = RtoEstimator.FLOOR
    max_rto: float = RtoEstimator.CEILING
    goodbye_timeout: float = 3.0  # how long `exit` waits for the server's goodbye


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the server pushed: a message, a join or a leave."""

    kind: str  # "chat", "private", "history", "join", "leave", or one of FILE_EVENTS
    time: float  # unix time the server stamped it with
    room: str
    user: str
    text: str
    more: tuple = ()  # the fields after the text: an EVENT about a file names it


# --- What can go wrong, in words a student understands --------------------------------


class ChatError(Exception):
    """Something the user should be told about; str() is the message."""


class Refused(ChatError):
    """The server said no: an ERROR reply [re, code, text]."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


SESSION_LOST = "The server does not know this session (was it restarted?). Log in again."
KEY_MISMATCH = ("The server's reply fails its checksum: server and client keys differ? "
                "Both must use the same --cipher and --key.")


class ServerNotResponding(ChatError):
    pass


class KeyMismatch(ChatError):
    pass


class SessionLost(ChatError):
    pass


class ConnectionClosed(ChatError):
    pass


class ServerStopped(SessionLost):
    """The server said it stops: what it had not answered, it never handled."""


class LoggedInElsewhere(SessionLost):
    """The same account logged in from another client, which took the session over."""


# --- The protocol, without sockets or threads -------------------------------------------


class ClientProtocol:
    """One user's side of the chat protocol: datagrams and the time in, datagrams out.

    `request` queues a request and returns its number; `receive` takes a datagram from
    the server; `poll` returns what to send now (and runs the heartbeat and the give-up);
    `next_wakeup` says when to call poll again. What happened is left for the caller in
    three lists: `answers` ((request number, fields or ChatError)), `events` and `notices`.
    """

    def __init__(self, cipher, timing: Timing | None = None, now: float = 0.0, loss: float = 0.0,
                 trace=None, server: str = "the server", downloads: str = "downloads"):
        self.cipher = cipher
        self.files = FileTransfers(downloads)  # files sent and received
        self.file_stream: Channel | None = None  # the session's second channel: file chunks
        self.server = server  # "host:port", for messages
        self.timing = timing or Timing()
        # Simulated loss (--loss) makes each try less likely to get through: try longer.
        self.connect_tries = max(1, math.ceil(self.timing.connect_timeout / FIRST_CONTACT_RETRY / (1 - loss) ** 2))
        self.trace = trace  # a function taking a line, or None for no packet trace
        self.token = NO_TOKEN
        self.name: str | None = None
        self.next_stranger_seq = 1  # numbers before login go on across tries: a late answer never matches anew
        self.channel = self.stranger_channel()
        self.pending: dict[int, PacketType] = {}  # request number -> its type, until answered
        self.answers: list[tuple[int, object]] = []
        self.events: list[Event] = []
        self.notices: list[str] = []
        self.last_heard = self.last_sent = now
        self.out_of_contact = False
        self.unreachable = 0  # "port unreachable" reports since the server last spoke
        self.closed_reason = ""  # set when the protocol gave up on the server
        self.lost: SessionLost | None = None  # why the last session ended, if not by our choice
        self.farewell: list[bytes] = []  # a last ACK on the ended session's channel, to send next

    def stranger_channel(self) -> Channel:
        """Before login: stop-and-wait, a try a second - the channel with a window of 1."""
        rto = RtoEstimator(FIRST_CONTACT_RETRY, FIRST_CONTACT_RETRY, FIRST_CONTACT_RETRY)
        return Channel(self.cipher, window=1, max_sends=self.connect_tries, rto=rto, first_seq=self.next_stranger_seq)

    def session_channel(self, token: bytes, flags: int = 0) -> Channel:
        rto = RtoEstimator(self.timing.initial_rto, self.timing.min_rto, self.timing.max_rto)
        return Channel(self.cipher, token, rto=rto, ack_delay=ACK_DELAY, ack_every=ACK_EVERY, flags=flags)

    @property
    def logged_in(self) -> bool:
        return self.token != NO_TOKEN

    # --- Requests ---

    def request(self, ptype: PacketType, fields=(), now: float = 0.0) -> int:
        """Queue a request; return its number, which its answer will name."""
        if self.closed_reason:
            raise ConnectionClosed(self.closed_reason)
        if ptype == PacketType.HELLO:
            fields = ["." * (MIN_HELLO_SIZE - HEADER_SIZE - 2)]  # padding, see MIN_HELLO_SIZE
        payload = pack_fields(*fields)
        if len(payload) > MAX_PAYLOAD:
            raise Refused("too-long", "That is too long to send in one packet; not sent.")
        if self.channel.idle():
            self.last_heard = max(self.last_heard, now)  # silence counts from when we start waiting
        seq = self.channel.send(ptype, payload)
        if not seq:
            raise Refused("busy", "Too many lines are waiting to be sent; not sent.")
        self.pending[seq] = ptype
        if not self.logged_in:
            self.next_stranger_seq = seq + 1
        return seq

    # --- What the server sends ---

    def receive(self, data: bytes, now: float) -> None:
        """Take one datagram from the server."""
        try:
            packet = decode_packet(data, self.cipher)
        except PacketError as error:
            self.trace_packet("in ", data, f": bad datagram, dropped ({error})")
            if isinstance(error, ChecksumError) and not self.logged_in:
                self.fail_pending(KeyMismatch(KEY_MISMATCH))  # an answer before login is unreadable
            return
        self.heard_from_server(now)
        if packet.type == PacketType.RESET:
            self.receive_reset(packet, data)
            return
        if not self.logged_in and (packet.seq or packet.type not in (PacketType.OK, PacketType.ERROR)):
            self.trace_packet("in ", data, ": from an old session, dropped")  # before login: answers only
            return
        if self.logged_in and (packet.token != self.token or (packet.seq == 0 and packet.type != PacketType.ACK)):
            self.trace_packet("in ", data, ": from an old session or from before it, dropped")
            return  # an answer from before the session: its ack field numbers a stranger's request
        if packet.flags & FLAG_FILE_STREAM:
            self.receive_file_stream(packet, data, now)
            return
        outcome, ready = self.channel.receive(packet, now)
        self.trace_packet("in ", data, "" if outcome in ("in order", "unsequenced") else ": " + outcome)
        for delivered in ready:
            if delivered.type == PacketType.EVENT:
                self.receive_event(delivered)
            elif delivered.type in (PacketType.OK, PacketType.ERROR):
                self.receive_answer(delivered)

    def receive_file_stream(self, packet: Packet, data: bytes, now: float) -> None:
        """A packet on the file stream: its acknowledgements, and chunks of files coming to us."""
        if self.file_stream is None:
            return
        outcome, ready = self.file_stream.receive(packet, now)
        self.trace_packet("in ", data, "" if outcome in ("in order", "unsequenced") else ": " + outcome)
        for delivered in ready:
            if delivered.seq and delivered.type == PacketType.FILE_CHUNK:
                self.files.receive_chunk(delivered.payload)

    def heard_from_server(self, now: float) -> None:
        self.last_heard = now
        self.unreachable = 0
        if self.out_of_contact:
            self.out_of_contact = False
            self.notices.append("[INFO] In contact with the server again.")

    def receive_reset(self, packet: Packet, data: bytes) -> None:
        """RESET: the server has no session for the token it echoes - believed only if it is ours."""
        if not self.logged_in or packet.token != self.token:
            self.trace_packet("in ", data, ": not about our session, dropped")
            return
        self.trace_packet("in ", data)
        self.end_session(SessionLost(SESSION_LOST))

    def receive_answer(self, packet: Packet) -> None:
        """An OK or ERROR: find the request it answers by the number in its first field."""
        try:
            seq, *fields = unpack_fields(packet.payload)
            ptype = self.pending.pop(int(seq))
        except (PacketError, ValueError, KeyError):
            return  # unreadable, or a late answer to something given up on
        seq = int(seq)
        if packet.type == PacketType.ERROR:
            self.answers.append((seq, Refused(*fields[:2]) if len(fields) >= 2 else Refused("error", "Refused.")))
            if ptype == PacketType.FILE_OFFER:
                self.files.answered(seq, self.answers[-1][1], self.last_heard)
        elif ptype == PacketType.LOGIN and not (fields and packet.token != NO_TOKEN):
            self.answers.append((seq, Refused("bad-reply", "The server's welcome could not be read.")))
        else:
            self.answers.append((seq, fields))
            if ptype == PacketType.FILE_OFFER:
                self.files.answered(seq, fields, self.last_heard)
            if ptype == PacketType.LOGIN:
                self.start_session(packet.token, fields[0])
            elif ptype == PacketType.BYE:
                self.end_session(Refused("not-sent", "Logged out; not sent."))

    def receive_event(self, packet: Packet) -> None:
        try:
            kind, when, room, user, text, *more = unpack_fields(packet.payload)
            if not -1e10 < float(when) < 1e10:  # nan and inf fail too; a clock cannot show such times
                raise ValueError(f"time {when!r} out of range")
        except (PacketError, ValueError) as error:
            self.note(f"an EVENT could not be read ({error}); skipped")
            return
        if kind == "stop":
            self.say_last_ack()  # so the server need not wait to know we heard
            self.notices.append("[INFO] The server was stopped.")
            self.end_session(ServerStopped("The server was stopped."))
        elif kind == "replaced":
            self.notices.append("[INFO] You logged in elsewhere; this client is logged out.")
            self.end_session(LoggedInElsewhere("You logged in elsewhere."))
        else:
            if kind == "file":
                self.files.offer_arrived(user, more, self.last_heard)
            elif kind in FILE_EVENTS and self.files.event(kind, user, text, more):
                return  # it ended a transfer of ours: the transfer's last line says it
            self.events.append(Event(kind, float(when), room, user, text, tuple(more)))

    def say_last_ack(self) -> None:
        cumulative, bitmap = self.channel.acknowledgement()
        self.farewell.append(encode_packet(Packet(PacketType.ACK, 0, cumulative, bitmap, self.token), self.cipher))

    def start_session(self, token: bytes, name: str) -> None:
        """Logged in: from now on, everything goes on the session's channel."""
        self.token, self.name = token, name
        self.switch_channel(self.session_channel(token), Refused("not-sent", "Sent while logging in; not sent."))
        self.file_stream = self.session_channel(token, FLAG_FILE_STREAM)

    def end_session(self, error: ChatError | None = None) -> None:
        """Back to no session: nothing more to acknowledge, nothing to keep alive."""
        if self.logged_in and isinstance(error, SessionLost):
            self.lost = error
        self.token, self.name = NO_TOKEN, None
        self.switch_channel(self.stranger_channel(), error or Refused("not-sent", "Logged out; not sent."))
        self.files.end_all("the session ended")
        self.file_stream = None

    def fail_pending(self, error: ChatError) -> None:
        """Every request still waiting gets `error` as its answer."""
        self.switch_channel(self.channel if self.logged_in else self.stranger_channel(), error)

    def switch_channel(self, channel: Channel, error: ChatError) -> None:
        """Go on with `channel`; whatever waited on the old one is answered now, never left waiting.

        A BYE counts as answered: the session is over, as it asked.
        """
        for seq, ptype in self.pending.items():
            self.answers.append((seq, ["goodbye"] if ptype == PacketType.BYE else error))
        self.pending.clear()
        self.channel = channel

    def port_unreachable(self) -> None:
        """The OS reported an ICMP "port unreachable": nobody listens there (yet).

        One report may be left over from an earlier server; two with nothing heard between
        mean the server is not running. In a session that is news at once (its process was
        killed, say), not after the heartbeats have waited for answers in vain.
        """
        self.unreachable += 1
        if self.unreachable < 2:
            return
        if self.logged_in:
            self.give_up(f"The server at {self.server} has stopped (nothing is listening on its port)")
        elif self.pending:
            self.fail_pending(ServerNotResponding(f"Server not responding at {self.server} "
                                                  "(nothing is listening on that port)"))

    # --- Time ---

    def poll(self, now: float) -> list[bytes]:
        """Return the datagrams to send now; warn, keep alive or give up as time says."""
        if self.closed_reason:
            return []
        if self.logged_in and now - self.last_sent >= self.timing.heartbeat_every and self.channel.idle():
            self.request(PacketType.PING, (), now)  # so the server knows we are still here
        out, self.farewell = self.farewell + self.channel.poll(now), []
        if self.file_stream is not None:
            out += self.poll_files(now)
        for data in out:
            self.trace_packet("out", data)
        if out:
            self.last_sent = now
        self.check_contact(now)
        return out

    def poll_files(self, now: float) -> list[bytes]:
        """Fill the file stream from the files being sent; tell the server of transfers stopped."""
        while self.files.cancels:
            self.request(PacketType.FILE_CANCEL, [str(self.files.cancels.pop(0))], now)
        self.files.fill(self.file_stream, now)
        if self.file_stream.failed:
            self.give_up("The server stopped acknowledging file chunks")
            return []
        return self.file_stream.poll(now)

    def check_contact(self, now: float) -> None:
        """Warn when the server has gone quiet while we wait for it; give up after a while."""
        if self.channel.failed and not self.logged_in:
            self.fail_pending(ServerNotResponding(f"Server not responding at {self.server}"))
            return
        silence = now - self.last_heard
        if self.channel.idle():
            return
        if self.channel.failed or silence >= self.timing.give_up_after:
            self.give_up(f"Lost contact with the server for {silence:.0f} s")
        elif silence >= self.timing.lost_contact_after and not self.out_of_contact and self.logged_in:
            self.out_of_contact = True
            self.notices.append("[WARN] Lost contact with the server... still trying.")

    def give_up(self, reason: str) -> None:
        """No answer for too long: a session ends (its client may log in again); else close."""
        if self.logged_in:
            self.notices.append(f"[WARN] {reason}.")
            self.end_session(SessionLost(f"{reason}."))
        else:
            self.closed_reason = f"{reason}; giving up."
            self.fail_pending(ConnectionClosed(self.closed_reason))

    def next_wakeup(self) -> float:
        """Return when poll() next has work to do."""
        heartbeat = self.last_sent + self.timing.heartbeat_every if self.logged_in else float("inf")
        files = self.file_stream.next_wakeup() if self.file_stream else float("inf")
        return min(self.channel.next_wakeup(), heartbeat, files, 0.0 if self.files.cancels else float("inf"))

    # --- Tracing (--verbose) ---

    def note(self, text: str) -> None:
        if self.trace:
            self.trace(f"[trace] {text}")

    def trace_packet(self, direction: str, data: bytes, note: str = "") -> None:
        """Trace one datagram; the line is only put together when someone reads it."""
        if self.trace:
            self.trace(f"[trace] {direction:<3} {describe_datagram(data)}{note}")


# --- Files: sending and receiving, without sockets -----------------------------------
#
# Sending files through the chat: `/send bob notes.pdf`, `/share slides.pdf`.
#
# Both scripts import this module: the client's side is `FileTransfers`, the server's
# `FileRelay`. Neither opens a socket or reads a clock; they are fed packets and the time,
# and put what they have to send on the session's channels, so tests drive them directly.
#
# How a file travels, alice to bob:
#
#     alice                               server                                bob
#       FILE_OFFER [bob, name, size, sha] ->
#                                   <- OK [re, 7]   (or ERROR: too big, no such user...)
#                                            EVENT "file" [..., 7, name, size, sha] ->
#       FILE_CHUNK [7, 0, data]  ~~~~>  transfers/7.part  ~~~~>  FILE_CHUNK [7, 0, data]
#       FILE_CHUNK [7, 1152, ...] ~~~>    (on disk)        ~~~>  downloads/name.part
#          ...                                                   SHA-256 checked, renamed
#                          <- EVENT "file-done" [..., 7]  (bob has every byte)
#
# * **Two streams.** Every session has two reliable channels (encryption_helper.Channel):
#   the chat's, and the file stream, whose packets carry FLAG_FILE_STREAM in the header,
#   ACKs too. Each has its own numbers, window and retransmissions. On one channel a chat
#   line sent after a lost chunk would wait until that chunk is resent, because a channel
#   delivers in order: head-of-line blocking, the reason HTTP/2 over TCP stalls on a loss.
#   QUIC gives each stream its own numbering for the same reason; so does this chat.
#   FILE_OFFER, FILE_CANCEL and the EVENTs about files go on the chat's channel.
# * **Store and forward.** The server writes each upload to `DATA_DIR/transfers/ID.part`
#   and reads each receiver's chunks back from that file, as fast as that receiver's file
#   stream takes them - at most FILL chunks waiting per stream. So the server never holds
#   a whole file in memory; a receiver that stalls or leaves holds back neither the sender
#   nor the other receivers; and chunks are relayed while the upload still comes in. The
#   file is deleted once every receiver has it or is gone.
# * **Checked, then named.** The offer carries the whole file's SHA-256. The server
#   checks it when the upload is complete; each receiver writes `NAME.part`, checks it
#   once every byte is there, and only then renames it to NAME. A crash at any end leaves
#   at most a `.part` file, never one named as if complete; a mismatch removes it.
# * **Names made safe.** A name comes from another user, so it is treated as hostile:
#   `safe_file_name` keeps no folder, drive, reserved Windows device name, control
#   character or trailing dot, and `unused_path` never overwrites (`notes (1).pdf`).


SAFE_NAME_BYTES = 200  # what a saved file's name is cut to: room left for " (12)" and ".part"
# Windows will not create a file with these names, with any extension ("con.txt" too).
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                  *(f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3")}
FORBIDDEN = set('<>:"/\\|?*')  # characters Windows refuses in a file name
UNPRINTABLE = {"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"}  # Unicode categories a file name loses
HISTORY = 50  # finished transfers /files still lists


class FileProblem(Exception):
    """A file that cannot be sent or saved; str() says why, in words a user understands."""


def naming_the_user(refusal: Refused, user: str) -> Refused:
    """Return the refusal, naming the user if there is no such user: the server never echoes
    a name it does not know (it may be anything), but the one who typed it may see it."""
    if refusal.code == "unknown-user":
        return Refused(refusal.code, f"No such user: {printable(user)}.")
    return refusal


def safe_file_name(name: str) -> str:
    """Return `name` made safe to save: no folders, drives, devices, controls; not too long.

    >>> safe_file_name("../../etc/passwd"), safe_file_name("C:\\\\Windows\\\\x"), safe_file_name("con.txt")
    ('passwd', 'x', '_con.txt')
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name.replace("\0", ""))[-1]  # the last part: no folder, no "..", no drive
    name = "".join("_" if ch in FORBIDDEN else ch for ch in name if not unprintable(ch))
    name = name.strip(" .")  # Windows drops trailing dots and spaces; a leading dot hides a file
    if not name:
        return "file"
    if name.split(".")[0].upper().rstrip(" ") in RESERVED_NAMES:
        name = "_" + name
    return shorten(name, SAFE_NAME_BYTES)


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
        for piece in iter(lambda: file.read(MB), b""):
            digest.update(piece)
    return digest.hexdigest()


@dataclasses.dataclass
class Transfer:
    """One file on its way, to or from us; what /files and the progress bar show."""

    direction: str  # "up": we send it; "down": we receive it
    peer: str  # to whom ("bob", or "the room"), or from whom
    name: str  # the file's name as offered (shown with printable())
    size: int
    sha256: str
    path: str  # up: the file we read; down: the .part file we write, then the final name
    id: int = 0  # the server's number for it; 0 until the offer is accepted
    done: int = 0  # bytes sent into the file stream, or received
    state: str = "offered"  # offered, sending, checking, done, failed, cancelled
    started: float = 0.0  # when bytes began to move (the time we are given, not read)
    note: str = ""  # how it ended
    file: object = None  # the open file, while bytes move
    last_seq: int = 0  # up: the file stream's number of the last chunk
    offsets: set = dataclasses.field(default_factory=set)  # down: the chunks that arrived
    said: str = ""  # how the server said it ended (it cancelled it), in its own words

    @property
    def active(self) -> bool:
        return self.state in ("offered", "sending", "checking")


class FileTransfers:
    """A client's files, both ways: offers, chunks out of the file, reassembly, checks.

    `fill` puts chunks of the files being sent into the file stream while it has room;
    `receive_chunk` writes an arriving chunk where its offset says, so chunks may come
    in any order; a download is checked once every chunk is there. What the user should
    see is left in `news` as (what, transfer) pairs: "progress", "done", "failed". A
    request the protocol must send (a FILE_CANCEL) is left in `cancels`.
    """

    def __init__(self, downloads: str = "downloads"):
        self.downloads = downloads
        self.offers: dict[int, Transfer] = {}  # request number -> offer not answered yet
        self.uploads: dict[int, Transfer] = {}  # transfer id -> file we send
        self.incoming: dict[int, Transfer] = {}  # transfer id -> file we receive
        self.finished: collections.deque = collections.deque(maxlen=HISTORY)
        self.news: list[tuple[str, Transfer]] = []
        self.cancels: list[int] = []  # ids to tell the server about

    # --- Sending ---

    @staticmethod
    def prepare(to: str, path: str) -> Transfer:
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
        name = shorten(os.path.basename(path), MAX_FILE_NAME_BYTES)
        return Transfer("up", to or "the room", name, size, sha, path)

    @staticmethod
    def offer_fields(transfer: Transfer) -> list[str]:
        """Return a FILE_OFFER's fields: [to ('' = the room), name, size, SHA-256]."""
        to = "" if transfer.peer == "the room" else transfer.peer
        return [to, transfer.name, str(transfer.size), transfer.sha256]

    def offered(self, seq: int, transfer: Transfer) -> None:
        self.offers[seq] = transfer

    def answered(self, seq: int, fields, now: float) -> None:
        """The server answered an offer: OK [id] starts the upload; a refusal ends it."""
        transfer = self.offers.pop(seq, None)
        if transfer is None:
            return
        if transfer.state != "offered":  # cancelled before the server answered
            if isinstance(fields, list) and fields and fields[0].isdigit():
                self.cancels.append(int(fields[0]))
            return
        if isinstance(fields, Refused):
            fields = naming_the_user(fields, transfer.peer)
        if isinstance(fields, Exception) or not fields or not fields[0].isdigit():
            self.end(transfer, "failed", str(fields) if isinstance(fields, Exception) else "refused")
            return
        transfer.id, transfer.started = int(fields[0]), now
        try:
            transfer.file = open(transfer.path, "rb")
        except OSError as error:
            self.end(transfer, "failed", f"cannot read it: {error.strerror or error}", tell=True)
            return
        transfer.state = "sending"
        self.uploads[transfer.id] = transfer

    def fill(self, stream, now: float) -> None:
        """Put chunks of the files being sent into the file stream, in turn, while it has room."""
        sending = [t for t in self.uploads.values() if t.state == "sending" and t.done < t.size]
        while sending and len(stream.waiting) < FILL:
            for transfer in list(sending):
                if not self.send_chunk(stream, transfer) or transfer.done >= transfer.size:
                    sending.remove(transfer)
        for transfer in list(self.uploads.values()):
            if transfer.state == "sending" and transfer.done >= transfer.size and stream.delivered(transfer.last_seq):
                self.end(transfer, "done", "the server has it all")

    def send_chunk(self, stream, transfer: Transfer) -> bool:
        """Read the next chunk from disk and queue it; False if the file could not be read."""
        want = chunk_length(transfer.size, transfer.done)
        try:
            data = transfer.file.read(want)
        except OSError as error:
            data, why = b"", f"cannot read it: {error.strerror or error}"
        else:
            why = "the file got shorter while it was sent"
        if len(data) != want:
            self.end(transfer, "failed", why, tell=True)
            return False
        transfer.last_seq = stream.send(PacketType.FILE_CHUNK, pack_chunk(transfer.id, transfer.done, data))
        transfer.done += want
        self.progress(transfer)
        return True

    # --- Receiving ---

    def offer_arrived(self, sender: str, more: list[str], now: float) -> None:
        """An EVENT "file" [id, name, size, sha]: make the .part file and wait for chunks."""
        if len(more) != 4 or not more[0].isdigit() or not more[2].isdigit() or not SHA_HEX.fullmatch(more[3]):
            return  # unreadable: no file is started, its chunks are ignored
        transfer = Transfer("down", sender, more[1], int(more[2]), more[3], "", int(more[0]), started=now)
        self.incoming[transfer.id] = transfer
        try:
            os.makedirs(self.downloads, exist_ok=True)
            transfer.path = self.create_part(safe_file_name(transfer.name))
            transfer.file = open(transfer.path, "r+b")
        except OSError as error:
            self.end(transfer, "failed", f"cannot save in {self.downloads}: {error.strerror or error}", tell=True)
            return
        transfer.state = "sending"
        self.progress(transfer)
        if transfer.size == 0:
            self.check(transfer)

    def create_part(self, name: str) -> str:
        """Create NAME.part (or NAME (1).part...) exclusively; return its path."""
        while True:
            path = unused_path(self.downloads, name, also=".part") + ".part"  # notes (1).pdf.part
            try:
                # 0o644 (less the umask): a file from someone else is never made executable
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o644))
                return path
            except FileExistsError:
                continue  # another download took that name a moment ago

    def receive_chunk(self, payload: bytes) -> None:
        """A FILE_CHUNK from the file stream: write it where its offset says."""
        try:
            number, offset, data = unpack_chunk(payload)
        except PacketError:
            return
        transfer = self.incoming.get(number)
        if transfer is None or transfer.state != "sending":
            return  # cancelled, failed or unknown: its chunks still in flight are dropped
        if offset >= transfer.size or offset % CHUNK_SIZE or len(data) != chunk_length(transfer.size, offset):
            self.end(transfer, "failed", "a chunk did not fit the file", tell=True)
            return
        if offset in transfer.offsets:
            return  # had it already
        try:
            transfer.file.seek(offset)
            transfer.file.write(data)
        except OSError as error:  # a full disk, say: this file fails, the chat goes on
            self.end(transfer, "failed", f"cannot write it: {error.strerror or error}", tell=True)
            return
        transfer.offsets.add(offset)
        transfer.done += len(data)
        self.progress(transfer)
        if transfer.done == transfer.size:
            self.check(transfer)

    def check(self, transfer: Transfer) -> None:
        """Every byte is there: compare the SHA-256, then give the file its real name."""
        transfer.state = "checking"
        try:
            transfer.file.close()
            if file_sha256(transfer.path) != transfer.sha256:
                self.end(transfer, "failed", "its SHA-256 does not match: the file arrived damaged", tell=True)
                return
            transfer.path = self.give_final_name(transfer.path)
        except OSError as error:  # a full disk, or a virus scanner holding the file (Windows)
            self.end(transfer, "failed", f"cannot save it: {error.strerror or error}", tell=True)
            return
        self.end(transfer, "done", "SHA-256 checked")

    @staticmethod
    def give_final_name(part: str) -> str:
        """Rename NAME.part to NAME (or NAME (1)...): the name says "complete" only now."""
        folder, name = os.path.split(part[: -len(".part")])
        while True:
            final = unused_path(folder, name)
            try:
                os.link(part, final)  # unlike a rename on POSIX, a link never replaces a file
            except FileExistsError:  # made a moment ago: take the next name
                continue
            except OSError:  # no hard links on this file system (FAT, say): a rename, then
                os.rename(part, final)
                return final
            os.remove(part)
            return final

    # --- Ending ---

    def end(self, transfer: Transfer, state: str, note: str, tell: bool = False) -> None:
        """Finish a transfer; a receiver's partial file is removed unless it is done."""
        if not transfer.active:
            return
        transfer.state, transfer.note = state, note
        if transfer.file is not None:
            transfer.file.close()
        if transfer.direction == "down" and state != "done" and transfer.path.endswith(".part"):
            try:
                os.remove(transfer.path)
            except OSError:
                pass  # never made, or already gone
        (self.uploads if transfer.direction == "up" else self.incoming).pop(transfer.id, None)
        self.finished.append(transfer)
        self.news.append((state, transfer))
        if tell and transfer.id:
            self.cancels.append(transfer.id)

    def event(self, kind: str, user: str, text: str, more: list[str]) -> bool:
        """An EVENT about a file [id]: "file-cancelled" ends it for everyone (True: it was
        ours, and is ended now); "file-done" says who has a file we sent."""
        number = int(more[0]) if more and whole_number(more[0]) else 0
        transfer = self.uploads.get(number) or self.incoming.get(number)
        if kind == "file-cancelled" and transfer:
            transfer.said = text  # its words name the file, and say why
            self.end(transfer, "cancelled", text)
            return True
        sent = [t for t in self.finished if t.id == number and t.direction == "up" and t.state == "done"]
        if kind == "file-done" and sent:
            has_it = sent[-1].note.removeprefix("the server has it all")
            sent[-1].note = f"{has_it}, {user}" if has_it else f"received by {user}"
        return False

    def cancel(self, number: int = 0) -> list[Transfer]:
        """Stop our transfers (all, or the one numbered); return them. The server is told."""
        stopped = [t for t in [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]
                   if t.active and number in (0, t.id)]
        for transfer in stopped:
            self.end(transfer, "cancelled", "you cancelled it", tell=True)
        return stopped  # an offer stays in `offers`: its id, once answered, is cancelled too

    def end_all(self, why: str) -> None:
        """The session ended: every transfer with it (the server forgets them too)."""
        for transfer in [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]:
            self.end(transfer, "failed", why)
        self.offers.clear()
        self.cancels.clear()

    def progress(self, transfer: Transfer) -> None:
        """Report progress each time another percent (or the whole file) is done."""
        step = max(transfer.size // 100, 1)
        if transfer.done >= transfer.size or transfer.done // step != (transfer.done - CHUNK_SIZE) // step:
            self.news.append(("progress", transfer))

    def listing(self) -> list[Transfer]:
        """Every transfer of this session we know of: in progress, then finished."""
        active = [*self.offers.values(), *self.uploads.values(), *self.incoming.values()]
        return [t for t in active if t.active] + list(self.finished)


# --- The network layer: the socket and one thread ----------------------------------------


class ChatClient:
    """One user's connection to the chat server: ClientProtocol, a socket and a thread.

    Each blocking method sends one request and returns the server's answer, or raises a
    ChatError saying in plain words what went wrong; `submit` sends one without waiting and
    returns a Future. What the server pushes arrives as `Event`s: passed to `on_event` if
    given (on the network thread), else put in `self.events`, a queue; warnings go to `on_notice`.

    When the session is lost (the server stopped, restarted or went quiet), `Rejoin` logs
    back in and rejoins the room by itself; what is asked for meanwhile waits, and is sent
    once back in, in order.

        client = ChatClient("127.0.0.1", 9999)
        client.login("alice", "secret")
        client.join("lobby", "juara")
        client.say("hello")
        client.close()
    """

    def __init__(self, host: str, port: int, cipher: str = DEFAULT_CIPHER, key: str | None = None, *,
                 timing: Timing | None = None, loss: float = 0.0, seed: int | None = None,
                 on_event=None, on_notice=None, trace=None, rejoin: bool = True, downloads: str = "downloads",
                 on_file=None):
        self.host, self.port = host, port
        self.on_file, self.file_news = on_file, queue.Queue()  # (what, Transfer): to on_file, else queued
        self.rejoin = Rejoin(self) if rejoin else None  # getting back in when the session is lost
        self.asked: dict[int, tuple] = {}  # request number -> (type, fields), to send again after a stop
        self.session_over = threading.Event()  # the session ended and no rejoin follows
        self.lost_reason: SessionLost | None = None  # why, when it did
        self.room: str | None = None  # the room we are in, as the server last said
        self.timing = timing or Timing()
        self.on_event, self.on_notice = on_event, on_notice or (lambda text: None)
        self.events: queue.Queue = queue.Queue()  # where events go when there is no on_event
        self.trace = trace
        self.protocol = ClientProtocol(make_cipher(cipher, key), self.timing, time.monotonic(), loss, trace,
                                       server=f"{host}:{port}", downloads=downloads)
        self.lock = threading.Lock()  # the protocol is shared by the caller's thread and ours
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.closed, self.closed_reason = threading.Event(), ""
        sock = connect_udp(host, port)
        on_drop = functools.partial(self.protocol.trace_packet, note=": LOST (simulated)")
        self.sock = LossySocket(sock, loss, seed, on_drop, side="client") if loss else sock
        self.waker = WakeUp()  # for the network thread, asleep in select()
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.waker.reader, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self.run_network, name="chat-network", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def name(self) -> str | None:
        return self.protocol.name

    @property
    def logged_in(self) -> bool:
        return self.protocol.logged_in

    # --- Requests: what the user can do ---

    def register(self, name: str, password: str) -> str:
        """Create an account; return the server's "Registration successful."."""
        return self.with_cookie(PacketType.REGISTER, name, password)[-1]

    def login(self, name: str, password: str) -> str:
        """Log in; return the welcome text. Later requests go on the session's channel."""
        welcome = self.with_cookie(PacketType.LOGIN, name, password)[-1]
        self.session_over.clear()
        self.room = None
        if self.rejoin:
            self.rejoin.login, self.rejoin.room = [name, password], []
        return welcome

    def join(self, room: str, password: str) -> str:
        """Enter a room (created with this password if new); return the server's words."""
        fields = self.call(PacketType.JOIN, room, password)
        joined, self.room = fields[-1], fields[0]
        return joined

    def say(self, text: str) -> str:
        """Send a message to everyone else in the room; return the server's words."""
        return self.call(PacketType.SAY, check_length(text))[-1]

    def private(self, user: str, text: str) -> str:
        """Send a message that only `user` sees."""
        return self.call(PacketType.PRIVATE, user, check_length(text))[-1]

    def rooms(self) -> list[tuple[str, int]]:
        """Return every room and how many are in it."""
        return read_rooms(self.call(PacketType.ROOMS))

    def who(self) -> tuple[str, list[str]]:
        """Return your room's name and its members."""
        return read_members(self.call(PacketType.WHO))

    def send_file(self, to: str, path: str) -> tuple[Transfer, concurrent.futures.Future]:
        """Offer a file to `to` ('' = the room), hashed here; the Future gets the server's answer.
        Once accepted, the network thread sends it from disk. Raises FileProblem if it cannot go."""
        transfer = FileTransfers.prepare(to, path)
        future = concurrent.futures.Future()
        with self.lock:
            if self.closed.is_set():
                raise ConnectionClosed(self.closed_reason or "The connection is closed.")
            if not self.protocol.logged_in:  # getting back in, say: this is not sent, the chat goes on
                raise Refused("not-sent", "Not in the chat right now; not sent.")
            seq = self.protocol.request(PacketType.FILE_OFFER, FileTransfers.offer_fields(transfer), time.monotonic())
            self.protocol.files.offered(seq, transfer)
            self.futures[seq] = future
        self.wake()
        return transfer, future

    def cancel_files(self, number: int = 0) -> list[Transfer]:
        """Stop our transfers (all, or the one numbered); the server and the other side are told."""
        with self.lock:
            stopped = self.protocol.files.cancel(number)
        self.wake()
        return stopped

    def transfers(self) -> list[Transfer]:
        """Return this session's transfers: in progress first, then those finished."""
        with self.lock:
            return self.protocol.files.listing()

    def hello(self) -> str:
        """Ask for a cookie: proof for the server that we really are at our address."""
        return self.call(PacketType.HELLO)[0]

    def bye(self) -> None:
        """End the session politely; a server that is gone or has forgotten us is fine."""
        if not self.logged_in or self.closed.is_set():
            return
        self.check_not_network_thread()
        try:
            result_within(self.submit(PacketType.BYE), self.timing.goodbye_timeout)
        except (ChatError, concurrent.futures.TimeoutError):
            pass
        with self.lock:
            self.protocol.end_session()

    def with_cookie(self, ptype: PacketType, name: str, password: str, *more: str) -> list[str]:
        """HELLO, then the request with the cookie; once more if the cookie went stale."""
        try:
            return self.call(ptype, self.hello(), name, password, *more)
        except Refused as refusal:
            if refusal.code != "stale-cookie":
                raise
        return self.call(ptype, self.hello(), name, password, *more)  # with a fresh cookie

    def call(self, ptype: PacketType, *fields: str) -> list[str]:
        """Send a request and wait for its answer; return its fields or raise its error."""
        self.check_not_network_thread()
        patience = self.timing.give_up_after + self.timing.connect_timeout + 5  # it answers before this
        future = self.submit(ptype, *fields)
        try:
            return result_within(future, patience)
        except concurrent.futures.TimeoutError:
            if self.rejoin and self.rejoin.forget(future):  # it waited for a rejoin: now it never goes
                raise Refused("not-sent", "Not back in the chat yet; not sent.") from None
            raise ServerNotResponding(f"Server not responding at {self.host}:{self.port}") from None

    def submit(self, ptype: PacketType, *fields: str) -> concurrent.futures.Future:
        """Queue a request without waiting; the Future gets its fields, or its ChatError."""
        future = concurrent.futures.Future()
        with self.lock:
            if self.closed.is_set():
                raise ConnectionClosed(self.closed_reason or "The connection is closed.")
            if self.rejoin and self.rejoin.holds(ptype):
                self.rejoin.hold(ptype, fields, future)
                return future
            if self.session_over.is_set() and ptype in RESENDABLE:
                raise SessionLost(SESSION_LOST)
            seq = self.protocol.request(ptype, fields, time.monotonic())
            self.futures[seq] = future
            if not (self.rejoin and threading.current_thread() is self.rejoin.thread):
                self.asked[seq] = (ptype, fields)  # the rejoin retries its own requests itself
        self.wake()
        return future

    def check_not_network_thread(self) -> None:
        """Refuse to wait on the network thread: only it could bring the answer (use submit)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("a blocking ChatClient call from its own network thread would wait for ever")

    # --- The network thread: the only reader of the socket ---

    def run_network(self) -> None:
        try:
            self.serve_network()
        except Exception as error:  # a bug, ours or a callback's: say so and stop, never hang
            self.close(f"Internal error in the client: {error!r}")

    def serve_network(self) -> None:
        while not self.closed.is_set():
            with self.lock:
                outgoing = self.protocol.poll(time.monotonic())
                wait = min(max(self.protocol.next_wakeup() - time.monotonic(), 0.0), MAX_WAIT)
            for data in outgoing:
                self.send_datagram(data)
            self.settle()
            try:
                ready = self.selector.select(wait)
            except (OSError, ValueError):
                return  # closed under us: we are shutting down
            for key, _ in ready:
                if key.fileobj is self.waker.reader:
                    self.waker.drain()
                else:
                    self.receive_all()
            self.settle()

    def receive_all(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_BUFFER)
            except BlockingIOError:
                return
            except (ConnectionRefusedError, ConnectionResetError):
                # An ICMP "port unreachable" for something we sent: nobody listens there
                # (yet). On Windows it shows up as ConnectionResetError. Not fatal.
                with self.lock:
                    self.protocol.port_unreachable()
                continue
            except OSError:
                return  # the socket was closed: we are shutting down
            with self.lock:
                self.protocol.receive(data, time.monotonic())

    def send_datagram(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (ConnectionRefusedError, ConnectionResetError):
            with self.lock:
                self.protocol.port_unreachable()
        except OSError as error:  # e.g. no route to the host for now: as if lost
            if self.trace:
                self.trace(f"[trace] sending failed: {error}")

    def settle(self) -> None:
        """Hand what the protocol produced to its takers, outside the lock."""
        with self.lock:
            protocol = self.protocol
            answers, protocol.answers = protocol.answers, []
            events, protocol.events = protocol.events, []
            notices, protocol.notices = protocol.notices, []
            file_news, protocol.files.news = protocol.files.news, []
            futures = [(self.futures.pop(seq, None), result, self.asked.pop(seq, None)) for seq, result in answers]
            gave_up = protocol.closed_reason
            lost, protocol.lost = protocol.lost, None
            if lost and not (self.rejoin and self.rejoin.start(lost)):
                self.lost_reason = lost
                self.session_over.set()
            if self.rejoin:
                futures, events = self.rejoin.take_back(futures), self.rejoin.not_seen(events)
        resolve([(future, result) for future, result, _ in futures])
        for event in events:
            self.on_event(event) if self.on_event else self.events.put(event)
        for notice in notices:
            self.on_notice(notice)
        for item in file_news:
            self.on_file(*item) if self.on_file else self.file_news.put(item)
        if gave_up and not self.closed.is_set():
            self.close(gave_up)

    def wake(self) -> None:
        self.waker.wake()

    # --- Shutting down ---

    def close(self, reason: str = "") -> None:
        """Close the socket and stop the thread; `reason` says why, if not by choice."""
        if self.closed.is_set():
            return
        self.closed_reason = reason
        self.closed.set()
        if reason:
            self.on_notice(f"[WARN] {reason}")
        self.wake()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=2 * MAX_WAIT + 1)
        with self.lock:
            self.protocol.files.end_all("the client was closed")  # no partial file left open, or behind
            waiting, self.futures = list(self.futures.values()), {}
            if self.rejoin:
                waiting += [future for *_, future in self.rejoin.held]
                self.rejoin.held = []
        closed = ConnectionClosed(reason or "The connection is closed.")
        resolve([(future, closed) for future in waiting])  # outside the lock: a done-callback may call us
        self.selector.close()
        self.sock.close()
        self.waker.close()



class Rejoin:
    """Getting back in when the session is lost: the server stopped, restarted or went quiet.

    It keeps the last login's name and password and the last JOIN's room and password,
    in memory for this run only, never on disk. While its thread logs back in, what the
    user asks for waits in `held`, and is sent, in order, once back in.
    """

    def __init__(self, client: "ChatClient"):
        self.client = client
        self.login: list[str] = []  # [name, password]
        self.room: list[str] = []  # [room, password]
        self.thread: threading.Thread | None = None  # logging back in, while the user types on
        self.held: list[tuple] = []  # (type, fields, future)
        # The newest event's time and what was said in that second; after a rejoin, the same
        # for the room's past shown already. Times are whole seconds: within the last one,
        # only what was said tells a message shown from one that never came.
        self.last_event_time, self.last_second = 0.0, collections.Counter()
        self.seen_until, self.seen_last = 0.0, collections.Counter()
        self.returning = False  # the room's past coming now is partly shown already: back in after a loss
        self.own_lines: collections.deque = collections.deque(maxlen=OWN_LINES_KEPT)  # ours, in this room

    def not_seen(self, events: list[Event]) -> list[Event]:
        """Under the client's lock: return the events but the room's past shown before the loss."""
        fresh = [event for event in events if not (event.kind == "history" and self.returning and self.shown(event))]
        for event in fresh:
            if event.time > self.last_event_time:
                self.last_event_time, self.last_second = event.time, collections.Counter()
            if event.time == self.last_event_time:
                self.last_second[event.user, event.text] += 1
        return fresh

    def past_shown(self) -> None:
        """Before the room is joined again: what has come so far was shown."""
        with self.client.lock:
            self.seen_until, self.seen_last = self.last_event_time, collections.Counter(self.last_second)
            self.returning = True

    def shown(self, past: Event) -> bool:
        """Was this message of the room's past shown before the session was lost? Each line
        seen, or said by us, is taken for one line of the past: the same words twice are two."""
        if past.time < self.seen_until:
            return True
        if past.time == self.seen_until and self.seen_last[past.user, past.text] > 0:
            self.seen_last[past.user, past.text] -= 1
            return True
        if self.login and past.user.lower() == self.login[0].lower() and past.text in self.own_lines:
            self.own_lines.remove(past.text)  # shown as "you: ..." when it was said
            return True
        return False

    def note_answers(self, answered: list[tuple]) -> None:
        """Under the client's lock: note our lines the server took, and a room the user joined
        (not we, on the way back in): its past is news, and we said nothing in it yet."""
        for _, result, asked in answered:
            if not asked or isinstance(result, ChatError):
                continue
            if asked[0] == PacketType.SAY:
                self.own_lines.append(asked[1][0])
            elif asked[0] == PacketType.JOIN and self.thread is None:
                self.room, self.returning = list(asked[1]), False
                self.own_lines.clear()

    def holds(self, ptype: PacketType) -> bool:
        """Under the client's lock: must a request wait for the rejoin (going, or about to start)?"""
        if threading.current_thread() is self.thread or ptype not in RESENDABLE:
            return False
        return self.thread is not None or bool(self.login and self.client.protocol.lost)

    def take_back(self, answered: list[tuple]) -> list[tuple]:
        """Under the client's lock: hold again, before anything typed since, the requests a
        stopping server never handled; return the other (future, result, asked) answers."""
        self.note_answers(answered)
        if self.thread is None:
            return answered
        stopped = [(*asked, future) for future, result, asked in answered
                   if isinstance(result, ServerStopped) and future and asked and asked[0] in RESENDABLE]
        self.held[:0] = stopped
        return [(future, result, asked) for future, result, asked in answered
                if not any(future is held[2] for held in stopped)]

    def forget(self, future) -> bool:
        """Take a request out of those waiting (its asker stopped waiting); False if not there."""
        with self.client.lock:
            kept = [held for held in self.held if held[2] is not future]
            found, self.held = len(kept) < len(self.held), kept
        return found

    def hold(self, ptype: PacketType, fields: tuple, future) -> None:
        """Under the client's lock: keep a request to send once back in, in order; the first
        one kept says so, or a line typed would seem to go nowhere (and be typed again)."""
        if ptype == PacketType.SAY and not any(held[0] == PacketType.SAY for held in self.held):
            self.client.protocol.notices.append("[INFO] Not back in yet: what you type waits, and goes once back in.")
        self.held.append((ptype, fields, future))

    def start(self, why: SessionLost) -> bool:
        """Under the client's lock: start logging back in; False if it cannot be done."""
        if not self.login or isinstance(why, LoggedInElsewhere):
            return False
        if self.thread is not None:
            return True  # lost again half-way: the running one sees its request fail, and starts over
        self.thread = threading.Thread(target=self.run, name="chat-rejoin", daemon=True)
        self.client.protocol.notices.append("[INFO] Trying to get back in (type exit to stop)...")
        self.thread.start()
        return True

    def run(self) -> None:
        """Log in again and go back to the room, until it works or cannot; then send what waited."""
        client, closed, started, told = self.client, self.client.closed, time.monotonic(), ""
        while not closed.is_set():
            try:
                client.with_cookie(PacketType.LOGIN, *self.login, "rejoin")
                client.on_notice(f"[INFO] Back in as {self.login[0]}.")
                self.go_back_to_the_room()
                break
            except (ServerNotResponding, KeyMismatch):
                closed.wait(REJOIN_EVERY)  # not back yet
            except Refused as refusal:
                if not worth_waiting(refusal, time.monotonic() - started):
                    client.on_notice(f"[WARN] Could not get back in: {refusal.text}")
                    break
                if refusal.code in ("locked", "logged-in-elsewhere") and refusal.code != told:
                    told = refusal.code
                    client.on_notice(f"[WARN] Not back in yet: {refusal.text} (still trying)")
                closed.wait(REJOIN_EVERY)
            except LoggedInElsewhere:
                break
            except SessionLost:  # lost again half-way: from the top
                closed.wait(REJOIN_EVERY)
            except ChatError:
                break  # closed meanwhile
        self.send_held()

    def go_back_to_the_room(self) -> None:
        """JOIN the room we were in; if that is refused now (its password changed), say so."""
        client, self.client.room = self.client, None
        if not self.room:
            return
        self.past_shown()
        try:
            client.room = client.call(PacketType.JOIN, *self.room)[0]
            client.on_notice(f"[INFO] In {client.room} again.")
        except Refused as refusal:
            room, self.room = self.room[0], []
            client.on_notice(f"[WARN] Not back in {room}: {refusal.text} Type /join {room} to try again.")

    def send_held(self) -> None:
        """Send what waited (or, if we are not back in, tell its askers it was not sent)."""
        client = self.client
        failed = []  # (future, why)
        with client.lock:
            held, self.held, self.thread = self.held, [], None
            back = client.protocol.logged_in and not client.closed.is_set()
            for ptype, fields, future in held if back else []:
                try:
                    seq = client.protocol.request(ptype, fields, time.monotonic())
                    client.futures[seq], client.asked[seq] = future, (ptype, fields)
                except ChatError as error:  # too long, or too many waiting: that one is not sent
                    failed.append((future, error))
            if not back:
                client.session_over.set()
                failed = [(future, Refused("not-sent", "Not back in the chat; not sent.")) for *_, future in held]
        for future, why in failed:
            if future.set_running_or_notify_cancel():
                future.set_exception(why)
        client.wake()


def worth_waiting(refusal: Refused, waited: float) -> bool:
    """Will logging back in work if tried again soon? A lockout ends, and so does the old
    session the server keeps at our old address (a new Wi-Fi, say) until it times out."""
    if refusal.code in ("busy", "full", "stale-cookie", "slow-down", "stopping", "locked"):
        return True
    return refusal.code == "logged-in-elsewhere" and waited < ELSEWHERE_PATIENCE


def resolve(answered: list[tuple]) -> None:
    """Give each (future, answer) its answer: fields as its result, a ChatError as its error."""
    for future, result in answered:
        if future is None or not future.set_running_or_notify_cancel():
            continue  # a heartbeat's answer, or one its asker cancelled: nobody waits for it
        if isinstance(result, ChatError):
            future.set_exception(result)
        else:
            future.set_result(result)


def read_rooms(fields: list[str]) -> list[tuple[str, int]]:
    """Read ROOMS' answer: (room, members) pairs; a last '+N' says N more did not fit."""
    more = fields.pop() if len(fields) % 2 else ""
    pairs = [(fields[i], int(fields[i + 1])) for i in range(0, len(fields), 2)]
    return pairs + ([(f"... and {more[1:]} more", 0)] if more else [])


def read_members(fields: list[str]) -> tuple[str, list[str]]:
    """Read WHO's answer: the room, then its members; a last '+N' says N more did not fit."""
    room, *members = fields
    if members and members[-1][1:].isdigit() and members[-1].startswith("+"):
        members[-1] = f"... and {members[-1][1:]} more"
    return room, members


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
    address and the operating system drops datagrams from anyone else.
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


# Requests that may wait for a rejoin, or be sent again after a stop: the server never did them.
RESENDABLE = {PacketType.SAY, PacketType.PRIVATE, PacketType.JOIN, PacketType.ROOMS, PacketType.WHO}


def check_length(text: str) -> str:
    """Return `text`, or refuse it here if the server would: no need to send it."""
    if oversize_text(text):
        raise Refused("too-long", oversize_text(text))
    return text


# --- The terminal ---------------------------------------------------------------------

ERASE_DOWN = "\x1b[J"  # ANSI: clear from the cursor to the end of the screen
CLEAR_LINE_END = "\x1b[K"  # ANSI: clear from the cursor to the end of its line
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufe0e\ufe0f")  # joiners and emoji variation selectors


class EndOfInput(Exception):
    """The user pressed Ctrl+D / Ctrl+Z, or the script ran out of lines."""


class Terminal:
    """The keyboard on its own thread, the screen shared by everyone.

    input() blocks, and on Windows nothing but Enter wakes it, so a thread of its own
    reads each line and hands it over through a queue. The main thread waits on that
    queue a little at a time: Ctrl+C always gets through, and a client that lost its
    server can end without waiting for Enter. Lines printed while the user types go
    above the prompt; with readline (Linux, macOS) the line being typed is then drawn
    again as it was, cursor and all. Without it (Windows) only the prompt is: what was
    typed is still in the line, and Enter sends it, but it is not shown again.

    Between two questions, keys typed ahead are not echoed (POSIX terminals): they may be
    the password the next prompt asks for. readline shows them once an ordinary prompt is
    up; getpass drops them, so a password is typed when its prompt is there. A Windows
    console echoes no key before a program reads it: there typeahead is hidden already
    (and getpass takes it as the password).
    """

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.asks: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.print_lock = threading.Lock()
        self.prompt = ""  # shown now, waiting for the user
        self.asked = ""  # the prompt the keyboard thread was given (readline draws that one)
        self.secret = False  # the question shown is a password: nothing typed is on screen
        self.outstanding = False  # a question is with the keyboard thread, not answered yet
        self.ended = False
        self.saved_mode = None
        self.given_back = False  # restore() was called: leave the terminal's settings alone
        self.status_shown = False  # the last line printed is a progress line, to be drawn over
        self.readline_cursor = readline_cursor() if interactive and readline else None
        if interactive and termios:
            try:
                self.saved_mode = termios.tcgetattr(sys.stdin.fileno())
            except (termios.error, OSError, ValueError):
                pass
        threading.Thread(target=self.read_lines, name="keyboard", daemon=True).start()

    def read_lines(self) -> None:
        while True:
            prompt, secret = self.asks.get()
            with self.print_lock:
                self.prompt = self.asked = prompt if self.interactive else ""
                self.secret = secret
            try:
                answer = self.read_answer(prompt, secret)
            except (EOFError, OSError, ValueError):
                answer = None
            except KeyboardInterrupt:  # reaches this thread on some systems; main handles it
                answer = None
            with self.print_lock:
                self.prompt = ""
                self.status_shown = False  # Enter moved the cursor on: the bar is no longer the last line
            self.set_echo(False)  # until the next question: what is typed now may be its password
            self.answers.put(answer)
            if answer is None:
                return

    def read_answer(self, prompt: str, secret: bool) -> str:
        """Return one line from the keyboard (or the script); raise EOFError at the end."""
        if not self.interactive:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")
        if secret:
            return getpass.getpass(prompt)
        self.set_echo(True)
        return input(prompt)

    def ask(self, prompt: str, secret: bool = False, alive=lambda: None) -> str:
        """Return the next line the user types; raise EndOfInput at its end.

        `alive()` is called while waiting and may raise to stop waiting.
        """
        if self.ended:
            raise EndOfInput
        if self.outstanding:  # an earlier question was abandoned: its line answers this one
            self.show_prompt(prompt)
        else:
            self.asks.put((prompt, secret))
            self.outstanding = True
        answer = wait_for(self.answers, alive)
        self.outstanding = False
        if answer is None:
            self.ended = True
            raise EndOfInput
        return answer

    def show_prompt(self, prompt: str) -> None:
        """Replace the prompt shown while the keyboard thread keeps waiting for a line."""
        with self.print_lock:
            if self.interactive:
                sys.stdout.write("\r" + " " * len(self.prompt) + "\r" + prompt)
                sys.stdout.flush()
                self.prompt = prompt

    def set_echo(self, on: bool) -> None:
        """Let the terminal show the keys typed (as it did when we started), or not."""
        with self.print_lock:
            if self.saved_mode is None or self.given_back:
                return
            mode = list(self.saved_mode)
            mode[3] = mode[3] | termios.ECHO if on else mode[3] & ~termios.ECHO  # [3]: the local flags
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, mode)  # NOW: keep what was typed ahead
            except (termios.error, OSError, ValueError):
                pass

    def restore(self) -> None:
        """Give the terminal back as we found it, for good: Ctrl+C during a password prompt
        must not leave typing invisible."""
        with self.print_lock:
            self.given_back = True
            if self.saved_mode is not None:
                try:
                    termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved_mode)
                except (termios.error, OSError, ValueError):
                    pass

    def show(self, text: str, status: bool = False) -> None:
        """Print a line above the prompt, without garbling what the user is typing.

        A `status` line (a progress bar; ANSI terminals only) is drawn over by the next line
        printed: a bar redrawn in place, and chat lines that take its place, the bar below them.
        """
        with self.print_lock:
            lift = cursor_up(1) + "\r" if self.status_shown else ""  # back onto the last progress line
            text += CLEAR_LINE_END if self.status_shown or status else ""
            self.status_shown = status
            try:
                if not self.prompt:
                    print(lift + text, flush=True)
                elif readline and not self.secret and self.prompt == self.asked:
                    self.show_above_readline(text, lift)
                else:  # a password's prompt (what is typed is not shown), or no readline
                    sys.stdout.write("\r" + " " * len(self.prompt) + "\r" + lift + text + "\n" + self.prompt)
                    sys.stdout.flush()
            except OSError:  # a program reading our output stopped, or the terminal closed (EIO)
                pass

    def show_above_readline(self, text: str, lift: str = "") -> None:
        """Clear the rows the line being typed covers, print `text`, draw the line again below
        it, and put the cursor back where readline has it: the screen is then what readline
        believes it is, and the next key edits the right place."""
        typed = readline.get_line_buffer()
        before_cursor = typed[:readline_point(typed, self.readline_cursor)]
        columns = shutil.get_terminal_size().columns
        row, _ = divmod(display_width(self.prompt + before_cursor), columns)
        sys.stdout.write("\r" + cursor_up(row) + lift + ERASE_DOWN + text + "\n" + self.prompt + typed)
        end_row, end_column = divmod(display_width(self.prompt + typed), columns)
        if end_row and not end_column:
            sys.stdout.write(" \r")  # the line fills its last row: step onto the next, as readline does
        after = typed[len(before_cursor):]
        if end_row == row:  # one row: step back over what follows the cursor, as readline does, so
            # that an emoji a terminal draws narrower than display_width says cannot shift it
            sys.stdout.write(f"\x1b[{display_width(after)}D" if after else "")
        else:
            target_row, target_column = divmod(display_width(self.prompt + before_cursor), columns)
            right = f"\x1b[{target_column}C" if target_column else ""
            sys.stdout.write(cursor_up(end_row - target_row) + "\r" + right)
        sys.stdout.flush()


def wait_for(answers: queue.Queue, alive):
    """Return the next answer put in `answers`, calling `alive()` - which may raise to stop
    the waiting - every MAX_WAIT seconds meanwhile: a Ctrl+C or a lost server gets through."""
    while True:
        alive()
        try:
            return answers.get(timeout=MAX_WAIT)
        except queue.Empty:
            continue


def cursor_up(rows: int) -> str:
    return f"\x1b[{rows}A" if rows > 0 else ""  # ANSI: cursor up that many rows


def readline_cursor():
    """Return readline's cursor position, a C int in its library (through ctypes), or None.

    Python's readline module gives the line typed but not where the cursor is in it; GNU
    readline and libedit keep that in `rl_point`. Reading it changes nothing, so it is
    safe while the keyboard thread is inside readline.
    """
    try:
        return ctypes.c_int.in_dll(ctypes.CDLL(readline.__file__), "rl_point")
    except (OSError, ValueError, AttributeError):  # readline built into Python, or no such symbol
        return None


def readline_point(typed: str, cursor) -> int:
    """Return how many characters of `typed` are before the cursor (rl_point counts bytes)."""
    if cursor is None:
        return len(typed)  # cannot tell: at the end, where it usually is
    return len(typed.encode("utf-8")[:max(cursor.value, 0)].decode("utf-8", "ignore"))


def display_width(text: str) -> int:
    """Return how many columns `text` takes on a terminal: most emoji and CJK take two,
    combining marks and joiners none."""
    width = 0
    for character in text:
        if unicodedata.combining(character) or character in ZERO_WIDTH:
            continue
        width += 2 if unicodedata.east_asian_width(character) in "WF" else 1
    return width


# --- The conversation -----------------------------------------------------------------


HELP = f"""Commands:
  /help              this list
  /rooms             rooms and how many are in each
  /who               who is in your room
  /join ROOM         go to another room (asks its password; a new room gets the one you give)
  /msg USER TEXT     a private message to one user
  /send USER FILE    send a file to one user ("quotes" optional around a name with spaces)
  /share FILE        send a file to everyone in your room
  /files             files in progress and finished;  /cancel  stops yours (/cancel N: number N)
  exit  or  /quit    leave (Ctrl+C does the same)
Anything else is sent to everyone in your room. A line over {MAX_TEXT_BYTES} bytes (UTF-8) goes as
several messages, cut between words. Start a line with // to send one beginning with /."""

TAB_AS = "    "  # a tab is shown as spaces: its width would depend on where the line starts
# Characters that reorder the text after them on screen (bidi embeddings, overrides and
# isolates): a name or message could make what follows read backwards ("Trojan Source").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LINE_BREAKS = ("\r\n", "\r", "\u2028", "\u2029")  # each shown as a new, indented line
# Emoji are sequences: a skin tone after a hand, 👩 ZWJ 💻, a flag's tag characters.
EMOJI_MODIFIERS = ("\U0001f3fb", "\U0001f3ff")  # the five skin tones, first and last
TAGS = ("\U000e0020", "\U000e007f")


def format_event(event: Event) -> str:
    """Return how an event is shown: `[HH:MM] alice: text` and the like."""
    clock = event_clock(event)
    user, text = printable(event.user), printable(event.text)
    if event.kind == "chat":
        return f"[{clock}] {user}: {text}"
    if event.kind == "private":
        return f"[{clock}] {user} (private): {text}"
    if event.kind == "history":
        return f"[history] [{clock}] {user}: {text}"
    if event.kind == "join":
        return f"[{clock}] {user} joined"
    if event.kind == "leave":
        return f"[{clock}] {user} left" + (f" ({text})" if text else "")
    if event.kind in FILE_EVENTS:
        return f"[{clock}] {text}"
    return f"[{clock}] {event.kind}: {user} {text}"


def printable(text: str) -> str:
    """Return `text` safe for a terminal, every printable sequence kept (emoji with their
    joiners too): what could move the cursor or change the terminal becomes '?', a tab
    spaces, and a line break starts an indented line."""
    for line_break in LINE_BREAKS:
        text = text.replace(line_break, "\n")
    text = "".join("?" if could_move_cursor(c) else c for c in text.replace("\t", TAB_AS))
    return text.replace("\n", "\n    ")


def could_move_cursor(character: str) -> bool:
    """Is it a control character (ESC starts every escape sequence; C1, DEL), half of a
    character (a lone surrogate), or a bidi control? A line break is not one here."""
    if character == "\n":
        return False
    return unicodedata.category(character) in ("Cc", "Cs") or character in BIDI_CONTROLS


def split_message(text: str, limit: int = MAX_TEXT_BYTES) -> list[str]:
    """Return `text` as messages of at most `limit` bytes of UTF-8, in order, cut between
    words where a word boundary is near (else between characters); the spaces at a cut are
    dropped. A text that fits is returned whole."""
    if limit < 4:
        raise ValueError("a limit under 4 bytes cannot hold every character")
    parts = []
    while len(text.encode("utf-8")) > limit:
        cut = cut_point(text, limit)
        part, text = text[:cut].rstrip(), text[cut:].lstrip()
        if part:
            parts.append(part)
    if text.strip():
        parts.append(text)
    return parts


def cut_point(text: str, limit: int) -> int:
    """Return where to cut `text` so that the first piece fits in `limit` bytes: after
    the last whole word that fits, else after the last whole character (emoji and all)."""
    fits = text.encode("utf-8")[:limit].decode("utf-8", "ignore")  # never half a character
    if text[len(fits)].isspace():
        return len(fits)  # the cut falls between words already
    space = max((index for index, c in enumerate(fits) if c.isspace()), default=-1)
    if space > 0 and fits[:space].strip():
        return space
    end = len(fits)
    while end > 1 and joins_previous(text, end):
        end -= 1
    return end if end > 1 else len(fits)  # one "character" longer than the limit: cut it anyway


def joins_previous(text: str, index: int) -> bool:
    """Does text[index] belong to the character before it (an accent, a joiner, a skin tone)?"""
    character = text[index]
    return (unicodedata.category(character).startswith("M") or character in ZERO_WIDTH
            or text[index - 1] == "\u200d" or EMOJI_MODIFIERS[0] <= character <= EMOJI_MODIFIERS[1]
            or TAGS[0] <= character <= TAGS[1])


def names_me(text: str, name: str | None) -> bool:
    """Does `text` mention `name` as a word, in any case ("hi Alice!", "@alice")?"""
    return bool(name) and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def describe_arrival(joined: str, members: list[str], me: str | None) -> str:
    """Return `joined lobby: alice, bob and 3 others here`, from the JOIN reply and WHO's list."""
    more = 0
    if members and members[-1].startswith("... and "):  # WHO's list did not all fit
        more = int(members.pop().split()[2])
    others = [printable(name) for name in members if name.lower() != (me or "").lower()]
    named = others if len(others) + more <= 3 else others[:2]
    unnamed = len(others) - len(named) + more
    if unnamed:
        who = ", ".join(named) + f" and {unnamed} other{'s' if unnamed > 1 else ''}"
    elif named:
        who = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]
    else:
        who = "nobody else"
    return f"{joined.split(',')[0]}: {who} here"


# --- Colours: ANSI escape codes (SGR), where the terminal shows them ---

BOLD_YELLOW, MAGENTA, PLAIN = "\x1b[1;33m", "\x1b[35m", "\x1b[0m"
MENTION_COLOR = BOLD_YELLOW  # a line that names me
PRIVATE_COLOR = MAGENTA  # a private message, to me or from me
BELL = "\a"  # the terminal beeps, or flashes its window, when it prints this
STD_OUTPUT_HANDLE = -11  # Windows: GetStdHandle's name for standard output
ENABLE_VIRTUAL_TERMINAL_PROCESSING = 0x0004  # Windows 10+: the console interprets ANSI codes


def use_color(stream, environ, platform: str = sys.platform, kernel32=None) -> bool:
    """May we colour what goes to `stream`? Only a terminal, never with NO_COLOR set
    (no-color.org) or TERM=dumb; on Windows only a console that takes ANSI codes."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb" or not is_terminal(stream):
        return False
    return enable_windows_ansi(kernel32) if platform == "win32" else True


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def enable_windows_ansi(kernel32=None) -> bool:
    """Ask the Windows console to interpret ANSI escape codes (Windows 10 and later can);
    return whether it now does. `kernel32` is for tests: by default, the real one."""
    if kernel32 is None:
        kernel32 = getattr(ctypes, "windll", None) and ctypes.windll.kernel32  # Windows only
        if not kernel32:
            return False
    handle = kernel32.GetStdHandle(STD_OUTPUT_HANDLE)
    mode = ctypes.c_uint32()  # a DWORD of flags
    if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
        return False  # not a console: output redirected
    return bool(kernel32.SetConsoleMode(handle, mode.value | ENABLE_VIRTUAL_TERMINAL_PROCESSING))


class Screen:
    """What the user is shown of the chat: events and one's own lines, coloured where the
    terminal allows; a line that names the user highlighted, with the bell.

    While a JOIN is answered, what the room sends (its history first) is held back, and
    shown after the line that says who is here.
    """

    def __init__(self, terminal: Terminal, color: bool = False, bell: bool = False):
        self.terminal, self.color, self.bell = terminal, color, bell
        self.me: str | None = None  # the user's name once logged in: to find mentions
        self.lock = threading.Lock()  # lines from the network thread and the main thread, in order
        self.held: list[str] | None = None

    @classmethod
    def for_stdout(cls, terminal: Terminal) -> "Screen":
        color = use_color(sys.stdout, os.environ)
        return cls(terminal, color, bell=terminal.interactive and is_terminal(sys.stdout))

    def show_event(self, event: Event) -> None:
        """Show what the server pushed (called on the network thread)."""
        line = format_event(event)
        if event.kind == "private":
            line = self.paint(line, PRIVATE_COLOR) + self.ring()
        elif event.kind == "chat" and names_me(event.text, self.me) and event.user.lower() != self.me.lower():
            line = self.paint(line, MENTION_COLOR) + self.ring()
        self.put(line)

    def show_own(self, text: str, to: str | None = None) -> None:
        """Show a line of ours that the server accepted: `[HH:MM] you: text`, or `-> bob: text`."""
        line = f"[{time.strftime('%H:%M')}] {'-> ' + printable(to) if to else 'you'}: {printable(text)}"
        self.put(self.paint(line, PRIVATE_COLOR) if to else line)

    def paint(self, line: str, color: str) -> str:
        return f"{color}{line}{PLAIN}" if self.color else line

    def ring(self) -> str:
        return BELL if self.bell else ""

    def put(self, line: str) -> None:
        with self.lock:
            if self.held is not None:
                self.held.append(line)
            else:
                self.terminal.show(line)

    def hold(self) -> None:
        """Keep what arrives for now; `release` shows it."""
        with self.lock:
            self.held = []

    def release(self, first: str | None = None) -> None:
        """Show `first` (if any), then what was held back, in the order it came."""
        with self.lock:
            held, self.held = self.held or [], None
            for line in ([first] if first else []) + held:
                self.terminal.show(line)


def event_clock(event: Event) -> str:
    """Return the event's time as the chat shows it, HH:MM on this PC's clock."""
    return time.strftime("%H:%M", time.localtime(event.time))


EXIT_WORDS = ("exit", "/quit", "/exit")  # what leaves the chat, typed alone on a line


def parse_line(line: str) -> tuple[str, str]:
    """Return what a typed line asks for: ("say", text), (command, the rest) or ("", "") for nothing.

    The terminal and the window both read lines with this, so a command means the same in each.

    >>> parse_line("/join games"), parse_line("//etc is a folder"), parse_line("hi")
    (('/join', 'games'), ('say', '/etc is a folder'), ('say', 'hi'))
    """
    if line.startswith("//"):
        return "say", line[1:]
    if line.startswith("/"):
        command, _, rest = line.partition(" ")
        return command.lower(), rest.strip()
    return ("say", line) if line.strip() else ("", "")


class Conversation:
    """The flow a user goes through: choose, log in, enter the lobby, chat, leave."""

    def __init__(self, client: ChatClient, terminal: Terminal, screen: Screen | None = None):
        self.client = client
        self.terminal = terminal
        self.screen = screen or Screen.for_stdout(terminal)
        client.on_event = self.screen.show_event  # what the server pushes is shown by the Screen
        self.chatting = False
        self.commands = {"/help": self.show_help, "/rooms": self.show_rooms, "/who": self.show_who,
                         "/join": self.join_room, "/msg": self.send_private, "/send": self.send_file,
                         "/share": self.share_file, "/files": self.list_files, "/cancel": self.cancel_files}
        self.progress = FileProgress(terminal, in_place=terminal is not None and progress_in_place(terminal))
        client.on_file = self.progress.update

    def ask(self, prompt: str, secret: bool = False) -> str:
        return self.terminal.ask(prompt, secret, alive=self.check_alive)

    def check_alive(self) -> None:
        if self.client.closed.is_set():
            raise ConnectionClosed(self.client.closed_reason)
        if self.chatting and self.client.session_over.is_set():  # lost, and not getting back in
            raise self.client.lost_reason or SessionLost(SESSION_LOST)

    def run(self) -> None:
        """Ask /register or /login until the user logs in, chats and leaves."""
        while True:
            choice = self.ask("Type /register or /login (exit to quit): ").strip().lower()
            if choice in EXIT_WORDS:
                return
            if choice in ("/register", "register"):
                self.register()
            elif choice in ("/login", "login"):
                if self.login() and self.chat():
                    return
            elif choice:
                self.terminal.show("Please type /register or /login.")

    def register(self) -> None:
        """Username (an empty one goes back), then a new password, typed twice."""
        name = self.ask("Username: ").strip()
        if not name:
            return
        if not auth.valid_username(name):
            self.terminal.show("Usernames are 1-20 letters, digits, '_', '.' or '-'.")
            return
        password = self.ask_new_password()
        if password is None:
            return
        try:
            self.terminal.show(self.client.register(name, password))
        except Refused as refusal:
            self.terminal.show(refusal.text)

    def ask_new_password(self) -> str | None:
        """Return a password typed twice alike and long enough; None if left empty."""
        while True:
            password = self.ask(f"Password (at least {MIN_PASSWORD} characters): ", secret=True)
            if not password:
                return None
            if len(password) < MIN_PASSWORD:
                self.terminal.show(f"Too short: a password has at least {MIN_PASSWORD} characters.")
            elif self.ask("Password again: ", secret=True) == password:
                return password
            else:
                self.terminal.show("The two passwords differ; type it again.")

    def login(self) -> bool:
        """Username (an empty one goes back), password, then the lobby's password."""
        name = self.ask("Username: ").strip()
        if not name:
            return False
        password = self.ask("Password: ", secret=True)
        try:
            self.terminal.show(self.client.login(name, password))
        except Refused as refusal:
            self.terminal.show(refusal.text)
            return False
        self.screen.me = self.client.name
        return self.enter_lobby()

    def enter_lobby(self) -> bool:
        """Ask for the lobby's password until it is right; Enter alone goes on in no room."""
        hint = "Try again, or press Enter alone to go on without a room."
        while True:
            password = self.ask(f"Room password for {LOBBY}: ", secret=True)
            if not password:  # not sent: an empty password would count as a wrong one
                break
            try:
                self.enter_room(LOBBY, password, then=" Type /help for commands.")
                return True
            except Refused as refusal:
                self.terminal.show(refusal.text)
                if refusal.code == "locked":  # asking again would not help now
                    break
            if hint:  # once
                self.terminal.show(hint)
                hint = ""
        self.terminal.show("You are in no room: /join ROOM enters one, /rooms lists them, exit leaves.")
        return True

    def enter_room(self, room: str, password: str, then: str = "") -> None:
        """JOIN, then WHO: say where we are and who is here; then the room's history and news."""
        self.screen.hold()
        line = None
        try:
            line = self.client.join(room, password)
            if line.startswith("joined"):
                _, members = self.client.who()
                line = describe_arrival(line, members, self.client.name) + "." + then
        finally:
            self.screen.release(line)

    def chat(self) -> bool:
        """Read lines and act on them; True when the user leaves, False to log in again."""
        self.chatting = True
        try:
            while True:
                line = self.ask("> ")
                if line.strip().lower() in EXIT_WORDS:
                    self.client.bye()
                    return True
                try:
                    self.handle_line(line)
                except (Refused, ServerNotResponding) as refusal:  # that line failed; the chat goes on
                    self.terminal.show(str(refusal))
        except SessionLost as error:
            if not isinstance(error, LoggedInElsewhere):  # that one was said already, as it came
                self.terminal.show(f"[WARN] {error}")
            return False
        finally:
            self.chatting = False

    def handle_line(self, line: str) -> None:
        command, rest = parse_line(line)
        if command == "say":
            self.send_line(rest)
        elif command:
            action = self.commands.get(command)
            if action is None:
                self.terminal.show(f"Unknown command {command}; type /help for the list.")
            else:
                action(rest)

    def send_line(self, text: str) -> None:
        """Send a line without waiting for its answer: pasted lines flow, in order. A line
        too long for one message goes as several."""
        parts = split_message(text)
        answered: list[bool] = []  # one entry per part answered: was it accepted?
        for part in parts:
            future = self.client.submit(PacketType.SAY, part)
            future.add_done_callback(lambda done, part=part: self.report_said(done, part, answered, len(parts)))

    def report_said(self, done, text: str, answered: list[bool], parts: int) -> None:
        """Runs when the server answered a line (or part): show it as ours, or say it was not sent."""
        error = done.exception()
        answered.append(error is None)
        shown = printable(text if len(text) <= 40 else text[:37] + "...")
        if error is None:
            self.screen.show_own(text)
        elif isinstance(error, ServerStopped):  # it said it handled nothing more
            self.terminal.show(f"not sent: {shown} (the server was stopped)")
        elif isinstance(error, SessionLost):  # the server may have had it before it went
            self.terminal.show(f"maybe not sent: {shown} (contact was lost before the server answered)")
        elif isinstance(error, ChatError) and not isinstance(error, ConnectionClosed):
            self.terminal.show(f"not sent: {shown} ({error})")
        if parts > 1 and len(answered) == parts:  # replies come in order: this was the last
            self.terminal.show(f"sent in {parts} parts" if all(answered) else
                               f"{sum(answered)} of {parts} parts sent")

    def show_help(self, rest: str) -> None:
        self.terminal.show(HELP)

    def show_rooms(self, rest: str) -> None:
        for name, count in self.client.rooms():
            self.terminal.show(f"  {name}  ({count} here)" if count else f"  {name}")

    def show_who(self, rest: str) -> None:
        room, members = self.client.who()
        self.terminal.show(f"In {room}: {', '.join(members)}")

    def join_room(self, rest: str) -> None:
        """/join ROOM: say what is wrong before asking a password, and whether the room is new."""
        if not rest:
            self.terminal.show("Usage: /join ROOM")
        elif not auth.valid_username(rest):
            self.terminal.show("Room names are 1-20 letters, digits, '_', '.' or '-' (no spaces).")
        elif rest.lower() == (self.client.room or "").lower():
            self.terminal.show(f"You are in {self.client.room} already.")
        else:
            password = self.ask(self.room_password_prompt(rest), secret=True)
            if password:  # Enter alone sends nothing: an empty password would count as a wrong one
                self.enter_room(rest, password)
            else:
                self.terminal.show(f"Not joined: {rest} needs its password.")

    def room_password_prompt(self, room: str) -> str:
        """`Password for games: `, or `Password for new room games: ` if no such room exists."""
        names = [name.lower() for name, _ in self.client.rooms()]
        if room.lower() in names:
            return f"Password for {room}: "
        if names and names[-1].startswith("... and "):  # the list did not all fit: cannot tell
            return f"Password for {room} (a new room gets this one): "
        return f"Password for new room {room}: "

    def send_private(self, rest: str) -> None:
        """/msg USER TEXT, in several messages if long; `-> bob: text` once each is accepted."""
        user, _, text = rest.partition(" ")
        if not user or not text.strip():
            self.terminal.show("Usage: /msg USER TEXT")
            return
        parts = split_message(text)
        try:
            for part in parts:
                self.client.private(user, part)
                self.screen.show_own(part, to=user)
        except Refused as refusal:
            raise naming_the_user(refusal, user) from None  # "not-online" and others: the server's words
        if len(parts) > 1:
            self.terminal.show(f"sent in {len(parts)} parts")


    def send_file(self, rest: str) -> None:
        """/send USER FILE"""
        user, _, path = rest.partition(" ")
        if not user or not path.strip():
            self.terminal.show('Usage: /send USER FILE   (e.g. /send bob "my notes.pdf")')
        else:
            self.offer_file(user, unquote(path))

    def share_file(self, rest: str) -> None:
        """/share FILE: to everyone else in the room"""
        if not rest:
            self.terminal.show("Usage: /share FILE")
        else:
            self.offer_file("", unquote(rest))

    def offer_file(self, to: str, path: str) -> None:
        """Offer the file; once the server accepts, it goes, and its progress is shown."""
        try:
            transfer, future = self.client.send_file(to, path)
        except FileProblem as problem:
            self.terminal.show(str(problem))
            return
        future.add_done_callback(lambda done: done.exception() or self.terminal.show(
            f"sending {printable(transfer.name)} ({describe_size(transfer.size)}) to {printable(transfer.peer)}"
            f" as number {transfer.id}"))  # a refusal is shown by FileProgress

    def list_files(self, rest: str) -> None:
        transfers = self.client.transfers()
        for transfer in transfers:
            self.terminal.show("  " + describe_transfer(transfer))
        if not transfers:
            self.terminal.show("No files sent or received yet.")

    def cancel_files(self, rest: str) -> None:
        number = rest.strip().lstrip("#")  # /files shows them as #3
        if number and not whole_number(number):
            self.terminal.show("Usage: /cancel, or /cancel N with N as /files shows it")
        elif not self.client.cancel_files(int(number) if number else 0):
            self.terminal.show("No file of yours is on its way." if not number else f"No transfer numbered {number}.")


def unquote(text: str) -> str:
    """Return a path as typed: surrounding quotes dropped, ~ expanded; backslashes kept (Windows)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return os.path.expanduser(text)


def progress_in_place(terminal) -> bool:
    """May a progress bar be drawn over itself? Only on a terminal that understands ANSI codes."""
    if not getattr(terminal, "interactive", False) or not is_terminal(sys.stdout):
        return False
    return os.name != "nt" or enable_windows_ansi()


def describe_transfer(transfer: Transfer) -> str:
    """Return one line of /files: number, direction, name, size, how far."""
    arrow = f"-> {transfer.peer}" if transfer.direction == "up" else f"<- {transfer.peer}"
    how = f"{percent(transfer)}%" if transfer.active else transfer.state
    if not transfer.active and transfer.note and transfer.note != transfer.state:
        how += f" ({transfer.note})"
    number = f"#{transfer.id} " if transfer.id else ""  # none yet: the server never took the offer
    return printable(f"{number}{transfer.name} {arrow}, {describe_size(transfer.size)}: {how}")


def percent(transfer: Transfer) -> int:
    return 100 if not transfer.size else transfer.done * 100 // transfer.size


class FileProgress:
    """How files on their way are shown: one bar for all, drawn over itself on a terminal
    (percent, size, speed, time left); elsewhere a plain line at each quarter. Then a last line."""

    REDRAW_EVERY = 0.1  # seconds: ten frames a second is smooth, and cheap
    BAR = 20  # characters

    def __init__(self, terminal, in_place: bool, clock=time.monotonic):
        self.terminal, self.in_place, self.clock = terminal, in_place, clock
        self.active: dict[int, Transfer] = {}  # id(transfer) -> transfer, while it moves
        self.quarters: dict[int, int] = {}  # plain lines: the last quarter shown
        self.drawn_at = -1.0

    def update(self, what: str, transfer: Transfer) -> None:
        """Called (on the network thread) with ("progress", "done", "failed" or "cancelled", transfer)."""
        if what != "progress":
            self.active.pop(id(transfer), None)
            self.terminal.show(final_line(what, transfer))
            if self.in_place and self.active:
                self.draw(force=True)
        elif self.in_place:
            self.active[id(transfer)] = transfer
            self.draw(force=transfer.done >= transfer.size)
        elif transfer.size and 0 < percent(transfer) // 25 < 4 and percent(transfer) // 25 > self.quarters.get(
                id(transfer), 0):
            self.quarters[id(transfer)] = percent(transfer) // 25
            self.terminal.show(printable(f"{transfer.name}: {percent(transfer)}% of {describe_size(transfer.size)}"))

    def draw(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.drawn_at >= self.REDRAW_EVERY:
            self.drawn_at = now
            line = "  |  ".join(self.bar(transfer, now) for transfer in self.active.values())
            width = shutil.get_terminal_size().columns - 1
            while display_width(line) > width:  # one row, or it could not be drawn over
                line = line[:-2]
            self.terminal.show(line, status=True)

    def bar(self, transfer: Transfer, now: float) -> str:
        filled = percent(transfer) * self.BAR // 100
        elapsed = max(now - transfer.started, 1e-6)
        speed = transfer.done / elapsed
        left = (transfer.size - transfer.done) / speed if speed else 0
        return printable(f"{transfer.name} [{'#' * filled}{'.' * (self.BAR - filled)}] {percent(transfer):3d}% "
                         f"{describe_size(transfer.done)}/{describe_size(transfer.size)} "
                         f"{describe_size(int(speed))}/s {left:.0f} s left")


def final_line(what: str, transfer: Transfer) -> str:
    """Return the line that ends a transfer: saved, sent, not sent, cancelled."""
    name, size = transfer.name, describe_size(transfer.size)
    if what == "done" and transfer.direction == "down":
        return printable(f"saved {transfer.path} ({size}, {transfer.note})")
    if what == "done":
        return printable(f"sent {name} ({size}) to {transfer.peer}")
    if what == "cancelled" and transfer.said:
        return printable(transfer.said)
    if what == "cancelled":
        return printable(f"cancelled: {name} ({transfer.note})")
    removed = "; the partial file was removed" if transfer.direction == "down" else ""
    return printable(f"{name} not {'saved' if transfer.direction == 'down' else 'sent'}: {transfer.note}{removed}")


# --- Finding a server: one question to the whole network -------------------------------

# A datagram sent to a broadcast address reaches every host on the network, which TCP
# cannot do: a connection has exactly two ends. So a client that does not know the
# server's address asks everyone, and whoever runs a chat server answers. Only when
# asked: on many networks a broadcast is noticed.
SEARCH_TIME = 1.0  # seconds a search listens: a LAN answers within milliseconds
SEARCH_TRIES = 3  # FINDs sent in that time, a third of it apart, as DHCP resends its DISCOVER
NOTHING_FOUND = "no server answered on this network; type its IP"
OTHER_KEYS_ONLY = "no server with this --cipher and --key answered; start the client with theirs"


@dataclasses.dataclass(frozen=True)
class FoundServer:
    """A chat server that answered a FIND."""

    address: str  # the IP its answer came from: the one to type, or to connect to
    port: int
    name: str
    online: int  # members logged in

    def __str__(self) -> str:
        return f"{printable(self.name)}  {self.address}:{self.port}  {self.online} online"


class ServerSearch:
    """One search of the network, without sockets: the FIND to send, and what answers say.

    The FIND carries a number drawn for this search, and an answer must name it (in its
    ack field and its first field): answers to an earlier search, and stray datagrams,
    are not taken for servers. A server that hears the FIND more than once - on two of
    our networks, or sent again - is listed once.
    """

    def __init__(self, cipher, number: int | None = None):
        self.cipher = cipher
        self.number = number or 1 + secrets.randbelow(2**32 - 1)  # any but 0: a request's number
        self.found: dict[tuple[str, int], FoundServer] = {}  # in the order they answered
        self.other_key: set[tuple[str, int]] = set()  # answered, but scrambled with another cipher or key

    def request(self) -> bytes:
        """Return the FIND datagram, padded to MIN_FIND_SIZE (the server drops it otherwise)."""
        padding = "." * (MIN_FIND_SIZE - HEADER_SIZE - 2)  # the field's 2-byte length, then the dots
        return encode_packet(Packet(PacketType.FIND, self.number, payload=pack_fields(padding)), self.cipher)

    def receive(self, data: bytes, address: tuple[str, int]) -> FoundServer | None:
        """Take a datagram that came back; return the server it tells of, if it is a new one."""
        try:
            packet = decode_packet(data, self.cipher)
            number, name, port, online = unpack_fields(packet.payload, 4)
        except ChecksumError:  # a chat server whose key differs from ours (its ERROR is unreadable)
            self.other_key.add(address)
            return None
        except PacketError:
            return None
        if (packet.type != PacketType.OK or packet.ack != self.number or number != str(self.number)
                or not (whole_number(port) and 0 < int(port) < 65536 and whole_number(online))):
            return None
        server = FoundServer(address[0], int(port), name, int(online))
        if (server.address, server.port) in self.found:
            return None
        self.found[server.address, server.port] = server
        return server

    def servers(self) -> list[FoundServer]:
        return list(self.found.values())


def broadcast_addresses(interfaces) -> list[str]:
    """Return where a search is sent: each network's broadcast address, then 255.255.255.255."""
    return list(dict.fromkeys([interface.broadcast for interface in interfaces if interface.broadcast]
                              + [LIMITED_BROADCAST]))


def search_network(search: ServerSearch, targets: list[str], port: int, wait: float = SEARCH_TIME,
                   tries: int = SEARCH_TRIES) -> ServerSearch:
    """Send the search's FIND to each target `tries` times within `wait` s, and collect the answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Without SO_BROADCAST the system refuses to send to a broadcast address (EACCES):
        # asking every host at once has to be meant.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        start = time.monotonic()
        for attempt in range(tries):
            for target in targets:
                try:
                    sock.sendto(search.request(), (target, port))
                except OSError:  # e.g. 255.255.255.255 with no default route: "network unreachable"
                    pass
            collect_answers(sock, search, start + wait * (attempt + 1) / tries)
    return search


def collect_answers(sock: socket.socket, search: ServerSearch, until: float) -> None:
    """Hand the search every datagram that arrives before `until` (a time.monotonic() value)."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data, address = sock.recvfrom(RECV_BUFFER)
        except TimeoutError:  # socket.timeout: nothing more came
            return
        except ConnectionResetError:  # Windows: "port unreachable" came back for one of our FINDs
            continue
        search.receive(data, address)


def find_servers(port: int, cipher, show) -> list[FoundServer]:
    """Search every network this PC is on; show what answered, or that nothing did."""
    show(f"Searching this network for chat servers on port {port}...")
    search = search_network(ServerSearch(cipher), broadcast_addresses(local_interfaces()), port)
    for address, other_port in sorted(search.other_key):
        show(f"{address}:{other_port} answered, but uses another --cipher or --key")
    if not search.found:
        show(OTHER_KEYS_ONLY if search.other_key else NOTHING_FOUND)
    return search.servers()


def pick_server(answer: str, found: list[FoundServer]) -> tuple[str, int | None] | None:
    """Return (host, port if known) for an answer to the Server IP prompt; None if it is no choice.

    Enter takes the first server found (127.0.0.1 if none), a number one from the list,
    anything else is an address.
    """
    if not answer:
        return (found[0].address, found[0].port) if found else (DEFAULT_HOST, None)
    if found and whole_number(answer):
        return (found[int(answer) - 1].address, found[int(answer) - 1].port) if 0 < int(answer) <= len(found) else None
    ports = [server.port for server in found if server.address == answer]
    return answer, ports[0] if ports else None


# --- The window: python client.py --gui -----------------------------------------------
#
# The same ChatClient and Conversation as the terminal, drawn with Tk instead of print().
# Tk is not thread-safe: only the thread that made the window may touch a widget. So no
# other thread does. The network thread and a worker thread (which makes the blocking
# ChatClient calls, so the window never freezes while the server is slow) put what they
# have on one queue, and the Tk thread empties it every POLL_EVERY ms, using after().

tk = None  # the tkinter module, imported by load_tkinter() only when a window is wanted
NO_TKINTER = ("The window needs tkinter, which this Python lacks (Debian/Ubuntu: sudo apt install python3-tk; "
              "Fedora: sudo dnf install python3-tkinter). Using the terminal instead.")
POLL_EVERY = 50  # ms between looks at the queue: quick to the eye, idle for the CPU
MAX_PER_POLL = 200  # items drawn per look, so a flood of messages cannot freeze the window
MAX_LINES = 5000  # the message list forgets its oldest lines beyond this
NAME_COLOURS = ("#1f5fbf", "#b0401f", "#2e7d32", "#8e24aa", "#00838f", "#c2185b", "#6d4c41", "#5d6d00")
STATUS_TEXTS = {  # what the status bar says in each state (see connection_state)
    "no server": "Not connected. Type the server's address, then Register or Log in.",
    "not logged in": "Server {server}: not logged in",
    "connected": "Connected to {server} as {name}",
    "lost contact": "Lost contact with {server}... still trying",
    "reconnecting": "The session ended; getting back in to {server}...",
    "closed": "Closed: {reason}",
}


def load_tkinter() -> None:
    """Import tkinter, or raise ImportError where this Python has none."""
    global tk
    # The submodules are imported too: only that makes tk.filedialog, tk.font and tk.ttk usable.
    import tkinter
    import tkinter.filedialog  # noqa: F401
    import tkinter.font  # noqa: F401
    import tkinter.ttk  # noqa: F401

    tk = tkinter
    if sys.platform == "win32":
        try:  # else Windows draws the window small and scales it up, blurred, on a high-DPI screen
            import ctypes

            ctypes.windll.shcore.SetProcessDpiAwareness(1)
        except (ImportError, AttributeError, OSError):
            pass  # Windows before 8.1: blurred, but it works


def connection_state(client: ChatClient | None) -> str:
    """Return how things stand with the server, one of STATUS_TEXTS' keys.

    UDP has no connection: "connected" means the server answers.
    """
    if client is None:
        return "no server"
    if client.closed.is_set():
        return "closed"
    if client.rejoin and client.rejoin.thread is not None:
        return "reconnecting"
    if client.protocol.out_of_contact:
        return "lost contact"
    return "connected" if client.logged_in else "not logged in"


def status_text(client: ChatClient | None) -> str:
    state = connection_state(client)
    if client is None:
        return STATUS_TEXTS[state]
    return STATUS_TEXTS[state].format(server=f"{client.host}:{client.port}", name=client.name,
                                      reason=client.closed_reason or "the connection is closed.")


def name_colour(name: str) -> str:
    """Return the colour a name is drawn in: always the same one, on every PC."""
    return NAME_COLOURS[binascii.crc32(name.encode()) % len(NAME_COLOURS)]


Piece = tuple[str, tuple[str, ...]]  # some text of a line and the Tk tags it is drawn with


def event_pieces(event: Event) -> list[Piece]:
    """Return a chat, private or history message as pieces: the time, the name, the text."""
    said = {"chat": ": ", "private": " (private): ", "history": ": "}[event.kind]
    stamp = ("[history] " if event.kind == "history" else "") + f"[{event_clock(event)}] "
    return [(stamp, ("time",)), (printable(event.user), ("name", name_colour(event.user))),
            (said, ()), (printable(event.text), ())]


def line_marks(event: Event, me: str | None) -> tuple[str, ...]:
    """Return the tags that colour a whole message line: mine, private, naming me, old."""
    marks = {"own": event.user == me, "history": event.kind == "history",
             "mention": event.user != me and names_me(event.text, me), "private": event.kind == "private"}
    return tuple(tag for tag, applies in marks.items() if applies)


class WindowBridge:
    """The queue from the other threads to the Tk thread, and Conversation's terminal.

    Any thread may `post` (what, detail) for the Tk thread. Conversation, which runs on
    the worker thread, calls `show` and `ask` as it would a Terminal's; the window
    answers a question by calling `answer` (None cancels it).
    """

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()

    def post(self, what: str, detail=None) -> None:
        self.inbox.put((what, detail))

    def show(self, text: str) -> None:
        self.post("line", text)

    def ask(self, prompt: str, secret: bool = False, alive=lambda: None) -> str:
        """Return what the user types into the window for `prompt`; Refused if cancelled."""
        while not self.answers.empty():  # left over from a question given up on
            self.answers.get_nowait()
        self.post("ask", (prompt, secret))
        answer = wait_for(self.answers, alive)
        if answer is None:
            raise Refused("cancelled", "Cancelled.")
        return answer

    def answer(self, text: str | None) -> None:
        self.answers.put(text)


class WindowScreen(Screen):
    """The Screen of the window: events and one's own lines go to the Tk thread, which
    draws them with colours of its own (tags), never with a terminal's escape codes."""

    def __init__(self, bridge: WindowBridge):
        super().__init__(bridge)

    def show_event(self, event: Event) -> None:
        self.terminal.post("event", event)

    def show_own(self, text: str, to: str | None = None) -> None:
        self.terminal.post("own", (text, to))


class Worker:
    """A thread for the calls that wait for the server, one at a time, in the order asked.

    What a job has to tell comes back through the bridge; so does the error it raises.
    """

    def __init__(self, bridge: WindowBridge):
        self.bridge = bridge
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.run, name="chat-worker", daemon=True)
        self.thread.start()

    def do(self, job, *args) -> None:
        self.jobs.put((job, args))

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, args = item
            try:
                job(*args)
            except (ChatError, ValueError) as error:  # ValueError: a key the cipher cannot use
                self.bridge.post("reply", str(error))
            except Exception as error:  # a bug: say so in the window, and keep the window alive
                self.bridge.post("internal error", repr(error))


class LoginView:
    """The first screen: the server's address, a username and a password; Register or Log in.

    `?` as the Server IP (or Find servers) searches the network as the terminal does; the
    servers that answer are listed, and a click on one fills in its IP and port.
    """

    sticky = "n"  # a form keeps its size in a big window, at the top, in the middle

    def __init__(self, parent, window: "ChatWindow", host: str, port: int):
        self.window = window
        self.found: list[FoundServer] = []  # the servers the last search listed
        self.frame = tk.Frame(parent, padx=24, pady=18)
        self.frame.columnconfigure(1, weight=1)
        tk.Label(self.frame, text="UDP chat room", font="TkHeadingFont").grid(row=0, column=0, columnspan=3, pady=8)
        self.host = self.add_field(1, "Server IP", host)
        self.port = self.add_field(2, "Port", str(port))
        self.name = self.add_field(3, "Username", "")
        self.password = self.add_field(4, "Password", "", secret=True)
        self.password_again = self.add_field(5, "Password again", "", secret=True, enter=self.register)
        tk.Label(self.frame, text="(to register)", foreground="#808080").grid(row=5, column=2, sticky="w")
        self.make_buttons()
        self.reply = tk.Label(self.frame, wraplength=420, justify="left")  # the server's answer
        self.reply.grid(row=7, column=0, columnspan=3, sticky="w")
        self.servers = tk.Listbox(self.frame, height=4, exportselection=False)  # shown once a search found some
        self.servers.grid(row=8, column=0, columnspan=3, sticky="ew", pady=4)
        self.servers.grid_remove()
        self.servers.bind("<<ListboxSelect>>", self.choose_server)  # a click, or the arrow keys

    def add_field(self, row: int, label: str, value: str, secret: bool = False, enter=None):
        """Return a labelled entry; Enter in it logs in (the usual choice) unless told otherwise."""
        tk.Label(self.frame, text=label + ":").grid(row=row, column=0, sticky="e", padx=6, pady=3)
        entry = tk.Entry(self.frame, width=28, show="*" if secret else "")
        entry.insert(0, value)
        entry.grid(row=row, column=1, sticky="ew", pady=3)
        entry.bind("<Return>", lambda event: (enter or self.log_in)())
        entry.bind("<KP_Enter>", lambda event: (enter or self.log_in)())
        return entry

    def make_buttons(self) -> None:
        self.find_button = tk.Button(self.frame, text="Find servers", command=self.search)
        self.find_button.grid(row=1, column=2, sticky="w", padx=6)
        buttons = tk.Frame(self.frame)
        buttons.grid(row=6, column=0, columnspan=3, pady=10)
        self.register_button = tk.Button(buttons, text="Register", command=self.register)
        self.login_button = tk.Button(buttons, text="Log in", command=self.log_in, default="active")
        for button in (self.register_button, self.login_button):
            button.pack(side="left", padx=6)
        for button in (self.find_button, self.register_button, self.login_button):
            button.bind("<Return>", lambda event: event.widget.invoke())

    def register(self) -> None:
        """Register: a password long enough, typed twice alike, as the terminal asks."""
        if len(self.password.get()) < MIN_PASSWORD:
            self.show_reply(f"Too short: a password has at least {MIN_PASSWORD} characters.")
            return
        if self.password_again.get() != self.password.get():  # else a typo makes an account nobody can enter
            for entry in (self.password, self.password_again):
                entry.delete(0, "end")
            self.show_reply("The two passwords differ; type it again.")
            self.password.focus_set()
            return
        self.send(self.window.register, "Registering...")

    def log_in(self) -> None:
        self.send(self.window.log_in, "Logging in...")

    def send(self, action, doing: str) -> None:
        """Check the port here (the server cannot answer a wrong one), then hand over to `action`."""
        if self.host.get().strip() == "?":  # the terminal's way to search
            self.search()
            return
        port = parse_port(self.port.get().strip())
        if port is None:
            self.show_reply(PORT_RULE)
            return
        self.busy(doing)
        action(self.host.get().strip() or DEFAULT_HOST, port, self.name.get().strip(), self.password.get())

    def search(self) -> None:
        """Find servers, or `?`: ask the whole network for chat servers on the port given."""
        port = parse_port(self.port.get().strip())
        if port is None:
            self.show_reply(PORT_RULE)
            return
        self.busy(f"Searching this network for chat servers on port {port}...")
        self.window.search(port)

    def show_servers(self, found: list[FoundServer], said: list[str]) -> None:
        """The search's outcome: the servers that answered, the first one filled in; or nobody."""
        self.found = found
        self.servers.delete(0, "end")
        for server in found:
            self.servers.insert("end", str(server))
        if found:
            self.servers.grid()
            self.servers.selection_set(0)
            self.choose_server()
            said = said + ["Click a server in the list to use it; the first is filled in."]
        else:
            self.servers.grid_remove()
            if self.host.get().strip() == "?":
                self.host.delete(0, "end")  # the "?" goes: the server's IP is to be typed (one typed stays)
        self.show_reply("\n".join(said))
        self.focus()

    def choose_server(self, event=None) -> None:
        """A server chosen in the list: its IP and port go into the fields."""
        chosen = self.servers.curselection()
        if chosen:
            server = self.found[chosen[0]]
            for entry, text in ((self.host, server.address), (self.port, str(server.port))):
                entry.delete(0, "end")
                entry.insert(0, text)

    def busy(self, doing: str) -> None:
        """Say what is happening, and take no second click until the server answers."""
        self.reply.configure(text=doing)
        for button in (self.register_button, self.login_button, self.find_button):
            button.configure(state="disabled")

    def show_reply(self, text: str) -> None:
        self.reply.configure(text=text)
        for button in (self.register_button, self.login_button, self.find_button):
            button.configure(state="normal")

    def focus(self) -> None:
        empty = [entry for entry in (self.host, self.port, self.name, self.password) if not entry.get()]
        (empty[0] if empty else self.password).focus_set()


class RoomPasswordView:
    """The second screen: the lobby's password, asked once the server has welcomed us.

    Log out is the way back to the first screen: for a student who does not know the
    password, or whom the server makes wait after too many wrong ones.
    """

    sticky = "n"

    def __init__(self, parent, window: "ChatWindow"):
        self.window = window
        self.frame = tk.Frame(parent, padx=24, pady=18)
        self.welcome = tk.Label(self.frame, font="TkHeadingFont")
        self.welcome.grid(row=0, column=0, columnspan=2)
        tk.Label(self.frame, text=f"Room password for {LOBBY}:").grid(row=1, column=0, padx=6, pady=10)
        self.password = tk.Entry(self.frame, width=20, show="*")
        self.password.grid(row=1, column=1, pady=10)
        self.password.bind("<Return>", lambda event: self.join())
        self.password.bind("<KP_Enter>", lambda event: self.join())
        buttons = tk.Frame(self.frame)
        buttons.grid(row=2, column=0, columnspan=2)
        self.join_button = tk.Button(buttons, text="Join", command=self.join, default="active")
        self.log_out_button = tk.Button(buttons, text="Log out", command=window.log_out)
        for button in (self.join_button, self.log_out_button):
            button.pack(side="left", padx=6)
            button.bind("<Return>", lambda event: event.widget.invoke())
        self.reply = tk.Label(self.frame, wraplength=420)
        self.reply.grid(row=3, column=0, columnspan=2, pady=8)

    def join(self) -> None:
        if not self.password.get():  # nothing sent: an empty password would count as a wrong one
            self.reply.configure(text=f"Type the room password of {LOBBY}, or Log out.")
            return
        self.reply.configure(text="Joining...")
        for button in (self.join_button, self.log_out_button):  # no logging out while the server decides
            button.configure(state="disabled")
        self.window.join_lobby(self.password.get())

    def show_reply(self, text: str) -> None:
        self.reply.configure(text=text)
        for button in (self.join_button, self.log_out_button):
            button.configure(state="normal")
        self.password.delete(0, "end")

    def focus(self) -> None:
        self.password.focus_set()


class FilesPanel:
    """Under the chat's input line: send a file, cancel, open the downloads; a bar per transfer.

    The bars follow the news about files that the ChatClient posts through the bridge, so
    only the Tk thread draws them. A transfer that ends takes its bar away and leaves the
    terminal's last line (`saved downloads/notes.pdf ...`) in the messages.
    """

    BAR_LENGTH = 160  # pixels

    def __init__(self, parent, view: "ChatView"):
        self.view = view
        self.frame = tk.Frame(parent)
        row = tk.Frame(self.frame)
        row.pack(fill="x")
        actions = {"Send file...": self.share, "Send to member...": self.send_to_member,
                   "Cancel transfers": view.window.cancel_transfers, "Open downloads": self.open_downloads}
        self.buttons = {}
        for text, action in actions.items():
            button = tk.Button(row, text=text, command=action)
            button.pack(side="left", padx=4)
            button.bind("<Return>", lambda event: event.widget.invoke())
            self.buttons[text] = button
        self.bars: dict[int, tuple] = {}  # id(transfer) -> (its row, label, progress bar)

    def share(self) -> None:
        """Send file...: to everyone else in the room, as /share does."""
        self.pick_file("", "the room")

    def send_to_member(self) -> None:
        """Send to member...: to the member chosen in the panel (a click, or the arrow keys)."""
        chosen = self.view.members.curselection()
        names = self.view.member_names
        if not chosen or names[chosen[0]].startswith("... and "):
            self.view.show_reply("Choose a member in the list on the right first, then Send to member...")
            return
        self.pick_file(names[chosen[0]], names[chosen[0]])

    def pick_file(self, to: str, whom: str) -> None:
        """Ask which file, in the system's own dialog; send it to `to` ('' = the room)."""
        path = tk.filedialog.askopenfilename(parent=self.frame, title=f"Send a file to {whom}")
        if path:  # '' (or an empty tuple, on some systems) when the dialog was cancelled
            self.view.window.send_file(to, path)
        self.view.focus()

    def show(self, what: str, transfer: Transfer) -> None:
        """News of a transfer: move its bar; at the end remove it and say how it ended."""
        key = id(transfer)
        if what != "progress":
            if key in self.bars:
                self.bars.pop(key)[0].destroy()
            self.view.show_reply(final_line(what, transfer))
            return
        if key not in self.bars:
            self.bars[key] = self.add_bar()
        _, label, bar = self.bars[key]
        label.configure(text=describe_transfer(transfer))  # number, name, who, size, percent
        bar.configure(value=percent(transfer))

    def add_bar(self) -> tuple:
        row = tk.Frame(self.frame)
        row.pack(fill="x", padx=4, pady=1)
        bar = tk.ttk.Progressbar(row, length=self.BAR_LENGTH, maximum=100)
        bar.pack(side="left")
        label = tk.Label(row, anchor="w")
        label.pack(side="left", fill="x", expand=True, padx=6)
        return row, label, bar

    def open_downloads(self) -> None:
        """Show the downloads folder in the system's file manager; where none opens, its path."""
        folder = os.path.abspath(self.view.window.client_options.get("downloads", "downloads"))  # ChatClient's
        try:
            os.makedirs(folder, exist_ok=True)
            open_folder(folder)
        except OSError as error:
            self.view.show_reply(f"No file manager opens here ({error.strerror or error}). Your files are in {folder}")
            return
        self.view.show_reply(f"Opening {folder}")


def open_folder(folder: str) -> None:
    """Open `folder` in the system's file manager; OSError if there is none to start."""
    if sys.platform == "win32":
        os.startfile(folder)  # Windows' own: Explorer
    else:  # macOS has `open`; Linux and the BSDs' desktops `xdg-open`
        subprocess.Popen(["open" if sys.platform == "darwin" else "xdg-open", folder],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ChatView:
    """The chat screen: the messages, the input line, and a panel of rooms and members."""

    sticky = "nsew"  # the chat fills the window: the messages take what room there is

    def __init__(self, parent, window: "ChatWindow"):
        self.window = window
        self.frame = tk.Frame(parent)
        self.frame.columnconfigure(0, weight=1)  # the messages take what room the window has
        self.frame.rowconfigure(0, weight=1)
        self.typed: list[str] = []  # lines sent, for Up and Down
        self.recalled = 0  # where Up and Down are in `typed`
        self.asking = False  # the input line answers a question (a room password), not the chat
        self.kept_typing = ""  # what was being typed when the question came
        self.room_names: list[str] = []  # the rooms panel's lines, as names
        self.member_names: list[str] = []
        self.make_messages()
        self.make_input()
        self.make_panel()
        self.files = FilesPanel(self.frame, self)  # under the input line
        self.files.frame.grid(row=2, column=0, columnspan=2, sticky="ew")

    def make_messages(self) -> None:
        base = tk.font.nametofont("TkDefaultFont").actual()  # the desktop's font, at the desktop's scale
        bold, italic = (base["family"], base["size"], "bold"), (base["family"], base["size"], "italic")
        self.messages = tk.Text(self.frame, width=64, height=22, wrap="word", state="disabled", font="TkDefaultFont",
                                takefocus=0, padx=6, pady=4)
        self.scrollbar = tk.Scrollbar(self.frame, command=self.messages.yview)
        self.messages.configure(yscrollcommand=self.view_moved)
        self.following = True  # the newest line is in sight, so new lines scroll into view
        self.size_seen = (0, 0)  # the messages' width and height when Tk last said where the view is
        self.messages.grid(row=0, column=0, sticky="nsew")
        self.scrollbar.grid(row=0, column=1, sticky="ns")
        tags = {"time": {"foreground": "#808080"}, "name": {"font": bold},
                "grey": {"foreground": "#808080"}, "info": {"foreground": "#404040"},
                "warn": {"foreground": "#b00020"}, "own": {"background": "#eaf1fb"},
                "history": {"foreground": "#707070", "font": italic},
                "mention": {"background": "#fff1b8"}, "private": {"background": "#fde0ef"}}
        for tag, options in tags.items():  # later tags win: a private line mine is still pink
            self.messages.tag_configure(tag, **options)
        for colour in NAME_COLOURS:
            self.messages.tag_configure(colour, foreground=colour)

    def make_input(self) -> None:
        line = tk.Frame(self.frame)
        line.grid(row=1, column=0, columnspan=2, sticky="ew", pady=4)
        line.columnconfigure(1, weight=1)
        self.prompt = tk.Label(line, text=">")
        self.prompt.grid(row=0, column=0, padx=4)
        self.entry = tk.Entry(line)
        self.entry.grid(row=0, column=1, sticky="ew")
        self.send_button = tk.Button(line, text="Send", command=self.submit)
        self.send_button.grid(row=0, column=2, padx=4)
        keys = {"<Return>": self.submit, "<KP_Enter>": self.submit, "<Escape>": self.cancel,
                "<Up>": lambda event: self.recall(-1), "<Down>": lambda event: self.recall(+1),
                "<Prior>": lambda event: self.messages.yview_scroll(-1, "pages"),
                "<Next>": lambda event: self.messages.yview_scroll(1, "pages")}
        for key, action in keys.items():
            self.entry.bind(key, action)

    def make_panel(self) -> None:
        panel = tk.Frame(self.frame, padx=6)
        panel.grid(row=0, column=2, rowspan=2, sticky="ns")
        panel.rowconfigure(1, weight=1)
        panel.rowconfigure(3, weight=2)
        tk.Label(panel, text="Rooms (click to join)").grid(row=0, column=0, sticky="w")
        self.rooms = tk.Listbox(panel, width=22, height=6, exportselection=False)
        self.rooms.grid(row=1, column=0, sticky="nsew")
        tk.Label(panel, text="In this room (double-click: private)").grid(row=2, column=0, sticky="w")
        self.members = tk.Listbox(panel, width=22, height=10, exportselection=False)
        self.members.grid(row=3, column=0, sticky="nsew")
        self.rooms.bind("<ButtonRelease-1>", self.pick_room)
        self.rooms.bind("<Return>", self.pick_room)
        self.members.bind("<Double-Button-1>", self.pick_member)
        self.members.bind("<Return>", self.pick_member)

    # --- Drawing ---

    def view_moved(self, first: str, last: str) -> None:
        """Tk says which part of the messages shows: move the scrollbar; are we still following?

        A Text widget that changes size keeps its top line where it was. When it gets shorter
        (a progress bar comes; or the window, which had grown for the bar, shrinks back once
        the bar goes) the newest line drops out of sight though nobody scrolled: that view
        keeps following. Only a move at the same size is the user's (the wheel, the scrollbar).
        """
        self.scrollbar.set(first, last)
        size = (self.messages.winfo_width(), self.messages.winfo_height())
        if size != self.size_seen and self.following:
            self.messages.see("end")  # Tk says where the view is once more, at this size
        else:
            self.following = float(last) >= 0.999
        self.size_seen = size

    def add_line(self, pieces: list[Piece], marks: tuple[str, ...] = ()) -> None:
        """Append one line to the messages; follow it if the user was reading the newest."""
        self.view_moved(*map(str, self.messages.yview()))  # Tk says so only when idle: a scroll may be news
        following = self.following
        self.messages.configure(state="normal")
        for text, tags in pieces:
            self.messages.insert("end", text, tags + marks)
        self.messages.insert("end", "\n", marks)
        excess = int(self.messages.index("end-1c").split(".")[0]) - MAX_LINES
        if excess > 0:
            self.messages.delete("1.0", f"{excess + 1}.0")
        self.messages.configure(state="disabled")
        if following:
            self.messages.see("end")

    def add_event(self, event: Event, me: str | None) -> None:
        if event.kind in ("chat", "private", "history"):
            self.add_line(event_pieces(event), line_marks(event, me))
        else:  # joins and leaves, in the terminal's words
            self.add_line([(format_event(event), ())], ("grey",))

    def add_own_private(self, me: str, user: str, text: str) -> None:
        clock = time.strftime("%H:%M")
        self.add_line([(f"[{clock}] ", ("time",)), (printable(me), ("name", name_colour(me))),
                       (f" to {printable(user)} (private): ", ()), (printable(text), ())], ("own", "private"))

    def show_reply(self, text: str) -> None:
        warning = text.startswith(("[WARN]", "[ERROR]", "not sent"))
        self.add_line([(printable(text), ())], ("warn" if warning else "info",))

    def show_panel(self, rooms: list[tuple[str, int]], room: str, members: list[str]) -> None:
        """Fill the side panel; my own room is shaded."""
        self.room_names = [name for name, _ in rooms]
        self.rooms.delete(0, "end")
        for index, (name, count) in enumerate(rooms):
            self.rooms.insert("end", f"{name} ({count})" if count else name)
            if name == room:
                self.rooms.itemconfigure(index, background="#dde8f7")
        self.member_names = list(members)
        self.members.delete(0, "end")
        for name in members:
            self.members.insert("end", name)

    def focus(self) -> None:
        self.entry.focus_set()

    # --- The input line ---

    def submit(self, event=None) -> str:
        """Enter: send the line, or answer the question being asked."""
        line = self.entry.get()
        self.entry.delete(0, "end")
        if self.asking:
            self.stop_asking()
            self.window.answer(line)
        else:
            if line.strip():
                self.typed.append(line)
            self.recalled = len(self.typed)
            self.window.send(line)
        return "break"  # handled: no other binding for this key

    def cancel(self, event=None) -> str:
        """Escape: a question is answered with nothing."""
        if self.asking:
            self.stop_asking()
            self.window.answer(None)
        return "break"

    def recall(self, step: int) -> str:
        """Up and Down: bring back a line typed before (never an answer, which may be a password)."""
        if not self.asking and self.typed:
            self.recalled = min(max(self.recalled + step, 0), len(self.typed))
            self.entry.delete(0, "end")
            self.entry.insert(0, self.typed[self.recalled] if self.recalled < len(self.typed) else "")
        return "break"

    def ask(self, prompt: str, secret: bool) -> None:
        """The input line becomes the answer to `prompt` (masked if secret) until Enter or Escape."""
        self.asking = True
        self.kept_typing = self.entry.get()
        self.entry.delete(0, "end")
        self.prompt.configure(text=prompt, foreground="#b00020")
        self.entry.configure(show="*" if secret else "")
        self.entry.focus_set()

    def stop_asking(self) -> None:
        self.asking = False
        self.prompt.configure(text=">", foreground=self.entry.cget("foreground"))
        self.entry.configure(show="")
        self.entry.insert(0, self.kept_typing)

    def prefill(self, text: str) -> None:
        self.entry.delete(0, "end")
        self.entry.insert(0, text)
        self.entry.icursor("end")
        self.entry.focus_set()

    # --- The panel ---

    def pick_room(self, event=None) -> None:
        """A click (or Enter) on a room: go there, if it is a room and not mine."""
        chosen = self.rooms.curselection()
        if chosen and not self.room_names[chosen[0]].startswith("... and "):
            self.window.join_room(self.room_names[chosen[0]])

    def pick_member(self, event=None) -> None:
        """A double-click (or Enter) on a member: start a private message to them."""
        chosen = self.members.curselection()
        if chosen and not self.member_names[chosen[0]].startswith("... and "):
            self.prefill(f"/msg {self.member_names[chosen[0]]} ")


class ChatWindow:
    """The window: which screen shows, and the traffic between the Tk thread and the others.

    Methods named in the "worker" part run on the worker thread and make the blocking
    ChatClient calls; everything else runs on the Tk thread and never waits.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, client_options: dict | None = None):
        self.client_options = client_options or {}  # for ChatClient: cipher, key, timing, loss...
        self.client: ChatClient | None = None
        self.conversation: Conversation | None = None
        self.bridge = WindowBridge()
        self.worker = Worker(self.bridge)
        self.closing = self.finished = False
        self.goodbye: threading.Thread | None = None  # the thread that logs out, once closing
        self.refresh_queued = False  # a panel refresh waits for the worker
        self.state = "no server"
        self.internal_errors: list[str] = []  # bugs, if any: shown, and kept for the tests
        self.root = tk.Tk()
        self.root.title("UDP chat")
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self.root.report_callback_exception = self.report_error
        self.make_screens(host, port)
        self.handlers = {"line": self.show_reply, "reply": self.show_reply, "event": self.show_event,
                         "own": self.show_own, "notice": self.show_reply, "ask": self.ask, "logged in": self.logged_in,
                         "joined": self.joined, "panel": self.fill_panel, "finished": self.finish,
                         "internal error": self.internal_error, "file": lambda news: self.chat.files.show(*news),
                         "servers": lambda outcome: self.login.show_servers(*outcome)}
        self.poll_id = self.root.after(POLL_EVERY, self.poll)

    def make_screens(self, host: str, port: int) -> None:
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)  # the screen grows with the window; the status bar does not
        self.login = LoginView(self.root, self, host, port)
        self.room_view = RoomPasswordView(self.root, self)
        self.chat = ChatView(self.root, self)
        self.status = tk.Label(self.root, text=STATUS_TEXTS["no server"], anchor="w", relief="sunken", padx=4)
        self.status.grid(row=1, column=0, sticky="ew")
        self.view = None
        self.show_view(self.login)

    def show_view(self, view) -> None:
        if self.view is not None:
            self.view.frame.grid_remove()
        self.view = view
        view.frame.grid(row=0, column=0, sticky=view.sticky)
        view.focus()

    def run(self) -> int:
        """Show the window until it is closed; return the exit status."""
        while True:
            try:
                self.root.mainloop()  # returns once finish() has destroyed the window
            except KeyboardInterrupt:  # Ctrl+C in the terminal that started us: leave as if closed
                self.root.after_cancel(self.poll_id)  # it may have struck poll() before it looked again
                self.poll_id = self.root.after(POLL_EVERY, self.poll)
                self.close()
                continue
            if not self.closing and self.client:  # destroyed outright, not closed: still log out
                self.client.bye()
                self.client.close()
            print("[INFO] Connection closed.")
            return 0

    # --- What the screens ask for (Tk thread) ---

    def register(self, host: str, port: int, name: str, password: str) -> None:
        self.worker.do(self.register_account, host, port, name, password)

    def log_in(self, host: str, port: int, name: str, password: str) -> None:
        self.worker.do(self.log_in_account, host, port, name, password)

    def search(self, port: int) -> None:
        self.worker.do(self.search_servers, port)

    def join_lobby(self, password: str) -> None:
        self.worker.do(self.enter_lobby, password)

    def log_out(self) -> None:
        """Log out, from the room password screen: back to the first screen at once."""
        for entry in (self.login.password, self.login.password_again):
            entry.delete(0, "end")  # a lab PC: the next student must not log in as this one
        self.show_view(self.login)
        self.login.busy("Logging out...")
        self.worker.do(self.leave_server)

    def join_room(self, room: str) -> None:
        self.worker.do(self.run_line, f"/join {room}")

    def send(self, line: str) -> None:
        """A line typed in the chat: shown at once if it is a message, then handled as in the terminal."""
        if line.strip().lower() in EXIT_WORDS:
            self.close()
            return
        self.worker.do(self.run_line, line)  # one's own line is shown once the server accepts it

    def send_file(self, to: str, path: str) -> None:
        """Offer a file as /send and /share do; the worker hashes it, so the window never waits."""
        self.worker.do(lambda: self.conversation.offer_file(to, path))

    def cancel_transfers(self) -> None:
        self.worker.do(self.run_line, "/cancel")

    def answer(self, text: str | None) -> None:
        self.bridge.answer(text)

    def refresh_panel_soon(self) -> None:
        if not self.refresh_queued:
            self.refresh_queued = True
            self.worker.do(self.refresh_panel)

    # --- The worker's part: calls that wait for the server ---

    def connect(self, host: str, port: int) -> ChatClient:
        """Return a client for host:port: the one we have, or a new one if it is closed or elsewhere."""
        client = self.client
        if client is not None and not client.closed.is_set() and (client.host, client.port) == (host, port):
            return client
        if client is not None:
            client.bye()
            client.close()
        if self.closing:
            raise ConnectionClosed("The window is closing.")
        client = ChatClient(host, port, on_event=lambda event: self.bridge.post("event", event),
                            on_notice=lambda text: self.bridge.post("notice", text), **self.client_options)
        self.conversation = Conversation(client, self.bridge, WindowScreen(self.bridge))  # the terminal's commands
        client.on_file = lambda what, transfer: self.bridge.post("file", (what, transfer))  # bars, not text
        self.client = client
        return client

    def register_account(self, host: str, port: int, name: str, password: str) -> None:
        self.bridge.post("reply", self.connect(host, port).register(name, password))

    def log_in_account(self, host: str, port: int, name: str, password: str) -> None:
        self.bridge.post("logged in", self.connect(host, port).login(name, password))

    def search_servers(self, port: int) -> None:
        """The terminal's search of the network; here, as it listens for a second, never on the Tk thread."""
        cipher = make_cipher(self.client_options.get("cipher", DEFAULT_CIPHER), self.client_options.get("key"))
        said: list[str] = []
        try:
            found = find_servers(port, cipher, said.append)
        except OSError as error:  # no network at all: nowhere to ask
            self.bridge.post("reply", f"The search failed: {error.strerror or error}")
            return
        self.bridge.post("servers", (found, said[1:]))  # its first line, "Searching...", shows already

    def leave_server(self) -> None:
        """BYE: the session ends now, not when the server's timeout runs out."""
        self.client.bye()
        self.bridge.post("reply", "Logged out.")

    def enter_lobby(self, password: str) -> None:
        """JOIN the lobby, then say who is here in the terminal's words ("nobody else here")."""
        line = self.client.join(LOBBY, password)
        self.bridge.post("joined", describe_arrival(line, self.client.who()[1], self.client.name))

    def run_line(self, line: str) -> None:
        """Handle a typed line just as the terminal does; after /join the panel is out of date."""
        self.conversation.handle_line(line)
        if parse_line(line)[0] == "/join":
            self.refresh_panel()

    def refresh_panel(self) -> None:
        """Ask for the rooms and my room's members, for the side panel."""
        self.refresh_queued = False
        try:
            rooms = self.client.rooms()
            room, members = self.client.who()
        except ChatError:
            return  # nobody asked for this: a failure shows in the status bar, not here
        self.bridge.post("panel", (rooms, room, members))

    # --- The Tk thread's loop: what the others posted ---

    def poll(self) -> None:
        """Draw what the other threads posted, and the status; then look again in POLL_EVERY ms."""
        self.poll_id = self.root.after(POLL_EVERY, self.poll)  # first: a bug below must not stop the polling
        for _ in range(MAX_PER_POLL):
            try:
                what, detail = self.bridge.inbox.get_nowait()
            except queue.Empty:
                break
            self.handlers[what](detail)
            if self.finished:
                return
        self.update_status()

    def update_status(self) -> None:
        """Say how things stand; when the session is gone, go back to the login screen."""
        state = connection_state(self.client)
        if state == self.state:
            return
        self.state = state
        self.status.configure(text=status_text(self.client))
        if state in ("closed", "not logged in") and self.view is not self.login and not self.closing:
            self.show_view(self.login)
            lost = (self.client.closed_reason or "The connection is closed.") if state == "closed" \
                else str(self.client.lost_reason or SESSION_LOST)
            self.login.show_reply(lost)

    def show_reply(self, text: str) -> None:
        self.view.show_reply(text)

    def show_event(self, event: Event) -> None:
        self.chat.add_event(event, self.client.name if self.client else None)
        if event.kind in ("join", "leave"):
            self.refresh_panel_soon()

    def show_own(self, line: tuple[str, str | None]) -> None:
        """A line of ours the server accepted: a message to the room, or a private one to `to`."""
        text, to = line
        me = self.client.name if self.client else None
        if to:
            self.chat.add_own_private(me or "", to, text)
        else:
            self.chat.add_event(Event("chat", time.time(), "", me or "", text), me)

    def ask(self, question: tuple[str, bool]) -> None:
        self.chat.ask(*question)

    def logged_in(self, welcome: str) -> None:
        self.login.show_reply("")
        self.room_view.welcome.configure(text=welcome)
        self.room_view.reply.configure(text="")
        self.show_view(self.room_view)

    def joined(self, text: str) -> None:
        if self.chat.asking:  # a question from a session that has since ended
            self.chat.stop_asking()
        self.room_view.show_reply("")
        self.show_view(self.chat)
        self.chat.show_reply(text + ". Type /help for commands.")
        self.root.title(f"UDP chat - {self.client.name}")
        self.refresh_panel_soon()

    def fill_panel(self, detail: tuple[list, str, list]) -> None:
        rooms, room, members = detail
        self.chat.show_panel(rooms, room, members)
        self.root.title(f"UDP chat - {self.client.name} in {room}")

    def internal_error(self, text: str) -> None:
        self.internal_errors.append(text)
        self.view.show_reply(f"[ERROR] Internal error in the window: {text}")

    def report_error(self, kind, error, trace) -> None:
        """Tk calls this for an exception in a callback: Ctrl+C leaves; a bug is shown, not a traceback."""
        if isinstance(error, KeyboardInterrupt):
            self.close()
        else:
            self.internal_error(repr(error))

    # --- Closing ---

    def close(self) -> None:
        """The window's close button, exit or Ctrl+C: hide at once, log out, then end."""
        if self.closing:
            return
        self.closing = True
        self.root.withdraw()
        self.goodbye = threading.Thread(target=self.say_goodbye, name="goodbye", daemon=True)
        self.goodbye.start()

    def say_goodbye(self) -> None:
        """On its own thread, as the worker may be waiting for the server: BYE, close, done."""
        self.worker.stop()
        self.bridge.answer(None)  # a question still open is cancelled
        client = self.client
        if client is not None:
            client.bye()  # the room sees us leave now, not when the server's timeout runs out
            client.close()
        self.bridge.post("finished")

    def finish(self, _detail=None) -> None:
        self.finished = True
        self.root.after_cancel(self.poll_id)
        self.root.destroy()


def run_window(args: argparse.Namespace) -> int | None:
    """Run the chat in a window; return None, having said why, when no window can open here."""
    try:
        load_tkinter()
    except ImportError:
        print(NO_TKINTER)
        return None
    options = dict(cipher=args.cipher, key=args.key, loss=args.loss, seed=args.seed, downloads=args.downloads)
    try:
        window = ChatWindow(args.host or DEFAULT_HOST, args.port or DEFAULT_PORT, options)
    except tk.TclError as error:  # no display: a remote login without X, say
        print(f"No window can open here ({error}). Using the terminal instead.")
        return None
    if args.verbose:
        window.client_options["trace"] = window.bridge.show
    return window.run()


# --- Starting from the command line ---------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="UDP chat room client. Asks for the server's IP and port unless both are given.",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who captures "
               "the traffic can read it. Server and client must use the same --cipher and --key.",
    )
    parser.add_argument("--host", help=f"server IP address (asked if not given; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=port_number,
                        help=f"server UDP port (asked if not given; default {DEFAULT_PORT})")
    add_shared_options(parser)  # --cipher, --key, --loss, --seed
    parser.add_argument("--verbose", action="store_true", help="trace every packet in and out")
    parser.add_argument("--find", action="store_true",
                        help="list the chat servers on this network (on --port), one per line, and exit "
                             "(status 1 if none answered)")
    parser.add_argument("--gui", action="store_true", help="chat in a window instead of the terminal (needs tkinter)")
    parser.add_argument("--downloads", default="downloads",
                        help="folder for the files others send you (default: downloads in the current folder)")
    return parser.parse_args(argv)


def safe_output() -> None:
    """Let any message print: a Windows console with a legacy code page cannot show every
    character, and must show a replacement rather than crash."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def ask_address(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int]:
    """Return the server's (host, port): from the command line, or asked."""
    host, found_port = args.host, None
    if host is None:
        host, found_port = ask_host(args, terminal)
    port, default_port = args.port, found_port or DEFAULT_PORT
    while port is None:
        answer = terminal.ask(f"Server port [{default_port}]: ").strip() or str(default_port)
        port = parse_port(answer)
        if port is None:
            terminal.show(PORT_RULE)
    return host, port


PORT_RULE = "A port is a whole number from 1 to 65535."


def parse_port(answer: str) -> int | None:
    """Return the port typed, or None if `answer` is not one."""
    return int(answer) if whole_number(answer) and 0 < int(answer) < 65536 else None


def log_out_when_the_window_closes(current: list) -> object:
    """Closing the terminal window logs out, as `exit` does: the room sees us leave at once.

    POSIX sends SIGHUP (the "hang-up" of the serial-line days); we turn it into the
    KeyboardInterrupt that main already handles. Windows calls a console handler instead.
    `current` holds the ChatClient, once there is one.
    """
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, hang_up)
    if hasattr(ctypes, "windll"):
        return log_out_on_console_close(current, ctypes.windll.kernel32)
    return None


def hang_up(signum, frame) -> None:
    raise KeyboardInterrupt


CONSOLE_CLOSE_EVENTS = {2, 5, 6}  # Windows: CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT


def log_out_on_console_close(current: list, kernel32) -> object:
    """Windows: say goodbye when the console closes (the OS waits up to 5 s for the handler)."""
    handler_type = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)(ctypes.c_int, ctypes.c_uint)

    def on_console_event(event: int) -> int:
        if event not in CONSOLE_CLOSE_EVENTS:
            return 0  # Ctrl+C, Ctrl+Break: Python's own handling
        for made in current:
            made.bye()
        return 1

    handler = handler_type(on_console_event)
    kernel32.SetConsoleCtrlHandler(handler, True)
    return handler  # the caller keeps it: were it freed, Windows would call freed memory


def ask_host(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int | None]:
    """Ask for the server's IP until there is one; `?` searches the network (on --port) first."""
    found: list[FoundServer] = []
    while True:
        default = found[0].address if found else DEFAULT_HOST
        hint = "" if found else " (? searches the network)"
        answer = terminal.ask(f"Server IP [{default}]{hint}: ").strip()
        if answer == "?":
            found = find_servers(args.port or DEFAULT_PORT, make_cipher(args.cipher, args.key), terminal.show)
            for number, server in enumerate(found, 1):
                terminal.show(f"{number}) {server}")
            continue
        chosen = pick_server(answer, found)
        if chosen:
            return chosen
        terminal.show(f"Type a number from 1 to {len(found)}, an IP address, or ? to search again.")


def print_servers_found(args: argparse.Namespace) -> int:
    """--find: one line per server that answers, `IP:PORT  name  N online`; the rest on stderr."""
    def show(text: str) -> None:
        print(text, file=sys.stderr)

    try:
        found = find_servers(args.port or DEFAULT_PORT, make_cipher(args.cipher, args.key), show)
    except (ValueError, OSError) as error:  # a key the cipher cannot use; no network at all
        show(f"[ERROR] {error}")
        return 1
    for server in found:
        print(f"{server.address}:{server.port}  {printable(server.name)}  {server.online} online")
    return 0 if found else 1  # as ping does: a script can tell "none" from "some"


def open_client(args: argparse.Namespace, terminal: Terminal) -> ChatClient:
    """Ask where the server is, and return a ChatClient for it that prints to the terminal."""
    host, port = ask_address(args, terminal)
    return ChatClient(host, port, args.cipher, args.key, loss=args.loss, seed=args.seed, downloads=args.downloads,
                      on_event=lambda event: terminal.show(format_event(event)),
                      on_notice=terminal.show, trace=terminal.show if args.verbose else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    safe_output()
    if args.find:
        return print_servers_found(args)
    if args.gui:
        status = run_window(args)
        if status is not None:
            return status
    return chat_in_terminal(args)


def chat_in_terminal(args: argparse.Namespace) -> int:
    """The terminal client, from the server's address to goodbye; return the exit status."""
    terminal = Terminal(interactive=sys.stdin.isatty())
    client = None
    current: list[ChatClient] = []
    console_handler = log_out_when_the_window_closes(current)  # noqa: F841 (kept alive while we run)
    status = 0
    connected = False  # did the server ever answer? Only then is there a connection to close
    try:
        client = open_client(args, terminal)
        current.append(client)
        client.hello()  # is anyone there? Better to know before asking for a password
        connected = True
        terminal.show(f"Connected to the chat server at {client.host}:{client.port}.")
        Conversation(client, terminal).run()
    except (EndOfInput, KeyboardInterrupt):
        pass  # leaving the usual way
    except ConnectionClosed:
        status = 1  # the reason was shown when it happened
    except (ChatError, ValueError) as error:  # ValueError: a key the cipher cannot use
        terminal.show(f"[ERROR] {error}")
        status = 1
    finally:
        say_goodbye(client, terminal, connected)
    return status


def say_goodbye(client: ChatClient | None, terminal: Terminal, connected: bool = True) -> None:
    """Log out if logged in, close the socket, and give the terminal back."""
    try:
        if client is not None:
            client.bye()
            client.close()
    except KeyboardInterrupt:
        pass
    with terminal.print_lock:
        terminal.prompt = ""
    terminal.restore()
    if connected:
        terminal.show("\n[INFO] Connection closed." if terminal.interactive else "[INFO] Connection closed.")
    elif terminal.interactive:
        terminal.show("")  # off the line of the prompt

if __name__ == "__main__":
    sys.exit(main())
