"""Who may call: socket permissions, other users, TCP off by default, TLS and mutual TLS,
management restricted to the Unix socket, and model names that cannot leave the repository."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

import edgeinfer
from edgeinfer.client import TlsOptions
from tests import models
from tests.conftest import Daemon, StartDaemon, short_tmpdir
from tests.reliability_helpers import figure, make_ca, make_cert

X = np.ones((1, 16), np.float32)
NOBODY = 65534
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
def own_daemons() -> Iterator[list[Daemon]]:
    """Daemons started with a config written here (the socket path is part of the test)."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()
        shutil.rmtree(daemon.workdir, ignore_errors=True)


def start_with(started: list[Daemon], repo: Path, listen: str, rest: str = "") -> Daemon:
    workdir = short_tmpdir()
    text = f'repository = "{repo}"\n[listen]\n{listen.replace("@DIR@", str(workdir))}\n{rest}'
    daemon = Daemon(text, workdir)
    started.append(daemon)
    return daemon


def connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> int:
    """In a forked child with these ids: 0 if the socket answered an HTTP/2 preface, else errno."""
    child = os.fork()
    if child == 0:  # only os and socket calls here, then _exit: safe after fork
        code = 100
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            code = 0 if sock.recv(9)[3:4] == b"\x04" else 101  # the server's SETTINGS frame
        except OSError as error:
            code = error.errno or 102
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_socket_mode_and_directory_are_private(own_daemons: list[Daemon], tmp_path: Path) -> None:
    """A socket in a new folder gets mode 0660 in a 0750 folder; unix_mode changes the mode."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    default = start_with(own_daemons, repo, 'unix = "@DIR@/run/edgeinfer/edgeinfer.sock"')
    default.socket = default.workdir / "run" / "edgeinfer" / "edgeinfer.sock"
    default.address = f"unix://{default.socket}"
    default.wait_ready()
    narrow = start_with(own_daemons, repo, 'unix = "@DIR@/edgeinfer.sock"\nunix_mode = "0600"')
    narrow.wait_ready()
    modes = {
        "socket": default.socket.stat().st_mode & 0o777,
        "folder": default.socket.parent.stat().st_mode & 0o777,
        "unix_mode_0600": narrow.socket.stat().st_mode & 0o777,
    }
    figure("access.modes", **{k: oct(v) for k, v in modes.items()})
    assert modes == {"socket": 0o660, "folder": 0o750, "unix_mode_0600": 0o600}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_other_user_without_the_group_is_refused(own_daemons: list[Daemon], tmp_path: Path) -> None:
    """nobody (not in the socket's group) cannot connect; with the group it can (control)."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_with(own_daemons, repo, 'unix = "@DIR@/run/edgeinfer.sock"')
    daemon.socket = daemon.workdir / "run" / "edgeinfer.sock"
    daemon.address = f"unix://{daemon.socket}"
    daemon.wait_ready()
    group = daemon.socket.stat().st_gid
    os.chmod(daemon.workdir, 0o755)  # the daemon's own folder (run/) is 0750
    results = {
        "nobody": connect_as(daemon.socket, NOBODY, NOBODY, []),
        "nobody_in_group": connect_as(daemon.socket, NOBODY, NOBODY, [group]),
    }
    # The folder alone also keeps nobody out, even with a socket open to all.
    os.chmod(daemon.socket, 0o666)
    results["nobody_socket_0666"] = connect_as(daemon.socket, NOBODY, NOBODY, [])
    figure("access.other_user", **{k: errno.errorcode.get(v, v) for k, v in results.items()})
    assert results == {
        "nobody": errno.EACCES,
        "nobody_in_group": 0,
        "nobody_socket_0666": errno.EACCES,
    }


def listening_tcp_ports(pid: int) -> set[int]:
    """Ports on which the process holds a listening TCP socket (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server cert for localhost/127.0.0.1, a client cert, and a rogue CA's client cert."""
    folder = tmp_path_factory.mktemp("certs")
    ca = make_ca(folder, "ca")
    rogue = make_ca(folder, "rogue-ca")
    server = make_cert(folder, "server", ca, server=True)
    client = make_cert(folder, "client", ca, server=False)
    intruder = make_cert(folder, "intruder", rogue, server=False)
    return {
        "ca": ca[0],
        "rogue_ca": rogue[0],
        "server_cert": server[0],
        "server_key": server[1],
        "client_cert": client[0],
        "client_key": client[1],
        "intruder_cert": intruder[0],
        "intruder_key": intruder[1],
    }


def tls_config(certs: dict[str, Path], mutual: bool) -> str:
    text = f'[listen.tls]\ncert = "{certs["server_cert"]}"\nkey = "{certs["server_key"]}"\n'
    if mutual:
        text += f'client_ca = "{certs["ca"]}"\n'
    return text


def outcome(address: str, tls: TlsOptions | None) -> str:
    try:
        with edgeinfer.Client(address, timeout=5, tls=tls) as client:
            client.predict("mlp", {"x": X})
    except edgeinfer.EdgeInferError as error:
        return error.code.name
    return "OK"


def options(certs: dict[str, Path], root: str = "ca", who: str | None = None) -> TlsOptions:
    return TlsOptions(
        root_certificates=certs[root].read_bytes(),
        certificate_chain=certs[f"{who}_cert"].read_bytes() if who else None,
        private_key=certs[f"{who}_key"].read_bytes() if who else None,
        server_name="localhost",
    )


def test_tcp_is_off_unless_configured(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A daemon without listen.tcp holds no listening TCP socket; with it, exactly one."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    unix_only = start_daemon(repo)
    with_tcp = start_daemon(repo, 'tcp = "127.0.0.1:0"\n')
    ports = {
        "unix_only": listening_tcp_ports(unix_only.process.pid),
        "with_tcp": listening_tcp_ports(with_tcp.process.pid),
    }
    figure("access.tcp_listeners", **{k: len(v) for k, v in ports.items()})
    assert ports["unix_only"] == set()
    assert len(ports["with_tcp"]) == 1


@pytest.mark.parametrize("mutual", [False, True], ids=["server_tls", "mutual_tls"])
def test_tls_refuses_clients_without_valid_credentials(
    start_daemon: StartDaemon, tmp_path: Path, certificates: dict[str, Path], mutual: bool
) -> None:
    """Over TLS, only clients trusting the server's CA (for mTLS: with a CA-signed cert) get in."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo, 'tcp = "127.0.0.1:0"\n' + tls_config(certificates, mutual))
    (port,) = listening_tcp_ports(daemon.process.pid)
    address = f"127.0.0.1:{port}"
    results = {
        "plaintext": outcome(address, None),
        "untrusted_server": outcome(address, options(certificates, root="rogue_ca")),
        "no_client_cert": outcome(address, options(certificates)),
        "rogue_client_cert": outcome(address, options(certificates, who="intruder")),
        "valid_client_cert": outcome(address, options(certificates, who="client")),
    }
    figure("access.mutual_tls" if mutual else "access.server_tls", **results)
    assert results["plaintext"] == "UNAVAILABLE"
    assert results["untrusted_server"] == "UNAVAILABLE"
    assert results["valid_client_cert"] == "OK"
    if mutual:
        assert results["no_client_cert"] == "UNAVAILABLE"
        assert results["rogue_client_cert"] == "UNAVAILABLE"
    else:
        assert results["no_client_cert"] == "OK"


def test_management_over_tcp_is_denied_when_unix_only(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With management.allow = 'unix', load/unload over TCP (v1 and V2) are PERMISSION_DENIED."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo, 'tcp = "127.0.0.1:0"\n[management]\nallow = "unix"\n')
    (port,) = listening_tcp_ports(daemon.process.pid)
    results = {}
    with edgeinfer.Client(f"127.0.0.1:{port}", timeout=30) as tcp:
        for name, action in (("tcp_load", tcp.load_model), ("tcp_unload", tcp.unload_model)):
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                action("mlp")
            results[name] = caught.value.code.name
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("RepositoryModelLoad", "RepositoryModelUnload"):
                call = channel.unary_unary(
                    f"/inference.GRPCInferenceService/{method}",
                    request_serializer=lambda m: m.SerializeToString(),
                )
                request_type = getattr(service_pb2, f"{method}Request")
                with pytest.raises(grpc.RpcError) as rpc_error:
                    call(request_type(model_name="mlp"), timeout=30)
                results[f"tcp_v2_{method}"] = rpc_error.value.code().name
        results["tcp_predict"] = "OK" if tcp.predict("mlp", {"x": X}) else "?"
    with daemon.client(timeout=30) as unix:
        results["unix_unload"] = unix.unload_model("mlp").state
        results["unix_load"] = unix.load_model("mlp").state
    figure("access.management_unix_only", **results)
    assert results == {
        "tcp_load": "PERMISSION_DENIED",
        "tcp_unload": "PERMISSION_DENIED",
        "tcp_v2_RepositoryModelLoad": "PERMISSION_DENIED",
        "tcp_v2_RepositoryModelUnload": "PERMISSION_DENIED",
        "tcp_predict": "OK",
        "unix_unload": "UNLOADED",
        "unix_load": "READY",
    }


ESCAPES = [
    "..",
    ".",
    "../outside",
    "mlp/../../outside",
    "/tmp",
    "%2e%2e%2foutside",
    "outside\x00",
    "..\\outside",
    "escape",  # a symlink in the repository to a model folder outside it
    "linked",  # a model whose artifact is a symlink to a file outside
]


def attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except edgeinfer.EdgeInferError as error:
        return error.code.name
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def test_model_names_cannot_leave_the_repository(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """No name, on any RPC of either API, loads, describes or runs a model from outside."""
    outside = tmp_path / "outside-repo"
    models.add_mlp(outside, "outside")
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    (repo / "escape").symlink_to(outside / "outside", target_is_directory=True)
    models.write_model(repo, "linked", models.MLP_CONFIG)
    (repo / "linked" / "1" / "model.pt").symlink_to(outside / "outside" / "1" / "model.pt")
    daemon = start_daemon(repo)
    codes: Counter[str] = Counter()
    others: Counter[str] = Counter()
    with daemon.client(timeout=30) as client, grpc.insecure_channel(daemon.address) as channel:
        reasons = {m.name: m.reason for m in client.list_models()}

        def v2(method: str, request: Any) -> Callable[[], object]:
            call = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=type(request).SerializeToString,
            )
            return lambda: call(request, timeout=30)

        for name in ESCAPES:
            infer = service_pb2.ModelInferRequest(model_name=name)
            infer.inputs.add(name="x", datatype="FP32", shape=[1, 16])
            infer.raw_input_contents.append(X.tobytes())
            load = service_pb2.RepositoryModelLoadRequest(model_name=name)
            # Each of these succeeds only if the name reached a model it may serve.
            refused = {
                "Predict": attempt(lambda n=name: client.predict(n, {"x": X})),
                "LoadModel": attempt(lambda n=name: client.load_model(n)),
                "V2 ModelInfer": attempt(v2("ModelInfer", infer)),
                "V2 ModelMetadata": attempt(
                    v2("ModelMetadata", service_pb2.ModelMetadataRequest(name=name))
                ),
                "V2 RepositoryModelLoad": attempt(v2("RepositoryModelLoad", load)),
            }
            # Right after the load attempts, before any unload could hide one that worked:
            # the model's own state (or the refusal's code), never READY.
            try:
                model_state = client.get_model(name).state
                state = "OK"
            except edgeinfer.EdgeInferError as error:
                model_state, state = error.code.name, error.code.name
            # Unloading what is not loaded is harmless.
            unload = attempt(lambda n=name: client.unload_model(n))
            assert "OK" not in refused.values(), (name, refused)
            assert model_state != "READY", (name, model_state)
            codes.update(refused.values())
            others.update([f"unload {unload}", f"get_model {state}"])
        assert client.predict("mlp", {"x": X})["y"].shape == (1, 4)
    figure("access.escapes", names=len(ESCAPES), refused=dict(codes), others=dict(others))
    assert "outside the repository" in reasons["linked"]
    assert "not in the repository" in reasons["escape"]
