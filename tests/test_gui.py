"""The window (`python client.py --gui`): real Tk widgets on a virtual display, a real server on loopback.

Each test types into the window's entries, presses its buttons and keys, and pumps Tk's
event loop until what it expects is on screen - never longer than a bound. A scripted
ChatClient sits in the same room to talk to the window and to watch what it sends.

With no display, the tests start Xvfb (Debian: `apt install xvfb`) on a free display of
their own. Where neither exists they are skipped - except in CI (the CI variable set),
where a missing display is a failure.
"""

import builtins
import gc
import os
import random
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
from conftest import EVENT_WAIT, fast_timing, member, next_event
from test_discovery import answer_to
from test_files import outcome

import client
import server
from encryption_helper import Interface


def missing(reason: str):
    """Skip for `reason`, or fail in CI, which must run these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the window's tests")
    pytest.skip(reason)


def start_xvfb(log) -> tuple[subprocess.Popen, str, int]:
    """Start Xvfb on a free display; return it, the display and its pipe, once it accepts connections.

    -displayfd makes Xvfb choose a free display number itself and write it to a pipe
    once it listens: no guessing numbers, no waiting a fixed time. The pipe stays open
    while Xvfb runs (Xvfb stops if it cannot write there). What Xvfb says goes to `log`.
    """
    reader, writer = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(writer), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp", "-noreset"], pass_fds=(writer,), stdout=log, stderr=log)
    os.close(writer)
    said = b""
    with selectors.DefaultSelector() as selector:
        selector.register(reader, selectors.EVENT_READ)
        while not said.endswith(b"\n") and selector.select(EVENT_WAIT):
            said += os.read(reader, 100) or b"\n"  # b"": Xvfb ended
    number = said.decode().strip()
    if not number.isdigit() or not accepts_connections(int(number)):
        xvfb.kill()
        xvfb.wait()
        os.close(reader)
        log.seek(0)
        pytest.fail(f"Xvfb did not start a display: {log.read()!r}")
    return xvfb, f":{number}", reader


def accepts_connections(number: int) -> bool:
    """True if the X server of display `number` takes a connection on its local socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(EVENT_WAIT)
        try:
            probe.connect(f"/tmp/.X11-unix/X{number}")
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def display():
    """A display for the window: $DISPLAY if set, else an Xvfb started (and stopped) here."""
    try:
        client.load_tkinter()
    except ImportError:
        missing("this Python has no tkinter")
    if os.environ.get("DISPLAY") or sys.platform in ("win32", "darwin"):
        yield os.environ.get("DISPLAY")
        return
    if not shutil.which("Xvfb"):
        missing("no display, and no Xvfb to make one (apt install xvfb)")
    with tempfile.TemporaryFile("w+") as log, pytest.MonkeyPatch.context() as patch:
        xvfb, name, pipe = start_xvfb(log)
        patch.setenv("DISPLAY", name)
        try:
            yield name
        finally:
            xvfb.terminate()
            xvfb.wait(timeout=10)
            os.close(pipe)


@pytest.fixture
def open_window(display):
    """Return a function that opens a ChatWindow on a server; each is closed and checked afterwards."""
    windows = []

    def open_on(address, downloads=None, **timing) -> client.ChatWindow:
        options = {"timing": fast_timing(**timing)}
        if downloads is not None:
            options["downloads"] = str(downloads)
        window = client.ChatWindow(address[0], address[1], options)
        windows.append(window)
        pump(window, lambda: window.root.winfo_viewable(), "the window to show")
        return window

    yield open_on
    for window in windows:
        if not window.finished:
            window.close()
            pump(window, lambda w=window: w.finished, "the window to close")
        window.goodbye.join(timeout=EVENT_WAIT)
        window.worker.thread.join(timeout=EVENT_WAIT)
        assert window.internal_errors == []
    # A window is a web of objects pointing at each other, freed by Python's cycle collector
    # on whichever thread happens to run it. Tk must be freed on its own thread: here, now.
    windows.clear()
    gc.collect()


def pump(window: client.ChatWindow, condition, what: str, timeout: float = EVENT_WAIT):
    """Run Tk's event loop until `condition()` is true; fail if it is not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if not window.finished:
            window.root.update()
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)  # a breath for the other threads; the loop waits for the condition


def type_into(window: client.ChatWindow, entry, text: str, key: str = "<Return>") -> None:
    """Type `text` into an entry and press `key` there, as a user would."""
    entry.focus_force()
    window.root.update()
    entry.delete(0, "end")
    entry.insert(0, text)
    entry.event_generate(key)


def messages(window: client.ChatWindow) -> str:
    return window.chat.messages.get("1.0", "end")


def tags_at(window: client.ChatWindow, text: str) -> tuple[str, ...]:
    """Return the tags on the first character of `text` in the message list."""
    index = window.chat.messages.search(text, "1.0")
    assert index, f"{text!r} is not in the messages: {messages(window)!r}"
    return window.chat.messages.tag_names(index)


def fill_login(window: client.ChatWindow, name: str, password: str = "secret", again: str | None = None) -> None:
    """Fill in the first screen: the password twice (Register asks for it again), alike unless told."""
    fields = ((window.login.name, name), (window.login.password, password),
              (window.login.password_again, password if again is None else again))
    for entry, text in fields:
        entry.delete(0, "end")
        entry.insert(0, text)


def log_in(window: client.ChatWindow, name: str, password: str = "secret") -> None:
    """Register, log in and enter the lobby through the window's screens."""
    fill_login(window, name, password)
    window.login.register_button.invoke()
    pump(window, lambda: window.login.reply.cget('text') == "Registration successful.", "the registration")
    window.login.login_button.invoke()
    pump(window, lambda: window.view is window.room_view, "the room password screen")
    type_into(window, window.room_view.password, "juara")
    pump(window, lambda: window.view is window.chat, "the chat screen")


def members_shown(window: client.ChatWindow) -> list[str]:
    return list(window.chat.members.get(0, "end"))


def test_the_window_keeps_the_terminals_password_rule(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice", "abc")
    window.login.register_button.invoke()
    assert window.login.reply.cget("text") == f"Too short: a password has at least {client.MIN_PASSWORD} characters."
    assert not chat_server.chat.users.exists("alice")


def test_register_takes_the_password_twice_and_refuses_two_that_differ(chat_server, open_window):
    window = open_window(chat_server.address)
    assert window.login.password_again.cget("show") == "*"
    fill_login(window, "alice", "secret", again="secert")
    window.login.register_button.invoke()
    assert window.login.reply.cget("text") == "The two passwords differ; type it again."  # the terminal's words
    assert (window.login.password.get(), window.login.password_again.get()) == ("", "")
    assert not chat_server.chat.users.exists("alice")
    fill_login(window, "alice", "secret")
    type_into(window, window.login.password_again, "secret")  # Enter in the second field registers
    pump(window, lambda: window.login.reply.cget('text') == "Registration successful.", "the registration")
    window.login.login_button.invoke()  # Log in needs the password once
    pump(window, lambda: window.view is window.room_view, "the room password screen")


def test_register_with_a_taken_name_shows_the_servers_words(chat_server, make_client, open_window):
    member(make_client, chat_server.address, "alice", password="secret")
    window = open_window(chat_server.address)
    assert window.login.host.get() == "127.0.0.1"
    assert window.login.password.cget("show") == "*"
    fill_login(window, "alice")
    window.login.register_button.invoke()
    pump(window, lambda: window.login.reply.cget('text') == "Username already taken.", "the refusal")
    window.login.password.delete(0, "end")
    window.login.password.insert(0, "wrong")
    window.login.password.focus_force()
    window.login.password.event_generate("<Return>")  # Enter logs in
    pump(window, lambda: window.login.reply.cget('text') == "Invalid username or password.", "the refusal")


def test_register_log_in_and_join_through_the_window(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice")
    window.login.register_button.invoke()
    pump(window, lambda: window.login.reply.cget('text') == "Registration successful.", "the registration")
    window.login.login_button.invoke()
    pump(window, lambda: window.view is window.room_view, "the room password screen")
    assert window.room_view.welcome.cget('text') == "Welcome, alice."
    type_into(window, window.room_view.password, "wrong")
    pump(window, lambda: window.room_view.reply.cget('text') == "Wrong room password.", "the refusal")
    type_into(window, window.room_view.password, "juara")
    pump(window, lambda: window.view is window.chat, "the chat screen")
    pump(window, lambda: "joined lobby: nobody else here. Type /help" in messages(window), "the join reply")
    pump(window, lambda: members_shown(window) == ["alice"], "the member list")
    assert window.status.cget('text') == f"Connected to 127.0.0.1:{chat_server.address[1]} as alice"


# --- Finding a server: `?` at Server IP. Nothing here is broadcast: the search is sent to
# 127.0.0.1 alone, or answered by the test itself.


@pytest.fixture
def searches(monkeypatch):
    """The window's searches, sent to 127.0.0.1 instead of the networks' broadcast addresses.

    Return `made`, one (targets asked for, the thread that searched) a search, and
    `answers`: (address, [name, port, online]) put there are answered here, and nothing is sent.
    """
    real_search = client.search_network
    searches = types.SimpleNamespace(made=[], answers=[])

    def search_network(search, targets, port, *rest):
        searches.made.append((targets, threading.current_thread()))
        if not searches.answers:
            return real_search(search, ["127.0.0.1"], port)
        for address, fields in searches.answers:
            search.receive(answer_to(search, *fields, cipher=search.cipher), address)
        return search

    monkeypatch.setattr(client, "search_network", search_network)
    monkeypatch.setattr(client, "local_interfaces", lambda: [Interface("eth0", "10.77.0.2", "255.255.255.0",
                                                                       "10.77.0.255")])
    return searches


def test_a_question_mark_at_server_ip_finds_the_server_and_fills_it_in(start_server, open_window, searches):
    running = start_server(name="lab-pc-07")
    window = open_window(running.address)
    type_into(window, window.login.host, "?")  # Enter: as the terminal's "Server IP [...] (? searches the network)"
    assert window.login.reply.cget("text") == f"Searching this network for chat servers on port {running.address[1]}..."
    assert window.login.login_button.cget("state") == "disabled"
    pump(window, lambda: "Click a server" in window.login.reply.cget("text"), "the search's outcome")
    assert list(window.login.servers.get(0, "end")) == [f"lab-pc-07  127.0.0.1:{running.address[1]}  0 online"]
    assert (window.login.host.get(), window.login.port.get()) == ("127.0.0.1", str(running.address[1]))
    [(targets, thread)] = searches.made
    assert targets == ["10.77.0.255", "255.255.255.255"] and thread is window.worker.thread  # never the Tk thread
    fill_login(window, "alice")
    window.login.register_button.invoke()
    pump(window, lambda: window.login.reply.cget('text') == "Registration successful.", "the registration")


def test_find_servers_lists_every_server_and_a_click_chooses_one(chat_server, open_window, searches):
    searches.answers += [(("10.77.0.1", 5000), ["lab-pc-07", "5000", "2"]),
                         (("10.77.0.8", 6000), ["kelas", "6000", "0"])]
    window = open_window(chat_server.address)
    window.login.find_button.invoke()
    pump(window, lambda: window.login.servers.winfo_ismapped(), "the list of servers")
    assert list(window.login.servers.get(0, "end")) == ["lab-pc-07  10.77.0.1:5000  2 online",
                                                       "kelas  10.77.0.8:6000  0 online"]
    assert (window.login.host.get(), window.login.port.get()) == ("10.77.0.1", "5000")  # the first, as Enter takes
    click(window, window.login.servers, 1)
    assert (window.login.host.get(), window.login.port.get()) == ("10.77.0.8", "6000")
    assert searches.made[0][0] == ["10.77.0.255", "255.255.255.255"]


def test_a_search_nobody_answers_says_so_and_leaves_the_ip_to_type(chat_server, open_window, searches):
    searches.answers.append((("10.77.0.1", 9999), ["not a port", "x", "0"]))  # no server's answer: not listed
    window = open_window(chat_server.address)
    type_into(window, window.login.host, "?")
    pump(window, lambda: client.NOTHING_FOUND in window.login.reply.cget("text"), "the outcome")
    assert window.login.host.get() == "" and window.root.focus_get() is window.login.host
    assert not window.login.servers.winfo_ismapped()
    assert window.login.login_button.cget("state") == "normal"
    window.login.host.insert(0, "192.168.1.10")
    window.login.reply.configure(text="")
    window.login.find_button.invoke()  # a search with an address typed: that address stays
    pump(window, lambda: len(searches.made) == 2 and client.NOTHING_FOUND in window.login.reply.cget("text"),
         "the second outcome")
    assert window.login.host.get() == "192.168.1.10"


def test_log_out_leaves_the_room_password_screen_the_server_keeps_asking(chat_server, make_client, open_window):
    member(make_client, chat_server.address, "alice", password="secret")
    window = open_window(chat_server.address)
    fill_login(window, "alice")
    window.login.login_button.invoke()
    pump(window, lambda: window.view is window.room_view, "the room password screen")
    window.room_view.join_button.invoke()  # nothing typed: nothing sent, so not a wrong password
    assert window.room_view.reply.cget("text") == "Type the room password of lobby, or Log out."
    for _ in range(server.LOGIN_FAILURES):
        type_into(window, window.room_view.password, "wrong")
        pump(window, lambda: window.room_view.join_button.cget("state") == "normal", "the refusal")
    assert window.room_view.reply.cget("text").startswith("Too many wrong room passwords; try again in ")
    window.room_view.log_out_button.invoke()
    assert window.view is window.login  # at once: the BYE goes on the worker thread
    pump(window, lambda: window.login.reply.cget("text") == "Logged out.", "the goodbye")
    assert "alice" not in chat_server.chat.online  # the session ended, not left to time out
    assert window.status.cget("text") == f"Server 127.0.0.1:{chat_server.address[1]}: not logged in"
    assert window.login.name.get() == "alice" and window.login.password.get() == ""  # a lab PC: not left to the next
    fill_login(window, "alice")
    window.login.login_button.invoke()
    pump(window, lambda: window.view is window.room_view, "the room password screen again")


def test_lines_go_both_ways_between_window_and_terminal_client(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    type_into(window, window.chat.entry, "hello bob: | café")
    assert next_event(bob, "chat").text == "hello bob: | café"
    pump(window, lambda: "hello bob" in messages(window), "alice's own line, once the server took it")
    assert "own" in tags_at(window, "hello bob")
    bob.say("hi there")
    pump(window, lambda: "bob: hi there" in messages(window), "bob's line")
    assert client.name_colour("bob") in tags_at(window, "bob: hi there")
    assert "own" not in tags_at(window, "hi there")


def test_private_messages_and_mentions_are_highlighted(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    bob.private("alice", "psst")
    bob.say("where is Alice?")
    pump(window, lambda: "where is Alice?" in messages(window), "bob's lines")
    assert "private" in tags_at(window, "psst")
    assert "mention" in tags_at(window, "where is Alice?")
    type_into(window, window.chat.entry, "/msg bob back to you")
    assert next_event(bob, "private").text == "back to you"
    pump(window, lambda: "back to you" in messages(window), "alice's private line, once the server took it")
    assert "private" in tags_at(window, "back to you")


def test_member_list_follows_joins_and_leaves(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    pump(window, lambda: members_shown(window) == ["alice", "bob"], "bob in the member list")
    pump(window, lambda: list(window.chat.rooms.get(0, "end")) == ["lobby (2)"], "the room's count")
    assert "grey" in tags_at(window, "bob joined")
    bob.bye()
    pump(window, lambda: members_shown(window) == ["alice"], "bob gone from the member list")


def test_closing_the_window_says_goodbye(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    window.root.tk.call(window.root.protocol("WM_DELETE_WINDOW"))  # what the window's close button runs
    pump(window, lambda: window.finished, "the window to close")
    event = next_event(bob, "leave")
    assert event.user == "alice"
    assert event.text == ""  # said goodbye: not a timeout


def test_the_status_bar_follows_a_server_that_goes_away_and_comes_back(start_server, open_window, tmp_path):
    first = start_server(data_dir=tmp_path / "kept")
    window = open_window(first.address, heartbeat_every=0.2, lost_contact_after=0.5, give_up_after=1.5)
    log_in(window, "alice")
    first.stop()  # nobody is told
    # Its port stays taken, by a socket that never answers: as if the server's PC had left
    # the network. (A port nobody holds would be reported "unreachable" at once.)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        silent.bind(first.address)
        type_into(window, window.chat.entry, "anyone there?")
        pump(window, lambda: window.status.cget("text").startswith("Lost contact with 127.0.0.1"), "lost contact")
        pump(window, lambda: window.status.cget("text").startswith("The session ended; getting back in"), "rejoining")
    finally:
        silent.close()
    assert window.view is window.chat  # the chat stays on screen meanwhile
    start_server(data_dir=tmp_path / "kept", port=first.address[1])
    pump(window, lambda: window.status.cget("text").startswith("Connected to 127.0.0.1"), "back in")
    pump(window, lambda: "In lobby again." in messages(window), "the notice")


def test_ctrl_c_in_the_terminal_closes_the_window_and_says_goodbye(chat_server, make_client, open_window, capsys):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")

    def press_ctrl_c():
        raise KeyboardInterrupt  # where Python delivers Ctrl+C: in whatever runs on the Tk thread

    window.root.after(0, press_ctrl_c)
    assert window.run() == 0  # the loop a user's window runs in; it ends once the window is gone
    assert window.finished
    assert next_event(bob, "leave").user == "alice"
    assert "[INFO] Connection closed." in capsys.readouterr().out


def test_slash_commands_work_in_the_input_line(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    member(make_client, chat_server.address, "bob")
    type_into(window, window.chat.entry, "/who")
    pump(window, lambda: "In lobby: alice, bob" in messages(window), "the /who answer")
    type_into(window, window.chat.entry, "/nonsense")
    pump(window, lambda: "Unknown command /nonsense" in messages(window), "the unknown command")
    window.chat.entry.event_generate("<Up>")
    assert window.chat.entry.get() == "/nonsense"
    type_into(window, window.chat.entry, "/join games")
    pump(window, lambda: window.chat.asking, "the room password question")
    assert window.chat.entry.cget("show") == "*"
    type_into(window, window.chat.entry, "secret")
    pump(window, lambda: "joined games" in messages(window), "the join")
    pump(window, lambda: members_shown(window) == ["alice"], "the new room's members")


def test_clicking_a_room_joins_it_and_double_clicking_a_member_starts_a_private_message(
        chat_server, make_client, open_window):
    member(make_client, chat_server.address, "carol", room="games", room_password="dice")
    window = open_window(chat_server.address)
    log_in(window, "alice")
    member(make_client, chat_server.address, "bob")
    pump(window, lambda: members_shown(window) == ["alice", "bob"], "bob in the member list")
    click(window, window.chat.members, members_shown(window).index("bob"), times=2)
    assert window.chat.entry.get() == "/msg bob "
    pump(window, lambda: "games (1)" in window.chat.rooms.get(0, "end"), "the games room")
    click(window, window.chat.rooms, window.chat.room_names.index("games"))
    pump(window, lambda: window.chat.asking, "the room password question")
    type_into(window, window.chat.entry, "dice")
    pump(window, lambda: members_shown(window) == ["alice", "carol"], "the games room's members")
    assert window.chat.entry.get() == "/msg bob "  # what was being typed is back after the password


def click(window: client.ChatWindow, listbox, index: int, times: int = 1) -> None:
    """Click a listbox's line `index` with the mouse, `times` times in quick succession."""
    listbox.see(index)
    window.root.update()
    x, y, _, height = listbox.bbox(index)
    for _ in range(times):  # Tk sees a double-click in two clicks close in time and place
        listbox.event_generate("<Button-1>", x=x + 2, y=y + height // 2)
        listbox.event_generate("<ButtonRelease-1>", x=x + 2, y=y + height // 2)


def test_a_missing_tkinter_is_explained_with_the_install_command(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tkinter(name, *args, **kwargs):
        if name.startswith("tkinter"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tkinter)
    assert client.run_window(client.parse_args(["--gui"])) is None  # main goes on in the terminal
    assert "sudo apt install python3-tk" in capsys.readouterr().out


def test_importing_the_client_needs_no_tkinter():
    code = "import sys; sys.modules['tkinter'] = None; import client; print(client.tk)"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "None")


# --- Files ---


def random_file(folder, size: int, name: str = "photo.bin") -> tuple[str, bytes]:
    data = random.Random(size).randbytes(size)
    path = folder / name
    path.write_bytes(data)
    return str(path), data


def choose_file(monkeypatch, path: str) -> list[dict]:
    """The file dialog answers `path` at once; return what it was asked, one dict a call."""
    asked = []

    def answer(**options):
        asked.append(options)
        return path

    monkeypatch.setattr(client.tk.filedialog, "askopenfilename", answer)
    return asked


def test_send_to_member_sends_the_chosen_file_byte_for_byte(chat_server, make_client, open_window, tmp_path,
                                                            monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob", downloads=str(tmp_path / "bob"))
    path, data = random_file(tmp_path, 300_000)
    asked = choose_file(monkeypatch, path)
    window.chat.files.buttons["Send to member..."].invoke()  # nobody chosen yet
    assert "Choose a member in the list" in messages(window) and asked == []
    pump(window, lambda: "bob" in members_shown(window), "bob in the member list")
    window.chat.members.selection_set(members_shown(window).index("bob"))
    window.chat.files.buttons["Send to member..."].invoke()
    assert asked[0]["title"] == "Send a file to bob"
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data
    last = f"sent photo.bin ({client.describe_size(len(data))}) to bob"
    pump(window, lambda: last in messages(window), "the last line")
    assert "as number" in messages(window)  # the terminal's words when the server took the offer
    assert window.chat.files.bars == {}


def test_send_file_shares_with_the_room(chat_server, make_client, open_window, tmp_path, monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob", downloads=str(tmp_path / "bob"))
    path, data = random_file(tmp_path, 5000, "notes.txt")
    choose_file(monkeypatch, path)
    window.chat.files.buttons["Send file..."].invoke()
    assert next_event(bob, "file").text == f"alice is sending notes.txt ({client.describe_size(5000)})"
    what, received = outcome(bob)
    assert what == "done" and open(received.path, "rb").read() == data
    last = f"sent notes.txt ({client.describe_size(5000)}) to the room"
    pump(window, lambda: last in messages(window), "the last line")


def test_a_cancelled_file_dialog_sends_nothing(chat_server, open_window, monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    choose_file(monkeypatch, "")
    window.chat.files.buttons["Send file..."].invoke()
    window.chat.files.buttons["Cancel transfers"].invoke()
    pump(window, lambda: "No file of yours is on its way." in messages(window), "the answer to cancel")
    assert window.conversation.client.transfers() == []


def test_a_file_sent_to_the_window_lands_in_its_downloads_folder(chat_server, make_client, open_window, tmp_path):
    window = open_window(chat_server.address, downloads=tmp_path / "alice")
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    path, data = random_file(tmp_path, 200_000)
    transfer, offer = bob.send_file("alice", path)
    offer.result(EVENT_WAIT)
    saved = tmp_path / "alice" / "photo.bin"
    pump(window, lambda: f"saved {saved} ({client.describe_size(len(data))}, SHA-256 checked)" in messages(window),
         "the saved line")
    assert saved.read_bytes() == data
    assert window.chat.files.bars == {}


def test_a_transfer_has_a_bar_while_it_moves(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    transfer = client.Transfer("down", "bob", "big.iso", 1000, "0" * 64, "downloads/big.iso.part", 7,
                               done=420, state="sending")
    window.chat.files.show("progress", transfer)
    row, label, bar = window.chat.files.bars[id(transfer)]
    assert (label.cget("text"), int(bar.cget("value"))) == (client.describe_transfer(transfer), 42)
    assert "big.iso <- bob, 1000 B: 42%" in label.cget("text")
    transfer.state, transfer.note = "cancelled", "you cancelled it"
    window.chat.files.show("cancelled", transfer)
    assert window.chat.files.bars == {} and not row.winfo_exists()
    assert "cancelled: big.iso (you cancelled it)" in messages(window)


def a_transfer_moving(name: str = "big.iso") -> client.Transfer:
    return client.Transfer("down", "bob", name, 20_000_000, "0" * 64, f"downloads/{name}.part", 7,
                           done=8_400_000, state="sending")


def end_of(window: client.ChatWindow, transfer: client.Transfer) -> None:
    transfer.state, transfer.note = "cancelled", "cancelled"
    window.chat.files.show("cancelled", transfer)


def fill_messages(window: client.ChatWindow, lines: int = 60) -> None:
    """Add more lines than the messages can show, and wait until the newest is in sight."""
    for number in range(lines):
        window.chat.show_reply(f"line {number}")
    pump(window, lambda: newest_line_in_sight(window), "the newest line in sight")


def newest_line_in_sight(window: client.ChatWindow) -> bool:
    """True if the view reaches the end and the last line shows whole, not cut at the bottom."""
    text = window.chat.messages
    box = text.dlineinfo("end-2c")  # the last line's own newline; "end-1c" is Tk's own, after it
    return text.yview()[1] == 1.0 and box is not None and box[1] + box[3] <= text.winfo_height()


def settle(window: client.ChatWindow) -> None:
    """Let the window take the size its contents ask for, as a window nobody resized does."""
    asked = lambda: (window.root.winfo_reqwidth(), window.root.winfo_reqheight())  # noqa: E731
    pump(window, lambda: (window.root.winfo_width(), window.root.winfo_height()) == asked(), "the window's new size")


def test_the_messages_follow_new_lines_after_a_progress_bar_came_and_went(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    fill_messages(window)
    transfer = a_transfer_moving()
    window.chat.files.show("progress", transfer)  # the window grows by a bar...
    settle(window)
    end_of(window, transfer)  # ...and shrinks back: the messages were taller for a moment
    settle(window)
    window.chat.show_reply("the line after")
    window.root.update()
    assert newest_line_in_sight(window)


def test_the_messages_follow_new_lines_while_a_bar_shows_in_a_window_of_fixed_size(chat_server, open_window):
    window = open_window(chat_server.address)
    window.root.geometry("800x450")  # a size of its own, as when the user resized it: a bar takes the messages' room
    log_in(window, "alice")
    fill_messages(window)
    height = window.chat.messages.winfo_height()
    window.chat.files.show("progress", a_transfer_moving())
    pump(window, lambda: window.chat.messages.winfo_height() < height, "the messages to make room for the bar")
    window.chat.show_reply("the line after")
    window.root.update()
    assert newest_line_in_sight(window)


def test_scrolled_up_the_messages_stay_put_until_scrolled_back_down(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    fill_messages(window)
    window.chat.messages.yview_scroll(-5, "units")  # what the mouse wheel does
    window.root.update()
    window.chat.show_reply("while reading back")
    window.root.update()
    assert not newest_line_in_sight(window)
    window.chat.messages.yview_moveto(1.0)  # the scrollbar dragged to the bottom
    window.root.update()
    window.chat.show_reply("back at the end")
    window.root.update()
    assert newest_line_in_sight(window)


def test_open_downloads_opens_the_folder_or_shows_where_it_is(chat_server, open_window, tmp_path, monkeypatch):
    window = open_window(chat_server.address, downloads=tmp_path / "alice")
    log_in(window, "alice")
    opened = []
    monkeypatch.setattr(client, "open_folder", opened.append)
    window.chat.files.buttons["Open downloads"].invoke()
    assert opened == [str(tmp_path / "alice")] and os.path.isdir(opened[0])

    def no_file_manager(folder):
        raise FileNotFoundError(2, "No such file or directory", "xdg-open")

    monkeypatch.setattr(client, "open_folder", no_file_manager)
    window.chat.files.buttons["Open downloads"].invoke()
    assert f"Your files are in {tmp_path / 'alice'}" in messages(window)
