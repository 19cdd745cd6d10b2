"""docs/PROTOCOL.md: the reference names everything the code puts on the wire.

A client is written from the reference alone, so a packet type, flag or error code that
the code defines and the reference does not list is a guess waiting to happen. The codes
are collected from the source itself, so a new one cannot be added without being written up.
"""

import re
from pathlib import Path

import auth
import encryption_helper
import encryption_helper as wire
import server
from encryption_helper import PacketType, decode_packet, make_cipher

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "PROTOCOL.md"
CODE = r'"([a-z]+(?:-[a-z]+)*)"'  # an error code is lower case, words joined by '-'
# Where the server makes an ERROR: Refusal("code", ...); the ERROR for a reply too long to
# send; the ERROR (re 0) for a datagram that is not a packet.
SERVER_PATTERNS = (rf"Refused\(\s*{CODE}", rf"PacketType\.ERROR, \[\s*{CODE}", rf'pack_fields\("0", {CODE}')
CLIENT_PATTERNS = (rf"Refused\(\s*{CODE}",)


def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def codes_in(filenames, patterns) -> set[str]:
    found = set()
    for filename in filenames:
        source = (ROOT / filename).read_text(encoding="utf-8")
        for pattern in patterns:
            found.update(re.findall(pattern, source))
    return found


def server_codes() -> set[str]:
    """Every code the server can send, as written in its source."""
    return codes_in(["server.py"], SERVER_PATTERNS)


def table_rows(text: str) -> list[list[str]]:
    """Return the cells of every markdown table row in `text`."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_the_scan_finds_the_codes_it_must():
    found = server_codes()
    assert {"stale-cookie", "invalid-login", "taken", "bad-packet", "locked", "slow-down", "busy"} <= found
    assert {"not-sent", "bad-reply"} <= codes_in(["client.py"], CLIENT_PATTERNS)


def test_every_error_code_the_server_sends_is_in_the_table_of_codes():
    listed = {row[0].strip("`") for row in table_rows(reference())}
    missing = server_codes() - listed
    assert not missing, f"error codes missing from the table in docs/PROTOCOL.md: {sorted(missing)}"


def test_every_code_the_client_makes_up_is_named():
    text = reference()
    missing = {code for code in codes_in(["client.py"], CLIENT_PATTERNS) if f"`{code}`" not in text}
    assert not missing, f"client-side codes missing from docs/PROTOCOL.md: {sorted(missing)}"


def test_every_packet_type_is_in_the_table_with_its_number():
    rows = {tuple(row[:2]) for row in table_rows(reference())}
    for ptype in PacketType:
        assert (ptype.name, str(ptype.value)) in rows, f"{ptype.name} ({ptype.value}) missing from the type table"


def test_every_flag_is_in_the_table_with_its_value():
    rows = {row[2].strip("`"): row[1].strip("`") for row in table_rows(reference()) if len(row) > 2}
    flags = {name: value for name, value in vars(encryption_helper).items() if name.startswith("FLAG_")}
    assert flags
    for name, value in flags.items():
        assert rows.get(name) == f"0x{value:04x}", f"{name} = 0x{value:04x} missing from the table of flags"


def test_the_reference_states_the_version_and_the_limits_the_code_uses():
    text = reference()
    assert f"version {encryption_helper.VERSION}" in text
    for number in (encryption_helper.MAX_DATAGRAM, encryption_helper.MAX_PAYLOAD, encryption_helper.MIN_HELLO_SIZE,
                   encryption_helper.MAX_TEXT_BYTES, auth.MAX_USERNAME, server.MAX_NAME_BYTES):
        assert str(number) in text


def test_every_datagram_of_the_annotated_exchange_is_valid_and_as_captioned():
    """Each hex block follows a caption naming its type in bold: the bytes decode as that type."""
    text = reference()
    blocks = list(re.finditer(r"```\n((?:[0-9a-f]{2}[ \n])+)```", text))
    assert len(blocks) == 14
    cipher = make_cipher("xor")
    for block in blocks:
        caption = re.findall(r"\*\*([A-Z]+)\*\*", text[: block.start()])[-1]  # the last type named before it
        packet = decode_packet(bytes.fromhex(block[1]), cipher)
        assert packet.type.name == caption


def test_the_session_part_of_the_exchange_is_tagged_and_sealed_with_the_k_it_states():
    """From the welcome on, each datagram's tag verifies under the key of its direction made from
    the K the text states; the welcome's sealed reset proof and the JOIN's room password open."""
    text = reference()
    K = bytes.fromhex(re.search(r"K =\s*`([0-9a-f]{64})`", text)[1])
    session = wire.session_keys(K)
    keys = {"client -> server": session.to_server, "server -> client": session.to_client}
    cipher, tagged = make_cipher("xor"), 0
    for block in re.finditer(r"```\n((?:[0-9a-f]{2}[ \n])+)```", text):
        direction = re.findall(r"(client -> server|server -> client)", text[: block.start()])[-1]
        data = bytes.fromhex(block[1])
        packet = decode_packet(data, cipher)
        fields = wire.unpack_fields(packet.payload) if packet.payload else []
        if packet.token == wire.NO_TOKEN:
            assert not packet.flags & wire.FLAG_TAGGED  # the handshake: no session key yet
        else:
            assert wire.tagged_by(data, keys[direction]) and not wire.tagged_by(data, keys[
                "server -> client" if direction == "client -> server" else "client -> server"])
            tagged += 1
        if packet.type == PacketType.OK and packet.token != wire.NO_TOKEN and packet.seq == 0:  # the welcome
            proof = re.search(r"a RESET\s+of this session would carry \(`([0-9a-f]{32})`\)", text)[1]
            assert wire.open_text(session.seal, fields[-1]) == proof
        if packet.type == PacketType.JOIN:
            assert wire.open_text(session.seal, fields[1]) == "juara"
    assert tagged == 9  # steps 6 (the welcome, with the token) to 14
