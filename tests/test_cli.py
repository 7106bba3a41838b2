"""The command line's own checks: --version, and `metaray ui` refusing what it cannot serve (one line, exit 2,
nothing created). `metaray ui` serving a store and stopping its server is tested in test_tracking.py."""

from orchestrator.cli.main import main


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("metaray ") and out.count("\n") == 1


def test_ui_refuses_a_bad_port_and_a_missing_store_creating_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args, says in ((["--port", "99999"], "--port: expected a TCP port between 1 and 65535, got '99999'"),
                       (["--port", "http"], "--port: expected a TCP port"),
                       ([], "no MLflow store at mlflow.db"),
                       (["--uri", f"sqlite:///{tmp_path / 'elsewhere.db'}"], "elsewhere.db"),
                       (["--uri", "http://127.0.0.1:5000"], "is a tracking server, not a store")):
        assert main(["ui", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_usage_mistakes_are_one_line(capsys):
    assert main(["sweep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metaray sweep: error:" in err
