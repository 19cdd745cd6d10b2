"""Server and clients on separate hosts of a real (virtual) LAN: found by broadcast, chatting, cut off.

Each test builds a small LAN out of Linux network namespaces, runs server.py and client.py
on its hosts as a student would, and removes it all afterwards - also when the test fails:

    namespace udpchat-lan-<pid>-switch     a bridge, br0: the LAN's switch
    namespace udpchat-lan-<pid>-server     eth0 10.77.0.1/24 -- veth -- a port of br0
    namespace udpchat-lan-<pid>-client1    eth0 10.77.0.2/24 -- veth -- a port of br0
    namespace udpchat-lan-<pid>-client2    eth0 10.77.0.3/24 -- veth -- a port of br0

The bridge lives in a namespace of its own, and every veth pair is made there with its other
end moved straight into a host's namespace, so nothing touches this machine's own interfaces.
The addresses exist only inside the namespaces, which have no route anywhere else - like a lab
network without Internet - so the clients' broadcasts reach these hosts and nothing else.
Every program runs inside one (`ip netns exec NAME python client.py ...`).

It needs Linux, root and `ip` (iproute2); the lossy-link test also `nft` (nftables). Without
them the tests skip and say why; on CI (the CI environment variable set) they fail instead.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import Program

PREFIX = f"udpchat-lan-{os.getpid()}-"  # unique per run: parallel runs and the benchmark never collide
SUBNET = "10.77.0"
HOSTS = ("server", "client1", "client2")  # host number i has the address 10.77.0.i
PORT = "9999"
SERVER_NAME = "lab-server"
SESSION_TIMEOUT = "8"  # seconds: above the client's 5 s heartbeat, short for a test


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if not shutil.which("ip"):
        return "needs the `ip` command (Debian package iproute2)"
    return None


def cannot_run(reason: str) -> None:
    """Skip with `reason`; on CI, where these tests must run, fail with it."""
    if os.environ.get("CI"):
        pytest.fail(f"the LAN tests cannot run on CI: {reason}")
    pytest.skip(reason)


def run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]


def left_over(name: str) -> bool:
    """Is `name` a namespace of ours, or of an earlier run of these tests that was killed?"""
    found = re.fullmatch(r"udpchat-lan-(\d+)-.+", name)
    if not found:
        return False
    pid = int(found.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # that run is gone
    except PermissionError:
        pass
    return False  # a run still going: its namespaces are its own


class Lan:
    """The namespaces, the programs running in them, and taking it all down again."""

    def __init__(self):
        self.made: list[str] = []
        self.programs: list[Program] = []

    def build(self) -> "Lan":
        switch = self.add_namespace("switch")
        run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", switch, "link", "set", "br0", "up")
        for number, host in enumerate(HOSTS, 1):
            inside, port = self.add_namespace(host), f"port{number}"
            run("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", inside)
            run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", inside, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            run("ip", "-n", inside, "link", "set", "eth0", "up")
            run("ip", "-n", inside, "link", "set", "lo", "up")
        return self

    def add_namespace(self, host: str) -> str:
        name = PREFIX + host
        run("ip", "netns", "add", name)
        self.made.append(name)
        return name

    @staticmethod
    def address(host: str) -> str:
        return f"{SUBNET}.{HOSTS.index(host) + 1}"

    def start(self, host: str, *args: str) -> Program:
        """Run `python ARGS...` on `host`, from the repository."""
        program = Program(*args, inside=("ip", "netns", "exec", PREFIX + host))
        self.programs.append(program)
        return program

    def on(self, host: str, *command: str, stdin: str | None = None) -> str:
        return run("ip", "netns", "exec", PREFIX + host, *command, stdin=stdin)

    def tear_down(self) -> None:
        """Stop every program, then remove every namespace: the switch's goes with its veth ends."""
        for program in self.programs:
            with contextlib.suppress(Exception):  # one that will not stop must not keep a namespace alive
                program.stop()
        for name in set(self.made) | {name for name in namespaces() if left_over(name)}:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()


@pytest.fixture
def lan(tmp_path):
    reason = unavailable_reason()
    if reason:
        cannot_run(reason)
    made = Lan()
    try:
        made.tear_down()  # what a killed earlier run of ours left behind
        try:
            made.build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            cannot_run(f"could not build the namespaces: {error}")
        yield made
    finally:
        made.tear_down()
    assert not [name for name in namespaces() if name.startswith(PREFIX)], "a namespace was left behind"


def start_chat_server(lan: Lan, tmp_path, *more: str) -> Program:
    server = lan.start("server", "server.py", "--port", PORT, "--name", SERVER_NAME,
                       "--data-dir", str(tmp_path / "server"), *more)
    server.expect("Press Ctrl+C to stop.")
    return server


def join_chat(client: Program, name: str) -> None:
    client.type("/register", name, "secret", "secret", "/login", name, "secret", "juara")
    client.expect("joined lobby")


# --- The tests --------------------------------------------------------------------------------


def test_the_banner_names_the_servers_lan_address(lan, tmp_path):
    server = lan.start("server", "server.py", "--port", PORT, "--data-dir", str(tmp_path))
    assert server.expect("Clients on other PCs answer:").endswith(f"Server IP {lan.address('server')}   port {PORT}")
    server.expect("find this server as: ")


def test_find_on_another_host_lists_the_server(lan, tmp_path):
    start_chat_server(lan, tmp_path)
    finder = lan.start("client1", "client.py", "--find")
    where = f"{lan.address('server')}:{PORT}"
    assert finder.expect(where).startswith(f"{where}  {SERVER_NAME}  0 online  ")  # then its fingerprint
    assert finder.finish() == 0


def test_clients_on_two_hosts_search_take_the_default_and_chat(lan, tmp_path):
    server = start_chat_server(lan, tmp_path)
    alice, bob = lan.start("client1", "client.py"), lan.start("client2", "client.py")
    for client in (alice, bob):
        client.type("?", "", "")  # search; Enter takes the first server found, Enter its port
        client.expect(f"1) {SERVER_NAME}  {lan.address('server')}:{PORT}  ")
        client.expect(f"Connected to the chat server at {lan.address('server')}:{PORT}.")
    join_chat(alice, "alice")
    join_chat(bob, "bob")
    alice.expect("bob joined")
    bob.type("halo dari client2")
    assert alice.expect("bob:").endswith("] bob: halo dari client2")
    alice.type("halo juga", "exit")
    assert bob.expect("alice:").endswith("] alice: halo juga")
    assert alice.finish() == 0
    server.expect(f"{lan.address('client1')}:")  # the server saw the client's own LAN address


def test_a_client_behind_a_lossy_link_still_chats(lan, tmp_path):
    if not shutil.which("nft"):
        cannot_run("needs `nft` (Debian package nftables)")
    start_chat_server(lan, tmp_path)
    # A fifth of every datagram that reaches client2 is lost, in its kernel, before its socket sees it.
    lan.on("client2", "nft", "-f", "-", stdin="add table inet lab\n"
           "add chain inet lab in { type filter hook input priority 0; }\n"
           "add rule inet lab in meta l4proto udp numgen random mod 100 < 20 counter drop\n")
    server_ip = lan.address("server")
    alice = lan.start("client1", "client.py", "--host", server_ip, "--port", PORT)
    bob = lan.start("client2", "client.py", "--host", server_ip, "--port", PORT)
    join_chat(alice, "alice")
    join_chat(bob, "bob")
    lines = [f"line {number} from the lossy side" for number in range(10)]
    bob.type(*lines)
    assert [alice.expect("bob:").split("] bob: ")[1] for _ in lines] == lines  # each once, in order
    alice.type(*(f"answer {number}" for number in range(10)))
    assert [bob.expect("alice:").split("] alice: ")[1] for _ in range(10)] == [f"answer {n}" for n in range(10)]
    dropped = re.search(r"counter packets (\d+)", lan.on("client2", "nft", "list", "chain", "inet", "lab", "in"))
    assert int(dropped.group(1)) > 0  # the link really lost some


def test_a_client_whose_link_is_cut_is_timed_out_and_announced(lan, tmp_path):
    server = start_chat_server(lan, tmp_path, "--session-timeout", SESSION_TIMEOUT)
    server_ip = lan.address("server")
    alice = lan.start("client1", "client.py", "--host", server_ip, "--port", PORT)
    bob = lan.start("client2", "client.py", "--host", server_ip, "--port", PORT)
    join_chat(alice, "alice")
    join_chat(bob, "bob")
    alice.expect("bob joined")
    lan.on("client2", "ip", "link", "set", "eth0", "down")  # the cable pulled out
    alice.expect("bob left (timed out)", wait=float(SESSION_TIMEOUT) + 20)
    server.expect("session ended: timed out")
    alice.type("still here?", "exit")
    assert alice.finish() == 0
