"""Finding a server without knowing its IP: FIND, the interfaces it is sent on, the `?` prompt.

Everything here runs on this machine alone and sends nothing but to 127.0.0.1: the server's
answer is tested on ChatServer itself (plain bytes, a fake clock), the client's side on
ServerSearch (no socket), and one real exchange goes over loopback, unicast. The search
itself is never run here - it broadcasts - but is replaced by a stand-in; a real broadcast
on a real (namespaced) network is tests/test_lan.py's part.
"""

import io
import socket
import sys
import types

import pytest
from test_chat_server import Harness, member

import client
import server
from encryption_helper import (
    MIN_FIND_SIZE,
    Packet,
    PacketType,
    decode_packet,
    encode_packet,
    fingerprint,
    make_cipher,
    pack_fields,
    unpack_fields,
)

CIPHER = make_cipher("xor")
STRANGER = ("10.0.0.9", 40000)


@pytest.fixture
def make_harness(tmp_path):
    made = []

    def make(**changes) -> Harness:
        made.append(Harness(tmp_path / f"data{len(made)}", **changes))
        return made[-1]

    yield make
    for harness in made:
        harness.chat.close()


def find(seq: int = 77, size: int = MIN_FIND_SIZE) -> bytes:
    """A FIND numbered `seq`, padded to `size` bytes."""
    return encode_packet(Packet(PacketType.FIND, seq, payload=pack_fields("." * (size - 34))), CIPHER)


# --- The server's answer ----------------------------------------------------------------------


def test_a_padded_find_is_answered_with_name_port_and_members_online(make_harness):
    harness = make_harness(name="lab-pc-07", port=5000)
    member(harness, 1, "alice")
    request = find(seq=77)
    [(answer, to, size)] = harness.deliver(request, STRANGER)
    assert to == STRANGER and answer.type == PacketType.OK and answer.seq == 0 and answer.ack == 77
    assert unpack_fields(answer.payload) == ["77", "lab-pc-07", "5000", "1", fingerprint(harness.chat.key[1])]
    assert size <= len(request)  # nobody can aim our answers at a victim for profit
    assert not any("FIND" in line for line in harness.log)  # forty students searching: logged only with --verbose


def test_an_unpadded_find_is_dropped_counted_and_logged(make_harness):
    harness = make_harness()
    assert harness.deliver(find(size=MIN_FIND_SIZE - 1), STRANGER) == []
    assert harness.chat.stats["finds dropped"] == 1
    assert any(f"sent a FIND, unpadded ({MIN_FIND_SIZE - 1} B); dropped" in line for line in harness.log)


def test_finds_over_an_addresss_rate_are_dropped_until_it_refills(make_harness, monkeypatch):
    monkeypatch.setattr(server, "FIND_BURST", 3)
    monkeypatch.setattr(server, "FIND_RATE", 1.0)
    harness = make_harness()
    answered = [harness.deliver(find(seq), ("10.0.0.9", 40000 + seq)) for seq in range(1, 6)]  # five ports
    assert [len(out) for out in answered] == [1, 1, 1, 0, 0]  # the bucket is the address's, not a port's
    assert harness.chat.stats["finds dropped"] == 2
    assert any("over its address's rate of answers; dropped" in line for line in harness.log)
    assert len(harness.deliver(find(6), ("10.0.0.8", 40000))) == 1  # another PC is not starved
    harness.now += 1.0
    assert len(harness.deliver(find(7), ("10.0.0.9", 40000))) == 1


def test_the_find_table_is_bounded(make_harness, monkeypatch):
    monkeypatch.setattr(server, "FIND_ADDRESSES", 5)
    harness = make_harness()
    for number in range(20):
        harness.deliver(find(number + 1), (f"10.0.1.{number}", 5000))
    assert len(harness.chat.find_buckets) == 5


def test_the_longest_answer_is_no_larger_than_the_find(make_harness, monkeypatch):
    harness = make_harness(name="é" * (server.MAX_NAME_BYTES // 2), port=65535)
    monkeypatch.setattr(harness.chat, "online", dict.fromkeys(range(999)))  # the most a 3-digit count says
    request = find(seq=2**32 - 1)
    [(answer, _, size)] = harness.deliver(request, STRANGER)
    assert unpack_fields(answer.payload)[3] == "999" and size <= len(request) == MIN_FIND_SIZE


def test_a_find_that_is_not_only_padding_is_refused_no_larger(make_harness):
    harness = make_harness()
    request = encode_packet(Packet(PacketType.FIND, 5, payload=pack_fields("x", "." * 130)), CIPHER)
    [(answer, _, size)] = harness.deliver(request, STRANGER)
    assert answer.type == PacketType.ERROR and unpack_fields(answer.payload)[1] == "bad-request"
    assert size <= len(request)


def test_the_default_name_is_the_host_name_cut_to_whole_characters(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "ü" * 40)  # 80 bytes of UTF-8
    assert server.host_name() == "ü" * 32


def test_a_name_too_long_for_an_answer_is_refused(capsys):
    with pytest.raises(SystemExit):
        server.parse_args(["--name", "x" * (server.MAX_NAME_BYTES + 1)])
    assert "argument --name: must be printable" in capsys.readouterr().err
    assert server.parse_args(["--name", "lab-pc-07"]).name == "lab-pc-07"


# --- The client's side, without sockets ------------------------------------------------------


KEY = "3f2a-91c0-7b4e-d215"


def answer_to(search: client.ServerSearch, *fields: str, ptype=PacketType.OK, ack=None, cipher=CIPHER) -> bytes:
    number = search.number if ack is None else ack
    # a fourth field: the fingerprint of the server's key
    fields = (*fields, KEY) if len(fields) == 3 else fields
    return encode_packet(Packet(ptype, 0, number, payload=pack_fields(str(number), *fields)), cipher)


def test_the_find_is_padded_and_carries_the_searchs_number():
    search = client.ServerSearch(CIPHER, number=4242)
    data = search.request()
    packet = decode_packet(data, CIPHER)
    assert len(data) == MIN_FIND_SIZE and packet.type == PacketType.FIND and packet.seq == 4242
    assert 0 < client.ServerSearch(CIPHER).number < 2**32


def test_answers_are_listed_once_each_in_the_order_they_came():
    search = client.ServerSearch(CIPHER, number=9)
    first = search.receive(answer_to(search, "lab-pc-07", "9999", "12"), ("192.168.1.10", 9999))
    assert str(first) == "lab-pc-07  192.168.1.10:9999  12 online  3f2a-91c0-7b4e-d215"
    assert search.receive(answer_to(search, "lab-pc-07", "9999", "12"), ("192.168.1.10", 9999)) is None
    search.receive(answer_to(search, "kelas", "9999", "0"), ("192.168.1.3", 9999))
    assert [server.host for server in search.found.values()] == ["192.168.1.10", "192.168.1.3"]


@pytest.mark.parametrize("data", [
    answer_to(client.ServerSearch(CIPHER, number=9), "old", "9999", "1", ack=8),  # an earlier search's
    answer_to(client.ServerSearch(CIPHER, number=9), "x", "9999", "1", ptype=PacketType.ERROR),
    answer_to(client.ServerSearch(CIPHER, number=9), "x", "port", "1"),
    answer_to(client.ServerSearch(CIPHER, number=9), "x", "70000", "1"),
    answer_to(client.ServerSearch(CIPHER, number=9), "x", "9999", "²"),
    answer_to(client.ServerSearch(CIPHER, number=9), "x", "9999"),
    b"hello:world",
], ids=["other number", "error", "port not a number", "port too big", "odd digit", "field missing", "not ours"])
def test_what_is_not_an_answer_to_this_search_is_not_a_server(data):
    search = client.ServerSearch(CIPHER, number=9)
    assert search.receive(data, ("192.168.1.10", 9999)) is None and list(search.found.values()) == []


def test_a_server_with_another_key_is_noted_not_listed():
    search = client.ServerSearch(CIPHER, number=9)
    search.receive(answer_to(search, "x", "9999", "1", cipher=make_cipher("xor", "other")), ("192.168.1.10", 9999))
    assert list(search.found.values()) == [] and search.other_key == {("192.168.1.10", 9999)}


FOUND = [client.FoundServer("lab-pc-07", "10.77.0.1", 5000, 2, KEY),
         client.FoundServer("kelas", "10.77.0.8", 9999, 0, KEY)]


@pytest.mark.parametrize("answer, found, chosen", [
    ("", FOUND, None),  # several answered: never one picked silently
    ("", FOUND[:1], ("10.77.0.1", 5000)),
    ("", [], ("127.0.0.1", None)),
    ("2", FOUND, ("10.77.0.8", 9999)),
    ("3", FOUND, None),
    ("0", FOUND, None),
    ("10.77.0.8", FOUND, ("10.77.0.8", 9999)),
    ("192.168.1.5", FOUND, ("192.168.1.5", None)),
])
def test_enter_takes_the_one_server_a_number_one_from_the_list(answer, found, chosen):
    assert client.pick_server(answer, found) == chosen


def test_a_search_goes_to_each_networks_broadcast_address_then_to_everyone_on_the_link(monkeypatch):
    monkeypatch.setattr(client, "fcntl", object())  # as on Linux: the kernel is asked
    monkeypatch.setattr(client, "linux_networks", lambda: [
        ("127.0.0.1", "255.0.0.0"), ("10.77.0.2", "255.255.255.0"), ("10.77.0.3", "255.255.255.0"),
        ("10.8.0.2", "255.255.255.255")])  # loopback, two addresses on one LAN, a VPN's point-to-point link
    assert client.broadcast_addresses() == ["10.77.0.255", "255.255.255.255"]


class ScriptedTerminal:
    """Answers prompts from a list, and keeps every prompt and line shown."""

    def __init__(self, *answers: str):
        self.answers = list(answers)
        self.prompts: list[str] = []
        self.shown: list[str] = []

    def ask(self, prompt: str, secret: bool = False) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def show(self, text: str) -> None:
        self.shown.append(text)


@pytest.fixture
def fake_network(monkeypatch):
    """Replace the search on the network (a broadcast) by answers prepared here; return them."""
    answers: list[tuple[tuple[str, int], list[str]]] = []  # (from, [name, port, online])
    searched = []

    def search_network(search, targets, port, *rest):
        searched.append((targets, port))
        for address, fields in answers:
            search.receive(answer_to(search, *fields, cipher=search.cipher), address)
        return search

    monkeypatch.setattr(client, "search_network", search_network)
    monkeypatch.setattr(client, "broadcast_addresses", lambda: ["10.77.0.255", "255.255.255.255"])
    return types.SimpleNamespace(answers=answers, searched=searched)


def test_question_mark_searches_lists_all_and_the_student_picks_by_number(fake_network):
    fake_network.answers += [(("10.77.0.1", 5000), ["lab-pc-07", "5000", "2"]),
                             (("10.77.0.8", 5000), ["kelas", "5000", "0"])]
    terminal = ScriptedTerminal("?", "", "2", "")
    assert client.ask_address(client.parse_args([]), terminal) == ("10.77.0.8", 5000)  # the port it named
    assert terminal.prompts == ["Server IP [127.0.0.1] (? searches the network): ",
                                "Server number (1-2) or IP: ", "Server number (1-2) or IP: ", "Server port [5000]: "]
    assert "1) lab-pc-07  10.77.0.1:5000  2 online  3f2a-91c0-7b4e-d215" in terminal.shown
    assert "2) kelas  10.77.0.8:5000  0 online  3f2a-91c0-7b4e-d215" in terminal.shown
    assert client.SEVERAL_FOUND in terminal.shown
    assert "Type a number from 1 to 2, an IP address, or ? to search again." in terminal.shown
    assert fake_network.searched == [(["10.77.0.255", "255.255.255.255"], 9999)]


def test_nothing_found_says_so_and_asks_again(fake_network):
    terminal = ScriptedTerminal("?", "10.77.0.5", "")
    assert client.ask_address(client.parse_args([]), terminal) == ("10.77.0.5", 9999)
    assert client.NOTHING_FOUND in terminal.shown
    assert terminal.prompts[1] == "Server IP [127.0.0.1] (? searches the network): "


def test_a_number_not_on_the_list_is_asked_again(fake_network):
    fake_network.answers.append((("10.77.0.1", 9999), ["lab-pc-07", "9999", "0"]))
    terminal = ScriptedTerminal("?", "4", "1", "")
    assert client.ask_address(client.parse_args([]), terminal) == ("10.77.0.1", 9999)
    assert "Type a number from 1 to 1, an IP address, or ? to search again." in terminal.shown


def test_find_option_prints_one_server_a_line_starting_ip_port(fake_network, capsys):
    fake_network.answers.append((("10.77.0.1", 9999), ["lab-pc-07", "9999", "3"]))
    assert client.main(["--find"]) == 0
    out, err = capsys.readouterr()
    assert out == "10.77.0.1:9999  lab-pc-07  3 online  3f2a-91c0-7b4e-d215\n"
    assert "Searching this network" in err


def test_find_option_with_nothing_found_says_so(fake_network, capsys):
    assert client.main(["--find", "--port", "5000"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and client.NOTHING_FOUND in err and fake_network.searched[0][1] == 5000


def test_find_option_with_only_other_keys_says_so_once(fake_network, monkeypatch, capsys):
    def search_network(search, targets, port, *rest):
        other = make_cipher("xor", "not our key")
        search.receive(answer_to(search, "lab-pc-07", "9999", "0", cipher=other), ("10.77.0.1", 9999))
        return search

    monkeypatch.setattr(client, "search_network", search_network)
    assert client.main(["--find"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "10.77.0.1:9999 answered, but uses another --cipher or --key" in err
    assert client.OTHER_KEYS_ONLY in err and client.NOTHING_FOUND not in err


class ScriptedSocket:
    """A UDP socket that sends nothing: what recvfrom() gives is scripted, and sending to
    255.255.255.255 fails as it does where there is no default route."""

    def __init__(self, received: list):
        self.received, self.sent, self.options = received, [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def setsockopt(self, level, option, value):
        self.options[option] = value

    def settimeout(self, seconds):
        pass

    def sendto(self, data, address):
        if address[0] == "255.255.255.255":
            raise OSError(101, "Network is unreachable")
        self.sent.append(address)

    def recvfrom(self, size):
        if not self.received:
            raise TimeoutError
        result = self.received.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def test_the_search_survives_windows_resets_and_a_target_it_cannot_reach(monkeypatch):
    search = client.ServerSearch(CIPHER, number=9)
    fake = ScriptedSocket([ConnectionResetError(10054, "WinError 10054"),  # an ICMP "port unreachable"
                           (answer_to(search, "lab-pc-07", "9999", "1"), ("10.77.0.1", 9999))])
    monkeypatch.setattr(client.socket, "socket", lambda *args: fake)
    client.search_network(search, ["10.77.0.255", "255.255.255.255"], 9999)
    assert [str(found) for found in search.found.values()] == [f"lab-pc-07  10.77.0.1:9999  1 online  {KEY}"]
    assert fake.options[socket.SO_BROADCAST] == 1 and fake.sent == [("10.77.0.255", 9999)] * client.SEARCH_TRIES


# --- One real exchange, on loopback --------------------------------------------------------


def test_a_server_answers_a_find_sent_to_it_on_loopback(start_server):
    running = start_server(name="lab-pc-07")
    search = client.search_network(client.ServerSearch(CIPHER), ["127.0.0.1"], running.address[1])
    assert [str(found) for found in search.found.values()] == [
        f"lab-pc-07  127.0.0.1:{running.address[1]}  0 online  {fingerprint(running.chat.key[1])}"]


def test_a_server_with_another_key_is_reported_on_loopback(start_server):
    running = start_server(key="another key")
    search = client.search_network(client.ServerSearch(CIPHER), ["127.0.0.1"], running.address[1])
    assert list(search.found.values()) == [] and search.other_key == {running.address}


# --- This machine's interfaces -------------------------------------------------------------


@pytest.mark.parametrize("address, netmask, broadcast", [
    ("192.168.1.10", "255.255.255.0", "192.168.1.255"),
    ("10.77.3.4", "255.255.0.0", "10.77.255.255"),
    ("10.0.0.1", "255.255.255.254", ""),
    ("10.0.0.1", "255.255.255.255", ""),
])
def test_broadcast_address_is_the_host_bits_set(address, netmask, broadcast):
    assert client.broadcast_of(address, netmask) == broadcast


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="asks the Linux kernel")
def test_linux_networks_are_read_from_the_kernel_with_their_netmasks():
    networks = client.linux_networks()
    assert ("127.0.0.1", "255.0.0.0") in networks  # loopback is there; the search leaves it out
    for address, netmask in networks:
        socket.inet_aton(address)
        socket.inet_aton(netmask)


@pytest.fixture
def elsewhere(monkeypatch):
    """Windows or macOS, simulated: the kernel cannot be asked; the host name resolves to `names`."""
    names: list[str] = []

    def getaddrinfo(host, port, family=0, kind=0, *rest):
        if not names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (name, 0)) for name in names]

    monkeypatch.setattr(client.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(client, "fcntl", None)
    monkeypatch.setattr(client, "linux_networks", lambda: pytest.fail("not elsewhere"))
    return names


def test_elsewhere_the_host_names_addresses_are_taken_on_a_24(elsewhere):
    elsewhere += ["192.168.1.10", "127.0.1.1", "10.77.0.20", "10.77.0.3"]
    assert client.broadcast_addresses() == ["10.77.0.255", "192.168.1.255", "255.255.255.255"]


def test_elsewhere_with_no_network_only_the_link_is_asked(elsewhere):
    assert client.broadcast_addresses() == ["255.255.255.255"]


def test_the_banner_names_the_interfaces_addresses(monkeypatch, capsys):
    monkeypatch.setattr(server, "lan_addresses", lambda: ["10.77.0.1", "192.168.1.10"])
    server.print_banner(server.ServerConfig(), ("0.0.0.0", 9999), "lab-pc-07")
    out = capsys.readouterr().out
    assert "Clients on other PCs answer:  Server IP 10.77.0.1 or 192.168.1.10   port 9999" in out
    assert "find this server as: lab-pc-07" in out


FIB_TRIE = """Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.77.0.0/24 2 0 2
        |-- 10.77.0.1
           /32 host LOCAL
        |-- 10.77.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
"""


def test_the_banner_finds_a_lan_address_without_a_default_route(monkeypatch):
    def routed_nowhere(*args):
        raise OSError(101, "Network is unreachable")  # a lab LAN with no way out

    monkeypatch.setattr(server, "open", lambda path, **options: io.StringIO(FIB_TRIE), raising=False)
    monkeypatch.setattr(socket.socket, "connect", routed_nowhere)
    assert server.lan_addresses() == ["10.77.0.1"]  # Linux's table of local addresses, loopback left out


def test_the_banner_of_a_server_on_loopback_says_other_pcs_cannot_reach_it(capsys):
    server.print_banner(server.ServerConfig(host="127.0.0.1"), ("127.0.0.1", 9999), "lab-pc-07")
    out = capsys.readouterr().out
    assert "Clients on other PCs cannot reach it: it listens on 127.0.0.1 only (leave out --host)" in out
    assert "Clients on other PCs answer" not in out and "Clients on this PC answer:    Server IP 127.0.0.1" in out


def test_the_banner_without_a_network_says_so(monkeypatch, capsys):
    monkeypatch.setattr(server, "lan_addresses", lambda: [])
    server.print_banner(server.ServerConfig(), ("0.0.0.0", 9999), "lab-pc-07")
    out = capsys.readouterr().out
    assert "this PC has no network address" in out and "<this PC's address>" not in out
