"""Issue 22, the server's fingerprint: a registration is bound to the server's key y.

A fake server that relays to the real one (so HELLO carries the real Y) but lacks y can
neither answer a REGISTER as the real server nor change the verifier on the way; the
fingerprint the banner shows is the one FIND answers carry, and it survives a restart.
"""

import re
import subprocess
import sys

import pytest
from conftest import ROOT
from test_hostile_login import Wiretap

import client
import encryption_helper as wire
from encryption_helper import PacketType

CIPHER = wire.make_cipher("xor")


class ForgingRelay(Wiretap):
    """A relay without the server's key: it passes HELLO's real Y on, and `forge` may answer
    or change a REGISTER."""

    def __init__(self, server_address, forge):
        self.forge = forge
        super().__init__(server_address)

    def from_client(self, data: bytes) -> None:
        packet = wire.decode_packet(data, CIPHER)
        if packet.type == PacketType.REGISTER:
            data, to = self.forge(packet)
            if to == "client":
                self.front.sendto(data, self.client)
                return
        self.back.sendto(data, self.server)


def answer_itself(packet):
    """The fake's own "Registration successful.", under a tag it had to make up."""
    payload = wire.pack_fields(str(packet.seq), "00" * 16, "Registration successful.")
    return wire.encode_packet(wire.Packet(PacketType.OK, 0, packet.seq, payload=payload),
                              CIPHER), "client"


def swap_verifier(packet):
    """Pass the REGISTER on with a verifier of the relay's own (whose password it knows)."""
    fields = wire.unpack_fields(packet.payload)
    fields[4] = client.public_key(12345)
    packet = wire.Packet(packet.type, packet.seq, payload=wire.pack_fields(*fields))
    return wire.encode_packet(packet, CIPHER), "server"


@pytest.mark.parametrize("forge, code", [(answer_itself, "bad-reply"),
                                         (swap_verifier, "bad-request")])
def test_a_relay_without_the_servers_key_cannot_make_a_registration_pass(
        start_server, make_client, forge, code):
    running = start_server()
    relay = ForgingRelay(running.address, forge)
    try:
        victim = make_client(relay.address)
        with pytest.raises(client.Refused) as refused:
            victim.register("bob", "builder-42")
        assert refused.value.code == code
        assert not running.chat.users.exists("bob")  # and the swapped verifier was not stored
    finally:
        relay.close()


def test_an_honest_registration_shows_the_servers_fingerprint(start_server, make_client):
    running = start_server()
    events = []
    bob = make_client(running.address, on_event=events.append)
    assert bob.register("bob", "builder-42") == "Registration successful."
    shown = wire.fingerprint(running.chat.key[1])
    assert any(event.text == f"Registering at server {shown}: compare it with the server's "
                             "banner." for event in events)
    assert re.fullmatch(r"([0-9a-f]{4}-){3}[0-9a-f]{4}", shown)


def banner_fingerprint_and_find(data_dir) -> tuple[str, str]:
    """Start server.py, read the fingerprint in its banner and ask it a FIND; stop it."""
    process = subprocess.Popen([sys.executable, "server.py", "--host", "127.0.0.1", "--port",
                                "0", "--data-dir", str(data_dir)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        while not any(line.startswith("Server fingerprint:") for line in lines):
            lines.append(process.stdout.readline())
            assert lines[-1], f"the server stopped: {lines}"
        port = int(re.search(r":(\d+)", lines[0]).group(1))
        banner = lines[-1].split()[2]
        search = client.search_network(client.ServerSearch(CIPHER), ["127.0.0.1"], port)
        [found] = search.servers()
        return banner, found.fingerprint
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_fingerprint_in_the_banner_is_the_finds_and_survives_a_restart(tmp_path):
    banner, found = banner_fingerprint_and_find(tmp_path / "data")
    assert banner == found
    assert banner_fingerprint_and_find(tmp_path / "data") == (banner, banner)
    assert banner_fingerprint_and_find(tmp_path / "other") != (banner, banner)  # a new key
