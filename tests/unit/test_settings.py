"""Settings: one prefix, nested groups, secrets from files, validation messages that name the variable."""

from __future__ import annotations

import os

import pytest

from worker.settings import SettingsError, get_settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.upper().startswith("CANCELABLE_") and k.upper() != "CANCELABLE_SHARED_DIR":
            monkeypatch.delenv(k)
    monkeypatch.setenv("CANCELABLE_SECRETS_DIR", "/nonexistent-secrets-dir")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_are_valid():
    s = load_settings()
    assert s.worker.visibility_timeout > s.worker.task_time_limit
    assert s.s3.sse == "none" and s.keys.provider == "local" and s.engine.bundle == "keymap"
    assert s.worker.soft_time_limit < s.worker.task_time_limit


def test_nested_env(monkeypatch):
    monkeypatch.setenv("CANCELABLE_S3__ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("CANCELABLE_S3__BUCKET", "b1")
    monkeypatch.setenv("CANCELABLE_WORKER__TASK_TIME_LIMIT", "60")
    monkeypatch.setenv("CANCELABLE_WORKER__VISIBILITY_TIMEOUT", "120")
    monkeypatch.setenv("cancelable_engine__steps", "7")
    monkeypatch.setenv("CANCELABLE_REDIS__URL", "redis://:pw@127.0.0.1:6380/1")
    s = load_settings()
    assert (s.s3.endpoint_url, s.s3.bucket, s.s3.region) == ("http://127.0.0.1:8333", "b1", "us-east-1")
    assert (s.worker.task_time_limit, s.worker.visibility_timeout, s.engine.steps) == (60, 120, 7)
    assert s.redis.url.get_secret_value().endswith("6380/1")
    assert "pw" not in str(s.model_dump(mode="json")) and "pw" not in repr(s)


def test_get_settings_is_cached(monkeypatch):
    a = get_settings()
    monkeypatch.setenv("CANCELABLE_S3__BUCKET", "other")
    assert get_settings() is a
    get_settings.cache_clear()
    assert get_settings().s3.bucket == "other"


def test_visibility_timeout_must_exceed_time_limit(monkeypatch):
    monkeypatch.setenv("CANCELABLE_WORKER__TASK_TIME_LIMIT", "3600")
    monkeypatch.setenv("CANCELABLE_WORKER__VISIBILITY_TIMEOUT", "3600")
    with pytest.raises(SettingsError) as ei:
        load_settings()
    msg = str(ei.value)
    assert "CANCELABLE_WORKER" in msg and "visibility_timeout (3600s) must exceed" in msg and "run twice" in msg


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("CANCELABLE_S3__SSE", "rot13", "CANCELABLE_S3__SSE"),
        ("CANCELABLE_WORKER__MAX_ATTEMPTS", "0", "CANCELABLE_WORKER__MAX_ATTEMPTS"),
        ("CANCELABLE_ENGINE__DEVICE", "tpu", "engine.device must be"),
        ("CANCELABLE_KEYS__PROVIDER", "vault", "CANCELABLE_KEYS__PROVIDER"),
        ("CANCELABLE_S3__PREFIX", "/x/", "s3.prefix"),
        ("CANCELABLE_BOGUS__X", "1", "CANCELABLE_BOGUS"),
        ("CANCELABLE_WORKER__TYPO", "1", "CANCELABLE_WORKER__TYPO"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, var, value, expect):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as ei:
        load_settings()
    assert expect in str(ei.value)


def test_sse_rules(monkeypatch):
    monkeypatch.setenv("CANCELABLE_S3__SSE", "aws:kms")
    with pytest.raises(SettingsError, match="SSE_KMS_KEY_ID"):
        load_settings()
    monkeypatch.setenv("CANCELABLE_S3__SSE_KMS_KEY_ID", "alias/s3")
    assert load_settings().s3.sse_kms_key_id == "alias/s3"
    monkeypatch.setenv("CANCELABLE_S3__SSE", "AES256")
    with pytest.raises(SettingsError, match="not aws:kms"):
        load_settings()


def test_half_credentials_rejected(monkeypatch):
    monkeypatch.setenv("CANCELABLE_S3__ACCESS_KEY_ID", "AK")
    with pytest.raises(SettingsError, match="both"):
        load_settings()


def test_secret_values_never_in_error_messages(monkeypatch):
    monkeypatch.setenv("CANCELABLE_S3__SECRET_ACCESS_KEY", "VERY-SECRET-VALUE")
    with pytest.raises(SettingsError) as ei:
        load_settings()
    assert "VERY-SECRET-VALUE" not in str(ei.value)
    monkeypatch.setenv("CANCELABLE_SENTRY__TRACES_SAMPLE_RATE", "SECRETISH-2")
    with pytest.raises(SettingsError) as ei:
        load_settings()
    assert "SECRETISH" not in str(ei.value)


def test_file_suffix_secrets(monkeypatch, tmp_path):
    (tmp_path / "ak").write_text("AKFILE\n")
    (tmp_path / "sk").write_text("sk-from-file\n")
    (tmp_path / "dsn").write_text("https://k@sentry.example/1\n")
    monkeypatch.setenv("CANCELABLE_S3__ACCESS_KEY_ID_FILE", str(tmp_path / "ak"))
    monkeypatch.setenv("CANCELABLE_S3__SECRET_ACCESS_KEY_FILE", str(tmp_path / "sk"))
    monkeypatch.setenv("CANCELABLE_SENTRY__DSN_FILE", str(tmp_path / "dsn"))
    s = load_settings()
    assert s.s3.access_key_id.get_secret_value() == "AKFILE"
    assert s.s3.secret_access_key.get_secret_value() == "sk-from-file"
    assert s.sentry.dsn.get_secret_value() == "https://k@sentry.example/1"
    monkeypatch.setenv("CANCELABLE_S3__ACCESS_KEY_ID", "AKENV")  # the plain variable wins
    assert load_settings().s3.access_key_id.get_secret_value() == "AKENV"
    monkeypatch.setenv("CANCELABLE_S3__SECRET_ACCESS_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="cannot read secret file"):
        load_settings()


def test_secrets_dir(monkeypatch, tmp_path):
    (tmp_path / "s3__access_key_id").write_text("AKDIR\n")
    (tmp_path / "s3__secret_access_key").write_text("skdir\n")
    (tmp_path / "redis__url").write_text("redis://:dirpw@10.0.0.1:6379/0\n")
    monkeypatch.setenv("CANCELABLE_SECRETS_DIR", str(tmp_path))
    s = load_settings()
    assert s.s3.access_key_id.get_secret_value() == "AKDIR"
    assert s.s3.secret_access_key.get_secret_value() == "skdir"
    assert s.redis.url.get_secret_value() == "redis://:dirpw@10.0.0.1:6379/0"
    monkeypatch.setenv("CANCELABLE_S3__SECRET_ACCESS_KEY", "skenv")  # env beats the secrets dir
    assert load_settings().s3.secret_access_key.get_secret_value() == "skenv"


def test_overrides_and_a_dump_hides_secrets():
    s = load_settings(s3={"bucket": "ovr", "access_key_id": "A", "secret_access_key": "SSSS-secret"})
    assert s.s3.bucket == "ovr"
    dump = s.model_dump(mode="json")  # what a log or status dump would show
    assert dump["s3"]["secret_access_key"] == "**********" and "SSSS" not in str(dump)


def test_settings_import_is_light():
    import subprocess
    import sys

    code = "import sys, worker.settings; print([m for m in ('torch', 'boto3', 'celery') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_no_redis_url_is_a_clear_error_not_a_guessed_default():
    """Issue 10 item 14: nothing falls back to redis://127.0.0.1:6379 (it may be someone else's Redis)."""
    from worker.broker.config import connect_redis, make_celery

    s = load_settings()
    assert s.redis.url is None
    for use in (s.redis.require_url, lambda: make_celery(s), lambda: connect_redis(s)):
        with pytest.raises(SettingsError, match="CANCELABLE_REDIS__URL: not set"):
            use()


def test_input_bucket_must_differ_from_the_template_bucket(monkeypatch):
    monkeypatch.setenv("CANCELABLE_S3__INPUT_BUCKET", "cancelable")
    with pytest.raises(SettingsError, match="input_bucket must differ"):
        load_settings()
    monkeypatch.setenv("CANCELABLE_S3__INPUT_BUCKET", "cancelable-inputs")
    assert load_settings().s3.input_bucket == "cancelable-inputs"
