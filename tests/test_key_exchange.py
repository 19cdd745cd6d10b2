"""SRP-6a login and session tags: RFC 5054's test vector, then whole exchanges between the two ends.

An exchange runs as the chat would: the client sends its name and A; the server answers the
account's salt and iterations and B; the client sends M1; the server, if M1 is right, sends
M2. Each side computes with what it alone holds (the password; the stored verifier).
"""

import hashlib
import hmac
import secrets

import pytest

import auth
import encryption_helper as wire

GROUP = (wire.SRP_N, wire.SRP_G)


def number(text: str) -> int:
    """A number written in hex as the RFC prints it, in groups of 8 digits over lines."""
    return int("".join(text.split()), 16)


# RFC 5054, appendix B: SHA-1 and the 1024-bit group of appendix A.
RFC_N = number("""
    EEAF0AB9 ADB38DD6 9C33F80A FA8FC5E8 60726187 75FF3C0B 9EA2314C 9C256576 D674DF74 96EA81D3
    383B4813 D692C6E0 E0D5D8E2 50B98BE4 8E495C1D 6089DAD1 5DC7D7B4 6154D6B6 CE8EF4AD 69B15D49
    82559B29 7BCF1885 C529F566 660E57EC 68EDBC3C 05726CC0 2FD4CBF4 976EAA9A FD5138FE 8376435B
    9FC61D2F C0EB06E3""")
RFC_SALT = bytes.fromhex("BEB25379D1A8581EB5A727673A2441EE")
RFC_K = number("7556AA04 5AEF2CDD 07ABAF0F 665C3E81 8913186F")
RFC_X = number("94B7555A ABE9127C C58CCF49 93DB6CF8 4D16C124")
RFC_V = number("""
    7E273DE8 696FFC4F 4E337D05 B4B375BE B0DDE156 9E8FA00A 9886D812 9BADA1F1 822223CA 1A605B53
    0E379BA4 729FDC59 F105B478 7E5186F5 C671085A 1447B52A 48CF1970 B4FB6F84 00BBF4CE BFBB1681
    52E08AB5 EA53D15C 1AFF87B2 B9DA6E04 E058AD51 CC72BFC9 033B564E 26480D78 E955A5E2 9E7AB245
    DB2BE315 E2099AFB""")
RFC_a = number("60975527 035CF2AD 1989806F 0407210B C81EDC04 E2762A56 AFD529DD DA2D4393")
RFC_b = number("E487CB59 D31AC550 471E81F0 0F6928E0 1DDA08E9 74A004F4 9E61F5D1 05284D20")
RFC_A = number("""
    61D5E490 F6F1B795 47B0704C 436F523D D0E560F0 C64115BB 72557EC4 4352E890 3211C046 92272D8B
    2D1A5358 A2CF1B6E 0BFCF99F 921530EC 8E393561 79EAE45E 42BA92AE ACED8251 71E1E8B9 AF6D9C03
    E1327F44 BE087EF0 6530E69F 66615261 EEF54073 CA11CF58 58F0EDFD FE15EFEA B349EF5D 76988A36
    72FAC47B 0769447B""")
RFC_B = number("""
    BD0C6151 2C692C0C B6D041FA 01BB152D 4916A1E7 7AF46AE1 05393011 BAF38964 DC46A067 0DD125B9
    5A981652 236F99D9 B681CBF8 7837EC99 6C6DA044 53728610 D0C6DDB5 8B318885 D7D82C7F 8DEB75CE
    7BD4FBAA 37089E6F 9C6059F3 88838E7A 00030B33 1EB76840 910440B1 B27AAEAE EB4012B7 D7665238
    A8E3FB00 4B117B58""")
RFC_U = number("CE38B959 3487DA98 554ED47D 70A7AE5F 462EF019")
RFC_S = number("""
    B0DC82BA BCF30674 AE450C02 87745E79 90A3381F 63B387AA F271A10D 233861E3 59B48220 F7C4693C
    9AE12B0A 6F67809F 0876E2D0 13800D6C 41BB59B6 D5979B5C 00A172B4 A2A5903A 0BDCAF8A 709585EB
    2AFAFA8F 3499B200 210DCC1F 10EB3394 3CD67FC8 8A2F39A4 BE5BEC4E C0A3212D C346D7E4 74B29EDE
    8A469FFE CA686E5A""")


@pytest.fixture
def rfc_group(monkeypatch):
    """The module's SRP constants set to RFC 5054's test group and hash."""
    monkeypatch.setattr(wire, "SRP_N", RFC_N)
    monkeypatch.setattr(wire, "SRP_G", 2)
    monkeypatch.setattr(wire, "SRP_HASH", "sha1")
    monkeypatch.setattr(wire, "SRP_K", RFC_K)


def test_rfc5054_vector_k_u_and_both_premaster_secrets(rfc_group):
    # k = H(N | PAD(g)) and u = H(PAD(A) | PAD(B)), as the RFC pads them.
    assert int.from_bytes(wire.srp_hash(RFC_N, 2), "big") == RFC_K
    assert int.from_bytes(wire.srp_hash(RFC_A, RFC_B), "big") == RFC_U
    # The RFC's own x = SHA1(s | SHA1(I | ":" | P)) (the chat's x is slow: auth.password_key).
    inner = hashlib.sha1(b"alice:password123").digest()
    x = int.from_bytes(hashlib.sha1(RFC_SALT + inner).digest(), "big")
    assert x == RFC_X and pow(2, x, RFC_N) == RFC_V
    assert pow(2, RFC_a, RFC_N) == RFC_A
    assert wire.srp_server(RFC_V, RFC_b, RFC_A) == (RFC_B, RFC_S)
    assert wire.srp_client(RFC_X, RFC_a, RFC_A, RFC_B) == RFC_S


def test_the_2048_bit_group_is_rfc5054s_with_its_multiplier():
    assert wire.SRP_N.bit_length() == 2048 and wire.SRP_G == 2
    assert wire.SRP_N % 2**32 == 0x9E4AFF73 and wire.SRP_N >> 2016 == 0xAC6BDB41
    # Fermat's test, to base 3: N (and q = (N - 1) / 2) pass, as primes do.
    assert pow(3, wire.SRP_N - 1, wire.SRP_N) == 1
    q = (wire.SRP_N - 1) // 2
    assert pow(3, q - 1, q) == 1
    assert int.from_bytes(wire.srp_hash(wire.SRP_N, wire.SRP_G), "big") == wire.SRP_K


def test_numbers_are_padded_to_the_length_of_n():
    assert wire.srp_hash(1) == hashlib.sha256(bytes(255) + b"\x01").digest()
    assert wire.srp_hash(b"\x01") == hashlib.sha256(b"\x01").digest()


def login(record: auth.Record, name: str, password: str, server_verifier: int | None = None):
    """Run one exchange; return (client's K, M1, expected M2) and (server's K, M1, M2)."""
    salt, iterations = bytes.fromhex(record["salt"]), record["iterations"]
    verifier = int(record["verifier"], 16) if server_verifier is None else server_verifier
    a, b = secrets.randbits(256), secrets.randbits(256)
    # Client -> server: name, A.
    A = pow(wire.SRP_G, a, wire.SRP_N)
    # Server -> client: salt, iterations, B (the server's S stays with it).
    B, server_S = wire.srp_server(verifier, b, A)
    # The client's slow hash, then its S.
    x = auth.password_key(name, password, salt, iterations)
    client_S = wire.srp_client(x, a, A, B)
    client = wire.srp_proofs(name, salt, A, B, client_S)
    server = wire.srp_proofs(record["name"], salt, A, B, server_S)
    return client, server


@pytest.fixture(scope="module")
def alice():
    return auth.new_verifier("Alice", "wonderland", GROUP, iterations=1000)


def test_an_exchange_gives_both_ends_the_same_key_and_both_proofs_verify(alice):
    (client_K, client_M1, client_M2), (server_K, server_M1, server_M2) = login(
        alice, "alice", "wonderland")
    assert client_K == server_K and len(client_K) == 32
    # The server checks M1, then the client checks M2.
    assert client_M1 == server_M1
    assert client_M2 == server_M2


def test_keys_differ_from_one_login_to_the_next(alice):
    first, _ = login(alice, "alice", "wonderland")
    second, _ = login(alice, "alice", "wonderland")
    assert first[0] != second[0] and first[1] != second[1]


def test_a_wrong_password_fails_m1(alice):
    (client_K, client_M1, _), (server_K, server_M1, _) = login(alice, "alice", "Wonderland")
    assert client_M1 != server_M1 and client_K != server_K


def test_the_name_is_part_of_x_and_m1(alice):
    (_, client_M1, _), (_, server_M1, _) = login(alice, "bob", "wonderland")
    assert client_M1 != server_M1


def test_a_server_without_the_verifier_cannot_make_m2(alice):
    # A fake server: the right salt and iterations (they are public), any other verifier.
    for fake in (auth.new_verifier("alice", "guess", GROUP, 1000), None):
        verifier = secrets.randbits(2048) % wire.SRP_N if fake is None else int(fake["verifier"], 16)
        (_, _, expected_M2), (_, _, fake_M2) = login(alice, "alice", "wonderland", verifier)
        assert fake_M2 != expected_M2


@pytest.mark.parametrize("bad", [0, wire.SRP_N, 2 * wire.SRP_N])
def test_a_or_b_of_zero_mod_n_is_refused(bad):
    # Such an A would give the server S = 0: a login with no password at all.
    with pytest.raises(ValueError):
        wire.srp_proofs("alice", b"salt", bad, 5, 0)
    with pytest.raises(ValueError):
        wire.srp_proofs("alice", b"salt", 5, bad, 0)


def test_a_tag_is_16_bytes_of_hmac_sha256():
    key, data = secrets.token_bytes(32), b"UC\x04\x05 a datagram"
    tag = wire.session_tag(key, data)
    assert len(tag) == wire.TAG_BYTES == 16
    assert wire.tag_matches(key, data, tag)


@pytest.mark.parametrize("key_bytes", [0, 1, 32, 64, 65, 100])
def test_a_tag_begun_once_per_key_is_rfc_2104s_hmac(key_bytes):
    # session_tag hashes the padded keys once (hmac_begun); the tag must not change by it.
    key = secrets.token_bytes(key_bytes)
    for data in (b"", b"UC", secrets.token_bytes(wire.MAX_DATAGRAM)):
        assert wire.session_tag(key, data) == hmac.new(key, data, "sha256").digest()[:16]
        assert wire.session_tag(key, data) == hmac.new(key, data, "sha256").digest()[:16]  # cached


def test_tags_reject_a_flipped_bit_anywhere():
    key, data = secrets.token_bytes(32), b"UC\x04\x05 a datagram"
    tag = wire.session_tag(key, data)
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        assert not wire.tag_matches(key, bytes(flipped), tag)
    for index in range(len(tag)):
        assert not wire.tag_matches(key, data, tag[:index] + bytes([tag[index] ^ 0x80]) + tag[index + 1:])


def test_tags_reject_another_key_and_a_cut_tag():
    key, data = secrets.token_bytes(32), b"JOIN"
    tag = wire.session_tag(key, data)
    assert not wire.tag_matches(secrets.token_bytes(32), data, tag)
    assert not wire.tag_matches(key, data, tag[:8])
