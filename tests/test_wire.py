"""The wire format, the toy ciphers and the RTO estimator: pure functions, no sockets."""

import binascii
import re
import struct
from pathlib import Path

import pytest

from encryption_helper import (
    HEADER,
    HEADER_FORMAT,
    HEADER_SIZE,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    NO_TOKEN,
    TAG_BYTES,
    VERSION,
    CaesarCipher,
    LossySocket,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    XorCipher,
    acknowledged,
    decode_packet,
    describe_datagram,
    encode_packet,
    make_cipher,
    pack_fields,
    prepare_body,
    sack_bitmap,
    session_keys,
    tagged_by,
    unpack_fields,
)

ROOT = Path(__file__).resolve().parent.parent
XOR = make_cipher("xor")
SAY = Packet(PacketType.SAY, seq=7, ack=3, sack=0b101, token=b"12345678", flags=1, payload=pack_fields("hi :)"))
# The SAY the docstrings of server.py and client.py show, byte by byte.
DOCUMENTED_SAY = Packet(PacketType.SAY, seq=7, ack=2, token=bytes.fromhex("3e1a2c5e5e779012"),
                        payload=pack_fields("hi :)"))


def forge(version: int = VERSION, ptype: int = PacketType.OK, payload: bytes = b"", cipher=XOR) -> bytes:
    """Return a datagram with any version and type number, and a checksum that matches."""
    header = HEADER.pack(b"UC", version, ptype, 0, len(payload), 0, 0, 0, NO_TOKEN, 0)
    crc = binascii.crc32(header, binascii.crc32(payload))
    return header[:-4] + crc.to_bytes(4, "big") + cipher.encrypt(payload)


def test_header_is_32_bytes_in_network_byte_order():
    assert HEADER_SIZE == struct.calcsize(HEADER_FORMAT) == 32
    data = encode_packet(SAY, make_cipher("none"))  # the payload as it is
    assert data[:2] == b"UC" and data[2] == VERSION == 6 and data[3] == PacketType.SAY
    assert data[4:6] == b"\x00\x01"  # flags
    assert data[6:8] == b"\x00\x07"  # payload length
    assert data[8:12] == b"\x00\x00\x00\x07"  # seq, big-endian
    assert data[12:16] == b"\x00\x00\x00\x03"  # ack
    assert data[16:20] == b"\x00\x00\x00\x05"  # sack
    assert data[20:28] == b"12345678"  # token
    assert data[32:] == b"\x00\x05hi :)"


def test_checksum_is_crc32_of_plain_payload_then_zeroed_header():
    data = encode_packet(SAY, XOR)
    zeroed = data[:28] + bytes(4)
    plain = XOR.decrypt(data[32:])
    crc = int.from_bytes(data[28:32], "big")
    assert crc == binascii.crc32(zeroed, binascii.crc32(plain)) == binascii.crc32(plain + zeroed)
    assert crc != binascii.crc32(zeroed + plain)  # the order matters: payload first


def test_prepared_body_is_the_payload_scrambled_with_the_crc_of_its_plain_bytes():
    body = prepare_body(SAY.payload, XOR)
    assert body.plain == SAY.payload
    assert body.scrambled == XOR.encrypt(SAY.payload) != SAY.payload
    assert body.crc == binascii.crc32(SAY.payload)
    with pytest.raises(ValueError):
        prepare_body(bytes(MAX_PAYLOAD + 1), XOR)


def test_one_prepared_body_serves_many_headers():
    body = prepare_body(SAY.payload, XOR)
    assert encode_packet(SAY, XOR, body) == encode_packet(SAY, XOR)
    for seq, token in ((1, b"aaaaaaaa"), (900, b"bbbbbbbb")):
        packet = SAY._replace(seq=seq, token=token)
        assert decode_packet(encode_packet(packet, XOR, body), XOR) == packet


@pytest.mark.parametrize("cipher", ["xor", "caesar", "none"])
def test_round_trip_with_every_cipher(cipher):
    chosen = make_cipher(cipher)
    assert decode_packet(encode_packet(SAY, chosen), chosen) == SAY


def test_only_the_payload_is_scrambled():
    data = encode_packet(SAY, XOR)
    plain = encode_packet(SAY, make_cipher("none"))
    assert data[:HEADER_SIZE] == plain[:HEADER_SIZE]  # the CRC too: it is of plain bytes
    assert b"hi :)" not in data


def test_largest_packet_fits_the_datagram_limit():
    biggest = Packet(PacketType.SAY, payload=bytes(MAX_PAYLOAD))
    assert len(encode_packet(biggest, XOR)) == MAX_DATAGRAM - TAG_BYTES == 1200
    assert len(encode_packet(biggest, XOR, key=bytes(32))) == MAX_DATAGRAM == 1216  # a session's
    with pytest.raises(ValueError):
        encode_packet(Packet(PacketType.SAY, payload=bytes(MAX_PAYLOAD + 1)), XOR)


KEY = bytes(range(32))


def test_a_tagged_packet_decodes_as_the_same_packet_and_only_its_key_verifies_it():
    data = encode_packet(SAY, XOR, key=KEY)
    assert len(data) == len(encode_packet(SAY, XOR)) + TAG_BYTES
    assert decode_packet(data, XOR) == SAY._replace(flags=SAY.flags | 0x0004)
    assert tagged_by(data, KEY)
    assert not tagged_by(data, bytes(32))  # another session's key
    assert not tagged_by(encode_packet(SAY, XOR), KEY)  # no tag at all
    assert not tagged_by(encode_packet(SAY, XOR) + data[-TAG_BYTES:], KEY)  # a tag without the flag


def test_a_tag_catches_a_flipped_bit_anywhere_even_in_the_token_or_the_tag():
    data = encode_packet(SAY, XOR, key=KEY)
    for position in range(len(data)):
        assert not tagged_by(flip_bit(data, position), KEY), position


def test_an_empty_tagged_packet_verifies():
    """A PING or an ACK: a header and a tag, 48 bytes, nothing between."""
    data = encode_packet(Packet(PacketType.ACK, 0, 5, 0, b"12345678"), XOR, key=KEY)
    assert len(data) == HEADER_SIZE + TAG_BYTES and tagged_by(data, KEY)
    assert decode_packet(data, XOR).payload == b""


def flip_bit(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1:]


GOOD = encode_packet(SAY, XOR)
# Each malformed datagram, and the words of the check that must catch it.
MALFORMED = {
    "empty": (b"", "too short"),
    "shorter than a header": (GOOD[:31], "too short"),
    "over 1216 bytes": (GOOD + bytes(1200), "too long"),
    "an untagged payload over 1168 bytes": (encode_packet(SAY, XOR)[:6] + (1169).to_bytes(2, "big")
                                            + encode_packet(SAY, XOR)[8:HEADER_SIZE] + bytes(1169), "too long"),
    "wrong magic": (b"XX" + GOOD[2:], "not a chat packet"),
    "wrong version": (forge(version=1), "protocol version 1"),
    "length field too big": (GOOD[:6] + b"\x00\x08" + GOOD[8:], "length field says 8"),
    "length field too small": (GOOD[:6] + b"\x00\x06" + GOOD[8:], "length field says 6"),
    "payload bit flipped": (flip_bit(GOOD, 34), "checksum"),
    "seq bit flipped": (flip_bit(GOOD, 11), "checksum"),
    "ack bit flipped": (flip_bit(GOOD, 15), "checksum"),
    "sack bit flipped": (flip_bit(GOOD, 19), "checksum"),
    "token bit flipped": (flip_bit(GOOD, 24), "checksum"),
    "checksum bit flipped": (flip_bit(GOOD, 31), "checksum"),
    "unknown type": (forge(ptype=99), "unknown packet type 99"),
    "text, not a packet": (b"alice:hello", "too short"),
    "random bytes": (bytes(range(256)), "not a chat packet"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_datagram_raises_packet_error(name):
    data, reason = MALFORMED[name]
    with pytest.raises(PacketError, match=reason):
        decode_packet(data, XOR)


def test_the_forged_datagrams_are_valid_but_for_what_they_change():
    assert decode_packet(forge(), XOR) == Packet(PacketType.OK)
    assert decode_packet(forge(payload=pack_fields("0")), XOR).payload == pack_fields("0")


def test_unknown_type_is_caught_after_the_checksum():
    data = forge(ptype=99)
    with pytest.raises(PacketError, match="unknown packet type 99"):
        decode_packet(data, XOR)
    with pytest.raises(PacketError, match="checksum"):  # a damaged one never gets as far
        decode_packet(flip_bit(data, 31), XOR)


def test_wrong_key_fails_the_checksum():
    data = encode_packet(SAY, make_cipher("xor", "another key"))
    with pytest.raises(PacketError, match="checksum"):
        decode_packet(data, XOR)


def test_wrong_cipher_fails_the_checksum():
    with pytest.raises(PacketError, match="checksum"):
        decode_packet(encode_packet(SAY, make_cipher("caesar")), XOR)


@pytest.mark.parametrize("text", ["a:b:c", "x|y", "two words", "line\nbreak", "emoji 🎉🙂", "", "::||", "é" * 100])
def test_fields_round_trip_any_text(text):
    assert unpack_fields(pack_fields("alice", text, "end")) == ["alice", text, "end"]


def test_fields_are_length_prefixed():
    assert pack_fields("hi", "") == b"\x00\x02hi\x00\x00"


@pytest.mark.parametrize("payload", [b"\x00", b"\x00\x05abc", b"\x00\x02\xff\xfe"])
def test_bad_fields_raise_packet_error(payload):
    with pytest.raises(PacketError):
        unpack_fields(payload)


def test_unpack_checks_the_field_count():
    with pytest.raises(PacketError, match="expected 2 fields, got 1"):
        unpack_fields(pack_fields("one"), 2)


def test_xor_known_answer_and_round_trip():
    cipher = XorCipher(b"key")
    assert cipher.encrypt(b"\x00\x00\x00\x00") == b"keyk"
    assert cipher.encrypt(b"ABC") == bytes([0x41 ^ 0x6B, 0x42 ^ 0x65, 0x43 ^ 0x79])
    data = bytes(range(256)) * 4
    assert cipher.decrypt(cipher.encrypt(data)) == data
    assert cipher.encrypt(b"") == b""


def test_xor_keeps_leading_zero_bytes():
    cipher = XorCipher(b"\x00\x00z")
    assert cipher.encrypt(b"\x00\x00\x00") == b"\x00\x00z"


def test_caesar_known_answer_and_round_trip():
    cipher = CaesarCipher(3)
    assert cipher.encrypt(b"abc xyz") == b"def#{|}"
    assert cipher.encrypt(b"\xff") == b"\x02"  # wraps around at 256
    data = bytes(range(256))
    assert cipher.decrypt(cipher.encrypt(data)) == data


@pytest.mark.parametrize("name, key", [("caesar", "0"), ("caesar", "256"), ("caesar", "x"), ("xor", ""), ("rot", "1"),
                                       ("rot", None)])
def test_bad_cipher_settings_are_refused(name, key):
    with pytest.raises(ValueError):
        make_cipher(name, key)


def test_default_keys_let_both_ends_agree():
    for name in ("xor", "caesar", "none"):
        assert decode_packet(encode_packet(SAY, make_cipher(name)), make_cipher(name)) == SAY


def test_describe_reads_the_header_only():
    data = encode_packet(SAY, XOR)
    assert describe_datagram(data) == "SAY seq=7 ack=3 sack=0b101 39 B retransmitted"
    assert describe_datagram(forge(ptype=99)) == "type 99 seq=0 ack=0 32 B"  # even a type it does not know
    assert describe_datagram(flip_bit(data, 31)) == describe_datagram(data)  # nor does it check the CRC
    assert describe_datagram(b"junk") == "? 4 B"


def test_describe_leaves_out_an_empty_sack():
    data = encode_packet(Packet(PacketType.ACK, ack=4), XOR)
    assert describe_datagram(data) == "ACK seq=0 ack=4 32 B"


def test_sack_bit_i_stands_for_number_ack_plus_2_plus_i():
    assert sack_bitmap(1, {3, 4}) == 0b11
    assert sack_bitmap(2, {4, 5, 7}) == 0b1011
    assert sack_bitmap(0, {2, 33, 34}) == 1 << 31 | 1  # 2 and 33 take bits 0 and 31; 34 is beyond them
    assert sack_bitmap(5, set()) == 0
    assert [seq for seq in range(1, 40) if acknowledged(seq, 2, 0b1011)] == [1, 2, 4, 5, 7]
    assert not acknowledged(3, 2, 0xFFFFFFFF)  # ack + 1 is, by definition, the one missing
    assert acknowledged(35, 2, 1 << 31) and not acknowledged(36, 2, 0xFFFFFFFF)


def test_rto_starts_at_one_second_and_follows_rfc_6298():
    rto = RtoEstimator()
    assert rto.timeout() == 1.0
    rto.observe(0.1)  # first sample: SRTT = R, RTTVAR = R/2
    assert rto.srtt == pytest.approx(0.1) and rto.rttvar == pytest.approx(0.05)
    assert rto.rto == pytest.approx(0.3)
    rto.observe(0.3)  # RTTVAR = 3/4 * 0.05 + 1/4 * |0.1 - 0.3|; SRTT = 7/8 * 0.1 + 1/8 * 0.3
    assert rto.rttvar == pytest.approx(0.0875) and rto.srtt == pytest.approx(0.125)
    assert rto.rto == pytest.approx(0.125 + 4 * 0.0875)


def test_rto_has_a_floor_and_a_ceiling():
    rto = RtoEstimator(floor=0.2, ceiling=5.0)
    for _ in range(20):
        rto.observe(0.001)
    assert rto.timeout() == 0.2
    rto.observe(60.0)
    assert rto.timeout() == 5.0


class RecordingSocket:
    """Stands in for a UDP socket: remembers what was sent, returns queued datagrams."""

    def __init__(self, incoming=()):
        self.sent, self.incoming = [], list(incoming)

    def sendto(self, data, address):
        self.sent.append(data)
        return len(data)

    def recvfrom(self, size):
        return self.incoming.pop(0), ("127.0.0.1", 1)


def test_lossy_socket_drops_the_same_share_every_run():
    def run(seed):
        lossy = LossySocket(RecordingSocket(), loss=0.3, seed=seed)
        for number in range(1000):
            lossy.sendto(str(number).encode(), ("127.0.0.1", 1))
        return lossy.sock.sent

    assert run(42) == run(42)
    assert 600 < len(run(42)) < 800  # about 70% get through
    assert run(42) != run(43)


def test_lossy_socket_receive_skips_dropped_datagrams():
    incoming = [str(number).encode() for number in range(200)]
    lossy = LossySocket(RecordingSocket(incoming), loss=0.5, seed=1)
    received = [lossy.recvfrom(100)[0] for _ in range(40)]
    assert received == sorted(set(received), key=incoming.index)  # in order, none twice
    assert lossy.dropped > 0


# A line of a hex dump: bytes in hex (or ".." for a byte left out), one or two spaces apart.
DUMP_LINE = re.compile(r"^ *((?:[0-9a-f]{2}|\.\.)(?: {1,2}(?:[0-9a-f]{2}|\.\.))*)(?: {2,}|$)", re.MULTILINE)


def dumped_bytes(text: str) -> str:
    """Return the bytes of every hex dump line in `text`, one space apart."""
    return " ".join(" ".join(match.split()) for match in DUMP_LINE.findall(text))


def test_the_datagram_shown_in_the_docstrings_is_real():
    import client
    import server

    # Tagged as alice's client tags it in docs/PROTOCOL.md's complete exchange.
    K = bytes.fromhex("c85a02c04d53d32567438ffef37994dcb0a40eb9f0e144f7ac3a8b8145e1d25f")
    expected = encode_packet(DOCUMENTED_SAY, XOR, key=session_keys(K).to_server).hex(" ")
    for module in (server, client):
        assert dumped_bytes(module.__doc__) == expected, f"the SAY in {module.__name__}.py's docstring"
