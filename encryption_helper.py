"""What the chat server and client share, defined once: ciphers, wire format, reliable channel.

Both `server.py` and `client.py` import this module. It has six parts, in this order:

1. **Toy ciphers** - XOR and Caesar. WARNING: they are TEACHING TOYS. They hide text
   from a casual glance at a packet capture and nothing more: `walkthrough.ipynb` breaks
   both in a few lines. Real systems use TLS or DTLS (authenticated encryption).
2. **The wire format** - one packet per UDP datagram: a 32-byte header packed with
   `struct` in network byte order (big-endian), then the payload. Only the payload is
   scrambled; the header stays readable, as IP and UDP headers do.
3. **The reliable channel** - `Channel`, Selective Repeat in both directions with
   cumulative and selective acknowledgements, timers from measured round trips (RFC 6298)
   and a give-up. The server keeps one per session, the client one to the server. It
   opens no socket and reads no clock: it is fed packets and the time, and says what to
   send and when it next wants to be woken.
4. **A lossy socket** - drops datagrams on purpose, repeatably, for lessons and tests.
5. **The local network** - this machine's IPv4 addresses and their broadcast
   addresses: what the server's banner tells other PCs to type, and where a client's
   search for a server (FIND) is sent.
6. **Waking a loop** - `WakeUp`, how another thread wakes a loop asleep in select().

The header, 32 bytes:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      magic "UC" (0x5543)      |    version    |     type      |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |             flags             |        payload length         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          sequence number (0: not on the reliable channel)     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |   acknowledgement: everything up to this number has arrived   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  selective ack bitmap: bit i set = number ack + 2 + i arrived |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    +                   session token (8 bytes)                     +
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |   CRC-32 of the plain payload, then of the header (CRC zero)  |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |        payload: length-prefixed fields, scrambled ...         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The payload is a run of fields, each a 2-byte length and that many bytes of UTF-8, so
any text survives the trip - a name or message may hold ":", "|", spaces, newlines or
emoji, and nothing ever needs escaping. A SAY carrying "hi :)" ends in

    00 05 68 69 20 3a 29      a field of 5 bytes: "hi :)"

Because the checksum covers the payload *before* scrambling, a receiver whose key
differs from the sender's computes a different CRC and can say so, instead of printing
garbage. The CRC runs over the payload first and the header after, so a message sent to
a whole room is checksummed once, not once per member (only the header differs).
"""

import argparse
import binascii
import bisect
import collections
import enum
import random
import re
import socket
import struct
import sys
import typing

try:  # Unix only: asking the kernel for an interface's addresses (section 5)
    import fcntl
except ImportError:  # Windows
    fcntl = None

# === 1. Toy ciphers ==================================================================


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
        longest = 65535  # the largest UDP datagram: the key stream for any payload, computed once
        self.stream = (key * (longest // len(key) + 1))[:longest]

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
    """Return the (toy) cipher called `name` with `key` (its default key when None)."""
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


# === 2. The wire format ==============================================================

HEADER_FORMAT = "!2sBBHHIII8sI"  # magic, version, type, flags, length, seq, ack, sack, token, crc
HEADER = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = HEADER.size  # 32 bytes
MAGIC = b"UC"  # "UDP Chat": a datagram that does not start with it is not ours
# 2: every header carries a selective acknowledgement; replies name their request.
# 3: FIND, a client's search for servers on the local network.
# 4: files: FILE_OFFER, FILE_CHUNK, FILE_CANCEL, and a second stream (FLAG_FILE_STREAM).
VERSION = 4
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


def oversize_text(text: str) -> str:
    """Return why `text` is too long for one message, or "" if it fits (both ends check)."""
    size = len(text.encode("utf-8"))
    return f"Message too long ({size} bytes, the limit is {MAX_TEXT_BYTES}); not sent." if size > MAX_TEXT_BYTES else ""


LOBBY = "lobby"  # the room every member enters first; its password is the server's --room-password
Address = tuple[str, int]  # (ip, port): who sent a datagram, where to send one


def describe_address(address: Address) -> str:
    """Return an address as a user types it: ip:port."""
    return f"{address[0]}:{address[1]}"


NO_TOKEN = bytes(8)
FIELD_LENGTH = struct.Struct("!H")
FLAG_RETRANSMIT = 0x0001  # set on a packet sent again; lets a trace mark it
# Set on every packet of a session's second reliable channel, the file stream, ACKs too: its
# numbers, window and timers are its own, so a chat line never waits behind a lost file
# chunk (no head-of-line blocking, as QUIC's streams avoid it). Clear: the chat's channel.
FLAG_FILE_STREAM = 0x0002
# A HELLO is padded to this size so that the server's reply is never larger than the
# request: then nobody can forge our source address and use the server as an amplifier.
MIN_HELLO_SIZE = 128
# A FIND is padded for the same reason: it may come from anyone, even a forged address,
# and its answer (name, port, members online) must never be the larger of the two.
MIN_FIND_SIZE = 128


class PacketType(enum.IntEnum):
    """What a packet asks or tells. OK and ERROR answer a request and name it (field 0)."""

    HELLO = 1  # request: "are you there?" -> OK [re, cookie]; padded, see MIN_HELLO_SIZE
    REGISTER = 2  # request: [cookie, username, password]
    LOGIN = 3  # request: [cookie, username, password] -> OK [re, name, room, text], token in the header
    JOIN = 4  # request: [room, room password]
    SAY = 5  # request: [text] for everyone else in the room
    PRIVATE = 6  # request: [username, text] for one user
    ROOMS = 7  # request: [] -> OK [re, room, count, room, count, ...]
    WHO = 8  # request: [] -> OK [re, room, member, member, ...]
    PING = 9  # request: [] -> OK [re]; the heartbeat of an idle client
    BYE = 10  # request: [] -> OK [re, text]; the session ends
    ACK = 11  # either way: nothing but the acknowledgement fields of the header
    FIND = 12  # request, often broadcast: "which chat servers are here?" -> OK [re, name, port, online]; padded
    FILE_OFFER = 13  # request: [to ('' = the room), file name, size, SHA-256 hex] -> OK [re, transfer id]
    FILE_CHUNK = 14  # on the file stream, either way: binary [transfer id 8 B, offset 8 B, data] (FILE_CHUNK_HEAD)
    FILE_CANCEL = 15  # request: [transfer id] -> OK [re, text]; the sender's stops it, a receiver's leaves it
    OK = 20  # reply [re, ...]: request number `re` succeeded; more fields depend on the request
    ERROR = 21  # reply [re, code, text]: the request failed, or (re 0) the packet was bad
    EVENT = 22  # server -> client: [kind, unix time, room, user, text, more...]; see FILE_EVENTS
    RESET = 23  # reply with no payload: "I have no session for you" (like TCP's RST)


PACKET_TYPES = {member.value: member for member in PacketType}  # number -> type, for decoding
# Types 20 and up only a server sends: a server never answers them, or two could loop.
SERVER_ONLY = {PacketType.OK, PacketType.ERROR, PacketType.EVENT, PacketType.RESET}


class Refused(Exception):
    """A request turned down, as an ERROR packet says it: `code` for programs, `text` for people.

    Both ends use this one class: a server handler raises it and the server answers
    ERROR [re, code, text]; the client raises it from the ERROR it receives.
    """

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


class PacketError(ValueError):
    """A datagram that is not a valid packet; the message says what is wrong with it."""


class ChecksumError(PacketError):
    """A datagram damaged on the way - or scrambled with another key than ours."""


class Packet(typing.NamedTuple):
    """One packet, payload in plain text (scrambling happens in encode/decode).

    A named tuple: read-only like the datagram it stands for, and quick to make - a
    busy server makes tens of thousands a second.
    """

    type: PacketType
    seq: int = 0
    ack: int = 0
    sack: int = 0
    token: bytes = NO_TOKEN
    flags: int = 0
    payload: bytes = b""


class Body(typing.NamedTuple):
    """A payload made ready for the wire once: scrambled, and its CRC computed.

    A message to a room of forty is prepared once and sent forty times, each time
    behind another header.
    """

    plain: bytes
    scrambled: bytes
    crc: int


def prepare_body(payload: bytes, cipher) -> Body:
    """Return `payload` scrambled by `cipher`, with the CRC-32 of its plain bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return Body(payload, cipher.encrypt(payload), binascii.crc32(payload))


def encode_packet(packet: Packet, cipher, body: Body | None = None) -> bytes:
    """Return the datagram for `packet`; `body` may carry its payload already prepared."""
    if body is None:
        body = prepare_body(packet.payload, cipher)
    header = HEADER.pack(MAGIC, VERSION, packet.type, packet.flags, len(body.plain),
                         packet.seq, packet.ack, packet.sack, packet.token, 0)
    crc = binascii.crc32(header, body.crc)  # the payload's CRC, continued over the header
    return header[:-4] + crc.to_bytes(4, "big") + body.scrambled


def decode_packet(data: bytes, cipher) -> Packet:
    """Return the packet in datagram `data`; raise PacketError if it is not a valid one."""
    if len(data) < HEADER_SIZE:
        raise PacketError(f"too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    if len(data) > MAX_DATAGRAM:
        raise PacketError(f"too long: {len(data)} bytes, the limit is {MAX_DATAGRAM}")
    magic, version, ptype, flags, length, seq, ack, sack, token, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PacketError(f"not a chat packet: starts with {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise PacketError(f"protocol version {version}, this program speaks {VERSION}")
    if length != len(data) - HEADER_SIZE:
        raise PacketError(f"length field says {length}, datagram holds {len(data) - HEADER_SIZE}")
    payload = cipher.decrypt(data[HEADER_SIZE:])
    zeroed_header = data[: HEADER_SIZE - 4] + bytes(4)
    if binascii.crc32(zeroed_header, binascii.crc32(payload)) != crc:
        raise ChecksumError("bad checksum: damaged on the way, or the ends use different keys")
    known = PACKET_TYPES.get(ptype)
    if known is None:
        raise PacketError(f"unknown packet type {ptype}")
    return Packet(known, seq, ack, sack, token, flags, payload)


def peek_type_name(data: bytes) -> str:
    """Return the packet type named in a datagram's header, even if the rest is bad."""
    if len(data) < 4 or data[:2] != MAGIC:
        return "?"
    known = PACKET_TYPES.get(data[3])
    return known.name if known else f"type {data[3]}"


def describe_datagram(data: bytes) -> str:
    """Return a datagram's header in words, for traces: type, seq, ack, size."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return f"? {len(data)} B"
    _, _, _, flags, _, seq, ack, sack, _, _ = HEADER.unpack_from(data)
    sack_text = f" sack={sack:#b}" if sack else ""
    retransmit = " retransmitted" if flags & FLAG_RETRANSMIT else ""
    stream = " [file stream]" if flags & FLAG_FILE_STREAM else ""
    return f"{peek_type_name(data)}{stream} seq={seq} ack={ack}{sack_text} {len(data)} B{retransmit}"


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


# A FILE_CHUNK's payload is binary, not text fields: the transfer's number and where the
# data goes in the file, 8 bytes each in network byte order, then as much of the file as
# fits. A file of 2.1 MB is about 1,900 chunks.
FILE_CHUNK_HEAD = struct.Struct("!QQ")  # transfer id, offset
CHUNK_SIZE = MAX_PAYLOAD - FILE_CHUNK_HEAD.size  # 1152 bytes of file per datagram
# The EVENTs about files carry more fields after the text: "file" [..., id, name, size,
# SHA-256] offers a file to its receiver; "file-done" [..., id] tells the sender that
# `user` has every byte; "file-declined" [..., id] that `user` cancelled or left;
# "file-cancelled" [..., id] that the transfer ended for everyone, the text says why.
FILE_EVENTS = ("file", "file-done", "file-declined", "file-cancelled")


def pack_chunk(transfer: int, offset: int, data: bytes) -> bytes:
    """Return a FILE_CHUNK's payload: transfer id, offset, then the data."""
    return FILE_CHUNK_HEAD.pack(transfer, offset) + data


def unpack_chunk(payload: bytes) -> tuple[int, int, bytes]:
    """Return (transfer id, offset, data) from a FILE_CHUNK's payload."""
    if len(payload) < FILE_CHUNK_HEAD.size:
        raise PacketError(f"a FILE_CHUNK holds at least {FILE_CHUNK_HEAD.size} bytes, not {len(payload)}")
    transfer, offset = FILE_CHUNK_HEAD.unpack_from(payload)
    return transfer, offset, payload[FILE_CHUNK_HEAD.size:]


MB = 1 << 20  # bytes in a megabyte, as the file limits count them
MAX_FILE_NAME_BYTES = 255  # most file systems' limit on one name: the longest name a FILE_OFFER carries
SHA_HEX = re.compile(r"[0-9a-f]{64}")  # a SHA-256 as a FILE_OFFER carries it
# Chunks kept waiting in a file stream beyond the ones in flight: enough to refill its
# window at once when ACKs come, few enough that memory stays small (32 x 1.2 KB).
FILL = 32


def whole_number(text: str) -> bool:
    """Is `text` a whole number written in ASCII digits? ("²" is a digit to str.isdigit, not to int.)"""
    return text.isascii() and text.isdigit()


def describe_size(size: int) -> str:
    """Return a size as people read it: 512 B, 14.2 KB, 2.1 MB."""
    if size < 1024:
        return f"{size} B"
    if size < MB:
        return f"{size / 1024:.1f} KB"
    return f"{size / MB:.1f} MB"


def chunk_length(size: int, offset: int) -> int:
    """Return how long the chunk at `offset` is: CHUNK_SIZE, or what is left at the end."""
    return min(CHUNK_SIZE, size - offset)


# === 3. The reliable channel =========================================================


class RtoEstimator:
    """How long to wait for an acknowledgement before sending again (RFC 6298).

    Every round-trip time measured updates a smoothed average (SRTT) and a smoothed
    mean deviation (RTTVAR); the retransmission timeout is SRTT + 4 * RTTVAR: long
    enough that a late answer is rarely mistaken for a lost one, short enough to
    recover quickly. Karn's rule: a packet sent more than once gives no sample,
    because nobody can tell which copy the answer belongs to - the caller simply does
    not call `observe` for it. Each further timeout multiplies the wait by BACKOFF up
    to a ceiling, so a congested or dead peer is not hammered.
    """

    ALPHA = 1 / 8  # weight of a new sample in SRTT (RFC 6298)
    BETA = 1 / 4  # weight of a new sample in RTTVAR (RFC 6298)
    INITIAL = 1.0  # seconds, before any measurement (RFC 6298 section 2.1)
    # RFC 6298 asks for at least 1 s, chosen for the Internet of 2000; Linux's TCP uses
    # 200 ms, because its receivers delay ACKs by 40 ms and more. Here the time a peer
    # may hold its ACK is added where it applies (`peer_ack_delay`, as QUIC adds its
    # max_ack_delay), so the floor need only keep a timer from racing a LAN round trip
    # (well under 10 ms). Where the clock is coarse (Windows ticks every 15.6 ms), timers
    # fire late, never early.
    FLOOR = 0.01
    GRANULARITY = 0.001  # the least room kept for variation (QUIC's kGranularity)
    # TCP doubles the wait after each timeout; KCP multiplies by 1.5. Gentler backoff
    # recovers sooner from random loss, and the ceiling and the give-up still stop a
    # dead peer from being hammered.
    BACKOFF = 1.5
    GAP_FLOOR = 0.002  # seconds: the wait for a packet the peer reported missing (gap_timeout)
    # Backoff stops growing here. RFC 6298 allows 60 s, for the Internet; on a LAN 2 s is
    # a hundred round trips, and a chat waiting longer per try feels dead.
    CEILING = 2.0

    def __init__(self, initial: float = INITIAL, floor: float = FLOOR, ceiling: float = CEILING,
                 peer_ack_delay: float = 0.0):
        self.floor = floor
        self.ceiling = ceiling
        self.peer_ack_delay = peer_ack_delay  # how long the peer may hold an ACK back
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = min(max(initial, floor), ceiling)
        self.round_trip_wait = self.rto  # SRTT + 4 RTTVAR: the wait with no room for a delayed ACK

    def observe(self, rtt: float) -> None:
        """Take one round-trip sample, in seconds, and update the timeout."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.round_trip_wait = self.srtt + max(4 * self.rttvar, self.GRANULARITY)
        self.rto = min(max(self.round_trip_wait + self.peer_ack_delay, self.floor), self.ceiling)

    def timeout(self, timeouts: int = 0) -> float:
        """Return the wait after a packet's send, once it has timed out `timeouts` times."""
        return min(self.rto * self.BACKOFF ** min(timeouts, 32), self.ceiling)

    def gap_timeout(self, timeouts: int = 0) -> float:
        """Return the wait for a packet the peer is known to be missing.

        The peer acknowledges at once whatever fills a gap - it never delays that ACK -
        so this wait needs no room for a delayed one: SRTT + 4 RTTVAR, with GAP_FLOOR
        for a floor. Without it, a resend lost again would wait the full timeout.
        """
        wait = max(self.round_trip_wait, self.GAP_FLOOR) * self.BACKOFF ** min(timeouts, 32)
        return min(wait, self.timeout(timeouts))


# Delayed ACKs, as TCP does them (RFC 1122, 4.2.3.2): a client acknowledges every second
# packet at once, a lone one at most ACK_DELAY later - half the ACKs for a busy server to
# read; anything out of order or duplicated at once, because then the server lacks news.
# The server acknowledges at once (its replies carry the acknowledgement), and its timers
# allow for the client's delay (RtoEstimator's peer_ack_delay).
ACK_EVERY = 2
ACK_DELAY = 0.01  # seconds


def sack_bitmap(cumulative: int, held) -> int:
    """Return the selective-ack bitmap for the numbers `held` beyond `cumulative` + 1.

    Bit i stands for number cumulative + 2 + i (cumulative + 1 is, by definition, the
    one missing). Numbers beyond the 32 bits are left out; they are acknowledged later.
    """
    bitmap = 0
    for seq in held:
        if 0 <= seq - cumulative - 2 < 32:
            bitmap |= 1 << (seq - cumulative - 2)
    return bitmap


def acknowledged(seq: int, cumulative: int, bitmap: int) -> bool:
    """Does an acknowledgement (cumulative, bitmap) say that number `seq` arrived?"""
    return seq <= cumulative or (0 <= seq - cumulative - 2 < 32 and bool(bitmap >> (seq - cumulative - 2) & 1))


class InFlight:
    """A packet sent and not yet acknowledged: its timer and its history."""

    __slots__ = ("ptype", "body", "sent_at", "deadline", "sends", "timeouts", "order", "passed")

    def __init__(self, ptype: PacketType, body: Body):
        self.ptype, self.body = ptype, body
        self.sent_at = self.deadline = 0.0
        self.sends = self.timeouts = 0  # how often sent; how often its timer fired
        self.order = 0  # when sent, counted in transmissions: later ones have bigger orders
        self.passed = 0  # packets sent after this one that the peer has confirmed


class Channel:
    """A reliable, ordered channel to one peer over UDP: Selective Repeat, both halves.

    **Sending.** `send` queues a packet; it gets the channel's next sequence number (1,
    2, 3, ...). At most `window` are in flight - sent, not yet acknowledged - counted from
    the oldest unacknowledged one; the rest wait in a bounded queue. Every packet in
    flight has its own timer: when it fires, that packet alone is sent again, and its
    next wait is longer (RtoEstimator.BACKOFF). A packet that two later-sent packets
    have overtaken - the peer acknowledged them, not it - is sent again at once, before
    its timer (fast retransmit). One sent `max_sends` times unacknowledged means the
    peer is gone: `failed` becomes true. How much is in flight is bounded twice: by the
    window the receiver can hold, and by a congestion window that halves when a timer
    fires with no sign of a gap beyond it (a burst of loss, or a link that cannot keep
    up; never below MIN_CONGESTION_WINDOW) and grows by one with each packet
    acknowledged - but does not shrink for a packet merely overtaken (random loss, which
    fast retransmit repairs). So random loss costs retransmissions, not speed.

    **Receiving.** A packet numbered below the next one expected, or one already held,
    is a duplicate and is dropped; one above it is held until the gap before it fills;
    then everything in order is delivered at once. Nothing beyond `window` numbers
    ahead is accepted: the peer never has more in flight, so it cannot be genuine.

    **Acknowledging.** Every packet either way carries the highest number up to which
    everything has arrived (cumulative) and a 32-bit bitmap of what is held beyond the
    gap (selective), so only what is really missing is resent. The acknowledgement
    rides on whatever goes the other way; if nothing does, a bare ACK is sent -
    `ack_delay` seconds after a packet arrives, or after `ack_every` packets, and at
    once for anything out of order or duplicated, because then the sender lacks news.

    Round trips are measured on packets sent exactly once (Karn's rule) and feed the
    RtoEstimator that sets the timers. Stop-and-wait is this class with a window of 1.
    A session has two: the chat's, and the file stream, whose `flags` (FLAG_FILE_STREAM)
    it stamps on every packet it sends, so the peer knows which channel a packet is for.

        channel = Channel(make_cipher("none"))
        channel.send(PacketType.SAY, pack_fields("hi"))
        datagrams = channel.poll(now=0.0)     # what to send now
        channel.next_wakeup()                 # when to call poll again, at the latest
    """

    WINDOW = 32  # the bitmap is 32 bits: it can speak for 32 packets beyond a gap
    MAX_QUEUE = 1000  # packets waiting behind a full window; then send() says no
    # A peer that acknowledges none of 20 sends of one packet is gone: at 30% loss each
    # way one send in two fails, and all of 20 fail once in a million.
    MAX_SENDS = 20
    FAST_RETRANSMIT_AFTER = 2  # overtaken by this many packets: lost, not late (KCP's "fastresend 2")
    MIN_CONGESTION_WINDOW = 2  # after a run of timeouts, still probe with two packets at once

    def __init__(self, cipher, token: bytes = NO_TOKEN, *, window: int = WINDOW, max_queue: int = MAX_QUEUE,
                 max_sends: int = MAX_SENDS, rto: RtoEstimator | None = None,
                 ack_delay: float = 0.0, ack_every: int = 1, first_seq: int = 1, flags: int = 0):
        if not 1 <= window <= self.WINDOW:
            raise ValueError(f"the window must be from 1 to {self.WINDOW}")
        self.cipher, self.token = cipher, token
        self.window, self.max_queue, self.max_sends = window, max_queue, max_sends
        self.rto = rto or RtoEstimator()
        self.ack_delay, self.ack_every = ack_delay, ack_every
        self.flags = flags  # stamped on everything it sends: FLAG_FILE_STREAM names the file stream
        # Sending half
        self.next_seq = first_seq  # 1 on a session; a stranger's tries go on counting
        self.in_flight: dict[int, InFlight] = {}  # by number, oldest first (dicts keep order)
        self.waiting: collections.deque = collections.deque()  # InFlight entries not yet sent
        self.transmissions = 0
        self.congestion_window = window  # chat bursts go out at once; timeouts halve it
        self.highest_sacked = 0  # the highest number the peer reported beyond a gap
        self.timer_at = float("inf")  # the earliest timer of a packet in flight, or earlier
        self.failed = False
        # Receiving half
        self.expected = 1  # the next number to deliver
        self.held: dict[int, Packet] = {}  # arrived early, waiting for the gap to fill
        self.unacked = 0  # packets arrived since our last acknowledgement...
        self.ack_due = float("inf")  # ...which must leave by then
        self.stats = collections.Counter()  # sent, retransmitted, fast retransmits, duplicates...

    # --- Sending half ---

    def send(self, ptype: PacketType, payload: bytes | Body) -> int:
        """Queue a packet for the peer; return the number it will carry, 0 if the queue is full."""
        if len(self.waiting) >= self.max_queue:
            return 0
        body = payload if isinstance(payload, Body) else prepare_body(payload, self.cipher)
        self.waiting.append(InFlight(ptype, body))
        return self.next_seq + len(self.waiting) - 1

    def idle(self) -> bool:
        """Is everything sent acknowledged, with nothing waiting?"""
        return not self.in_flight and not self.waiting

    def delivered(self, seq: int) -> bool:
        """Has the peer acknowledged packet number `seq` (a number send() returned)?"""
        return seq < self.base()  # everything below the window's left edge has arrived

    def buffered_bytes(self) -> int:
        """Return the payload bytes this channel holds: in flight, waiting, or held for a gap."""
        entries = [*self.in_flight.values(), *self.waiting]
        return sum(len(entry.body.plain) for entry in entries) + sum(len(p.payload) for p in self.held.values())

    def on_acknowledgement(self, cumulative: int, bitmap: int, now: float) -> None:
        """Mark what the peer acknowledged as delivered; count what overtook what is missing."""
        done = []
        for seq in self.in_flight:  # oldest first: the cumulative part is at the front
            if seq > cumulative:
                break
            done.append(seq)
        if bitmap:
            done += [seq for seq in self.in_flight if seq > cumulative and acknowledged(seq, cumulative, bitmap)]
        if not done:
            return
        orders = []  # when each packet now confirmed was sent, in transmissions
        for seq in done:
            entry = self.in_flight.pop(seq)
            orders.append(entry.order)
            if entry.sends == 1:  # Karn's rule: only unambiguous round trips count
                self.rto.observe(now - entry.sent_at)
        self.congestion_window = min(self.window, self.congestion_window + len(done))
        if bitmap:  # a gap: what is still missing may have been overtaken
            self.highest_sacked = max(self.highest_sacked, cumulative + 1 + bitmap.bit_length())
            self.count_overtaking(sorted(orders), now)

    def count_overtaking(self, orders: list[int], now: float) -> None:
        """Count, for each packet still missing, the confirmed packets that were sent after it.

        Packets, not acknowledgements, as RFC 6675 counts: one ACK may confirm twenty.
        """
        for entry in self.in_flight.values():
            before = entry.passed
            entry.passed += len(orders) - bisect.bisect_right(orders, entry.order)
            if before < self.FAST_RETRANSMIT_AFTER <= entry.passed:
                entry.deadline = self.timer_at = now  # lost, not late: poll() sends it again now
                self.stats["fast retransmits"] += 1

    # --- Receiving half ---

    def receive(self, packet: Packet, now: float) -> tuple[str, list[Packet]]:
        """Take a packet from the peer; return what happened to it and what is now deliverable.

        Its acknowledgement fields are read first. A packet numbered 0 is not on the
        channel (an ACK, or an answer to a stranger's request) and is delivered at once.
        """
        self.on_acknowledgement(packet.ack, packet.sack, now)
        seq = packet.seq
        if seq == 0:
            return "unsequenced", [packet]
        if seq < self.expected or seq in self.held:
            self.stats["duplicates"] += 1
            self.ack_due = now  # the acknowledgement that covered it was lost: repeat it
            return "duplicate", []
        if seq >= self.expected + self.window:
            self.stats["outside the window"] += 1
            return "outside the window", []
        self.held[seq] = packet
        ready = []
        while self.expected in self.held:
            ready.append(self.held.pop(self.expected))
            self.expected += 1
        self.unacked += 1
        if len(ready) != 1 or self.held or self.unacked >= self.ack_every:
            self.ack_due = now  # a gap opened or filled, or enough have come: tell the peer now
        else:
            self.ack_due = min(self.ack_due, now + self.ack_delay)
        return ("in order" if ready else "held: a gap before it"), ready

    def acknowledgement(self) -> tuple[int, int]:
        """Return (cumulative, bitmap): what to tell the peer we have."""
        cumulative = self.expected - 1
        return cumulative, sack_bitmap(cumulative, self.held)

    # --- Time: what to send now ---

    def poll(self, now: float) -> list[bytes]:
        """Return the datagrams to send now: retransmissions, new packets, or a bare ACK."""
        if self.failed:
            return []
        timers_ran = self.timer_at <= now
        out = [self.transmit(seq, entry, now) for seq, entry in self.expired(now)] if timers_ran else []
        if self.failed:
            return []  # the peer is gone: nothing new goes out either
        while self.has_room():
            entry = self.waiting.popleft()
            self.in_flight[self.next_seq] = entry
            out.append(self.transmit(self.next_seq, entry, now))
            self.next_seq += 1
        if self.ack_due <= now and not out:
            cumulative, bitmap = self.acknowledgement()
            ack = Packet(PacketType.ACK, 0, cumulative, bitmap, self.token, self.flags)
            out.append(encode_packet(ack, self.cipher))
            self.stats["bare acks"] += 1
        if out:
            self.unacked, self.ack_due = 0, float("inf")  # every datagram carried the acknowledgement
        if out or timers_ran:
            self.timer_at = min((entry.deadline for entry in self.in_flight.values()), default=float("inf"))
        return [data for data in out if data is not None]

    def expired(self, now: float) -> list[tuple[int, InFlight]]:
        """Return the packets in flight whose timers fired, counting a timeout for each."""
        due = [(seq, entry) for seq, entry in self.in_flight.items() if entry.deadline <= now]
        congested = False
        for seq, entry in due:
            if entry.passed < self.FAST_RETRANSMIT_AFTER:
                entry.timeouts += 1  # a fast retransmit is not a timeout: no backoff
                # Silence with no sign of a gap beyond it: a burst of loss, or a peer that
                # cannot keep up. A packet the peer reported missing is random loss.
                congested |= seq > self.highest_sacked
            entry.passed = 0
        if congested:  # slow down
            self.congestion_window = max(self.MIN_CONGESTION_WINDOW, self.congestion_window // 2)
        return due

    def transmit(self, seq: int, entry: InFlight, now: float) -> bytes | None:
        """Return the datagram for packet `seq`, and start its timer; None if we give up."""
        if entry.sends >= self.max_sends:
            self.failed = True
            return None
        flags = self.flags | (FLAG_RETRANSMIT if entry.sends else 0)
        self.stats["retransmitted" if entry.sends else "sent"] += 1
        entry.sends += 1
        self.transmissions += 1
        entry.order = self.transmissions
        entry.sent_at = now
        missing = entry.sends > 1 and seq < self.highest_sacked  # known to be missing at the peer
        entry.deadline = now + (self.rto.gap_timeout if missing else self.rto.timeout)(entry.timeouts)
        cumulative, bitmap = self.acknowledgement()
        packet = Packet(entry.ptype, seq, cumulative, bitmap, self.token, flags)
        return encode_packet(packet, self.cipher, entry.body)

    def has_room(self) -> bool:
        """May a waiting packet go now? Both windows must have room for it."""
        return bool(self.waiting) and self.next_seq < self.base() + min(self.window, self.congestion_window)

    def base(self) -> int:
        """Return the oldest unacknowledged number (the window's left edge)."""
        return next(iter(self.in_flight), self.next_seq)

    def next_wakeup(self) -> float:
        """Return the time poll() next has work to do (inf: nothing until a packet comes)."""
        if self.failed:
            return float("inf")
        if self.has_room():
            return 0.0  # a waiting packet may go: now
        return min(self.timer_at, self.ack_due)  # timer_at may be early (acknowledged since): harmless


# === 4. A lossy network, for teaching and testing ====================================


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


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """Add the options both ends take: the toy cipher they must agree on, and simulated loss."""
    parser.add_argument("--cipher", choices=CIPHER_NAMES, default=DEFAULT_CIPHER,
                        help="toy cipher for packet payloads; server and clients must use the same "
                             "(default: %(default)s)")
    parser.add_argument("--key", help="cipher key; server and clients must use the same "
                                      "(default: the cipher's built-in key)")
    parser.add_argument("--loss", type=loss_share, default=0.0,
                        help="simulate a lossy network: drop this share of datagrams in and out, e.g. 0.3")
    parser.add_argument("--seed", type=int, help="random seed for --loss, to drop the same datagrams each run")


def loss_share(text: str) -> float:
    """Read --loss: a share of datagrams, at least 0 and below 1 (1 would drop everything)."""
    share = float(text)  # argparse turns a ValueError into "invalid loss_share value"
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return share


def port_number(text: str) -> int:
    """Read --port: a UDP port, a whole number from 1 to 65535 (the header field has 16 bits)."""
    if not (whole_number(text) and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 65535")
    return int(text)


# === 5. The local network ============================================================


class Interface(typing.NamedTuple):
    """One IPv4 address of this machine, and the network it is on."""

    name: str  # "eth0", "wlan0"; "?" where the system does not say
    address: str  # "192.168.1.10": what other PCs type to reach this one
    netmask: str  # "255.255.255.0": the bits of the address that name the network
    broadcast: str  # "192.168.1.255": a datagram sent here reaches every host on that network; "" if none


# A datagram to 255.255.255.255 reaches every host on the link it leaves by, and no router
# forwards it. A network's own broadcast address (its host bits all ones) works the same way.
LIMITED_BROADCAST = "255.255.255.255"
# Where the system does not tell the netmask: the /24 of most lab, office and home networks.
ASSUMED_NETMASK = "255.255.255.0"
# Linux's requests for an interface's settings (<linux/sockios.h>) and its flags (<net/if.h>).
SIOCGIFFLAGS, SIOCGIFADDR, SIOCGIFBRDADDR, SIOCGIFNETMASK = 0x8913, 0x8915, 0x8919, 0x891B
IFF_UP, IFF_BROADCAST, IFF_LOOPBACK = 0x1, 0x2, 0x8
IFREQ = struct.Struct("16s24x")  # struct ifreq: the interface's name, then room for the kernel's answer


def local_interfaces() -> list[Interface]:
    """Return this machine's IPv4 interfaces that are up, loopback left out.

    Read from the machine itself, never learned from the network, so it works on a lab
    network with no default route and no Internet. On Linux the kernel is asked, interface
    by interface; elsewhere (Windows, macOS) the addresses the host's own name resolves to
    are taken, each assumed to be on a /24 network.
    """
    found = linux_interfaces() if sys.platform.startswith("linux") and fcntl is not None else []
    return found or guessed_interfaces()


def linux_interfaces() -> list[Interface]:
    """Ask the Linux kernel for each interface's flags, address, netmask and broadcast address."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # the kernel wants a socket; nothing is sent
        for _, name in socket.if_nameindex():
            try:
                flags = struct.unpack_from("H", ask_interface(sock, SIOCGIFFLAGS, name))[0]
                if not flags & IFF_UP or flags & IFF_LOOPBACK:
                    continue
                address, netmask, broadcast = (socket.inet_ntoa(ask_interface(sock, request, name)[4:8])
                                               for request in (SIOCGIFADDR, SIOCGIFNETMASK, SIOCGIFBRDADDR))
            except OSError:  # no IPv4 address on it (EADDRNOTAVAIL), or it went away meanwhile
                continue
            if not flags & IFF_BROADCAST:  # a point-to-point link (a VPN): nobody else to reach
                broadcast = ""
            elif broadcast == "0.0.0.0":  # set up without one (`ip addr add` without `brd +`)
                broadcast = broadcast_of(address, netmask)
            found.append(Interface(name, address, netmask, broadcast))
    return found


def ask_interface(sock: socket.socket, request: int, name: str) -> bytes:
    """Return what the kernel answers about interface `name`: a struct ifreq past its name."""
    return fcntl.ioctl(sock.fileno(), request, IFREQ.pack(name.encode()[:15]))[16:]


def guessed_interfaces() -> list[Interface]:
    """Where the system cannot be asked: this host's IPv4 addresses, each on an assumed /24."""
    addresses = {routed_address()}
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_DGRAM)
        addresses.update(info[4][0] for info in infos)
    except (OSError, UnicodeError):  # a host name that does not resolve, or cannot be encoded
        pass
    usable = sorted((address for address in addresses if address and not address.startswith(("127.", "0."))),
                    key=socket.inet_aton)
    return [Interface("?", address, ASSUMED_NETMASK, broadcast_of(address, ASSUMED_NETMASK)) for address in usable]


def routed_address() -> str:
    """Return the address of the interface a default route leaves by ("" if there is none).

    connect() on a UDP socket sends nothing: it only makes the system choose the
    interface it would send through, whose address getsockname() then tells.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            return probe.getsockname()[0]
        except OSError:  # no route at all
            return ""


def broadcast_of(address: str, netmask: str) -> str:
    """Return the broadcast address of `address`'s network: its host bits all set to one."""
    host_bits = ~int.from_bytes(socket.inet_aton(netmask), "big") & 0xFFFFFFFF
    if host_bits <= 1:  # a /31 or /32 has no broadcast address
        return ""
    network = int.from_bytes(socket.inet_aton(address), "big")
    return socket.inet_ntoa((network | host_bits).to_bytes(4, "big"))


# === 6. Waking a loop ================================================================


class WakeUp:
    """A way for any thread to wake a loop that sleeps in select().

    select() waits on sockets only (on Windows, not even on pipes). So the loop also
    waits on one end of a connected pair of sockets, and `wake()` sends a byte into the
    other end: a classic trick. The server's loop is woken so by its password worker, the
    client's network thread by whoever queues a request.
    """

    def __init__(self):
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)  # a full pair means the loop is woken already: never wait for it

    def wake(self) -> None:
        try:
            self.writer.send(b"!")
        except OSError:
            pass  # the loop is closing, or woken many times over already: nobody needs more

    def drain(self) -> None:
        """Empty the pair, so that select() sleeps again until the next wake()."""
        try:
            while self.reader.recv(1024):
                pass
        except OSError:  # BlockingIOError: nothing more to read
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
