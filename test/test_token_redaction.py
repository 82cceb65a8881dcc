"""The grand-challenge token never appears in output, logs, files or exceptions, in any form: raw, inside a
header value, escaped by a repr or JSON, or cut in pieces at a line break."""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_grand_challenge import FakeGrandChallenge  # noqa: E402

TOKEN = 'gc-9f3b"c2\\d8e1\nsecond-line-7a6b5c'


def forms(token: str) -> list[str]:
    """What a leak looks like, written out here independently of the code under test."""
    return [token, repr(token)[1:-1], json.dumps(token)[1:-1], repr(token.encode())[2:-1],
            repr(repr(token))[1:-1], quote(token, safe=""), "gc-9f3b", "second-line-7a6b5c"]


def assert_clean(text: str) -> None:
    for form in forms(TOKEN):
        assert form not in text, f"token form {form!r} leaked"


@pytest.mark.parametrize("template", [
    "{t}", "Illegal header value b'BEARER {b}'", "{{'Authorization': 'Bearer {r}'}}", "{j}", "{rr}",
    "https://x/?token={q}", "first half {h1} ... second half {h2}",
])
def test_redactor_scrubs_every_form(template):
    from training.benchmark.grand_challenge import Redactor

    text = template.format(t=TOKEN, b=repr(TOKEN.encode())[2:-1], r=repr(TOKEN)[1:-1], j=json.dumps(TOKEN),
                           rr=repr(repr(TOKEN)), q=quote(TOKEN, safe=""), h1=TOKEN.split("\n")[0],
                           h2=TOKEN.split("\n")[1])
    scrubbed = Redactor(TOKEN)(text)
    assert_clean(scrubbed)
    assert "[redacted]" in scrubbed


def test_redactor_scrubs_log_records_and_their_tracebacks():
    from training.benchmark.grand_challenge import Redactor

    redactor = Redactor(TOKEN)
    try:
        try:
            raise ValueError(f"header {TOKEN!r}")
        except ValueError as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "call with %s", (repr(TOKEN.encode()),),
                                   sys.exc_info())
    assert redactor.filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert_clean(text)
    assert "request failed" in text and "Traceback" in text  # the traceback is kept, scrubbed


def test_whitespace_around_the_token_is_dropped(tmp_path):
    from training.benchmark.grand_challenge import GrandChallengeRunner

    runner = GrandChallengeRunner(tmp_path, "slug", token="  gc-token-123\n")
    assert runner._token == "gc-token-123"


def test_a_token_with_a_line_break_is_never_printed(tmp_path, capsys, caplog, monkeypatch):
    """gcapi sends the token in a header; with a line break in it httpx raises an error quoting the header
    value, escaped. Nothing of it may reach the terminal, the log or the output folder."""
    from training.benchmark.__main__ import main

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the fake site's certificate")
    caplog.set_level(logging.DEBUG)
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a.mha").write_bytes(b"not used")

    def never(input_dir, output_dir):
        raise AssertionError("no job should run")

    with FakeGrandChallenge(tmp_path / "site", "another-token", never) as site:
        monkeypatch.setenv("GRAND_CHALLENGE_AUTHORIZATION", TOKEN)
        status = main(["--cases", str(cases), "--out", str(tmp_path / "out"), "--runner", "grand-challenge",
                       "--algorithm", site.slug, "--base-url", site.base_url, "--ca-bundle", str(site.cert),
                       "--retry-delay", "0.01", "--no-progress"])
        assert status == 2
        assert site.jobs_created == 0
    printed = capsys.readouterr()
    assert_clean(printed.out + printed.err)
    assert_clean(caplog.text)
    assert_clean("\n".join(r.getMessage() for r in caplog.records))
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert_clean(path.read_bytes().decode("utf-8", "replace"))
