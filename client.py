"""UDP chat room client: log in, join a password-protected room, chat.

Start the server on one PC (`python server.py`), then on each other PC:

    python client.py                                   # asks for the server's IP and port
    python client.py --host 192.168.1.10 --port 9999   # asks neither

When standard input is not a terminal, every answer (the password too) is read as a plain
line and end of input means exit, so a session can be scripted:

    printf '/login\\nalice\\nsecret\\njuara\\nhello\\nexit\\n' | python client.py --host 127.0.0.1 --port 9999

Design:

* `ChatClient` is the protocol without the terminal, usable from tests and the notebook.
  Its UDP socket is connect()ed to the server, so the operating system drops datagrams
  from anyone else. One network thread is the only reader of the socket.
* Requests go to the server one at a time, stop-and-wait: each is sent again, after a
  timeout learned from measured round trips, until its reply arrives. Lines typed
  meanwhile wait their turn.
* Everything the server pushes (messages, joins, leaves) arrives numbered; `InboundWindow`
  puts it back in order, drops duplicates and acknowledges it (Selective Repeat).
* `Terminal` keeps the keyboard on its own thread, so that arriving messages are printed
  above the line being typed and Ctrl+C works on Windows too.

The packet format and the toy ciphers are defined once, in encryption_helper.py. The XOR
and Caesar ciphers only hide text from a casual glance: they are teaching toys.

A SAY datagram, as this client sends it (XOR-scrambled payload, readable header):

    55 43 01 05 00 00 00 07 00 00 00 07 00 00 00 00  "UC" v1 SAY flags=0 len=7 seq=7 ack=0
    3e 1a 2c 5e 5e 77 90 12 ab 7f 38 ae 49 4c 5a 58  token, CRC-32, then the payload:
    12 0a 60                                          [5]"hi :)" XORed with the key "II2120"
"""

import argparse
import dataclasses
import getpass
import itertools
import queue
import secrets
import socket
import sys
import threading
import time

from encryption_helper import (
    BITMAP,
    CIPHER_NAMES,
    DEFAULT_CIPHER,
    FLAG_RETRANSMIT,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MAX_TEXT_BYTES,
    MIN_HELLO_SIZE,
    NO_TOKEN,
    RECV_BUFFER,
    WINDOW,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    decode_packet,
    describe_datagram,
    encode_packet,
    make_cipher,
    pack_fields,
    unpack_fields,
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
LOBBY = "lobby"
MAX_WAIT = 0.5  # seconds any thread blocks at most, so Ctrl+C and shutdown are prompt
FIRST_CONTACT_RETRY = 1.0  # seconds between tries of HELLO and BYE, whatever the backoff
# Delayed ACKs, as TCP does them (RFC 1122, 4.2.3.2): one ACK for every second EVENT, or
# ACK_DELAY after the first one not yet acknowledged - half the ACKs for a busy server to
# read. Anything out of order or duplicated is acknowledged at once: the server lacks news.
ACK_EVERY = 2
ACK_DELAY = 0.02  # seconds; far below the server's smallest retransmission timeout (0.2 s)


@dataclasses.dataclass
class Timing:
    """How patient the client is. Tests shorten these; the defaults suit a lab."""

    # First contact: try once a second at most (nothing is measured yet to do better),
    # for this long; then "Server not responding". At 30% loss each way a try fails half
    # the time, and all ten fail once in a thousand.
    connect_timeout: float = 10.0
    heartbeat_every: float = 5.0  # say PING after this much quiet, so the server keeps us
    lost_contact_after: float = 15.0  # nothing heard this long: warn the user...
    give_up_after: float = 45.0  # ...and this long: give up and close
    initial_rto: float = RtoEstimator.INITIAL
    min_rto: float = RtoEstimator.FLOOR
    max_rto: float = RtoEstimator.CEILING
    goodbye_timeout: float = 3.0  # how long `exit` waits for the server's goodbye


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the server pushed: a message, a join or a leave."""

    kind: str  # "chat", "private", "history", "join" or "leave"
    time: float  # unix time the server stamped it with
    room: str
    user: str
    text: str


# --- What can go wrong, in words a student understands --------------------------------


class ChatError(Exception):
    """Something the user should be told about; str() is the message."""


class Refused(ChatError):
    """The server said no: an ERROR reply [code, text, *extra]."""

    def __init__(self, code: str, text: str, *extra: str):
        super().__init__(text)
        self.code, self.text, self.extra = code, text, extra


SESSION_LOST = "The server does not know this session (was it restarted?). Log in again."


class ServerNotResponding(ChatError):
    pass


class KeyMismatch(ChatError):
    pass


class SessionLost(ChatError):
    pass


class ConnectionClosed(ChatError):
    pass


# --- Receiving in order ---------------------------------------------------------------


class InboundWindow:
    """Selective Repeat, the receiving half: deliver each EVENT once, in order.

    The server numbers the EVENTs it sends us 1, 2, 3, ... Some get lost, some arrive
    twice, some overtake others. We keep `expected`, the next number to deliver:
    an EVENT numbered below it, or one we already hold, is a duplicate and is dropped;
    one above it is held until the gap before it fills; then everything in order is
    delivered at once. Nothing beyond expected + size is accepted: the server never
    has more than `size` in flight, so such a packet cannot be genuine.

    Our ACK tells the server two things: `cumulative`, the number up to which we have
    everything, and a 32-bit bitmap of what we hold beyond the gap (bit i stands for
    cumulative + 2 + i), so it resends only what is really missing.
    """

    def __init__(self, size: int = WINDOW):
        self.size = size
        self.expected = 1
        self.held: dict[int, object] = {}

    def receive(self, seq: int, item) -> tuple[str, list]:
        """Take EVENT `seq`; return what happened to it and the items now deliverable."""
        if seq < self.expected or seq in self.held:
            return "duplicate", []
        if seq >= self.expected + self.size:
            return "outside the window", []
        self.held[seq] = item
        ready = []
        while self.expected in self.held:
            ready.append(self.held.pop(self.expected))
            self.expected += 1
        return ("in order" if ready else "buffered out of order"), ready

    def ack(self) -> tuple[int, int]:
        """Return (cumulative, bitmap) for the ACK to send now."""
        bitmap = 0
        for seq in self.held:
            bitmap |= 1 << (seq - self.expected - 1)
        return self.expected - 1, bitmap


# --- The protocol, headless -----------------------------------------------------------


class ChatClient:
    """One user's connection to the chat server, without any terminal.

    Each method sends one request and returns the server's answer, or raises a
    ChatError saying in plain words what went wrong. What the server pushes arrives as
    `Event`s: passed to `on_event` if given (on the network thread), else put in
    `self.events`, a queue. Warnings such as lost contact go to `on_notice`.

        client = ChatClient("127.0.0.1", 9999)
        client.login("alice", "secret")
        client.join("lobby", "juara")
        client.say("hello")
        client.close()
    """

    def __init__(self, host: str, port: int, cipher: str = DEFAULT_CIPHER, key: str | None = None, *,
                 timing: Timing | None = None, loss: float = 0.0, seed: int | None = None,
                 on_event=None, on_notice=None, trace=None):
        self.host, self.port = host, port
        self.cipher = make_cipher(cipher, key)
        self.timing = timing or Timing()
        self.on_event = on_event
        self.events: queue.Queue = queue.Queue()
        self.on_notice = on_notice or (lambda text: None)
        self.trace_to = trace  # a function taking a line, or None for no packet trace
        self.rto = RtoEstimator(self.timing.initial_rto, self.timing.min_rto, self.timing.max_rto)
        # A random first sequence number, as TCP does: a new client at an address that
        # an old one used is never mistaken for it.
        self.seq = secrets.randbelow(1 << 30)
        self.token = NO_TOKEN
        self.name: str | None = None
        self.inbound = InboundWindow()
        self.replies: queue.Queue = queue.Queue()
        self.request_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.last_heard = self.last_sent = time.monotonic()
        self.out_of_contact = False
        self.unacked = 0  # EVENTs arrived since our last ACK...
        self.ack_by = 0.0  # ...which must leave by then (time.monotonic), if any
        self.nobody_listening = False  # the OS reported "port unreachable"
        self.closed = threading.Event()
        self.closed_reason = ""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((host, port))  # UDP: sends nothing, just fixes the peer
        except (OSError, OverflowError) as error:
            sock.close()
            reason = getattr(error, "strerror", None) or error
            raise ServerNotResponding(f"Cannot reach {host}:{port}: {reason}") from None
        sock.settimeout(MAX_WAIT)
        self.loss = loss
        self.sock = LossySocket(sock, loss, seed, self.trace_drop, side="client") if loss else sock
        self.threads = [threading.Thread(target=self.receive_forever, name="chat-receiver", daemon=True),
                        threading.Thread(target=self.keep_alive, name="chat-heartbeat", daemon=True)]
        for thread in self.threads:
            thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- Requests: what the user can do ---

    def register(self, name: str, password: str) -> str:
        """Create an account; return the server's "Registration successful."."""
        cookie = self.hello()
        return self.request(PacketType.REGISTER, cookie, name, password)[-1]

    def login(self, name: str, password: str) -> str:
        """Log in; return the welcome text. Later requests carry the session token."""
        cookie = self.hello()
        reply = self.request_packet(PacketType.LOGIN, cookie, name, password)
        fields = unpack_fields(reply.payload)
        self.inbound = InboundWindow()  # a new session numbers its EVENTs from 1
        self.token, self.name = reply.token, fields[0]
        return fields[-1]

    def join(self, room: str, password: str) -> str:
        """Enter a room (created with this password if new); return the server's words."""
        return self.request(PacketType.JOIN, room, password)[-1]

    def say(self, text: str) -> str:
        """Send a message to everyone else in the room; wait out the flood limit if hit."""
        self.check_length(text)
        return self.request_patiently(PacketType.SAY, text)[-1]

    def private(self, user: str, text: str) -> str:
        """Send a message that only `user` sees."""
        self.check_length(text)
        return self.request_patiently(PacketType.PRIVATE, user, text)[-1]

    def rooms(self) -> list[tuple[str, int]]:
        """Return every room and how many are in it."""
        fields = self.request(PacketType.ROOMS)
        more = fields.pop() if len(fields) % 2 else ""
        pairs = [(fields[i], int(fields[i + 1])) for i in range(0, len(fields), 2)]
        return pairs + ([(f"... and {more[1:]} more", 0)] if more else [])

    def who(self) -> tuple[str, list[str]]:
        """Return your room's name and its members."""
        room, *members = self.request(PacketType.WHO)
        if members and members[-1][1:].isdigit() and members[-1].startswith("+"):  # did not all fit
            members[-1] = f"... and {members[-1][1:]} more"
        return room, members

    def ping(self) -> None:
        self.request(PacketType.PING)

    def bye(self) -> None:
        """End the session politely; a server that is gone or has forgotten us is fine."""
        if self.token == NO_TOKEN or self.closed.is_set():
            return
        try:
            self.request(PacketType.BYE, give_up_after=self.timing.goodbye_timeout)
        except (ServerNotResponding, SessionLost, KeyMismatch):
            pass
        self.token = NO_TOKEN

    def hello(self) -> str:
        """Ask for a cookie: proof for the server that we really are at our address."""
        padding = "." * (MIN_HELLO_SIZE - HEADER_SIZE - 2)  # see MIN_HELLO_SIZE
        # A simulated loss (--loss) makes each try less likely to get through: try longer.
        patience = self.timing.connect_timeout / (1 - self.loss) ** 2
        return self.request(PacketType.HELLO, padding, give_up_after=patience)[0]

    @staticmethod
    def check_length(text: str) -> None:
        size = len(text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            raise Refused("too-long", f"Message too long ({size} bytes, the limit is {MAX_TEXT_BYTES}); not sent.")

    # --- Stop-and-wait ---

    def request(self, ptype: PacketType, *fields: str, give_up_after: float | None = None) -> list[str]:
        """Send a request until its reply comes; return the reply's fields."""
        return unpack_fields(self.request_packet(ptype, *fields, give_up_after=give_up_after).payload)

    def request_patiently(self, ptype: PacketType, *fields: str) -> list[str]:
        """Like request, but when told to slow down, wait as long as asked and send again."""
        while True:
            try:
                return self.request(ptype, *fields)
            except Refused as refusal:
                if refusal.code != "slow-down" or not refusal.extra:
                    raise
                self.on_notice(f"[INFO] {refusal.text}")
                time.sleep(min(float(refusal.extra[0]), self.timing.give_up_after))

    def request_packet(self, ptype: PacketType, *fields: str, give_up_after: float | None = None) -> Packet:
        """Stop-and-wait (rdt 3.0): send, wait a timeout, send again until answered.

        The timeout comes from the round trips measured so far (RFC 6298) and doubles
        with each try. A reply to an earlier try of the same request is as good as any:
        the server answers a repeated request with the same reply and acts only once.
        """
        # A request with a deadline (HELLO, BYE) does not wait long for another to finish.
        if not self.request_lock.acquire(timeout=-1 if give_up_after is None else give_up_after):
            raise ServerNotResponding(self.not_responding_text())
        try:
            return self.send_until_answered(ptype, fields, give_up_after)
        finally:
            self.request_lock.release()

    def send_until_answered(self, ptype: PacketType, fields, give_up_after: float | None) -> Packet:
        """The loop of request_packet, run while holding the request lock."""
        if self.closed.is_set():
            raise ConnectionClosed(self.closed_reason or "The connection is closed.")
        while not self.replies.empty():  # what came while no request waited is stale
            self.replies.get_nowait()
        payload = pack_fields(*fields)
        if len(payload) > MAX_PAYLOAD:
            raise Refused("too-long", "That is too long to send in one packet; not sent.")
        self.seq += 1
        packet = Packet(ptype, self.seq, 0, self.token, 0, payload)
        started = time.monotonic()
        for attempt in itertools.count():
            sent_at = time.monotonic()
            self.send_packet(packet._replace(flags=FLAG_RETRANSMIT if attempt else 0))
            wait = self.rto.timeout(attempt)
            if give_up_after is not None:  # a short deadline: keep trying often
                wait = min(wait, FIRST_CONTACT_RETRY)
            reply = self.wait_for_reply(packet, sent_at + wait)
            if reply is not None:
                # Karn's rule: after a resend we cannot tell which copy was answered.
                # Logins are not timed either: their answer waits for a slow hash.
                if attempt == 0 and ptype not in (PacketType.REGISTER, PacketType.LOGIN):
                    self.rto.observe(time.monotonic() - sent_at)
                return self.check_reply(reply)
            self.check_contact(started, give_up_after, attempt)

    def wait_for_reply(self, request: Packet, deadline: float) -> Packet | None:
        """Return the reply to `request`, or None if none came by `deadline`."""
        while True:
            try:
                item = self.replies.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return None
            if isinstance(item, PacketError):
                raise KeyMismatch("The server's reply fails its checksum: server and client keys differ? "
                                  "Both must use the same --cipher and --key.")
            if item.ack == request.seq and (item.type != PacketType.RESET or item.token == request.token):
                return item
            # else: a late reply to an earlier request, or a RESET not about our session

    def check_reply(self, reply: Packet) -> Packet:
        if reply.type == PacketType.RESET:
            self.token = NO_TOKEN
            raise SessionLost(SESSION_LOST)
        if reply.type == PacketType.ERROR:
            fields = unpack_fields(reply.payload)
            raise Refused(*fields) if len(fields) >= 2 else Refused("error", "The server refused that.")
        return reply

    def check_contact(self, started: float, give_up_after: float | None, attempt: int) -> None:
        """After a try went unanswered: warn, or give up, if the server has gone quiet."""
        now = time.monotonic()
        if self.closed.is_set():
            raise ConnectionClosed(self.closed_reason or "The connection is closed.")
        if give_up_after is not None:
            # Twice told "port unreachable" by the server's PC: no need to wait longer.
            if now - started >= give_up_after or (self.nobody_listening and attempt >= 1):
                raise ServerNotResponding(self.not_responding_text())
            return
        silence = now - max(self.last_heard, started)
        if silence >= self.timing.give_up_after:
            self.close(f"Lost contact with the server for {silence:.0f} s; giving up.")
            raise ServerNotResponding(self.closed_reason)
        if silence >= self.timing.lost_contact_after and not self.out_of_contact:
            self.out_of_contact = True
            self.on_notice("[WARN] Lost contact with the server... still trying.")

    def not_responding_text(self) -> str:
        why = " (nothing is listening on that port)" if self.nobody_listening else ""
        return f"Server not responding at {self.host}:{self.port}{why}"

    # --- The network thread: the only reader of the socket ---

    def receive_forever(self) -> None:
        timeout = MAX_WAIT  # the socket's, as set in __init__
        while not self.closed.is_set():
            try:
                wanted = self.ack_or_wait()
                if wanted != timeout:
                    self.sock.settimeout(wanted)
                    timeout = wanted
                data = self.sock.recv(RECV_BUFFER)
            except TimeoutError:
                continue
            except (ConnectionRefusedError, ConnectionResetError):
                # An ICMP "port unreachable" for something we sent: nobody listens there
                # (yet). On Windows it shows up as ConnectionResetError. Not fatal.
                self.nobody_listening = True
                continue
            except OSError:
                return  # the socket was closed: we are shutting down
            self.handle_datagram(data)

    def ack_or_wait(self) -> float:
        """Send the delayed ACK if its time has come; return how long to wait for a datagram."""
        if not self.unacked:
            return MAX_WAIT
        left = self.ack_by - time.monotonic()
        if left > 0:
            return left
        self.send_ack()
        return MAX_WAIT

    def handle_datagram(self, data: bytes) -> None:
        try:
            packet = decode_packet(data, self.cipher)
        except PacketError as error:
            self.trace_packet("in ", data, f": bad datagram, dropped ({error})")
            if data[:2] == MAGIC and "checksum" in str(error):
                self.replies.put(error)
            return
        self.last_heard = time.monotonic()
        self.nobody_listening = False
        if self.out_of_contact:
            self.out_of_contact = False
            self.on_notice("[INFO] In contact with the server again.")
        if packet.type == PacketType.EVENT:
            self.receive_event(packet, data)
        elif packet.type in (PacketType.OK, PacketType.ERROR, PacketType.RESET):
            self.trace_packet("in ", data)
            self.replies.put(packet)
        else:
            self.trace_packet("in ", data, ": not for a client, dropped")

    def receive_event(self, packet: Packet, data: bytes) -> None:
        if self.token == NO_TOKEN or packet.token != self.token:
            self.trace_packet("in ", data, ": from an old session, dropped")
            return
        outcome, ready = self.inbound.receive(packet.seq, packet.payload)
        self.trace_packet("in ", data, "" if outcome == "in order" else ": " + outcome)
        if not self.unacked:
            self.ack_by = time.monotonic() + ACK_DELAY  # the latest this EVENT's ACK may leave
        self.unacked += 1
        for payload in ready:
            try:
                kind, when, room, user, text = unpack_fields(payload, 5)
                event = Event(kind, float(when), room, user, text)
            except (PacketError, ValueError) as error:
                self.trace(f"an EVENT could not be read ({error}); skipped")
                continue
            if self.on_event:
                self.on_event(event)
            else:
                self.events.put(event)
        # The ACK may wait only in the plain case: the EVENT expected next, nothing held
        # behind a gap. A gap opening, partly or wholly filling, or a duplicate (the ACK that
        # covered it was lost) is acknowledged at once, as TCP does.
        plain = outcome == "in order" and len(ready) == 1 and not self.inbound.held
        if self.unacked >= ACK_EVERY or not plain:
            self.send_ack()

    def send_ack(self) -> None:
        self.unacked = 0
        if self.token == NO_TOKEN:
            return  # the session ended (BYE): nobody is waiting for it
        cumulative, bitmap = self.inbound.ack()
        self.send_packet(Packet(PacketType.ACK, 0, cumulative, self.token, 0, BITMAP.pack(bitmap)))

    def send_packet(self, packet: Packet) -> None:
        data = encode_packet(packet, self.cipher)
        self.trace_packet("out", data)
        with self.send_lock:
            self.last_sent = time.monotonic()
            try:
                self.sock.send(data)
            except OSError as error:  # e.g. "port unreachable" reported late; as if lost
                self.nobody_listening |= isinstance(error, (ConnectionRefusedError, ConnectionResetError))
                self.trace(f"sending failed: {error}")

    # --- Heartbeat ---

    def keep_alive(self) -> None:
        """PING when we have been quiet a while, so the server knows we are still here."""
        while not self.closed.wait(MAX_WAIT):
            quiet = time.monotonic() - self.last_sent
            if self.token == NO_TOKEN or quiet < self.timing.heartbeat_every:
                continue
            if not self.request_lock.acquire(blocking=False):
                continue  # a request is under way: that says we are alive
            self.request_lock.release()
            try:
                self.ping()
            except SessionLost:
                pass  # the token is gone now, which is how the user interface learns of it
            except ChatError as error:  # gave up on the server; close() told everyone
                if not self.closed.is_set():
                    self.close(str(error))

    # --- Shutting down ---

    def close(self, reason: str = "") -> None:
        """Close the socket and stop the threads; `reason` says why, if not by choice."""
        if self.closed.is_set():
            return
        self.closed_reason = reason
        self.closed.set()
        if reason:
            self.on_notice(f"[WARN] {reason}")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the receiver now, not at its timeout
        except OSError:
            pass  # not every system allows it on UDP; the receiver's timeout will do
        self.sock.close()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2 * MAX_WAIT + 1)

    # --- Tracing (--verbose) ---

    def trace(self, text: str) -> None:
        if self.trace_to:
            self.trace_to(f"[trace] {text}")

    def trace_packet(self, direction: str, data: bytes, note: str = "") -> None:
        """Trace one datagram; the line is only put together when someone reads it."""
        if self.trace_to:
            self.trace_to(f"[trace] {direction:<3} {describe_datagram(data)}{note}")

    def trace_drop(self, direction: str, data: bytes) -> None:
        self.trace_packet(direction, data, ": LOST (simulated)")


# --- The terminal ---------------------------------------------------------------------


class EndOfInput(Exception):
    """The user pressed Ctrl+D / Ctrl+Z, or the script ran out of lines."""


class Terminal:
    """The keyboard on its own thread, the screen shared by everyone.

    input() blocks, and on Windows nothing but Enter wakes it, so a thread of its own
    reads each line and hands it over through a queue. The main thread waits on that
    queue a little at a time: Ctrl+C always gets through, and a client that lost its
    server can end without waiting for Enter. Lines printed while the user types go
    above the prompt, which is then drawn again.
    """

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.asks: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.print_lock = threading.Lock()
        self.prompt = ""  # shown now, waiting for the user
        self.outstanding = False  # a question is with the keyboard thread, not answered yet
        self.ended = False
        self.saved_mode = None
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
                self.prompt = prompt if self.interactive else ""
            try:
                if not self.interactive:
                    line = sys.stdin.readline()
                    if not line:
                        raise EOFError
                    answer = line.rstrip("\r\n")
                elif secret:
                    answer = getpass.getpass(prompt)
                else:
                    answer = input(prompt)
            except (EOFError, OSError, ValueError):
                answer = None
            except KeyboardInterrupt:  # reaches this thread on some systems; main handles it
                answer = None
            with self.print_lock:
                self.prompt = ""
            self.answers.put(answer)
            if answer is None:
                return

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
        while True:
            alive()
            try:
                answer = self.answers.get(timeout=MAX_WAIT)
            except queue.Empty:
                continue
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

    def restore(self) -> None:
        """Give the terminal back as we found it: Ctrl+C during a password prompt must not
        leave typing invisible."""
        if self.saved_mode is not None:
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved_mode)
            except (termios.error, OSError, ValueError):
                pass

    def show(self, text: str) -> None:
        """Print a line above the prompt, without garbling what the user is typing."""
        with self.print_lock:
            try:
                if not self.prompt:
                    print(text, flush=True)
                    return
                typed = readline.get_line_buffer() if readline else ""
                width = len(self.prompt) + len(typed)
                sys.stdout.write("\r" + " " * width + "\r" + text + "\n" + self.prompt + typed)
                sys.stdout.flush()
            except BrokenPipeError:  # output piped into a program that stopped reading
                pass


# --- The conversation -----------------------------------------------------------------


HELP = """Commands:
  /help              this list
  /rooms             rooms and how many are in each
  /who               who is in your room
  /join ROOM         go to another room (asks its password; a new room gets the one you give)
  /msg USER TEXT     a private message to one user
  exit  or  /quit    leave (Ctrl+C does the same)
Anything else is sent to everyone in your room. Start a line with // to send one beginning with /."""


def format_event(event: Event) -> str:
    """Return how an event is shown: `[HH:MM] alice: text` and the like."""
    clock = time.strftime("%H:%M", time.localtime(event.time))
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
    return f"[{clock}] {event.kind}: {user} {text}"


def printable(text: str) -> str:
    """Return `text` safe for a terminal: no escape codes; line breaks indented."""
    text = "".join(c if c.isprintable() or c == "\n" else "?" for c in text)
    return text.replace("\n", "\n    ")


class Conversation:
    """The flow a user goes through: choose, log in, enter the lobby, chat, leave."""

    def __init__(self, client: ChatClient, terminal: Terminal):
        self.client = client
        self.terminal = terminal
        self.chatting = False
        self.commands = {"/help": self.show_help, "/rooms": self.show_rooms, "/who": self.show_who,
                         "/join": self.join_room, "/msg": self.send_private}

    def ask(self, prompt: str, secret: bool = False) -> str:
        return self.terminal.ask(prompt, secret, alive=self.check_alive)

    def check_alive(self) -> None:
        if self.client.closed.is_set():
            raise ConnectionClosed(self.client.closed_reason)
        if self.chatting and self.client.token == NO_TOKEN:  # a heartbeat was told: no session
            raise SessionLost(SESSION_LOST)

    def run(self) -> None:
        """Ask /register or /login until the user logs in, chats and leaves."""
        while True:
            choice = self.ask("Type /register or /login (exit to quit): ").strip().lower()
            if choice in ("exit", "/quit", "/exit"):
                return
            if choice in ("/register", "register"):
                self.register()
            elif choice in ("/login", "login"):
                if self.login() and self.chat():
                    return
            elif choice:
                self.terminal.show("Please type /register or /login.")

    def register(self) -> None:
        name = self.ask("Username: ").strip()
        password = self.ask("Password: ", secret=True)
        try:
            self.terminal.show(self.client.register(name, password))
        except Refused as refusal:
            self.terminal.show(refusal.text)

    def login(self) -> bool:
        name = self.ask("Username: ").strip()
        password = self.ask("Password: ", secret=True)
        try:
            self.terminal.show(self.client.login(name, password))
        except Refused as refusal:
            self.terminal.show(refusal.text)
            return False
        while True:  # the lobby's password, until it is right
            password = self.ask(f"Room password for {LOBBY}: ", secret=True)
            try:
                self.terminal.show(self.client.join(LOBBY, password) + ". Type /help for commands.")
                return True
            except Refused as refusal:
                self.terminal.show(refusal.text)

    def chat(self) -> bool:
        """Read lines and act on them; True when the user leaves, False to log in again."""
        self.chatting = True
        try:
            while True:
                line = self.ask("> ")
                if line.strip().lower() in ("exit", "/quit", "/exit"):
                    self.client.bye()
                    return True
                try:
                    self.handle_line(line)
                except Refused as refusal:
                    self.terminal.show(refusal.text)
        except SessionLost as error:
            self.terminal.show(f"[WARN] {error}")
            return False
        finally:
            self.chatting = False

    def handle_line(self, line: str) -> None:
        if line.startswith("//"):
            self.client.say(line[1:])
        elif line.startswith("/"):
            command, _, rest = line.partition(" ")
            action = self.commands.get(command.lower())
            if action is None:
                self.terminal.show(f"Unknown command {command}; type /help for the list.")
            else:
                action(rest.strip())
        elif line.strip():
            self.client.say(line)

    def show_help(self, rest: str) -> None:
        self.terminal.show(HELP)

    def show_rooms(self, rest: str) -> None:
        for name, count in self.client.rooms():
            self.terminal.show(f"  {name}  ({count} here)" if count else f"  {name}")

    def show_who(self, rest: str) -> None:
        room, members = self.client.who()
        self.terminal.show(f"In {room}: {', '.join(members)}")

    def join_room(self, rest: str) -> None:
        if not rest:
            self.terminal.show("Usage: /join ROOM")
            return
        password = self.ask(f"Room password for {rest}: ", secret=True)
        self.terminal.show(self.client.join(rest, password))

    def send_private(self, rest: str) -> None:
        user, _, text = rest.partition(" ")
        if not user or not text.strip():
            self.terminal.show("Usage: /msg USER TEXT")
            return
        self.client.private(user, text)


# --- Starting from the command line ---------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="UDP chat room client. Asks for the server's IP and port unless both are given.",
        epilog="The xor and caesar ciphers are teaching toys: anyone on the network who captures "
               "the traffic can read it. Server and client must use the same --cipher and --key.",
    )
    parser.add_argument("--host", help=f"server IP address (asked if not given; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"server UDP port (asked if not given; default {DEFAULT_PORT})")
    parser.add_argument("--cipher", choices=CIPHER_NAMES, default=DEFAULT_CIPHER,
                        help="toy cipher for packet payloads (default: %(default)s)")
    parser.add_argument("--key", help="cipher key (default: the cipher's built-in key, the same as the server's)")
    parser.add_argument("--verbose", action="store_true", help="trace every packet in and out")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="simulate a lossy network: drop this share of datagrams, e.g. 0.3")
    parser.add_argument("--seed", type=int, help="random seed for --loss, to drop the same datagrams each run")
    args = parser.parse_args(argv)
    if not 0 <= args.loss < 1:
        parser.error("--loss must be at least 0 and below 1")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error("--port must be from 1 to 65535")
    return args


def safe_output() -> None:
    """Let any message print: a Windows console with a legacy code page cannot show every
    character, and must show a replacement rather than crash."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def ask_address(args: argparse.Namespace, terminal: Terminal) -> tuple[str, int]:
    """Return the server's (host, port): from the command line, or asked."""
    host = args.host
    if host is None:
        host = terminal.ask(f"Server IP [{DEFAULT_HOST}]: ").strip() or DEFAULT_HOST
    port = args.port
    while port is None:
        answer = terminal.ask(f"Server port [{DEFAULT_PORT}]: ").strip() or str(DEFAULT_PORT)
        if answer.isdigit() and 0 < int(answer) < 65536:
            port = int(answer)
        else:
            terminal.show("A port is a whole number from 1 to 65535.")
    return host, port


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    safe_output()
    terminal = Terminal(interactive=sys.stdin.isatty())
    client = None
    status = 0
    try:
        host, port = ask_address(args, terminal)
        client = ChatClient(
            host, port, args.cipher, args.key, loss=args.loss, seed=args.seed,
            on_event=lambda event: terminal.show(format_event(event)),
            on_notice=terminal.show, trace=terminal.show if args.verbose else None,
        )
        client.hello()  # is anyone there? Better to know before asking for a password
        terminal.show(f"Connected to the chat server at {host}:{port}.")
        Conversation(client, terminal).run()
    except (EndOfInput, KeyboardInterrupt):
        pass  # leaving the usual way
    except ConnectionClosed:
        status = 1  # the reason was shown when it happened
    except ChatError as error:
        terminal.show(f"[ERROR] {error}")
        status = 1
    except ValueError as error:  # a key the cipher cannot use
        terminal.show(f"[ERROR] {error}")
        status = 1
    finally:
        try:
            if client is not None:
                client.bye()
                client.close()
        except KeyboardInterrupt:
            pass
        with terminal.print_lock:
            terminal.prompt = ""
        terminal.restore()
        terminal.show("\n[INFO] Connection closed." if terminal.interactive else "[INFO] Connection closed.")
    return status


if __name__ == "__main__":
    sys.exit(main())
