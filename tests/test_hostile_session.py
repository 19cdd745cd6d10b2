"""Issue 22, the session's tags: a classmate who reads a session's token off the wire still
cannot forge its packets, nor end it with a RESET.

The classmate here is on the path (a relay between alice and the server, tests/test_hostile_login's
Wiretap): it sees every datagram, so it knows alice's token and her next sequence numbers, and it
sends from the very address the server knows as alice's. Every packet of a session carries a
16-byte HMAC-SHA256 tag under a key from the login's K (docs/PROTOCOL.md, section 11), which the
relay cannot compute; a RESET must carry the proof the login sealed for the client. The real RESET
of a restarted server, which knows no session, still ends one, and the client gets back in
(tests/test_integration.py, test_after_a_crash_and_restart_the_client_gets_back_in_by_itself).
"""

import socket
import time

import pytest
from conftest import member, next_event, no_more_events, wait_until
from test_hostile_login import Wiretap

import encryption_helper as wire
from encryption_helper import Packet, PacketType, pack_fields

CIPHER = wire.make_cipher("xor")


@pytest.fixture
def tapped(start_server, make_client):
    """alice behind a wiretap, bob directly, both in the lobby; the server sees alice at the tap."""
    running = start_server()
    tap = Wiretap(running.address)
    bob = member(make_client, running.address, "bob")
    alice = member(make_client, tap.address, "alice")
    yield running, tap, alice, bob
    tap.close()


def last_from(tap: Wiretap, sender: str) -> Packet:
    """The last session packet the tap relayed from the client (or the server): its header."""
    for data in reversed(tap.seen):
        packet = wire.decode_packet(data, CIPHER)
        from_server = packet.type in wire.SERVER_ONLY
        if packet.token != wire.NO_TOKEN and from_server == (sender == "server"):
            return packet
    raise AssertionError(f"no session packet from the {sender} seen")


def forged(packet: Packet, ptype: PacketType, fields: list[str], seq: int, tag: bytes = b"") -> bytes:
    """A datagram with the session's token and numbers, the flag set and a tag made up."""
    data = wire.encode_packet(Packet(ptype, seq, packet.ack, 0, packet.token, wire.FLAG_TAGGED,
                                     pack_fields(*fields)), CIPHER)
    return data + (tag or bytes(wire.TAG_BYTES))


def test_a_say_forged_with_alices_token_from_her_address_reaches_nobody(tapped):
    running, tap, alice, bob = tapped
    alice.say("a real line")
    assert next_event(bob, "chat").text == "a real line"
    seen = last_from(tap, "client")
    # The next few numbers, in case one is taken: sent from the address the server knows as alice.
    for seq in range(seen.seq + 1, seen.seq + 4):
        for tag in (b"", seen.token * 2):
            tap.back.sendto(forged(seen, PacketType.SAY, ["I owe everyone 100k"], seq, tag), running.address)
    wait_until(lambda: running.chat.stats["bad"] >= 6, what="the server to drop the forgeries")
    assert all(event.text != "I owe everyone 100k" for event in no_more_events(bob, alice))
    alice.say("still here")  # her session goes on, her numbers untouched
    assert next_event(bob, "chat").text == "still here"


def test_an_event_forged_to_alice_is_not_shown(tapped):
    running, tap, alice, bob = tapped
    bob.say("hello alice")
    assert next_event(alice, "chat").text == "hello alice"
    seen = last_from(tap, "server")
    fields = ["chat", str(time.time()), "lobby", "bob", "send me your password"]
    for seq in range(seen.seq + 1, seen.seq + 4):
        tap.front.sendto(forged(seen, PacketType.EVENT, fields, seq), tap.client)
    assert all(event.text != "send me your password" for event in no_more_events(alice, bob))


def test_a_reset_without_the_proof_ends_no_session(tapped):
    running, tap, alice, bob = tapped
    seen = last_from(tap, "server")
    for proof in (b"", bytes(16), seen.token * 2):
        reset = Packet(PacketType.RESET, 0, seen.seq, 0, seen.token, 0, proof)
        tap.front.sendto(wire.encode_packet(reset, CIPHER), tap.client)
    alice.say("not reset")
    assert next_event(bob, "chat").text == "not reset"
    assert alice.logged_in and alice.protocol.state == "connected"
    assert all(event.kind != "leave" for event in no_more_events(bob, alice))


def test_a_reset_asked_for_with_alices_token_from_another_address_is_not_given(tapped):
    """The server sends a RESET's proof only once no session has the token: mallory, asking with
    alice's token from her own PC, gets nothing (and alice's session goes on)."""
    running, tap, alice, bob = tapped
    seen = last_from(tap, "client")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mallory:
        mallory.settimeout(1.0)
        ping = Packet(PacketType.PING, seen.seq + 1, 0, 0, seen.token)
        mallory.sendto(wire.encode_packet(ping, CIPHER, key=bytes(32)), running.address)
        with pytest.raises(TimeoutError):
            mallory.recvfrom(wire.RECV_BUFFER)
    alice.say("still in")
    assert next_event(bob, "chat").text == "still in"
    assert alice.protocol.state == "connected"
