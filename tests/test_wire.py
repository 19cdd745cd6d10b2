"""The wire format, the toy ciphers and the RTO estimator: pure functions, no sockets."""

import binascii
import re
import struct

import pytest

from encryption_helper import (
    HEADER_FORMAT,
    HEADER_SIZE,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    NO_TOKEN,
    CaesarCipher,
    LossySocket,
    NoCipher,
    Packet,
    PacketError,
    PacketType,
    RtoEstimator,
    XorCipher,
    decode_packet,
    describe_datagram,
    encode_packet,
    make_cipher,
    pack_fields,
    peek_type_name,
    unpack_fields,
)

XOR = make_cipher("xor")
SAY = Packet(PacketType.SAY, seq=7, ack=3, token=b"12345678", flags=1, payload=pack_fields("hi :)"))


def test_header_is_28_bytes_in_network_byte_order():
    assert HEADER_SIZE == struct.calcsize(HEADER_FORMAT) == 28
    data = encode_packet(SAY, NoCipher())
    assert data[:2] == b"UC" and data[2] == 1 and data[3] == PacketType.SAY
    assert data[4:6] == b"\x00\x01"  # flags
    assert data[6:8] == b"\x00\x07"  # payload length
    assert data[8:12] == b"\x00\x00\x00\x07"  # seq, big-endian
    assert data[12:16] == b"\x00\x00\x00\x03"  # ack
    assert data[16:24] == b"12345678"
    assert data[28:] == b"\x00\x05hi :)"


def test_checksum_is_crc32_of_zeroed_header_and_plain_payload():
    data = encode_packet(SAY, XOR)
    zeroed = data[:24] + bytes(4)
    plain = XOR.decrypt(data[28:])
    assert int.from_bytes(data[24:28], "big") == binascii.crc32(zeroed + plain)


@pytest.mark.parametrize("cipher", ["xor", "caesar", "none"])
def test_round_trip_with_every_cipher(cipher):
    chosen = make_cipher(cipher)
    assert decode_packet(encode_packet(SAY, chosen), chosen) == SAY


def test_only_the_payload_is_scrambled():
    data = encode_packet(SAY, XOR)
    assert data[:24] == encode_packet(SAY, NoCipher())[:24]
    assert b"hi :)" not in data


def test_largest_packet_fits_the_datagram_limit():
    biggest = Packet(PacketType.SAY, payload=bytes(MAX_PAYLOAD))
    assert len(encode_packet(biggest, XOR)) == MAX_DATAGRAM == 1200
    with pytest.raises(ValueError):
        encode_packet(Packet(PacketType.SAY, payload=bytes(MAX_PAYLOAD + 1)), XOR)


def flip_bit(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1:]


MALFORMED = {
    "empty": b"",
    "shorter than a header": encode_packet(SAY, XOR)[:27],
    "over 1200 bytes": encode_packet(SAY, XOR) + bytes(1200),
    "wrong magic": b"XX" + encode_packet(SAY, XOR)[2:],
    "wrong version": encode_packet(SAY, XOR)[:2] + b"\x09" + encode_packet(SAY, XOR)[3:],
    "length field too big": encode_packet(SAY, XOR)[:6] + b"\x00\x08" + encode_packet(SAY, XOR)[8:],
    "length field too small": encode_packet(SAY, XOR)[:6] + b"\x00\x06" + encode_packet(SAY, XOR)[8:],
    "payload bit flipped": flip_bit(encode_packet(SAY, XOR), 30),
    "seq bit flipped": flip_bit(encode_packet(SAY, XOR), 11),
    "token bit flipped": flip_bit(encode_packet(SAY, XOR), 20),
    "checksum bit flipped": flip_bit(encode_packet(SAY, XOR), 27),
    "unknown type": b"UC\x01\x63" + encode_packet(Packet(PacketType.OK), XOR)[4:],
    "text, not a packet": b"alice:hello",
    "random bytes": bytes(range(256)),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_datagram_raises_packet_error(name):
    with pytest.raises(PacketError):
        decode_packet(MALFORMED[name], XOR)


def test_unknown_type_is_caught_after_the_checksum():
    header = struct.pack(HEADER_FORMAT, b"UC", 1, 99, 0, 0, 0, 0, NO_TOKEN, 0)
    data = header[:-4] + binascii.crc32(header).to_bytes(4, "big")
    with pytest.raises(PacketError, match="unknown packet type 99"):
        decode_packet(data, XOR)


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


@pytest.mark.parametrize("name, key", [("caesar", "0"), ("caesar", "256"), ("caesar", "x"), ("xor", ""), ("rot", "1")])
def test_bad_cipher_settings_are_refused(name, key):
    with pytest.raises(ValueError):
        make_cipher(name, key)


def test_default_keys_let_both_ends_agree():
    for name in ("xor", "caesar", "none"):
        assert decode_packet(encode_packet(SAY, make_cipher(name)), make_cipher(name)) == SAY


def test_peek_and_describe_read_the_header_only():
    data = encode_packet(SAY, XOR)
    assert peek_type_name(data) == "SAY"
    assert describe_datagram(data) == "SAY seq=7 ack=3 35 B retransmitted"
    assert peek_type_name(b"junk") == "?"
    assert describe_datagram(b"junk") == "? 4 B"


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


def test_rto_backs_off_exponentially_up_to_the_ceiling():
    rto = RtoEstimator(initial=0.25, floor=0.2, ceiling=5.0)
    assert [rto.timeout(attempt) for attempt in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]
    assert rto.timeout(1000) == 5.0


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


def test_the_datagram_shown_in_the_docstrings_is_real():
    import client
    import server

    packet = Packet(PacketType.SAY, seq=7, token=bytes.fromhex("3e1a2c5e5e779012"), payload=pack_fields("hi :)"))
    for module in (server, client):
        hex_lines = re.findall(r"^    ((?:[0-9a-f]{2} )*[0-9a-f]{2})  ", module.__doc__, re.MULTILINE)
        assert bytes.fromhex(" ".join(hex_lines)) == encode_packet(packet, XOR)
