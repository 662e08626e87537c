"""Settings: precedence flag > environment > file > default, and one clear error for anything unknown or bad."""

import tomllib

import pytest

from fer_swarm import config
from fer_swarm.errors import ConfigError

from .conftest import ROOT, error_lines, run_cli


@pytest.mark.parametrize("program", sorted(config.PROGRAMS))
def test_shipped_toml_lists_every_setting_with_its_default(program):
    text = (ROOT / "configs" / f"{program}.toml").read_text()
    assert text == config.toml_template(program), f"configs/{program}.toml is stale: regenerate it with toml_template"
    parsed = tomllib.loads(text)
    loaded = config.load(program, config_file=ROOT / "configs" / f"{program}.toml", environ={})
    assert loaded == config.PROGRAMS[program]()  # the file states the defaults
    for name, field in config.PROGRAMS[program].model_fields.items():
        assert name in parsed or f"# {name} =" in text
        assert field.description in text


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text("threads = 2\nname = 'from-file'\nliveness = 7\n")
    env = {"FER_SWARM_WORKER_THREADS": "3", "FER_SWARM_WORKER_NAME": "from-env"}
    s = config.load("worker", config_file=f, environ=env, flags={"threads": "4"})
    assert (s.threads, s.name, s.liveness, s.heartbeat_interval_s) == (4, "from-env", 7, 1.0)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(flags={"threads": "many"}), "--threads"),
        (dict(environ={"FER_SWARM_WORKER_THEADS": "2"}), "FER_SWARM_WORKER_THEADS"),
        (dict(environ={"FER_SWARM_WORKER_LIVENESS": "0"}), "FER_SWARM_WORKER_LIVENESS"),
        (dict(file_text="theads = 2\n"), "'theads'"),
        (dict(file_text="threads = -1\n"), "'threads'"),
        (dict(file_text="threads = [\n"), "not valid TOML"),
    ],
)
def test_bad_settings_name_the_key_and_source(tmp_path, kwargs, needle):
    file_text = kwargs.pop("file_text", None)
    if file_text is not None:
        kwargs["config_file"] = tmp_path / "w.toml"
        kwargs["config_file"].write_text(file_text)
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        config.load("worker", **kwargs)


def test_environment_and_file_keep_the_spelling_the_user_wrote(tmp_path):
    with pytest.raises(ConfigError, match="environment: fer_swarm_worker_liveness: "):
        config.load("worker", environ={"fer_swarm_worker_liveness": "0"})
    with pytest.raises(ConfigError, match="environment: unknown worker setting Fer_Swarm_Worker_Theads$"):
        config.load("worker", environ={"Fer_Swarm_Worker_Theads": "2"})
    # Another program's variables, empty ones and unrelated ones are not this program's business.
    env = {"FER_SWARM_BROKER_MAX_QUEUE": "x", "FER_SWARM_WORKER_THREADS": "", "PATH": "/bin"}
    assert config.load("worker", environ=env) == config.WorkerSettings()
    f = tmp_path / "w.toml"
    f.write_text("[worker]\nthreads = 2\n")  # a table is not how the file is laid out
    with pytest.raises(ConfigError, match=f"{f}: unknown worker setting 'worker'"):
        config.load("worker", config_file=f, environ={})


def test_a_folder_or_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        config.load("worker", config_file=tmp_path, environ={})


def test_settings_built_in_code_ignore_the_environment(monkeypatch):
    """Only load() reads the environment: a variable left in the shell must not change a test or the demo."""
    monkeypatch.setenv("FER_SWARM_WORKER_THREADS", "3")
    assert config.WorkerSettings().threads == 1
    assert config.load("worker").threads == 3  # os.environ when none is given


def test_edge_takes_one_source():
    with pytest.raises(ConfigError, match="one source"):
        config.load("edge", flags={"camera": "0", "video": "x.mp4"}, environ={})


@pytest.mark.parametrize(
    "args, needle",
    [
        (["worker", "--threads", "x"], "--threads"),
        (["worker", "--theads", "2"], "--theads"),
        (["broker", "--config", "/nonexistent.toml"], "not found"),
        (["broker", "--max-queue", "0"], "--max-queue"),
    ],
)
def test_cli_config_errors_are_one_line_and_exit_2(args, needle):
    res = run_cli(*args, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_help_explains_every_setting():
    res = run_cli("broker", "--help", timeout=60)
    assert res.returncode == 0
    flat = " ".join(res.stdout.split())
    for name in config.BrokerSettings.model_fields:
        assert "--" + name.replace("_", "-") in flat
    assert "FER_SWARM_BROKER_SETTING" in flat and "…" not in res.stdout


def test_version_names_the_package_and_the_wire_protocol():
    from fer_swarm import __version__

    from .conftest import run_cli

    res = run_cli("--version", timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"fer-swarm {__version__} (wire protocol fer-swarm/3)"
