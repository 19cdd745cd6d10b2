"""The wire: what the chat server and client share, defined once.

Both `server.py` and `client.py` import this module, so the packet format, the toy
ciphers and the round-trip-time estimator exist in exactly one place.

WARNING - the XOR and Caesar ciphers here are TEACHING TOYS. They hide text from a
casual glance at a packet capture and nothing more: `walkthrough.ipynb` breaks both in a
few lines. Real systems use TLS or DTLS (authenticated encryption such as AES-GCM).

One packet travels in one UDP datagram: a fixed 28-byte header, packed with `struct`
in network byte order (big-endian), followed by the payload. Only the payload is
scrambled by the cipher; the header stays readable, as IP and UDP headers do.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      magic "UC" (0x5543)      |    version    |     type      |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |             flags             |        payload length         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        sequence number                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                     acknowledgement number                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    +                   session token (8 bytes)                     +
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |        CRC-32 of the header (this field zero) and the         |
    |                   payload before scrambling                   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |        payload: length-prefixed fields, scrambled ...         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The payload is a run of fields, each a 2-byte length and that many bytes of UTF-8, so
any text survives the trip - a name or message may hold ":", "|", spaces, newlines or
emoji, and nothing ever needs escaping. For example, a SAY packet carrying "hi :)" is

    55 43 01 05 00 00 00 07 ...header...  00 05 68 69 20 3a 29
    magic   SAY        len=7             field of 5 bytes: "hi :)"

Because the checksum covers the payload *before* scrambling, a receiver whose key
differs from the sender's computes a different CRC and can say so, instead of printing
garbage.
"""

import binascii
import enum
import random
import struct
import typing

# --- Sizes ---------------------------------------------------------------------------

HEADER_FORMAT = "!2sBBHHII8sI"  # magic, version, type, flags, length, seq, ack, token, crc
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 28 bytes
MAGIC = b"UC"  # "UDP Chat": a datagram that does not start with it is not ours
VERSION = 1
# 1200 bytes fits the smallest path MTU seen in practice (IPv6 guarantees 1280, minus
# its headers), so our datagrams are never split into IP fragments; QUIC uses the same.
MAX_DATAGRAM = 1200
MAX_PAYLOAD = MAX_DATAGRAM - HEADER_SIZE
# recvfrom() must be given room for the largest possible UDP datagram: on Windows a
# smaller buffer raises WinError 10040, on Linux the datagram is silently cut.
RECV_BUFFER = 65535
# Message text limit, in UTF-8 bytes, leaving room in MAX_PAYLOAD for the other fields
# of the EVENT that carries it (kind, time, room, user).
MAX_TEXT_BYTES = 1000
NO_TOKEN = bytes(8)

FIELD_LENGTH = struct.Struct("!H")
BITMAP = struct.Struct("!I")  # the selective-acknowledgement bitmap of an ACK


class PacketType(enum.IntEnum):
    """What a packet asks or tells. Requests go client -> server, one at a time."""

    HELLO = 1  # request: "are you there?" -> OK [cookie]; padded, see MIN_HELLO_SIZE
    REGISTER = 2  # request: [cookie, username, password]
    LOGIN = 3  # request: [cookie, username, password] -> OK [name, room, text], token in the header
    JOIN = 4  # request: [room, room password]
    SAY = 5  # request: [text] for everyone else in the room
    PRIVATE = 6  # request: [username, text] for one user
    ROOMS = 7  # request: [] -> OK [room, count, room, count, ...]
    WHO = 8  # request: [] -> OK [room, member, member, ...]
    PING = 9  # request: [] -> OK []; the heartbeat of an idle client
    BYE = 10  # request: [] -> OK [text]; the session ends
    ACK = 11  # client -> server: which EVENTs arrived (ack field + bitmap payload)
    OK = 20  # reply: the request succeeded; fields depend on the request
    ERROR = 21  # reply: [code, text] - the request failed, or the packet was bad
    EVENT = 22  # server -> client, reliable: [kind, unix time, room, user, text]
    RESET = 23  # reply with no payload: "I have no session for you" (like TCP's RST)


PACKET_TYPES = {member.value: member for member in PacketType}  # number -> type, for decoding


# EVENTs the server may have in flight to one client: the receiver's buffer holds as many,
# and the ACK's 32-bit bitmap covers them.
WINDOW = 32
FLAG_RETRANSMIT = 0x0001  # set on a packet sent again; lets a trace mark it
# A HELLO is padded to this size so that the server's reply is never larger than the
# request: then nobody can forge our source address and use the server as an amplifier.
MIN_HELLO_SIZE = 128


class PacketError(ValueError):
    """A datagram that is not a valid packet; the message says what is wrong with it."""


class Packet(typing.NamedTuple):
    """One packet, payload in plain text (scrambling happens in encode/decode).

    A named tuple: read-only like the datagram it stands for, and quick to make - a
    busy server makes tens of thousands a second.
    """

    type: PacketType
    seq: int = 0
    ack: int = 0
    token: bytes = NO_TOKEN
    flags: int = 0
    payload: bytes = b""


# --- Toy ciphers ---------------------------------------------------------------------


class NoCipher:
    """Sends the payload as it is: handy for reading captures."""

    name = "none"

    def encrypt(self, data: bytes) -> bytes:
        return data

    decrypt = encrypt


class XorCipher:
    """Repeating-key XOR - a TEACHING TOY, broken by one known plaintext.

    Each payload byte is XORed with the key byte at the same position, the key repeated
    as needed. XOR is its own inverse, so decrypting is encrypting again. To stay fast,
    the whole payload and key stream are XORed as two big integers: one C-level
    operation instead of a Python loop over bytes.
    """

    name = "xor"

    def __init__(self, key: bytes):
        if not key:
            raise ValueError("the xor cipher needs a non-empty key")
        # The key stream for the longest datagram, computed once.
        self.stream = (key * (RECV_BUFFER // len(key) + 1))[:RECV_BUFFER]

    def encrypt(self, data: bytes) -> bytes:
        n = len(data)
        mixed = int.from_bytes(data, "big") ^ int.from_bytes(self.stream[:n], "big")
        return mixed.to_bytes(n, "big")

    decrypt = encrypt


class CaesarCipher:
    """Caesar's shift applied to bytes - a TEACHING TOY, broken by trying all 255 shifts.

    Every byte value b becomes (b + shift) mod 256; decryption shifts back. A
    translation table does the whole payload in one C-level call.
    """

    name = "caesar"

    def __init__(self, shift: int):
        if not 1 <= shift <= 255:
            raise ValueError("the caesar key must be a whole number from 1 to 255")
        self.forward = bytes((b + shift) % 256 for b in range(256))
        self.backward = bytes((b - shift) % 256 for b in range(256))

    def encrypt(self, data: bytes) -> bytes:
        return data.translate(self.forward)

    def decrypt(self, data: bytes) -> bytes:
        return data.translate(self.backward)


CIPHER_NAMES = ("xor", "caesar", "none")
DEFAULT_CIPHER = "xor"
# The key both scripts use when none is given, so that they work out of the box. A key
# known to everyone protects nothing - but neither does a toy cipher.
DEFAULT_KEYS = {"xor": "II2120", "caesar": "3", "none": ""}


def make_cipher(name: str, key: str | None = None):
    """Return the cipher called `name` with `key` (its default key when None)."""
    if key is None:
        key = DEFAULT_KEYS[name]
    if name == "xor":
        return XorCipher(key.encode("utf-8"))
    if name == "caesar":
        if not key.strip().isdigit():
            raise ValueError(f"the caesar key must be a whole number from 1 to 255, not {key!r}")
        return CaesarCipher(int(key))
    if name == "none":
        return NoCipher()
    raise ValueError(f"unknown cipher {name!r}; choose one of {', '.join(CIPHER_NAMES)}")


# --- Packets <-> bytes ---------------------------------------------------------------


def encode_packet(packet: Packet, cipher, scrambled: bytes | None = None) -> bytes:
    """Return the datagram for `packet`.

    `scrambled` may carry `cipher.encrypt(packet.payload)` already computed, so that a
    message sent to a whole room is scrambled once, not once per member.
    """
    if len(packet.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(packet.payload)} bytes exceeds {MAX_PAYLOAD}")
    if scrambled is None:
        scrambled = cipher.encrypt(packet.payload)
    header = struct.pack(
        HEADER_FORMAT, MAGIC, VERSION, packet.type, packet.flags, len(packet.payload),
        packet.seq, packet.ack, packet.token, 0,
    )
    crc = binascii.crc32(packet.payload, binascii.crc32(header))
    return header[:-4] + crc.to_bytes(4, "big") + scrambled


def decode_packet(data: bytes, cipher) -> Packet:
    """Return the packet in datagram `data`; raise PacketError if it is not a valid one."""
    if len(data) < HEADER_SIZE:
        raise PacketError(f"too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    if len(data) > MAX_DATAGRAM:
        raise PacketError(f"too long: {len(data)} bytes, the limit is {MAX_DATAGRAM}")
    magic, version, ptype, flags, length, seq, ack, token, crc = struct.unpack_from(
        HEADER_FORMAT, data
    )
    if magic != MAGIC:
        raise PacketError(f"not a chat packet: starts with {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise PacketError(f"protocol version {version}, this program speaks {VERSION}")
    if length != len(data) - HEADER_SIZE:
        raise PacketError(f"length field says {length}, datagram holds {len(data) - HEADER_SIZE}")
    payload = cipher.decrypt(data[HEADER_SIZE:])
    zeroed_header = data[: HEADER_SIZE - 4] + bytes(4)
    if binascii.crc32(payload, binascii.crc32(zeroed_header)) != crc:
        raise PacketError("bad checksum: damaged on the way, or the ends use different keys")
    known = PACKET_TYPES.get(ptype)
    if known is None:
        raise PacketError(f"unknown packet type {ptype}")
    return Packet(known, seq, ack, token, flags, payload)


def peek_type_name(data: bytes) -> str:
    """Return the packet type named in a datagram's header, even if the rest is bad."""
    if len(data) < 4 or data[:2] != MAGIC:
        return "?"
    try:
        return PacketType(data[3]).name
    except ValueError:
        return f"type {data[3]}"


def describe_datagram(data: bytes) -> str:
    """Return a datagram's header in words, for traces: type, seq, ack, size."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return f"? {len(data)} B"
    seq, ack = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
    retransmit = " retransmitted" if int.from_bytes(data[4:6], "big") & FLAG_RETRANSMIT else ""
    return f"{peek_type_name(data)} seq={seq} ack={ack} {len(data)} B{retransmit}"


# --- Fields inside a payload ---------------------------------------------------------


def pack_fields(*fields: str) -> bytes:
    """Return the fields as one payload: each is a 2-byte length, then UTF-8 bytes."""
    parts = []
    for field in fields:
        data = field.encode("utf-8")
        parts.append(FIELD_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack_fields(payload: bytes, count: int | None = None) -> list[str]:
    """Return the text fields in `payload`; exactly `count` of them unless count is None."""
    fields = []
    offset, end = 0, len(payload)
    while offset < end:
        text_starts = offset + FIELD_LENGTH.size
        if text_starts > end:
            raise PacketError("payload ends inside a field's length")
        length = payload[offset] << 8 | payload[offset + 1]  # 2 bytes, big-endian (FIELD_LENGTH)
        offset = text_starts + length  # where the next field begins
        if offset > end:
            raise PacketError(f"field of {length} bytes runs past the end of the payload")
        fields.append(payload[text_starts:offset])
    if count is not None and len(fields) != count:
        raise PacketError(f"expected {count} fields, got {len(fields)}")
    try:
        return [field.decode("utf-8") for field in fields]
    except UnicodeDecodeError:
        raise PacketError("a field is not valid UTF-8") from None


# --- Timing, shared by both ends -----------------------------------------------------


class RtoEstimator:
    """How long to wait for an answer before sending again (RFC 6298).

    Every round-trip time measured updates a smoothed average (SRTT) and a smoothed
    mean deviation (RTTVAR); the retransmission timeout is SRTT + 4 * RTTVAR: long
    enough that a late answer is rarely mistaken for a lost one, short enough to
    recover quickly. Karn's rule: a packet sent more than once gives no sample,
    because nobody can tell which copy the answer belongs to - the caller simply does
    not call `observe` for it. Each further attempt doubles the wait (exponential
    backoff), so a congested or dead peer is not hammered.
    """

    ALPHA = 1 / 8  # weight of a new sample in SRTT (RFC 6298)
    BETA = 1 / 4  # weight of a new sample in RTTVAR (RFC 6298)
    INITIAL = 1.0  # seconds, before any measurement (RFC 6298 section 2.1)
    # RFC 6298 asks for at least 1 s, chosen for the Internet of 2000. On a LAN round
    # trips are below 10 ms; Linux's TCP uses 200 ms, and so do we.
    FLOOR = 0.2
    # Backoff stops growing here. RFC 6298 allows 60 s, for the Internet; on a LAN 2 s is
    # a hundred round trips, and a chat waiting longer per try feels dead. A short
    # ceiling also matters on a very lossy link, where most tries fail: more tries a
    # minute means less time lost.
    CEILING = 2.0

    def __init__(self, initial: float = INITIAL, floor: float = FLOOR, ceiling: float = CEILING):
        self.floor = floor
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = min(max(initial, floor), ceiling)

    def observe(self, rtt: float) -> None:
        """Take one round-trip sample, in seconds, and update the timeout."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.floor), self.ceiling)

    def timeout(self, attempt: int = 0) -> float:
        """Return the wait before retry number `attempt` (0 = the first send)."""
        return min(self.rto * 2 ** min(attempt, 16), self.ceiling)


# --- A lossy network, for teaching and testing ---------------------------------------


class LossySocket:
    """A UDP socket that drops each datagram, in or out, with probability `loss`.

    With a fixed `seed` the same datagrams are dropped on every run, so a class can
    watch retransmission recover from loss on one machine, and a failing test repeats.
    Each direction draws from its own generator, and `side` ("server", "client") tells
    the two ends apart: a server and a client given the same seed must not drop in
    lockstep (they would lose every reply to a request that got through).
    Everything but sending and receiving passes through to the real socket.
    """

    def __init__(self, sock, loss: float, seed: int | None = None, on_drop=None, side: str = ""):
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be at least 0 and below 1")
        self.sock = sock
        self.loss = loss
        self.randoms = {direction: random.Random(None if seed is None else f"{side}/{seed}/{direction}")
                        for direction in ("in", "out")}
        self.on_drop = on_drop or (lambda direction, data: None)
        self.dropped = 0

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def lost(self, direction: str, data: bytes) -> bool:
        """Decide whether this datagram is lost; count and report it if so."""
        if self.randoms[direction].random() >= self.loss:
            return False
        self.dropped += 1
        self.on_drop(direction, data)
        return True

    def sendto(self, data: bytes, address) -> int:
        if self.lost("out", data):
            return len(data)  # as far as the sender can tell, it went out
        return self.sock.sendto(data, address)

    def send(self, data: bytes) -> int:
        if self.lost("out", data):
            return len(data)
        return self.sock.send(data)

    def recvfrom(self, size: int):
        while True:  # a dropped datagram is as if it never came: read the next one
            data, address = self.sock.recvfrom(size)
            if not self.lost("in", data):
                return data, address

    def recvfrom_into(self, buffer):
        while True:
            size, address = self.sock.recvfrom_into(buffer)
            if not self.lost("in", bytes(buffer[:size])):
                return size, address

    def recv(self, size: int) -> bytes:
        while True:
            data = self.sock.recv(size)
            if not self.lost("in", data):
                return data
