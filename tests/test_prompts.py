"""What the user is asked and told: the Conversation with a real server, and client.py scripted.

The Conversation tests give it a RecordingTerminal (answers in, prompts and lines out) and a
real ChatClient, so they see the prompts, which a scripted client.py does not print.
"""

import re
import types

import pytest
from conftest import member, next_event
from test_e2e import client_args, programs  # noqa: F401 - programs is a fixture
from test_terminal import RecordingTerminal

import client
import encryption_helper as wire


class Conversation(types.SimpleNamespace):
    """A real ChatClient and a RecordingTerminal, wired as client.py wires them."""


def conversation(make_client, address, *answers: str) -> tuple[Conversation, RecordingTerminal]:
    """Return a conversation that will get `answers`, and its terminal."""
    terminal = RecordingTerminal(*answers)
    made: list[client.ChatClient] = []
    made.append(make_client(address, on_event=lambda event: terminal.show_event(event, made[0].name)))
    return Conversation(client=made[0], terminal=terminal), terminal


def run(chat: Conversation) -> None:
    """Run the conversation until it leaves, or its answers run out (then it stays logged in)."""
    try:
        client.converse(chat.client, chat.terminal)
    except client.EndOfInput:
        pass


def registered(make_client, address, *names: str) -> None:
    for name in names:
        make_client(address).register(name, "pass")


# --- Registration and login -------------------------------------------------------------------


def test_registration_asks_the_password_twice_and_refuses_a_short_one(chat_server, make_client):
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/register", "alice", "abc", "abcd", "abce", "abcd", "abcd")
    run(chat)
    shown = wire.fingerprint(chat_server.chat.key[1])
    assert terminal.shown == ["Too short: a password has at least 4 characters.",
                              "The two passwords differ; type it again.",
                              f"Registering at server {shown}: compare it with the server's banner.",
                              "Registration successful."]
    assert terminal.prompts[2:7] == ["Password (at least 4 characters): "] * 2 + ["Password again: ",
                                     "Password (at least 4 characters): ", "Password again: "]


@pytest.mark.parametrize("answers", [["/register", ""], ["/register", "alice", ""], ["/login", ""]])
def test_an_empty_answer_goes_back_to_the_choice(chat_server, make_client, answers):
    chat, terminal = conversation(make_client, chat_server.address, *answers)
    run(chat)
    assert terminal.shown == []
    assert terminal.prompts[-1] == "Type /register or /login (exit to quit): "


def test_a_bad_username_is_refused_before_the_password_is_asked(chat_server, make_client):
    chat, terminal = conversation(make_client, chat_server.address, "/register", "al ice")
    run(chat)
    assert terminal.shown == ["Usernames are 1-20 letters, digits, '_', '.' or '-'."]
    assert not any("Password" in prompt for prompt in terminal.prompts)


def test_enter_alone_at_the_lobby_password_goes_on_without_a_room(chat_server, make_client):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "wrong", "also wrong", "")
    run(chat)
    assert terminal.shown[1:] == ["Wrong room password.", "Try again, or press Enter alone to go on without a room.",
                                  "Wrong room password.",  # Enter alone is not sent: it is no wrong password
                                  "You are in no room: /join ROOM enters one, /rooms lists them, exit leaves."]
    assert terminal.prompts[-1] == "> "  # chatting, logged in


# --- Joining: who is here, and the room's history after that ---------------------------------


def test_joining_says_who_is_here(chat_server, make_client):
    for name in ["ann", "ben", "cat", "dan", "eve"]:
        member(make_client, chat_server.address, name)
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address, "/login", "alice", "pass", "juara")
    run(chat)
    assert terminal.shown[-1] == "joined lobby: ann, ben and 3 others here. Type /help for commands."


def test_history_is_shown_after_the_joined_line(chat_server, make_client, programs):  # noqa: F811
    member(make_client, chat_server.address, "alice").say("earlier words")
    registered(make_client, chat_server.address, "bob")
    bob = programs(*client_args(chat_server.address))
    bob.type("/login", "bob", "pass", "juara")
    bob.expect("joined lobby: alice here.")
    assert bob.expect("[history]").endswith("alice: earlier words")


def test_join_names_a_new_room_and_an_existing_one_in_its_prompt(chat_server, make_client):
    registered(make_client, chat_server.address, "alice", "bob")
    alice, alice_sees = conversation(make_client, chat_server.address,
                                     "/login", "alice", "pass", "juara", "/join games", "rahasia")
    run(alice)  # its answers run out in games: alice stays there
    assert "Password for new room games: " in alice_sees.prompts
    assert alice_sees.shown[-1] == "joined games (new room): nobody else here."
    bob, bob_sees = conversation(make_client, chat_server.address,
                                 "/login", "bob", "pass", "juara", "/join Games", "rahasia")
    run(bob)
    assert "Password for Games: " in bob_sees.prompts
    assert bob_sees.shown[-1] == "joined games: alice here."


def test_rooms_lists_an_empty_room_with_its_count(chat_server, make_client):
    alice = member(make_client, chat_server.address, "alice", room="games", room_password="dadu")
    alice.join("lobby", "juara")  # nobody is left in games
    registered(make_client, chat_server.address, "bob")
    chat, terminal = conversation(make_client, chat_server.address, "/login", "bob", "pass", "juara", "/rooms")
    run(chat)
    assert "  games  (0 here)" in terminal.shown and "  lobby  (2 here)" in terminal.shown


def test_enter_alone_at_a_rooms_password_joins_nothing_and_sends_nothing(chat_server, make_client):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "juara", "/join games", "")
    run(chat)
    assert terminal.shown[-1] == "Not joined: games needs its password."
    assert "games" not in chat_server.chat.rooms  # not made with an empty password, nor counted as a guess


def test_join_says_what_is_wrong_before_asking_a_password(chat_server, make_client):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "juara", "/join BAD NAME", "/join LOBBY", "/join")
    run(chat)
    assert terminal.shown[-3:] == ["Room names are 1-20 letters, digits, '_', '.' or '-' (no spaces).",
                                   "You are in lobby already.", "Usage: /join ROOM"]
    assert not any(prompt.startswith("Password for") for prompt in terminal.prompts)


# --- Private messages ----------------------------------------------------------------------------


def test_a_private_message_to_nobody_says_no_such_user(chat_server, make_client):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "juara", "/msg zed hello?")
    run(chat)
    assert terminal.shown[-1] == "No such user: zed."


def test_a_private_message_to_someone_offline_says_not_online(chat_server, make_client, monkeypatch):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "juara", "/msg bob hello?")

    def offline(user, text):  # the server's refusal when bob has an account but is not here
        raise client.Refused("not-online", "bob is not online.")

    monkeypatch.setattr(chat.client, "private", offline)
    run(chat)
    assert terminal.shown[-1] == "bob is not online."


def test_a_private_message_is_confirmed(chat_server, make_client):
    bob = member(make_client, chat_server.address, "bob")
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address,
                                  "/login", "alice", "pass", "juara", "/msg bob just us")
    run(chat)
    assert re.fullmatch(r"\[\d\d:\d\d\] -> bob: just us", terminal.shown[-1])
    assert next_event(bob, "private").text == "just us"


# --- Long lines ----------------------------------------------------------------------------------

LONG_LINE = " ".join(f"word{n:04}" for n in range(222))[:2000]  # 2,000 characters, 2 messages


def test_help_gives_the_length_limit(chat_server, make_client):
    registered(make_client, chat_server.address, "alice")
    chat, terminal = conversation(make_client, chat_server.address, "/login", "alice", "pass", "juara", "/help")
    run(chat)
    assert f"A line over {client.MAX_TEXT_BYTES} bytes (UTF-8) goes as" in terminal.shown[-1]


def test_a_long_line_is_sent_in_parts_in_order(chat_server, make_client, programs):  # noqa: F811
    bob = member(make_client, chat_server.address, "bob")
    registered(make_client, chat_server.address, "alice")
    alice = programs(*client_args(chat_server.address))
    alice.type("/login", "alice", "pass", "juara", LONG_LINE)
    alice.expect("] you: word0000")
    alice.expect("] you: word0111")  # each part comes back as one's own line
    assert " ".join([next_event(bob, "chat").text, next_event(bob, "chat").text]) == LONG_LINE


def test_a_long_private_message_is_sent_in_parts_in_order(chat_server, make_client, programs):  # noqa: F811
    bob = member(make_client, chat_server.address, "bob")
    registered(make_client, chat_server.address, "alice")
    alice = programs(*client_args(chat_server.address))
    alice.type("/login", "alice", "pass", "juara", "/msg bob " + LONG_LINE)
    alice.expect("] -> bob: word0000")
    alice.expect("] -> bob: word0111")
    assert " ".join([next_event(bob, "private").text, next_event(bob, "private").text]) == LONG_LINE


def test_cancel_takes_a_number_as_files_shows_it_and_refuses_anything_else(chat_server, make_client, monkeypatch):
    chat, terminal = conversation(make_client, chat_server.address)
    asked = []
    monkeypatch.setattr(chat.client, "cancel_files", lambda number=0: asked.append(number) or [])
    for typed in ("#3", "3", "", "²", "all of them"):
        client.run_command(chat.client, f"/cancel {typed}".strip(), terminal)
    assert asked == [3, 3, 0]  # "²" and words cancel nothing: a typo never stops every transfer
    assert terminal.shown.count("Usage: /cancel, or /cancel N with N as /files shows it") == 2


def test_sending_a_file_while_logged_out_says_not_sent(chat_server, make_client, tmp_path):
    chat, terminal = conversation(make_client, chat_server.address)
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    client.run_command(chat.client, f"/share {tmp_path / 'notes.txt'}", terminal)
    assert terminal.shown == [client.SESSION_LOST]  # said, and the chat goes on
