"""`clipdex serve` takes its keys from files or the environment (where `ps` does not show
them) and says out loud when it listens beyond loopback without read keys."""

from __future__ import annotations

import pytest

from clipdex.commands.serve import exposure_warnings, settings_from
from clipdex.main import build_parser


def settings(*flags: str):
    return settings_from(build_parser().parse_args(["serve", "--index", "idx", *flags]))


def test_keys_come_from_files(tmp_path):
    (tmp_path / "read.keys").write_text("first\n\n  second  \n")
    (tmp_path / "admin.key").write_text("the-admin\n")
    made = settings("--read-keys-file", str(tmp_path / "read.keys"),
                    "--admin-key-file", str(tmp_path / "admin.key"))
    assert made.read_secrets() == ["first", "second"] and made.admin_secret() == "the-admin"


def test_keys_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPDEX_READ_KEYS", "a, b,")
    monkeypatch.setenv("CLIPDEX_ADMIN_KEY", "boss")
    made = settings()
    assert made.read_secrets() == ["a", "b"] and made.admin_secret() == "boss"


def test_flags_win_over_the_environment_and_keys_stay_secret(monkeypatch):
    monkeypatch.setenv("CLIPDEX_READ_KEYS", "from-env")
    monkeypatch.setenv("CLIPDEX_ADMIN_KEY", "env-admin")
    made = settings("--read-key", "flag-key")
    assert made.read_secrets() == ["flag-key"] and made.admin_secret() == "env-admin"
    shown = repr(made) + str(made.model_dump()) + made.model_dump_json()
    assert "flag-key" not in shown and "env-admin" not in shown


def test_every_setting_reads_the_environment(monkeypatch):
    from api.settings import Settings

    monkeypatch.setenv("CLIPDEX_MAX_DEPTH", "77")
    monkeypatch.setenv("CLIPDEX_PUBLIC_URL", "https://search.example")
    made = Settings()
    assert made.max_depth == 77 and made.public_url == "https://search.example"
    assert Settings(max_depth=5).max_depth == 5  # explicit values win
    monkeypatch.setenv("CLIPDEX_MAX_DEPTH", "many")
    with pytest.raises(ValueError, match="max_depth"):
        Settings()


def test_an_empty_or_missing_key_file_stops_the_start(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="holds no key"):
        settings("--read-keys-file", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="cannot read the key file"):
        settings("--admin-key-file", str(tmp_path / "absent"))


def test_exposure_without_read_keys_is_warned_about(monkeypatch):
    monkeypatch.delenv("CLIPDEX_READ_KEYS", raising=False)
    assert exposure_warnings(settings()) == []  # loopback
    assert exposure_warnings(settings("--host", "::1")) == []
    [warning] = exposure_warnings(settings("--host", "0.0.0.0"))
    assert "without read keys" in warning
    assert exposure_warnings(settings("--host", "0.0.0.0", "--read-key", "k")) == []


def test_the_openapi_schema_names_the_key_schemes():
    from api.app import create_app
    from api.settings import Settings

    either = [{"bearer": []}, {"apiKey": []}]
    keyed = create_app(Settings(read_keys=("k",), admin_key="a")).openapi()
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert keyed["paths"]["/search/text"]["post"]["security"] == either
    assert keyed["paths"]["/admin/reload"]["post"]["security"] == either
    assert "security" not in keyed["paths"]["/healthz"]["get"]
    open_service = create_app(Settings()).openapi()
    assert "security" not in open_service["paths"]["/search/text"]["post"]
    assert open_service["paths"]["/admin/reload"]["post"]["security"] == either
