"""Config files are validated once, with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeinferd.config import DEFAULT_SOCKET, load_config
from edgeinferd.errors import ConfigError
from edgeinferd.repository import Repository, parse_model_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgeinferd.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    """With no config file every setting has its default."""
    config = load_config(None)
    assert str(config.listen.unix) == DEFAULT_SOCKET
    assert config.listen.tcp is None
    assert config.listen.unix_mode == 0o660


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    """repository and socket paths are relative to the config file's folder."""
    config = load_config(write(tmp_path, 'repository = "models"\n[listen]\nunix = "s.sock"\n'))
    assert config.repository == tmp_path / "models"
    assert config.listen.unix == tmp_path / "s.sock"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("repository = 3\n", "repository", "expected a string, got 3"),
        ("[listen]\ntcp = 'localhost'\n", "listen.tcp", "expected 'host:port'"),
        ("[listen]\nunix_mode = '999'\n", "listen.unix_mode", "octal"),
        ("[logging]\nlevel = 'loud'\n", "logging.level", "expected one of 'debug'"),
        ("[shutdown]\ngrace_period_s = -1\n", "shutdown.grace_period_s", "from 0 to 3600, got -1"),
        ("[listen]\nport = 1\n", "listen.port", "unknown setting"),
        ("[listen]\ntls = {cert = 'a', key = 'b'}\n", "listen.tls.cert", "listen.tcp is not set"),
        ("[management]\nallow = 'everyone'\n", "management.allow", "'unix'"),
        ("repository = [\n", "", "invalid TOML"),
    ],
)
def test_daemon_config_errors_name_file_and_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    """Each bad setting is refused with the file, the dotted field and what was expected."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert caught.value.field == field
    assert words in str(caught.value)


GOOD_MODEL = """
max_batch_size = 8
[[inputs]]
name = "x"
dtype = "float32"
shape = [3, -1]
[[outputs]]
name = "y"
dtype = "int64"
shape = [1]
"""


def test_model_config_parses_every_section() -> None:
    """A full model config becomes typed settings."""
    text = GOOD_MODEL + "[batching]\nmax_queue_delay_us = 500\npreferred_batch_sizes = [4, 8]\n"
    text += "[instances]\ncount = 2\nthreads = 1\n"
    import tomllib

    config = parse_model_config("m", tomllib.loads(text), "m/config.toml")
    assert config.inputs[0].shape == (3, -1)
    assert config.batching.preferred_batch_sizes == (4, 8)
    assert config.instances == 2


def place(extra: str) -> str:
    """Top-level keys go before the tables; tables after them."""
    if extra.startswith("["):
        return GOOD_MODEL + extra
    if extra.startswith("max_batch_size"):
        return extra + GOOD_MODEL.replace("max_batch_size = 8\n", "")
    return extra + GOOD_MODEL


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ('name = "other"\n', "name", "differs from the folder name"),
        ("max_batch_size = -1\n", "max_batch_size", "from 0 to 65536, got -1"),
        ('format = "onnx"\n', "format", "'torchscript'"),
        (
            "[batching]\npreferred_batch_sizes = [64]\n",
            "batching.preferred_batch_sizes[0]",
            "1 to 8",
        ),
        (
            '[[inputs]]\nname = "z"\ndtype = "complex64"\nshape = []\n',
            "inputs[1].dtype",
            "'float32'",
        ),
        (
            '[[outputs]]\nname = "y"\ndtype = "int64"\nshape = [1]\n',
            "outputs",
            "duplicate name 'y'",
        ),
        ("[instances]\ncount = 0\n", "instances.count", "from 1 to 64, got 0"),
        ('[batching]\ndelay_policy = "sometimes"\n', "batching.delay_policy", "'adaptive'"),
    ],
)
def test_model_config_errors_name_file_and_field(extra: str, field: str, words: str) -> None:
    """Each bad model setting is refused naming <model>/config.toml and the field."""
    import tomllib

    with pytest.raises(ConfigError) as caught:
        parse_model_config("m", tomllib.loads(place(extra)), "m/config.toml")
    assert caught.value.file == "m/config.toml"
    assert caught.value.field == field
    assert words in str(caught.value)


def test_repository_never_leaves_its_root(tmp_path: Path) -> None:
    """Names with separators or '..' are refused; a symlinked model folder outside is not found."""
    from edgeinferd.errors import InvalidInput, ModelNotFound

    (tmp_path / "repo").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.toml").write_text(GOOD_MODEL)
    (tmp_path / "repo" / "link").symlink_to(tmp_path / "outside")
    repository = Repository(tmp_path / "repo")
    for name in ("../outside", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(InvalidInput):
            repository.model_dir(name)
    with pytest.raises(ModelNotFound):
        repository.model_dir("link")
