"""The real scripts as a user runs them: client.py in its scripted mode, server.py from the shell."""

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import PROGRAM_WAIT, ROOT, Program, wait_until

import server


@pytest.fixture
def programs():
    started = []

    def start(*args, **options) -> Program:
        program = Program(*args, **options)
        started.append(program)
        return program

    yield start
    for program in started:
        program.stop()


def client_args(address):
    return ["client.py", "--host", address[0], "--port", str(address[1])]


def test_two_scripted_clients_exchange_messages(chat_server, programs):
    alice = programs(*client_args(chat_server.address))
    alice.type("/register", "alice", "secret", "secret", "/login", "alice", "secret", "wrong", "juara")
    alice.expect("Registration successful.")
    alice.expect("Wrong room password.")
    alice.expect("joined lobby")
    bob = programs(*client_args(chat_server.address))
    bob.type("/register", "bob", "pass", "pass", "/login", "bob", "pass", "juara")
    bob.expect("joined lobby")
    alice.expect("bob joined")
    bob.type("hello alice: café ☕ | ok")
    assert bob.expect("] you:").endswith("] you: hello alice: café ☕ | ok")  # once the server took it
    assert alice.expect("bob:").endswith("] bob: hello alice: café ☕ | ok")
    alice.type("hi bob", "/msg bob just us", "exit")
    assert alice.expect("] you:").endswith("] you: hi bob")
    assert alice.expect("] -> bob:").endswith("] -> bob: just us")
    assert bob.expect("] alice:").endswith("] alice: hi bob")
    assert bob.expect("(private)").endswith("] alice (private): just us")
    assert alice.expect("[INFO] Connection closed.") == "[INFO] Connection closed."
    assert alice.finish() == 0
    bob.expect("alice left")
    bob.process.stdin.close()  # end of input means exit
    bob.expect("[INFO] Connection closed.")
    assert bob.finish() == 0


def test_the_readme_example_line_works(chat_server, programs):
    first = programs(*client_args(chat_server.address))
    first.type("/register", "alice", "secret", "secret", "exit")
    first.expect("Registration successful.")
    script = "/login\nalice\nsecret\njuara\nhello\nexit\n"
    result = subprocess.run([sys.executable, *client_args(chat_server.address)], input=script, cwd=ROOT,
                            capture_output=True, text=True, encoding="utf-8", timeout=PROGRAM_WAIT)
    assert "Welcome, alice." in result.stdout and result.stdout.endswith("[INFO] Connection closed.\n")
    assert result.returncode == 0 and result.stderr == ""


def test_client_commands(chat_server, programs):
    alice = programs(*client_args(chat_server.address))
    alice.type("/register", "alice", "pass", "pass", "/login", "alice", "pass", "juara", "/help", "/who", "/rooms",
               "/nonsense", "/msg", "/join kelas", "rahasia", "/who", "//slash at the start", "exit")
    alice.expect("/msg USER TEXT")
    alice.expect("In lobby: alice")
    alice.expect("lobby  (1 here)")
    alice.expect("Unknown command /nonsense; type /help for the list.")
    alice.expect("Usage: /msg USER TEXT")
    alice.expect("joined kelas (new room)")
    alice.expect("In kelas: alice")
    assert alice.finish() == 0
    wait_until(lambda: any("'/slash at the start'" in line for line in chat_server.log), what="the // message")


def test_a_line_the_server_refuses_is_reported_as_not_sent(start_server, programs, monkeypatch):
    monkeypatch.setattr(server, "MESSAGE_BURST", 1)  # one line at once, then one a second...
    monkeypatch.setattr(server, "MESSAGE_RATE", 1.0)
    monkeypatch.setattr(server, "MAX_BACKLOG", 1)  # ...and one held back: the rest of a paste is refused
    running = start_server()
    alice = programs(*client_args(running.address))
    alice.type("/register", "alice", "pass", "pass", "/login", "alice", "pass", "juara")
    alice.expect("joined lobby")
    alice.type(*[f"pasted line {number}" for number in range(5)])
    refused = alice.expect("not sent: ")
    assert re.fullmatch(r"not sent: pasted line [2-4] \(Slow down: too many messages at once; not sent\.\)", refused)
    wait_until(lambda: any("'pasted line 1'" in line for line in running.log), what="the line held back")


def test_client_asks_for_ip_and_port_with_defaults(chat_server, programs):
    host, port = chat_server.address
    alice = programs("client.py")
    alice.type(host, "not a port", "²", str(port), "exit")  # "²" is a digit to str.isdigit, not to int
    alice.expect("A port is a whole number from 1 to 65535.")
    alice.expect(f"Connected to the chat server at {host}:{port}.")
    assert alice.finish() == 0


def test_client_reports_a_missing_server_without_a_traceback_or_a_closed_connection(programs):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again: nothing listens there
    alice = programs("client.py", "--host", "127.0.0.1", "--port", str(port))
    alice.expect(f"[ERROR] Server not responding at 127.0.0.1:{port}")
    assert alice.finish() == 1
    assert not any("Traceback" in line for line in alice.output)
    assert "[INFO] Connection closed." not in alice.output  # there never was a connection


def test_client_reports_a_wrong_key(chat_server, programs):
    alice = programs(*client_args(chat_server.address), "--key", "guess")
    alice.expect("server and client keys differ? Both must use the same --cipher and --key.")
    assert alice.finish() == 1


@pytest.mark.parametrize("script", ["server.py", "client.py"])
def test_help_explains_the_options(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=PROGRAM_WAIT)
    assert result.returncode == 0
    for option in ["--host", "--port", "--cipher", "--key", "--verbose", "--loss", "--seed"]:
        assert option in result.stdout
    if script == "server.py":
        for option in ["--data-dir", "--room-password", "--quiet"]:
            assert option in result.stdout
    assert "toy" in result.stdout


@pytest.mark.parametrize("script", ["server.py", "client.py"])
@pytest.mark.parametrize("port", ["70000", "-1", "²"])
def test_a_port_out_of_range_is_refused_in_words(script, port, tmp_path):
    more = ["--data-dir", str(tmp_path)] if script == "server.py" else []
    result = subprocess.run([sys.executable, script, "--port", port, *more], cwd=ROOT, capture_output=True,
                            text=True, timeout=PROGRAM_WAIT, encoding="utf-8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --port: must be a whole number from 1 to 65535" in result.stderr


def test_server_refuses_a_busy_port(chat_server, programs, tmp_path):
    server = programs("server.py", "--host", "127.0.0.1", "--port", str(chat_server.address[1]),
                      "--data-dir", str(tmp_path / "second"))  # not the repository's chat_data
    server.expect("Is another server running there?")
    assert server.finish() == 1


def start_server_process(programs, tmp_path, *more):
    server = programs("server.py", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path), *more)
    line = server.expect("UDP chat server listening on")
    return server, ("127.0.0.1", int(line.rsplit(":", 1)[1]))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs a console group on Windows")
def test_ctrl_c_stops_the_server_cleanly(programs, tmp_path):
    server, _ = start_server_process(programs, tmp_path)
    server.expect("Press Ctrl+C to stop.")
    server.process.send_signal(signal.SIGINT)
    server.expect("[INFO] Server stopped.")
    assert server.finish() == 0
    assert not any("Traceback" in line for line in server.output)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs a console group on Windows")
def test_ctrl_c_stops_the_client_cleanly(chat_server, programs):
    alice = programs(*client_args(chat_server.address))
    alice.type("/register", "alice", "pass", "pass", "/login", "alice", "pass", "juara")
    alice.expect("joined lobby")
    alice.process.send_signal(signal.SIGINT)  # waiting for the next line, like a student at the prompt
    alice.expect("[INFO] Connection closed.")
    assert alice.finish() == 0
    wait_until(lambda: "alice" not in chat_server.chat.online, what="the server to see alice leave")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here (Windows: a console handler, tested apart)")
def test_closing_the_terminal_logs_the_client_out(chat_server, programs):
    alice = programs(*client_args(chat_server.address))
    alice.type("/register", "alice", "secret", "secret", "/login", "alice", "secret", "juara")
    alice.expect("joined lobby")
    alice.process.send_signal(signal.SIGHUP)  # what the terminal sends when its window closes
    wait_until(lambda: "alice" not in chat_server.chat.online, what="the server to see alice leave")
    assert alice.finish() == 0


def test_ctrl_c_on_the_server_tells_its_clients_at_once(programs, tmp_path):
    server, address = start_server_process(programs, tmp_path)
    alice = programs(*client_args(address))
    alice.type("/register", "alice", "secret", "secret", "/login", "alice", "secret", "juara")
    alice.expect("joined lobby")
    server.process.send_signal(signal.SIGINT)
    server.expect("[INFO] Stopping: telling 1 member...")
    alice.expect("[INFO] The server was stopped.")
    alice.expect("[INFO] Trying to get back in")
    server.expect("[INFO] Server stopped.")
    assert server.finish() == 0


def test_server_banner_tells_clients_what_to_type(programs, tmp_path):
    server, address = start_server_process(programs, tmp_path, "--room-password", "rahasia")
    server.expect(f"Server IP 127.0.0.1   port {address[1]}")
    server.expect("Lobby room password: rahasia")
    server.expect("teaching toy")
    server.expect("Accounts and history kept in:")


def test_server_process_serves_a_client(programs, tmp_path):
    server, address = start_server_process(programs, tmp_path)
    alice = programs(*client_args(address))
    alice.type("/register", "alice", "pass", "pass", "exit")
    alice.expect("Registration successful.")
    assert alice.finish() == 0
    server.expect("REGISTER")
    assert os.path.exists(tmp_path / "users.json")
