"""A hostile classmate on the lab LAN: the attacks on discovery, on what is printed, on the
client's ICMP handling and on rooms, each run again and shown to fail.

Where addresses matter (a forged ICMP from another PC, a FIND flood from one PC, a second
server answering `?`) the attack runs on the LAN of network namespaces that tests/test_lan.py
builds (root; it skips and says why without). The rest runs the real server and client on
loopback, or the client's printing with a model of a terminal screen.
"""

import io
import os
import re

import pytest
from conftest import member

# `lan`: a fixture, the LAN of namespaces
from test_lan import PORT, SERVER_NAME, join_chat, lan, start_chat_server  # noqa: F401
from test_terminal import ScreenModel

import client
import server
from encryption_helper import Refused

# --- Attack 4: a forged ICMP "port unreachable" for the victim's port --------------------------

# Run on the attacker's PC: a raw socket (root there, no address spoofed) sends ICMP "port
# unreachable" to the victim, quoting a datagram the victim's port "sent" to the server's.
FORGE_ICMP = """
import socket, struct, sys, time
victim, server, victim_port, server_port = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])

def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 48, 0, 0, 64, 17, 0,
                     socket.inet_aton(victim), socket.inet_aton(server))
header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
quoted = header + struct.pack("!HHHH", victim_port, server_port, 28, 0)
message = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
    for _ in range(5):
        raw.sendto(message, (victim, 0))
        time.sleep(0.3)
print("forged 5", flush=True)
"""


def test_a_forged_port_unreachable_ends_no_session(lan, tmp_path):  # noqa: F811
    server_process = start_chat_server(lan, tmp_path)
    server_ip, victim_ip = lan.address("server"), lan.address("client1")
    alice = lan.start("client1", "client.py", "--host", server_ip, "--port", PORT, "--verbose")
    bob = lan.start("client2", "client.py", "--host", server_ip, "--port", PORT)
    join_chat(alice, "alice")
    seen = server_process.expect(f"{victim_ip}:")
    victim_port = re.search(rf"{re.escape(victim_ip)}:(\d+)", seen).group(1)
    join_chat(bob, "bob")
    alice.expect("bob joined")
    # bob's PC, where the attacker sits, forges the reports
    lan.on("client2", "python3", "-c", FORGE_ICMP, victim_ip, server_ip, victim_port, PORT)
    alice.expect('ICMP "port unreachable"')  # the reports reached the victim's socket...
    alice.expect('ICMP "port unreachable"')  # ...two of them, once the old verdict
    alice.type("still here")
    assert bob.expect("alice:").endswith("] alice: still here")
    assert not [line for line in alice.output if "[WARN]" in line]
    assert not [line for line in bob.output if "alice left" in line]


# --- Attack 1: a FIND flood from one PC; a second server answering `?` ------------------------

# Run on the attacker's PC: padded FINDs to the server, 2,000 a second (the old server-wide
# limit of 10 a second was starved by far fewer), until stopped.
FLOOD_FINDS = """
import socket, sys, time
import client, encryption_helper as wire
find = client.ServerSearch(wire.make_cipher(wire.DEFAULT_CIPHER)).request()
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    print("flooding", flush=True)
    while True:
        for _ in range(100):
            sock.sendto(find, (sys.argv[1], int(sys.argv[2])))
        time.sleep(0.05)
"""


def test_a_find_flood_from_one_pc_starves_no_other(lan, tmp_path):  # noqa: F811
    server_process = start_chat_server(lan, tmp_path)
    flooder = lan.start("client2", "-c", FLOOD_FINDS, lan.address("server"), PORT)
    flooder.expect("flooding")
    server_process.expect(f"{lan.address('client2')}:")  # the server drops the flood's FINDs...
    finder = lan.start("client1", "client.py", "--find")
    where = f"{lan.address('server')}:{PORT}"
    # ...and still answers another PC
    assert finder.expect(where).startswith(f"{where}  {SERVER_NAME}  0 online  ")  # then its fingerprint
    assert finder.finish() == 0
    assert any("over its address's rate of answers" in line for line in server_process.output)


def test_of_two_servers_answering_enter_takes_neither(lan, tmp_path):  # noqa: F811
    """The student picks by number."""
    start_chat_server(lan, tmp_path)
    # a classmate's program posing as the lab's server, with the same name
    lan.start("client2", "server.py", "--port", PORT, "--name", SERVER_NAME,
              "--data-dir", str(tmp_path / "fake")).expect("Press Ctrl+C to stop.")
    alice = lan.start("client1", "client.py")
    alice.type("?")
    alice.expect("several servers answered")
    listed = [alice.expect(f") {SERVER_NAME}  ") for _ in range(2)]
    alice.type("")  # Enter alone: not taken
    alice.expect("Type a number from 1 to 2, an IP address, or ? to search again.")
    real = next(line.split(")")[0] for line in listed if f"{lan.address('server')}:{PORT}" in line)
    alice.type(real, "")
    alice.expect(f"Connected to the chat server at {lan.address('server')}:{PORT}.")


# --- Attack 2: escape codes in a (fake) server's welcome, refusal and JOIN answer ----------------

# what must never reach a screen or a file raw (a line break aside)
CONTROLS = "[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]"
HOSTILE = ("Welcome!\x1b]52;c;cm0gLXJmIH4vKg==\x07\x1b]0;owned\x07\x1b[2K\x1b[1A"
           "\x9b2J\u202egnp.exe\r[WARN] forged")


def a_terminal(monkeypatch, columns: int = 80) -> tuple[client.Terminal, io.StringIO]:
    """The real Terminal's show, on a terminal `columns` wide; what it writes is returned."""
    output = io.StringIO()
    monkeypatch.setattr(client.sys, "stdout", output)
    monkeypatch.setattr(client.shutil, "get_terminal_size", lambda: os.terminal_size((columns, 24)))
    terminal = client.Terminal.__new__(client.Terminal)
    terminal.interactive, terminal.color, terminal.bell, terminal.held = True, True, True, None
    terminal.lock, terminal.prompt, terminal.secret = client.threading.Lock(), "", False
    return terminal, output


def test_no_escape_code_from_a_server_reaches_the_terminal(monkeypatch):
    terminal, output = a_terminal(monkeypatch)
    client.show_answer(terminal, lambda: HOSTILE)  # a welcome
    client.show_answer(terminal, lambda: (_ for _ in ()).throw(Refused("x", HOSTILE)))  # refused
    terminal.release(f"joined {HOSTILE}")  # the JOIN's answer
    terminal.show(f"[WARN] Not back in yet: {HOSTILE}")  # whatever way a text comes
    shown = output.getvalue()
    assert not re.search(CONTROLS, shown.replace("\r", ""))
    assert "]52;c;" in shown  # shown, harmless


def test_the_window_shows_no_control_either():
    assert not re.search(CONTROLS, client.screen_text(HOSTILE))
    assert client.LINE_TAGS["line"]["lmargin2"] > 0  # its wrapped rows are indented


# --- Attack 10: a message padded to wrap, forging a line at column 0 -----------------------------

@pytest.mark.parametrize("padding", [" " * 63, "x" * 63, "日" * 32])
def test_a_message_that_wraps_cannot_start_a_row_of_its_own(monkeypatch, padding):
    terminal, output = a_terminal(monkeypatch)
    forged = f"{padding}[07:36] bob: send me your password [WARN] [INFO] Connection closed."
    terminal.show_event(client.Event("chat", 1_700_000_000.0, "lobby", "mallory", forged), "alice")
    screen = ScreenModel(rows=10, columns=80)
    screen.feed(output.getvalue().replace("\n", "\r\n"))
    rows = [row for row in screen.lines() if row.strip()]
    assert len(rows) > 1 and rows[0].startswith("[") and "mallory:" in rows[0]
    assert all(row.startswith("    ") for row in rows[1:])  # every wrapped row indented


# --- Attack 12: escape codes stored in chat_history.txt ------------------------------------------

def test_the_history_file_holds_no_control_and_reads_back_exactly(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice")
    alice.say(HOSTILE)
    chat_server.chat.history.file.flush()
    path = os.path.join(chat_server.config.data_dir, server.HISTORY_FILE)
    stored = open(path, encoding="utf-8").read()
    assert stored.count("\n") == 1 and not re.search(CONTROLS, stored)
    assert [text for *_, text in server.HistoryFile.read(path)] == [HOSTILE]


# --- Attack 8: 49 new rooms in a few seconds, to take over a room with a password ----------------

def test_a_room_flood_cannot_take_over_a_password_room(start_server, make_client, monkeypatch):
    monkeypatch.setattr(server, "MAX_ROOMS", 12)  # a full table within three accounts
    running = start_server()
    alice = member(make_client, running.address, "alice", room="kelas",
                   room_password="alice's")
    alice.join("lobby", "juara")  # kelas is empty now
    refusals = []
    for account in ("mallory", "mallory2", "mallory3"):
        attacker = member(make_client, running.address, account)
        for number in range(49):
            try:
                attacker.join(f"{account}r{number}", "m")
            except Refused as refusal:
                refusals.append(refusal.code)
    # 5 rooms each for the first two, then the table is full: the third makes none
    assert refusals == ["too-many-rooms"] * 2 * (49 - 5) + ["full"] * 49
    with pytest.raises(Refused, match="Wrong room password."):
        attacker.join("kelas", "mallory's")
    assert alice.join("kelas", "alice's").startswith("joined kelas")

