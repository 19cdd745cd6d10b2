"""The window (`python client.py --gui`): real Tk widgets on a virtual display, a real server on loopback.

Each test types into the window's entries, presses its buttons and keys, answers its
dialogs, and pumps Tk's event loop until what it expects is on screen - never longer
than a bound. A ChatClient sits in the same room to talk to the window and to watch
what it sends.

With no display, the tests start Xvfb (Debian: `apt install xvfb`) on a free display of
their own. Where neither exists they are skipped - except in CI (the CI variable set),
where a missing display is a failure.
"""

import builtins
import dataclasses
import gc
import itertools
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
from conftest import EVENT_WAIT, fast_timing, member, next_event, wait_until
from test_discovery import answer_to

import client
from encryption_helper import fingerprint


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
def open_window(display, tmp_path):
    """Return a function that opens a ChatWindow on a server; each is closed afterwards."""
    windows = []

    def open_on(address, downloads=None, **timing) -> client.ChatWindow:
        options = {"timing": fast_timing(**timing), "downloads": str(downloads or tmp_path / "window")}
        window = client.ChatWindow(address[0], address[1], options)
        windows.append(window)
        pump(window, lambda: window.root.winfo_viewable(), "the window to show")
        return window

    yield open_on
    for window in windows:
        if not window.finished:
            window.close()
            pump(window, lambda w=window: w.finished, "the window to close")
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


def answer_dialog(window: client.ChatWindow, text: str | None) -> str:
    """Wait for the window's dialog, type `text` there and press OK (None: Cancel); return its prompt.

    The dialog runs an event loop of its own until it is answered: the answer is typed
    by a callback that Tk runs inside that loop.
    """
    prompts = []

    def look() -> None:
        dialogs = [child for child in window.root.winfo_children() if hasattr(child, "entry")]
        if not dialogs:
            window.root.after(10, look)
            return
        prompts.append(dialogs[0].prompt)
        if text is None:
            dialogs[0].cancel()
        else:
            dialogs[0].entry.insert(0, text)
            dialogs[0].ok()

    window.root.after(10, look)
    return pump(window, lambda: prompts, "the dialog")[0]


def type_into(window: client.ChatWindow, entry, text: str) -> None:
    """Type `text` into an entry and press Enter there, as a user would."""
    entry.focus_force()
    window.root.update()
    entry.delete(0, "end")
    entry.insert(0, text)
    entry.event_generate("<Return>")


def messages(window: client.ChatWindow) -> str:
    return window.messages.get("1.0", "end")


def tags_at(window: client.ChatWindow, text: str) -> tuple[str, ...]:
    """Return the tags on the first character of `text` in the messages."""
    index = window.messages.search(text, "1.0")
    assert index, f"{text!r} is not in the messages: {messages(window)!r}"
    return window.messages.tag_names(index)


def reply(window: client.ChatWindow) -> str:
    return window.reply.cget("text")


def fill_login(window: client.ChatWindow, name: str, password: str = "secret", again: str | None = None) -> None:
    """Fill in the log in frame: the password twice (Register asks for it again), alike unless told."""
    for entry, text in ((window.name, name), (window.password, password),
                        (window.again, password if again is None else again)):
        entry.delete(0, "end")
        entry.insert(0, text)


def press(window: client.ChatWindow, text: str) -> None:
    """Press the button labelled `text` in the window's visible frame."""
    frame = window.chat if window.chatting else window.login
    buttons = [widget for widget in all_widgets(frame) if widget.winfo_class() == "TButton"
               and widget.cget("text") == text]
    assert len(buttons) == 1, f"no single {text!r} button"
    buttons[0].invoke()


def all_widgets(widget) -> list:
    return [widget] + [inner for child in widget.winfo_children() for inner in all_widgets(child)]


def log_in(window: client.ChatWindow, name: str, password: str = "secret") -> None:
    """Register, log in and enter the lobby through the window, as a user would."""
    fill_login(window, name, password)
    press(window, "Register")
    pump(window, lambda: reply(window) == "Registration successful.", "the registration")
    press(window, "Log in")
    assert answer_dialog(window, "juara") == "Password for lobby: "
    pump(window, lambda: members_shown(window) == [name], "the member list")


def members_shown(window: client.ChatWindow) -> list[str]:
    return list(window.members.get(0, "end"))


CLICK_TIMES = itertools.count(10_000, 10_000)  # ms, the X server's clock: clicks far apart


def click(window: client.ChatWindow, listbox, index: int, times: int = 1) -> None:
    """Click a listbox's line `index` with the mouse, `times` times in quick succession."""
    listbox.see(index)
    window.root.update()
    x, y, _, height = listbox.bbox(index)
    start = next(CLICK_TIMES)
    for step in range(times):  # Tk sees a double-click in two clicks close in time and place
        for event in ("<Button-1>", "<ButtonRelease-1>"):
            listbox.event_generate(event, x=x + 2, y=y + height // 2, time=start + 50 * step)


# --- Logging in ---


def test_register_keeps_the_terminals_password_rule(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice", "abc")
    press(window, "Register")
    assert reply(window) == f"Too short: a password has at least {client.MIN_PASSWORD} characters."
    assert not chat_server.chat.users.exists("alice")


def test_register_takes_the_password_twice_and_refuses_two_that_differ(chat_server, open_window):
    window = open_window(chat_server.address)
    assert window.password.cget("show") == window.again.cget("show") == "*"
    fill_login(window, "alice", "secret", again="secert")
    press(window, "Register")
    assert reply(window) == "The two passwords differ; type it again."  # the terminal's words
    assert window.again.get() == "" and not chat_server.chat.users.exists("alice")
    type_into(window, window.again, "secret")  # Enter in the second field registers
    pump(window, lambda: reply(window) == "Registration successful.", "the registration")
    assert chat_server.chat.users.exists("alice")


def test_a_taken_name_and_a_wrong_password_show_the_servers_words(chat_server, make_client, open_window):
    member(make_client, chat_server.address, "alice", password="secret")
    window = open_window(chat_server.address)
    assert (window.host.get(), window.port.get()) == ("127.0.0.1", str(chat_server.address[1]))
    fill_login(window, "alice")
    press(window, "Register")
    pump(window, lambda: reply(window) == "Username already taken.", "the refusal")
    type_into(window, window.password, "wrong")  # Enter logs in
    pump(window, lambda: reply(window) == "Invalid username or password.", "the refusal")
    assert not window.chatting


def test_a_port_that_is_no_port_is_refused(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice")
    type_into(window, window.port, "99999")
    pump(window, lambda: "1 to 65535" in reply(window), "the port's rule")
    assert not window.chatting


def test_log_in_asks_the_room_password_in_a_dialog_until_it_is_right(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice")
    press(window, "Register")
    pump(window, lambda: reply(window) == "Registration successful.", "the registration")
    press(window, "Log in")
    assert answer_dialog(window, "") == "Password for lobby: "  # Enter alone sends nothing
    pump(window, lambda: "Not joined: lobby needs its password." in messages(window), "the answer")
    assert "Welcome, alice" in messages(window) and window.chatting
    pump(window, lambda: list(window.rooms.get(0, "end")) == ["lobby (0)"], "the rooms list")
    click(window, window.rooms, 0)  # a click on a room joins it: the password is asked again
    answer_dialog(window, "wrong")
    pump(window, lambda: "Wrong room password." in messages(window), "the refusal")
    click(window, window.rooms, 0)
    answer_dialog(window, "juara")
    pump(window, lambda: "joined lobby: nobody else here." in messages(window), "the join")
    pump(window, lambda: members_shown(window) == ["alice"], "the member list")
    assert window.status.cget("text") == f"127.0.0.1:{chat_server.address[1]}: connected"


def test_cancel_at_the_room_password_leaves_the_user_out_of_any_room(chat_server, open_window):
    window = open_window(chat_server.address)
    fill_login(window, "alice")
    press(window, "Register")
    pump(window, lambda: reply(window) == "Registration successful.", "the registration")
    press(window, "Log in")
    answer_dialog(window, None)
    pump(window, lambda: "Cancelled." in messages(window), "the cancel")
    assert "alice" in chat_server.chat.online and window.client.room is None


# --- Finding a server. Nothing here is broadcast: the search goes to 127.0.0.1 alone, or is
# answered by the test itself.


@pytest.fixture
def searches(monkeypatch):
    """The window's searches, sent to 127.0.0.1 instead of the networks' broadcast addresses.

    Return `made`, one (targets, the thread that searched) a search, and `answers`:
    (address, [name, port, online]) put there are answered here, and nothing is sent.
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
    monkeypatch.setattr(client, "broadcast_addresses", lambda: ["10.77.0.255", "255.255.255.255"])
    return searches


def test_find_servers_finds_the_server_on_the_port_typed(start_server, open_window, searches):
    running = start_server(name="lab-pc-07")
    window = open_window(running.address)
    window.host.delete(0, "end")
    press(window, "Find servers")
    pump(window, lambda: window.servers.size(), "the list of servers")
    shown = f"lab-pc-07  127.0.0.1:{running.address[1]}  0 online  {fingerprint(running.chat.key[1])}"
    assert list(window.servers.get(0, "end")) == [shown]
    [(targets, thread)] = searches.made
    assert targets == ["10.77.0.255", "255.255.255.255"] and thread is not threading.current_thread()
    click(window, window.servers, 0)
    assert (window.host.get(), window.port.get()) == ("127.0.0.1", str(running.address[1]))
    assert reply(window) == "Click a server in the list to use it."


def test_find_servers_lists_every_server_and_a_click_chooses_one(chat_server, open_window, searches):
    searches.answers += [(("10.77.0.1", 5000), ["lab-pc-07", "5000", "2"]),
                         (("10.77.0.8", 6000), ["kelas", "6000", "0"])]
    window = open_window(chat_server.address)
    press(window, "Find servers")
    pump(window, lambda: window.servers.size() == 2, "the list of servers")
    assert list(window.servers.get(0, "end")) == [str(server) for server in window.found]
    assert [server.host for server in window.found] == ["10.77.0.1", "10.77.0.8"]
    assert reply(window) == "Several servers answered: Click a server in the list to use it."
    click(window, window.servers, 1)
    assert (window.host.get(), window.port.get()) == ("10.77.0.8", "6000")


def test_a_search_nobody_answers_says_so_and_keeps_the_ip_typed(chat_server, open_window, searches):
    searches.answers.append((("10.77.0.1", 9999), ["not a port", "x", "0"]))  # no server's answer
    window = open_window(chat_server.address)
    window.host.delete(0, "end")
    window.host.insert(0, "192.168.1.10")
    press(window, "Find servers")
    pump(window, lambda: reply(window) == client.NOTHING_FOUND, "the outcome")
    assert window.servers.size() == 0 and window.host.get() == "192.168.1.10"


# --- Chatting ---


def test_lines_go_both_ways_and_own_lines_read_you(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    type_into(window, window.entry, "hello bob: | café")
    assert next_event(bob, "chat").text == "hello bob: | café"
    pump(window, lambda: "you: hello bob: | café" in messages(window), "alice's own line")
    assert "own" in tags_at(window, "you: hello bob")
    assert window.entry.get() == ""
    bob.say("hi there")
    pump(window, lambda: "bob: hi there" in messages(window), "bob's line")
    assert "own" not in tags_at(window, "bob: hi there")


def test_private_messages_and_mentions_are_highlighted(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    bob.private("alice", "psst")
    bob.say("where is Alice?")
    pump(window, lambda: "where is Alice?" in messages(window), "bob's lines")
    assert "private" in tags_at(window, "bob (private): psst")
    assert "mention" in tags_at(window, "where is Alice?")
    type_into(window, window.entry, "/msg bob back to you")
    while (event := next_event(bob, "private")).user != "alice":  # bob's own line comes back too
        pass
    assert event.text == "back to you"
    pump(window, lambda: "-> bob: back to you" in messages(window), "alice's private line")
    assert "private" in tags_at(window, "-> bob: back to you")


def test_the_lists_follow_joins_and_leaves(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    pump(window, lambda: members_shown(window) == ["alice", "bob"], "bob in the member list")
    pump(window, lambda: list(window.rooms.get(0, "end")) == ["lobby (2)"], "the room's count")
    assert "bob joined" in messages(window)
    bob.bye()
    pump(window, lambda: members_shown(window) == ["alice"], "bob gone from the member list")


def test_clicking_a_room_joins_it_and_double_clicking_a_member_starts_a_private_message(
        chat_server, make_client, open_window):
    member(make_client, chat_server.address, "carol", room="games", room_password="dice")
    window = open_window(chat_server.address)
    log_in(window, "alice")
    member(make_client, chat_server.address, "bob")
    pump(window, lambda: members_shown(window) == ["alice", "bob"], "bob in the member list")
    click(window, window.members, 1, times=2)
    assert window.entry.get() == "/msg bob "
    pump(window, lambda: "games (1)" in window.rooms.get(0, "end"), "the games room")
    click(window, window.rooms, list(window.rooms.get(0, "end")).index("games (1)"))
    assert answer_dialog(window, "dice") == "Password for games: "
    pump(window, lambda: members_shown(window) == ["alice", "carol"], "the games room's members")


def test_slash_commands_go_through_the_terminals_command_parser(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    member(make_client, chat_server.address, "bob")
    type_into(window, window.entry, "/who")
    pump(window, lambda: "In lobby: alice, bob" in messages(window), "the /who answer")
    type_into(window, window.entry, "/nonsense")
    pump(window, lambda: "Unknown command /nonsense" in messages(window), "the unknown command")
    type_into(window, window.entry, "/help")
    pump(window, lambda: client.HELP in messages(window), "the help")
    type_into(window, window.entry, "/join games")
    assert answer_dialog(window, "secret") == "Password for new room games: "
    pump(window, lambda: "joined games" in messages(window), "the join")
    pump(window, lambda: members_shown(window) == ["alice"], "the new room's members")


def test_the_messages_stay_put_while_scrolled_up_and_follow_at_the_end(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    for number in range(60):
        window.add_line(f"line {number}")
    window.root.update()
    assert window.messages.yview()[1] == 1.0  # the newest line in sight
    window.messages.yview_scroll(-5, "units")  # what the mouse wheel does
    window.root.update()
    window.add_line("while reading back")
    window.root.update()
    assert window.messages.yview()[1] < 1.0
    window.messages.yview_moveto(1.0)  # the scrollbar dragged to the bottom
    window.add_line("back at the end")
    window.root.update()
    assert window.messages.yview()[1] == 1.0


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
        type_into(window, window.entry, "anyone there?")
        pump(window, lambda: window.status.cget("text").endswith("lost contact"), "lost contact")
        pump(window, lambda: window.status.cget("text").endswith("reconnecting"), "reconnecting")
    finally:
        silent.close()
    assert window.chatting  # the chat stays on screen meanwhile
    start_server(data_dir=tmp_path / "kept", port=first.address[1])
    pump(window, lambda: window.status.cget("text").endswith("connected"), "back in", timeout=30)


# --- Logging out and closing ---


def test_log_out_ends_the_session_and_shows_the_log_in_frame(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    press(window, "Log out")
    assert not window.chatting  # at once: BYE on the worker
    wait_until(lambda: "alice" not in chat_server.chat.online, what="the session to end")
    pump(window, lambda: window.status.cget("text").endswith(": not logged in"), "the status")
    assert window.name.get() == "alice" and window.password.get() == window.again.get() == ""
    fill_login(window, "alice")
    press(window, "Log in")
    answer_dialog(window, "juara")
    pump(window, lambda: window.chatting and members_shown(window) == ["alice"], "the chat again")


def test_a_session_taken_over_elsewhere_brings_back_the_log_in_frame(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    elsewhere = make_client(chat_server.address)
    elsewhere.login("alice", "secret")  # the same account, from another PC
    pump(window, lambda: not window.chatting, "the log in frame")
    assert window.status.cget("text").endswith(": not logged in") and window.password.get() == ""


def test_closing_the_window_logs_out(chat_server, make_client, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    window.root.tk.call(window.root.protocol("WM_DELETE_WINDOW"))  # what the close button runs
    pump(window, lambda: window.finished, "the window to close")
    event = next_event(bob, "leave")
    assert (event.user, event.text) == ("alice", "")  # said goodbye: not a timeout


def test_exit_in_the_input_line_closes_the_window(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    type_into(window, window.entry, "exit")
    pump(window, lambda: window.finished, "the window to close")
    wait_until(lambda: "alice" not in chat_server.chat.online, what="the session to end")


def test_ctrl_c_in_the_terminal_closes_the_window_and_says_goodbye(chat_server, make_client, open_window, capsys):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    # Ctrl+C in the terminal that started the window: SIGINT, while Tk waits for events.
    window.root.after(50, signal.raise_signal, signal.SIGINT)
    assert window.run() == 0  # the loop a user's window runs in; it ends once the window is gone
    assert window.finished
    assert next_event(bob, "leave").user == "alice"
    assert "[INFO] Connection closed." in capsys.readouterr().out


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


def transfer_end(made: client.ChatClient) -> client.Transfer:
    """Return the next transfer of `made` that ended: done, failed or cancelled."""
    while True:
        transfer = next_event(made, "transfer", timeout=60).more[0]
        if not transfer.active:
            return transfer


def test_send_file_goes_to_the_member_chosen_byte_for_byte_with_the_bar(
        chat_server, make_client, open_window, tmp_path, monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob", downloads=str(tmp_path / "bob"), accept_files=True)
    path, data = random_file(tmp_path, 300_000)
    asked = choose_file(monkeypatch, path)
    pump(window, lambda: "bob" in members_shown(window), "bob in the member list")
    window.members.selection_set(members_shown(window).index("bob"))
    press(window, "Send file...")
    assert asked[0]["title"] == "Send to bob" and not window.members.curselection()
    last = f"sent photo.bin ({client.describe_size(len(data))}) to bob"
    pump(window, lambda: last in messages(window), "the last line")
    received = transfer_end(bob)
    assert received.state == "done" and open(received.path, "rb").read() == data
    window.root.update()
    assert messages(window).count(last) == 1  # told once, however many events it had
    assert window.bar_label.cget("text") == "No file on its way" and int(window.bar.cget("value")) == 0


def test_send_file_with_no_member_chosen_shares_with_the_room(chat_server, make_client, open_window,
                                                               tmp_path, monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob", downloads=str(tmp_path / "bob"), accept_files=True)
    path, data = random_file(tmp_path, 5000, "notes.txt")
    asked = choose_file(monkeypatch, path)
    press(window, "Send file...")
    assert asked[0]["title"] == "Send to the room"
    received = transfer_end(bob)
    assert received.state == "done" and open(received.path, "rb").read() == data
    pump(window, lambda: f"sent notes.txt ({client.describe_size(5000)}) to the room" in messages(window),
         "the last line")


def test_a_cancelled_file_dialog_sends_nothing(chat_server, open_window, monkeypatch):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    choose_file(monkeypatch, "")
    press(window, "Send file...")
    type_into(window, window.entry, "/cancel")
    pump(window, lambda: "No file of yours is on its way." in messages(window), "the answer to /cancel")
    assert window.client.transfers() == []


def test_a_file_sent_to_the_window_lands_in_its_downloads_folder(chat_server, make_client, open_window, tmp_path):
    window = open_window(chat_server.address, downloads=tmp_path / "alice")
    log_in(window, "alice")
    bob = member(make_client, chat_server.address, "bob")
    path, data = random_file(tmp_path, 200_000)
    bob.send_file("alice", path)
    pump(window, lambda: "bob offers photo.bin" in messages(window), "the offer")
    assert not (tmp_path / "alice").exists()  # nothing saved before the button says so
    press(window, "Accept file")
    saved = tmp_path / "alice" / "photo.bin"
    pump(window, lambda: f"saved {saved} ({client.describe_size(len(data))}" in messages(window), "the saved line")
    assert saved.read_bytes() == data and window.bar_label.cget("text") == "No file on its way"


def test_one_bar_counts_the_bytes_of_every_file_on_its_way(chat_server, open_window):
    window = open_window(chat_server.address)
    log_in(window, "alice")
    first = client.Transfer("receive", "bob", "big.iso", 1000, "0" * 64, "downloads/big.iso", number=7,
                            done_bytes=400, state="moving")
    second = client.Transfer("send", "bob", "notes.txt", 1000, "0" * 64, "notes.txt", number=8,
                             done_bytes=100, state="moving")
    # An event carries the transfer as it was, and the live one.
    for transfer in (first, second):
        window.draw(client.Event("transfer", time.time(), more=(transfer, transfer)))
    assert (window.bar_label.cget("text"), int(window.bar.cget("value"))) == ("25% of 2 file(s)", 25)
    first.state, first.note = "cancelled", "you cancelled it"
    ended = dataclasses.replace(first)
    window.draw(client.Event("transfer", time.time(), more=(ended, first)))
    window.draw(client.Event("transfer", time.time(), more=(ended, first)))  # seen again: told once
    assert window.bar_label.cget("text") == "10% of 1 file(s)"
    assert messages(window).count("cancelled: big.iso (you cancelled it)") == 1


# --- The window itself ---


def test_the_minimum_size_cuts_nothing_in_either_frame(chat_server, open_window):
    window = open_window(chat_server.address)
    width, height = window.root.minsize()
    assert (width, height) == (window.root.winfo_reqwidth(), window.root.winfo_reqheight())
    window.root.geometry(f"{width}x{height}")
    for chatting in (False, True):
        window.show_frame(chatting)
        pump(window, lambda: (window.root.winfo_width(), window.root.winfo_height()) == (width, height),
             "the window at its minimum size")
        frame = window.chat if chatting else window.login
        for widget in all_widgets(frame)[1:] + [window.status]:
            assert widget.winfo_width() >= widget.winfo_reqwidth(), widget
            assert widget.winfo_height() >= widget.winfo_reqheight(), widget
            assert widget.winfo_rootx() + widget.winfo_width() <= window.root.winfo_rootx() + width
            assert widget.winfo_rooty() + widget.winfo_height() <= window.root.winfo_rooty() + height


def test_the_window_uses_themed_widgets_and_no_terminal_words(chat_server, open_window):
    window = open_window(chat_server.address)
    widgets = all_widgets(window.root)
    assert {widget.winfo_class() for widget in widgets} >= {"TButton", "TEntry", "TLabel", "TProgressbar"}
    texts = " ".join(str(widget.cget("text")) for widget in widgets if "text" in widget.keys())
    assert "Ctrl+C" not in texts and "exit" not in texts.lower()
    # The help and the notices the window shows are the terminal's: none says "Ctrl+C".
    assert "Ctrl+C" not in client.HELP and "type exit" not in client.HELP


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
