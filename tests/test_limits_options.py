"""The limits' options (issue 11): bad values are one line and exit 2; good ones reach Settings."""

from __future__ import annotations

import pytest

from muxsrv import cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frame-timeout", "-1"], "argument --frame-timeout: must be a finite number"),
        (["--frame-timeout", "inf"], "argument --frame-timeout: must be a finite number"),
        (["--frame-timeout", "soon"], "argument --frame-timeout: not a number of seconds"),
        (["--max-conns-per-ip", "-1"], "argument --max-conns-per-ip: must be 0 (no limit) or more"),
        (["--max-conns-per-ip", "2.5"], "argument --max-conns-per-ip: not a whole number: '2.5'"),
        (["--max-output", "-1"], "argument --max-output: must be a size in bytes, 0 (no limit)"),
        (["--max-output", "lots"], "argument --max-output: not a size in bytes: 'lots'"),
        (["--output-soft-limit", "1T"], "argument --output-soft-limit: not a size in bytes"),
        (["--output-soft-seconds", "-5"], "argument --output-soft-seconds: must be a finite"),
        (["--max-buffered", "-1"], "argument --max-buffered: must be a size in bytes, 0"),
        (["--max-buffered", "x"], "argument --max-buffered: not a size in bytes: 'x'"),
        (["--output-soft-limit", "64M"], "--output-soft-limit must be below --max-output"),
        (["--max-output", "1M", "--output-soft-limit", "2M"],
         "--output-soft-limit must be below --max-output"),
    ],
)
def test_bad_values_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: a bad limit starting a server with a default, or a traceback."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("muxsrv: error: "), err
    assert message in err


def settings(*args: str) -> cli.Settings:
    return cli.settings_from(cli.build_parser().parse_args(list(args)), "echo")


def test_defaults_and_values_reach_the_settings() -> None:
    assert settings().frame_timeout == 30.0
    assert settings("--frame-timeout", "2.5").frame_timeout == 2.5
    assert settings("--frame-timeout", "0").frame_timeout == 0.0
    assert settings().max_conns_per_ip == 0
    assert settings("--max-conns-per-ip", "3").max_conns_per_ip == 3
    assert settings().max_output == 64 << 20
    assert settings().output_soft_limit == 0
    assert settings().output_soft_seconds == 60.0
    got = settings("--max-output", "1G", "--output-soft-limit", "8mb",
                   "--output-soft-seconds", "30")
    assert (got.max_output, got.output_soft_limit, got.output_soft_seconds) == (
        1 << 30, 8 << 20, 30.0)
    assert settings("--max-output", "0", "--output-soft-limit", "1M").max_output == 0
    assert settings().max_buffered == 256 << 20
    assert settings("--max-buffered", "1g").max_buffered == 1 << 30
