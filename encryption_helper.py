"""What the chat server and client must agree on, byte for byte, defined once.

Both `server.py` and `client.py` import this module, and the project allows no other
module: so the wire lives here, in four sections: 1. toy ciphers; 2. the packet format;
3. the reliable channel; 4. lab tools. One packet per UDP datagram: a 32-byte header in
network byte order (big-endian), then the payload, which alone is scrambled (the header
stays readable, as IP and UDP headers do).

    bytes  field (docs/PROTOCOL.md draws it)
    0-1    magic "UC" (0x55 0x43): a datagram that does not start so is not ours
    2      version (6)
    3      type (PacketType)
    4-5    flags (FLAG_...)
    6-7    payload length
    8-11   sequence number (0: not on the reliable channel)
    12-15  acknowledgement: every number up to this one has arrived
    16-19  selective acknowledgement bitmap: bit i set = number ack + 2 + i arrived
    20-27  session token
    28-31  CRC-32 of the plain payload, then of the header with this field zero
    32-    payload: length-prefixed fields, scrambled
    then   in a session, with FLAG_TAGGED: a 16-byte tag, HMAC-SHA256 of all before it

A payload is a run of fields, each a 2-byte length and that many bytes of UTF-8, so any
text survives and nothing needs escaping: a SAY of "hi :)" ends in `00 05 68 69 20 3a 29`.
The CRC covers the payload before scrambling, so a wrong key shows as a bad checksum, not
as garbage. docs/PROTOCOL.md gives every packet and its answers, RELIABILITY.md the channel.
"""

import argparse
import binascii
import bisect
import collections
import dataclasses
import enum
import functools
import hashlib
import hmac
import random
import re
import secrets
import struct

# === 1. Toy ciphers ===============================================================


class XorCipher:
    """Repeating-key XOR - a TEACHING TOY (real systems use TLS), broken by one known plaintext."""

    def __init__(self, key: bytes):
        if not key:
            raise ValueError("the xor cipher needs a non-empty key")
        # The key stream for the largest datagram, made once: byte i meets key byte i mod len(key).
        self.stream = (key * (65535 // len(key) + 1))[:65535]

    # Payload and key stream XORed as two big integers: one C-level step, not a loop.
    def encrypt(self, data: bytes) -> bytes:
        mixed = int.from_bytes(data, "big") ^ int.from_bytes(self.stream[: len(data)], "big")
        return mixed.to_bytes(len(data), "big")

    # XOR undoes itself: (b ^ k) ^ k == b.
    decrypt = encrypt


class CaesarCipher:
    """Caesar's shift on bytes - a TEACHING TOY, broken by trying all 255 shifts."""

    # Byte b becomes (b + shift) mod 256 through a table: one C-level call per payload. A shift
    # of 0 is cipher "none": the payload as it is, handy for reading packet captures.
    def __init__(self, shift: int):
        self.forward = bytes((b + shift) % 256 for b in range(256))
        self.backward = bytes((b - shift) % 256 for b in range(256))

    def encrypt(self, data: bytes) -> bytes:
        return data.translate(self.forward)

    def decrypt(self, data: bytes) -> bytes:
        return data.translate(self.backward)


# Default keys, so that both scripts work out of the box: known to all, they protect nothing.
DEFAULT_KEYS = {"xor": "II2120", "caesar": "3", "none": ""}
CIPHER_NAMES = tuple(DEFAULT_KEYS)
DEFAULT_CIPHER = "xor"


def make_cipher(name: str, key: str | None = None):
    """Return the (toy) cipher called `name` with `key` (its default key when None)."""
    key = DEFAULT_KEYS.get(name, "") if key is None else key
    if name == "xor":
        return XorCipher(key.encode("utf-8"))
    if name == "caesar":
        if not (whole_number(key.strip()) and 1 <= int(key) <= 255):
            raise ValueError(f"the caesar key must be a whole number from 1 to 255, not {key!r}")
        return CaesarCipher(int(key))
    if name == "none":
        return CaesarCipher(0)
    raise ValueError(f"unknown cipher {name!r}; choose one of {', '.join(CIPHER_NAMES)}")


# === 1b. Logging in without sending the password: SRP-6a ==========================

# SRP-6a (RFC 2945; RFC 5054's group and PAD). The server keeps v = g^x mod N, x a slow salted
# hash of name and password (auth.py): v cannot log in, and a guess costs the slow hash. A = g^a,
# B = k*v + g^b: both ends reach S = g^(b*(a + u*x)), never sent. M1 proves the password, M2 the
# verifier; A, B, M1, M2 test no guess offline, a fake server gets one guess per login; an A or B
# of 0 mod N (S known) is refused. NOT protected: making an account (a fake server gets v).

# RFC 5054 appendix A's 2048-bit group (N = 2q + 1, q prime; g = 2); k = H(N | PAD(g)).
SRP_N = int(
    "AC6BDB41324A9A9BF166DE5E1389582FAF72B6651987EE07FC3192943DB56050A37329CBB4A099ED8193E075"
    "7767A13DD52312AB4B03310DCD7F48A9DA04FD50E8083969EDB767B0CF6095179A163AB3661A05FBD5FAAAE8"
    "2918A9962F0B93B855F97993EC975EEAA80D740ADBF4FF747359D041D5C33EA71D281E446B14773BCA97B43A"
    "23FB801676BD207A436C6481F1D2B9078717461A5B9D32E688F87748544523B524B0D57D5EA77A2775D2ECFA"
    "032CFBDBF52FB3786160279004E57AE6AF874E7303CE53299CCC041C7BC308D82A5698F3A8D0C38271AE35F8"
    "E9DBFBB694B5C803D89F7AE435DE236D525F54759B65E372FCD68EF20FA7111F9E4AFF73", 16)
SRP_G, SRP_HASH = 2, "sha256"
SRP_K = int("05B9E8EF059C6B32EA59FC1D322D37F04AA30BAE5AA9003B8321E21DDB04E300", 16)
# A session's packets carry HMAC-SHA256 cut to 16 bytes: a forgery passes once in 2^128.
TAG_BYTES = 16


def srp_hash(*parts: bytes | int) -> bytes:
    """H(part | part ...), each number padded to the length of N (RFC 5054's PAD)."""
    size = (SRP_N.bit_length() + 7) // 8
    data = b"".join(p.to_bytes(size, "big") if isinstance(p, int) else p for p in parts)
    return hashlib.new(SRP_HASH, data).digest()


def srp_client(x: int, a: int, A: int, B: int) -> int:
    """Return S = (B - k*g^x)^(a + u*x), where A = g^a and u = H(A | B)."""
    u = int.from_bytes(srp_hash(A, B), "big")
    return pow(B - SRP_K * pow(SRP_G, x, SRP_N), a + u * x, SRP_N)


def srp_server(v: int, b: int, A: int) -> tuple[int, int]:
    """Return B = k*v + g^b and S = (A * v^u)^b: the client's S if its x made v."""
    B = (SRP_K * v + pow(SRP_G, b, SRP_N)) % SRP_N
    u = int.from_bytes(srp_hash(A, B), "big")
    return B, pow(A * pow(v, u, SRP_N), b, SRP_N)


def srp_proofs(name: str, salt: bytes, A: int, B: int, S: int) -> tuple[bytes, bytes, bytes]:
    """Return K = H(S), M1 = H(H(name) | salt | A | B | K) and M2 = H(A | M1 | K)."""
    if A % SRP_N == 0 or B % SRP_N == 0:
        raise ValueError("refused: A or B is 0 mod N")
    K = srp_hash(S)
    M1 = srp_hash(srp_hash(name.lower().encode()), salt, A, B, K)
    return K, M1, srp_hash(A, M1, K)


# HMAC (RFC 2104) is H((key ^ opad) | H((key ^ ipad) | data)). Each padded key fills one
# 64-byte block of SHA-256, so both hashes can be begun once per key, as the RFC's section 4
# suggests: a packet then costs two short hashes and no setup - the tag is the same.
@functools.lru_cache(maxsize=4096)
def hmac_begun(key: bytes) -> tuple:
    """Return SHA-256 begun on key ^ ipad and on key ^ opad (the key made one block)."""
    block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    return tuple(hashlib.sha256(bytes(b ^ pad for b in block)) for pad in (0x36, 0x5C))


def session_tag(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of `data` under the session key, cut to TAG_BYTES."""
    inner, outer = hmac_begun(key)
    inner = inner.copy()
    inner.update(data)
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.digest()[:TAG_BYTES]


# What a session's K gives both ends: the key JOIN's room password is sealed with, and one
# tag key per direction (a packet cannot be sent back to its sender).
SessionKeys = collections.namedtuple("SessionKeys", "seal to_server to_client")


def session_keys(K: bytes) -> SessionKeys:
    """The session's keys from SRP-6a's K, made here so that both ends make the same."""
    return SessionKeys(srp_hash(b"seal", K), srp_hash(b"tag: client to server", K),
                       srp_hash(b"tag: server to client", K))


def tag_matches(key: bytes, data: bytes, tag: bytes) -> bool:
    """Compared in constant time: how long it takes tells no byte of the right tag."""
    return hmac.compare_digest(session_tag(key, data), tag)


def tagged_by(data: bytes, key: bytes) -> bool:
    """Does datagram `data` end in the right tag under `key`? Only the two ends know the
    key (from K): a classmate who read the token off the wire still cannot forge a packet."""
    flags = int.from_bytes(data[4:6], "big") if len(data) >= HEADER_SIZE + TAG_BYTES else 0
    return bool(flags & FLAG_TAGGED) and tag_matches(key, data[:-TAG_BYTES], data[-TAG_BYTES:])


def fingerprint(Y: int) -> str:
    """The server key Y's fingerprint, 4 groups of 4 hex digits: short to compare by eye."""
    digits = srp_hash(Y)[:8].hex()
    return "-".join(digits[i:i + 4] for i in range(0, 16, 4))


def register_tag(Z: int, fields: list[str]) -> str:
    """The tag of a REGISTER, or of its answer: only the client (a) and server (y) know Z."""
    return session_tag(srp_hash(b"register", Z), pack_fields(*fields)).hex()


def seal(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """XOR `data` with SHAKE-256 of key and nonce, a pad never used twice; it undoes itself."""
    pad = hashlib.shake_256(key + nonce).digest(len(data))
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def seal_text(key: bytes, text: str) -> str:
    """Return `text` sealed under a session's key, in hex: 16 random bytes of nonce, then it."""
    nonce = secrets.token_bytes(16)
    return (nonce + seal(key, nonce, text.encode("utf-8"))).hex()


def open_text(key: bytes, sealed: str) -> str:
    """Return the text that seal_text sealed; PacketError if it cannot be one."""
    if not re.fullmatch(r"([0-9a-f]{2}){16,}", sealed):
        raise PacketError("a sealed field must be hex: a 16-byte nonce, then the sealed text")
    data = bytes.fromhex(sealed)
    try:
        return seal(key, data[:16], data[16:]).decode("utf-8")
    except UnicodeDecodeError:
        raise PacketError("a sealed field did not open: another session's key?") from None


# === 2. The packet format =========================================================

# The header of the table above; "!" is network byte order.
HEADER_FORMAT = "!2sBBHHIII8sI"
HEADER = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = HEADER.size
MAGIC = b"UC"
VERSION = 6
# With the header and a session's tag, 1216 bytes; with IPv6's and UDP's headers 1264, within
# the 1280 that every IPv6 link carries: never split into IP fragments (QUIC keeps 1200).
MAX_PAYLOAD = 1168
MAX_DATAGRAM = HEADER_SIZE + MAX_PAYLOAD + TAG_BYTES
# recvfrom() needs room for any UDP datagram: less raises WinError 10040, or Linux cuts it.
RECV_BUFFER = 65535
# A message's text, in UTF-8 bytes: room is left for the other fields of its EVENT.
MAX_TEXT_BYTES = 1000
# The room every member enters first; its password is the server's --room-password.
LOBBY = "lobby"
Address = tuple[str, int]
NO_TOKEN = bytes(8)
# Set on a packet sent again, so that a trace can mark it; a receiver ignores it.
FLAG_RETRANSMIT = 0x0001
# On every packet of a session's file stream, its second channel: a chat line never waits
# behind a lost file chunk.
FLAG_FILE_STREAM = 0x0002
# A tag follows the payload (the length field counts the payload alone): a session's packets.
FLAG_TAGGED = 0x0004
# A HELLO or FIND, whose source may be forged, is padded to at least the size of the answer
# (HELLO's carries the server's key Y): nobody can use the server as an amplifier.
MIN_HELLO_SIZE, MIN_FIND_SIZE = 640, 160


class PacketType(enum.IntEnum):
    """What a packet asks or tells. OK and ERROR answer a request and name it (field `re`)."""

    # The handshake, before a session: HELLO [padding] -> OK [re, cookie, iterations];
    # REGISTER [cookie, username, salt, iterations, v]; LOGIN [cookie, username, A] -> OK [re,
    # salt, iterations, B], then LOGIN [.., A, M1] -> OK [re, .., M2] with the session token.
    HELLO, REGISTER, LOGIN = 1, 2, 3
    # A member's requests: JOIN [room, password], SAY [text], PRIVATE [user, text],
    # ROOMS [] and WHO [] (lists), PING [] (the heartbeat), BYE [] (the session ends).
    JOIN, SAY, PRIVATE, ROOMS, WHO, PING, BYE = 4, 5, 6, 7, 8, 9, 10
    # ACK: nothing but the acknowledgement fields. FIND, often broadcast: "which chat
    # servers are here?" -> OK [re, name, port, online].
    ACK, FIND = 11, 12
    # FILE_OFFER [to ('': the room), name, size, SHA-256 hex] -> OK [re, transfer id];
    # FILE_CHUNK, on the file stream, is binary (FILE_CHUNK_HEAD); FILE_CANCEL [id].
    FILE_OFFER, FILE_CHUNK, FILE_CANCEL = 13, 14, 15
    # Only a server sends these: OK [re, ...], ERROR [re, code, text], EVENT [kind, time,
    # room, user, text, ...], RESET [16 bytes, the reset proof] ("I have no session for
    # you", like TCP's RST).
    OK, ERROR, EVENT, RESET = 20, 21, 22, 23


PACKET_TYPES = {member.value: member for member in PacketType}
# A server never answers these, or two servers could answer each other for ever.
SERVER_ONLY = {PacketType.OK, PacketType.ERROR, PacketType.EVENT, PacketType.RESET}


class Refused(Exception):
    """A request turned down, as an ERROR [re, code, text] says it; both ends raise it."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


class PacketError(ValueError):
    """A datagram that is not a valid packet; the message says what is wrong."""


class ChecksumError(PacketError):
    """A datagram damaged on the way - or scrambled with another key than ours."""


# One packet, its payload in plain text (encode and decode scramble and unscramble it).
Packet = collections.namedtuple("Packet", "type seq ack sack token flags payload",
                                defaults=(0, 0, 0, NO_TOKEN, 0, b""))
# A payload made ready once - scrambled, its CRC begun - to send behind many headers.
Body = collections.namedtuple("Body", "plain scrambled crc")


def prepare_body(payload: bytes, cipher) -> Body:
    """Return `payload` scrambled by `cipher`, with the CRC-32 of its plain bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return Body(payload, cipher.encrypt(payload), binascii.crc32(payload))


def encode_packet(packet: Packet, cipher, body: Body | None = None, key: bytes = b"") -> bytes:
    """Return the datagram for `packet`; `body` may carry its payload already prepared; with
    a session's `key`, tagged (FLAG_TAGGED)."""
    body = body or prepare_body(packet.payload, cipher)
    flags = packet.flags & ~FLAG_TAGGED | (FLAG_TAGGED if key else 0)
    header = HEADER.pack(MAGIC, VERSION, packet.type, flags, len(body.plain),
                         packet.seq, packet.ack, packet.sack, packet.token, 0)
    # The payload's CRC, continued over the header with its CRC field zero.
    crc = binascii.crc32(header, body.crc)
    data = header[:-4] + crc.to_bytes(4, "big") + body.scrambled
    return data + session_tag(key, data) if key else data


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
    # The tag is checked by the end that knows the session's key (tagged_by).
    room = len(data) - HEADER_SIZE - (TAG_BYTES if flags & FLAG_TAGGED else 0)
    if length != room:
        raise PacketError(f"length field says {length}, datagram holds {room}")
    if length > MAX_PAYLOAD:
        raise PacketError(f"too long: a payload of {length} bytes, the limit is {MAX_PAYLOAD}")
    payload = cipher.decrypt(data[HEADER_SIZE:HEADER_SIZE + length])
    if binascii.crc32(data[:HEADER_SIZE - 4] + bytes(4), binascii.crc32(payload)) != crc:
        raise ChecksumError("bad checksum: damaged on the way, or the ends use different keys")
    if ptype not in PACKET_TYPES:
        raise PacketError(f"unknown packet type {ptype}")
    return Packet(PACKET_TYPES[ptype], seq, ack, sack, token, flags, payload)


def describe_datagram(data: bytes) -> str:
    """Return a datagram's header in words, for traces: type, seq, ack, size."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        return f"? {len(data)} B"
    _, _, ptype, flags, _, seq, ack, sack, _, _ = HEADER.unpack_from(data)
    name = PACKET_TYPES[ptype].name if ptype in PACKET_TYPES else f"type {ptype}"
    stream = " [file stream]" if flags & FLAG_FILE_STREAM else ""
    sack_text = f" sack={sack:#b}" if sack else ""
    retransmit = " retransmitted" if flags & FLAG_RETRANSMIT else ""
    tagged = " tagged" if flags & FLAG_TAGGED else ""
    return f"{name}{stream} seq={seq} ack={ack}{sack_text} {len(data)} B{tagged}{retransmit}"


def pack_fields(*fields: str) -> bytes:
    """Return the fields as one payload: each a 2-byte length, then its UTF-8 bytes."""
    encoded = [field.encode("utf-8") for field in fields]
    return b"".join(len(data).to_bytes(2, "big") + data for data in encoded)


def unpack_fields(payload: bytes, count: int | None = None) -> list[str]:
    """Return the text fields in `payload`; exactly `count` of them unless count is None."""
    fields, offset = [], 0
    while offset < len(payload):
        if offset + 2 > len(payload):
            raise PacketError("payload ends inside a field's length")
        length = int.from_bytes(payload[offset:offset + 2], "big")
        start, offset = offset + 2, offset + 2 + length
        if offset > len(payload):
            raise PacketError(f"field of {length} bytes runs past the end of the payload")
        fields.append(payload[start:offset])
    if count is not None and len(fields) != count:
        raise PacketError(f"expected {count} fields, got {len(fields)}")
    try:
        return [field.decode("utf-8") for field in fields]
    except UnicodeDecodeError:
        raise PacketError("a field is not valid UTF-8") from None


def oversize_text(text: str) -> str:
    """Return why `text` is too long for one message, or "" if it fits (both ends check)."""
    size = len(text.encode("utf-8"))
    if size <= MAX_TEXT_BYTES:
        return ""
    return f"Message too long ({size} bytes, the limit is {MAX_TEXT_BYTES}); not sent."


# A FILE_CHUNK's payload is binary, not text fields: the transfer's number and the offset
# of the data in the file, 8 bytes each, then up to CHUNK_SIZE bytes of the file.
FILE_CHUNK_HEAD = struct.Struct("!QQ")
CHUNK_SIZE = MAX_PAYLOAD - FILE_CHUNK_HEAD.size
# The EVENTs about files carry fields after the text (docs/PROTOCOL.md, section 7).
FILE_EVENTS = ("file", "file-done", "file-declined", "file-cancelled")
MB = 1 << 20
# Most file systems' limit on a name; a SHA-256 as a FILE_OFFER carries it.
MAX_FILE_NAME_BYTES = 255
SHA_HEX = re.compile(r"[0-9a-f]{64}")
# Chunks kept waiting behind a file stream's window: enough to refill it when ACKs come.
FILL = 32


def pack_chunk(transfer: int, offset: int, data: bytes) -> bytes:
    """Return a FILE_CHUNK's payload: transfer id, offset, then the data."""
    return FILE_CHUNK_HEAD.pack(transfer, offset) + data


def unpack_chunk(payload: bytes) -> tuple[int, int, bytes]:
    """Return (transfer id, offset, data) from a FILE_CHUNK's payload."""
    if len(payload) < FILE_CHUNK_HEAD.size:
        raise PacketError(f"a FILE_CHUNK holds at least {FILE_CHUNK_HEAD.size} bytes, "
                          f"not {len(payload)}")
    transfer, offset = FILE_CHUNK_HEAD.unpack_from(payload)
    return transfer, offset, payload[FILE_CHUNK_HEAD.size:]


def chunk_length(size: int, offset: int) -> int:
    """Return how long the chunk at `offset` is: CHUNK_SIZE, or what is left at the end."""
    return min(CHUNK_SIZE, size - offset)


def describe_size(size: int) -> str:
    """Return a size as people read it: 512 B, 14.2 KB, 2.1 MB."""
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KB" if size < MB else f"{size / MB:.1f} MB"


def whole_number(text: str) -> bool:
    """Is `text` a whole number in ASCII digits? ("²" is a digit to str.isdigit, not to int.)"""
    return text.isascii() and text.isdigit()


# === 3. The reliable channel ======================================================


class RtoEstimator:
    """How long to wait for an acknowledgement before sending again (RFC 6298).

    Round trips measured update a smoothed average (SRTT) and mean deviation (RTTVAR); the
    timeout is SRTT + 4 RTTVAR, plus the time the peer may hold its ACK back (as QUIC adds
    max_ack_delay), times BACKOFF for each timeout of the packet, up to CEILING.
    """

    # RFC 6298's weights of a new sample in SRTT and RTTVAR, and its wait before any sample.
    ALPHA, BETA, INITIAL = 1 / 8, 1 / 4, 1.0
    # RFC 6298's floor is 1 s, for the Internet; here it keeps a timer from racing a LAN
    # round trip. KCP's backoff of 1.5 recovers sooner from random loss (TCP doubles).
    FLOOR, BACKOFF, CEILING = 0.01, 1.5, 2.0
    # The least room kept for variation (QUIC's kGranularity); the least gap_timeout.
    GRANULARITY, GAP_FLOOR = 0.001, 0.002

    def __init__(self, initial: float = INITIAL, floor: float = FLOOR, ceiling: float = CEILING,
                 peer_ack_delay: float = 0.0):
        self.floor, self.ceiling, self.peer_ack_delay = floor, ceiling, peer_ack_delay
        self.srtt, self.rttvar = None, 0.0
        # The timeout, and SRTT + 4 RTTVAR without the room for the peer's delayed ACK.
        self.rto = self.round_trip_wait = min(max(initial, floor), ceiling)

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
        """Return the wait for a packet the peer reported missing: its ACK is never delayed."""
        wait = max(self.round_trip_wait, self.GAP_FLOOR) * self.BACKOFF ** min(timeouts, 32)
        return min(wait, self.timeout(timeouts))


# Delayed ACKs, as TCP's (RFC 1122, 4.2.3.2): a client acknowledges every second packet,
# a lone one ACK_DELAY later, a gap or a copy at once; the server's timers allow for it.
ACK_EVERY, ACK_DELAY = 2, 0.01


def sack_bitmap(cumulative: int, held) -> int:
    """Return the bitmap of the numbers `held`: bit i stands for number cumulative + 2 + i."""
    # cumulative + 1 is, by definition, the one missing; those beyond 32 bits wait their turn.
    bits = [seq - cumulative - 2 for seq in held]
    return sum(1 << bit for bit in bits if 0 <= bit < 32)


def acknowledged(seq: int, cumulative: int, bitmap: int) -> bool:
    """Does an acknowledgement (cumulative, bitmap) say that number `seq` arrived?"""
    bit = seq - cumulative - 2
    return seq <= cumulative or (0 <= bit < 32 and bool(bitmap >> bit & 1))


@dataclasses.dataclass(slots=True)
class InFlight:
    """A packet of the retransmission queue, with its timer and history."""

    ptype: PacketType
    body: Body
    sent_at: float = 0.0
    deadline: float = 0.0
    sends: int = 0
    timeouts: int = 0
    # Its place among all our transmissions; confirmed packets sent after it since.
    order: int = 0
    passed: int = 0


class Channel:
    """A reliable, ordered channel to one peer over UDP: Selective Repeat, both halves.

    `send()` queues a packet, `receive()` takes one from the peer, `poll(now)` returns the
    datagrams to send now, `next_wakeup()` when to poll again. A session has two: the chat's
    and the file stream's. Stop-and-wait is this class with a window of 1. `key`, once
    set, tags every datagram it sends (a session's, FLAG_TAGGED).
    """

    # 32 in flight (the bitmap's bits), 1000 waiting; 20 sends unacknowledged: the peer is
    # gone. Overtaken by 2 packets, one is lost, not late (KCP's "fastresend 2").
    WINDOW, MAX_QUEUE, MAX_SENDS = 32, 1000, 20
    FAST_RETRANSMIT_AFTER, MIN_CONGESTION_WINDOW = 2, 2

    def __init__(self, cipher, token: bytes = NO_TOKEN, *, window: int = WINDOW,
                 max_queue: int = MAX_QUEUE, max_sends: int = MAX_SENDS,
                 rto: RtoEstimator | None = None, ack_delay: float = 0.0, ack_every: int = 1,
                 first_seq: int = 1, flags: int = 0):
        if not 1 <= window <= self.WINDOW:
            raise ValueError(f"the window must be from 1 to {self.WINDOW}")
        self.cipher, self.token, self.flags, self.rto = cipher, token, flags, rto or RtoEstimator()
        self.key = b""
        self.window, self.max_queue, self.max_sends = window, max_queue, max_sends
        self.ack_delay, self.ack_every = ack_delay, ack_every
        # Sending: the retransmission queue by number, oldest first; timer_at, its earliest
        # timer or earlier (a server asks every session's next_wakeup(): it must not scan);
        # highest_sacked, the highest number the peer has beyond a gap: a loss before it is
        # random loss, not a burst.
        self.next_seq, self.failed, self.timer_at = first_seq, False, float("inf")
        self.in_flight: dict[int, InFlight] = {}
        self.waiting: collections.deque[InFlight] = collections.deque()
        self.congestion_window, self.highest_sacked = window, 0
        # Receiving: the next number to deliver, those come early, and the acknowledgement owed.
        self.expected, self.held, self.unacked, self.ack_due = 1, {}, 0, float("inf")
        self.stats = collections.Counter()

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
        return seq < next(iter(self.in_flight), self.next_seq)

    def buffered_bytes(self) -> int:
        """Return the payload bytes held here: in flight, waiting, or held for a gap."""
        sending = sum(len(entry.body.plain) for entry in (*self.in_flight.values(), *self.waiting))
        return sending + sum(len(packet.payload) for packet in self.held.values())

    def poll(self, now: float) -> list[bytes]:
        """Return the datagrams to send now: retransmissions, new packets, or a bare ACK."""
        timers_ran = self.timer_at <= now
        due = self._expired(now) if timers_ran and not self.failed else []
        if self.failed or any(entry.sends >= self.max_sends for _, entry in due):
            self.failed = True
            return []
        out = [self._transmit(seq, entry, now) for seq, entry in due]
        while self._has_room():
            self.in_flight[self.next_seq] = entry = self.waiting.popleft()
            out.append(self._transmit(self.next_seq, entry, now))
            self.next_seq += 1
        if self.ack_due <= now and not out:
            ack = Packet(PacketType.ACK, 0, *self.acknowledgement(), self.token, self.flags)
            out.append(encode_packet(ack, self.cipher, key=self.key))
            self.stats["bare acks"] += 1
        # Every datagram carries the acknowledgement: none is owed any more.
        if out:
            self.unacked, self.ack_due = 0, float("inf")
        if out or timers_ran:
            deadlines = [entry.deadline for entry in self.in_flight.values()]
            self.timer_at = min(deadlines, default=float("inf"))
        return out

    def next_wakeup(self) -> float:
        """Return the time poll() next has work to do (inf: nothing until a packet comes)."""
        if self.failed:
            return float("inf")
        return 0.0 if self._has_room() else min(self.timer_at, self.ack_due)

    def _has_room(self) -> bool:
        """May a waiting packet go now? Both windows must have room for it."""
        limit = next(iter(self.in_flight), self.next_seq) + min(self.window, self.congestion_window)
        return bool(self.waiting) and self.next_seq < limit

    def _expired(self, now: float) -> list[tuple[int, InFlight]]:
        """Return the packets whose timers fired; halve the congestion window if congested."""
        due = [(seq, entry) for seq, entry in self.in_flight.items() if entry.deadline <= now]
        congested = False
        for seq, entry in due:
            # A fast retransmit is not backed off. A timeout with no gap reported beyond it
            # is a burst of loss or a peer that cannot keep up: slow down.
            if entry.passed < self.FAST_RETRANSMIT_AFTER:
                entry.timeouts += 1
                congested |= seq > self.highest_sacked
            entry.passed = 0
        if congested:
            self.congestion_window = max(self.MIN_CONGESTION_WINDOW, self.congestion_window // 2)
        return due

    def _transmit(self, seq: int, entry: InFlight, now: float) -> bytes:
        """Return the datagram for packet `seq` and start its timer."""
        again = entry.sends > 0
        self.stats["retransmitted" if again else "sent"] += 1
        entry.sends += 1
        entry.order, entry.sent_at = self.stats["sent"] + self.stats["retransmitted"], now
        # The peer acknowledges at once what fills a gap: no room for a delayed ACK then.
        wait = self.rto.gap_timeout if again and seq < self.highest_sacked else self.rto.timeout
        entry.deadline = now + wait(entry.timeouts)
        flags = self.flags | (FLAG_RETRANSMIT if again else 0)
        packet = Packet(entry.ptype, seq, *self.acknowledgement(), self.token, flags)
        return encode_packet(packet, self.cipher, entry.body, self.key)

    def _on_acknowledgement(self, cumulative: int, bitmap: int, now: float) -> None:
        """Forget what the peer confirmed; count what overtook each packet it still lacks."""
        confirmed = [seq for seq in self.in_flight if acknowledged(seq, cumulative, bitmap)]
        done = [self.in_flight.pop(seq) for seq in confirmed]
        # Karn's rule: only a packet sent once gives an unambiguous round trip.
        for entry in done:
            if entry.sends == 1:
                self.rto.observe(now - entry.sent_at)
        self.congestion_window = min(self.window, self.congestion_window + len(done))
        if not self.in_flight:
            self.timer_at = float("inf")
        if not (bitmap and done):
            return
        self.highest_sacked = max(self.highest_sacked, cumulative + 1 + bitmap.bit_length())
        # Packets, not ACKs, as RFC 6675 counts: one ACK may confirm twenty.
        orders = sorted(entry.order for entry in done)
        for entry in self.in_flight.values():
            before = entry.passed
            entry.passed += len(orders) - bisect.bisect_right(orders, entry.order)
            # Overtaken FAST_RETRANSMIT_AFTER times, it goes again at the next poll.
            if before < self.FAST_RETRANSMIT_AFTER <= entry.passed:
                entry.deadline = self.timer_at = now
                self.stats["fast retransmits"] += 1

    def receive(self, packet: Packet, now: float) -> tuple[str, list[Packet]]:
        """Take a packet from the peer; return what happened to it and what is now in order."""
        self._on_acknowledgement(packet.ack, packet.sack, now)
        seq = packet.seq
        # Numbered 0, it is on no channel (an ACK, an answer before login): handed back.
        if seq == 0:
            return "unsequenced", [packet]
        # A copy: the acknowledgement that covered it was lost, so repeat it now.
        if seq < self.expected or seq in self.held:
            self.stats["duplicates"] += 1
            self.ack_due = now
            return "duplicate", []
        # The peer never has more than a window in flight: this cannot be genuine.
        if seq >= self.expected + self.window:
            self.stats["outside the window"] += 1
            return "outside the window", []
        self.held[seq] = packet
        ready = []
        while self.expected in self.held:
            ready.append(self.held.pop(self.expected))
            self.expected += 1
        self.unacked += 1
        # A gap opened or filled, or enough have come: the peer is told at once.
        at_once = len(ready) != 1 or self.held or self.unacked >= self.ack_every
        self.ack_due = now if at_once else min(self.ack_due, now + self.ack_delay)
        return ("in order" if ready else "held: a gap before it"), ready

    def acknowledgement(self) -> tuple[int, int]:
        """Return (cumulative, bitmap): what to tell the peer we have."""
        return self.expected - 1, sack_bitmap(self.expected - 1, self.held)


# === 4. Lab tools: a lossy socket, the shared options ============================


class LossySocket:
    """A UDP socket that drops each datagram, in or out, with probability `loss`."""

    def __init__(self, sock, loss: float, seed: int | None = None, on_drop=None, side=""):
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be at least 0 and below 1")
        self.sock, self.loss, self.dropped = sock, loss, 0
        # With a seed, the same datagrams each run; each direction and side its own generator.
        self.randoms = {way: random.Random(None if seed is None else f"{side}/{seed}/{way}")
                        for way in ("in", "out")}
        self.on_drop = on_drop or (lambda direction, data: None)

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def lost(self, direction: str, data: bytes) -> bool:
        """Decide whether this datagram is lost; count and report it if so."""
        if self.randoms[direction].random() >= self.loss:
            return False
        self.dropped += 1
        self.on_drop(direction, data)
        return True

    # A datagram lost on the way out still looks sent to its sender, as on a real network.
    def sendto(self, data: bytes, address) -> int:
        return len(data) if self.lost("out", data) else self.sock.sendto(data, address)

    def send(self, data: bytes) -> int:
        return len(data) if self.lost("out", data) else self.sock.send(data)

    # A datagram lost on the way in is as if it never came: the next one is read.
    def recvfrom(self, size: int):
        while True:
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
    same = "; server and clients must use the same"
    parser.add_argument("--cipher", choices=CIPHER_NAMES, default=DEFAULT_CIPHER,
                        help=f"toy cipher for packet payloads{same} (default: %(default)s)")
    parser.add_argument("--key", help=f"cipher key{same} (default: the cipher's built-in key)")
    parser.add_argument("--loss", type=loss_share, default=0.0, help="simulate a lossy network: "
                        "drop this share of datagrams in and out, e.g. 0.3")
    parser.add_argument("--seed", type=int,
                        help="random seed for --loss, to drop the same datagrams each run")


def loss_share(text: str) -> float:
    """Read --loss: a share of datagrams, at least 0 and below 1 (1 would drop everything)."""
    share = float(text)
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return share


def port_number(text: str) -> int:
    """Read --port: a UDP port, a whole number from 1 to 65535 (the port field has 16 bits)."""
    if not (whole_number(text) and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 65535")
    return int(text)
