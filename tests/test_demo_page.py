"""The demo page at ``/``, in a real browser: Debian's ``chromium`` (headless), driven by Playwright.

No mocks. One server process for the module: ``jax-realtime serve`` on real tiny.en weights with the
small test buckets, an API key (``--api-key``: the page must send it as a WebSocket subprotocol,
which also checks that the accepted handshake names one the browser offered) and max_sessions 2.

Chromium gets a fake microphone: ``--use-fake-device-for-media-stream
--use-file-for-fake-audio-capture=<clip>%noloop`` plays a 16 kHz PCM16 clip of tests/data (Chromium
takes it as it is and resamples it to its capture rate, 44.1 kHz here) once from the moment the
page opens the microphone, then silence (``%noloop``; without it the file loops).  So the page's
transcript of one recording is compared with the whole clip's reference, no repetition to allow
for.  ``--use-fake-ui-for-media-stream`` grants the permission; a browser without it is denied,
which is how the "microphone denied" message is checked.

Playwright is the driver (``executable_path``: the system chromium; ``playwright install`` is never
run).  It adds ``--headless`` and a fresh temporary profile (its own ``--user-data-dir``) to
CHROMIUM_FLAGS, which keep Chromium off the network (no QUIC, sync, updates or background fetches).  Chromium must be installed (the README's test command installs it): it is an error, not a
skip, when it is missing.  Screenshots are written to the test's tmp dir and, if
``$JAX_REALTIME_ARTIFACTS`` is set, to that directory too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf
from websockets.sync.client import connect as ws_connect

from conftest import DATA, load_refs
from harness.service_config import write_config
from harness.evaluation import normalize, wer
from harness.realtime_client import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-device-for-media-stream"]
KEY = "demo-" + secrets.token_hex(8)
MAX_SESSIONS = 2
STARTUP_TIMEOUT = 900.0

_REFS = {r["id"]: r for r in load_refs("ljspeech")}
MIC_CLIP = "ljspeech-LJ001-0001"  # 9.7 s, the fake microphone
FILE_CLIP = "ljspeech-LJ001-0030"  # 6.9 s, picked as a file
WER_BOUND = 20.0  # percent, Whisper's normaliser; streamed tiny.en gets these clips (nearly) right


def clip_path(clip_id: str) -> Path:
    return DATA / _REFS[clip_id]["wav"]


def clip_seconds(clip_id: str) -> float:
    return sf.info(str(clip_path(clip_id))).duration


def ref_text(clip_id: str) -> str:
    return _REFS[clip_id]["text"]


# ------------------------------------------------------------------------------------- fixtures


class Server:
    """The module's server; ``restart`` replaces the process on the same port."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.config = write_config(tmp / "demo.toml", max_sessions=MAX_SESSIONS, admission_control=False)
        self.proc: ServerProcess | None = None
        self.starts = 0

    def start(self, port: int | None = None) -> ServerProcess:
        self.starts += 1
        self.proc = ServerProcess.serve(self.config, port=port, name=f"demo{self.starts}",
                                        extra_args=["--api-key", KEY], log_path=self.tmp / f"demo{self.starts}.log",
                                        startup_timeout=STARTUP_TIMEOUT)
        return self.proc.start()

    @property
    def url(self) -> str:
        return self.proc.http_url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("demo-server"))
    srv.start()
    yield srv
    srv.proc.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp("demo-artifacts")]
    if os.environ.get("JAX_REALTIME_ARTIFACTS"):
        dirs.append(Path(os.environ["JAX_REALTIME_ARTIFACTS"]))
        dirs[-1].mkdir(parents=True, exist_ok=True)
    return dirs


def screenshot(page, artifacts: list[Path], name: str) -> Path:
    first = artifacts[0] / name
    page.screenshot(path=str(first))
    for extra in artifacts[1:]:
        shutil.copyfile(first, extra / name)
    return first


@pytest.fixture(scope="module")
def playwright():
    assert os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as the README's test "
        "command does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


def launch(playwright, *flags: str):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS + list(flags))


@pytest.fixture(scope="module")
def browser(playwright):
    """Chromium with a fake microphone playing MIC_CLIP once per capture, permission granted."""
    wav = clip_path(MIC_CLIP)
    assert sf.info(str(wav)).subtype == "PCM_16"  # what Chromium's fake capture reads
    b = launch(playwright, "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop")
    yield b
    b.close()


# Chromium logs every refused request and failed connection as a console error: expected here
# (a 401 before the key is typed, a server that is restarting); anything else is a failure.
NETWORK_NOISE = ("Failed to load resource", "WebSocket connection to")


class Page:
    """One tab on the demo page, with its uncaught errors and console errors (less network noise)
    and every URL it asked for."""

    def __init__(self, browser, server: Server, viewport=(1000, 640)):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: m.type == "error" and not m.text.startswith(NETWORK_NOISE)
                     and self.errors.append(m.text))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        self.page.goto(server.url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def js(self, expression: str):
        return self.page.evaluate(expression)

    def text(self, element_id: str) -> str:
        return self.page.locator(f"#{element_id}").inner_text()

    def committed(self) -> list[str]:
        return self.js("Array.from(document.querySelectorAll('#transcript .committed'), e => e.textContent)")

    def partials(self) -> list[str]:
        return self.js("Array.from(document.querySelectorAll('#transcript .partial'), e => e.textContent)")

    def focused(self) -> str:
        return self.js("document.activeElement && document.activeElement.id")

    def tab_to(self, element_id: str, key: str = "Tab", limit: int = 12) -> None:
        for _ in range(limit):
            if self.focused() == element_id:
                return
            self.page.keyboard.press(key)
        assert self.focused() == element_id, f"{key} never reached #{element_id}"

    def wait_status(self, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.text("status")
            if re.search(pattern, status) or time.monotonic() > deadline:
                assert re.search(pattern, status), f"status {status!r} never matched {pattern!r}"
                return status
            time.sleep(0.1)

    def wait_text(self, element_id: str, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, text := self.text(element_id)):
            assert time.monotonic() < deadline, f"#{element_id} {text!r} never matched {pattern!r}"
            time.sleep(0.1)
        return text

    def only_own_origin(self, server: Server) -> None:
        host = server.url.split("://", 1)[1]
        foreign = [u for u in self.requests if not (u.split("://", 1)[-1].startswith(host + "/")
                                                    or u.startswith(("data:", "blob:")))]
        assert not foreign, foreign

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server):
    page = Page(browser, server)
    yield page
    page.close()


def assert_matches(clip_id: str, text: str) -> float:
    score = wer([ref_text(clip_id)], [text])
    assert score <= WER_BOUND, f"WER {score:.1f}% > {WER_BOUND}%\nref: {ref_text(clip_id)}\nhyp: {text}"
    return score


# ---------------------------------------------------------------------------------------- tests


def test_page_and_assets_are_served(server):
    """``/`` and ``/demo`` serve the page, with a CSP that allows nothing from elsewhere; its
    scripts and style come from the package; no key is needed for them."""
    import urllib.error
    import urllib.request

    def get(path):
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            return response.status, response.headers, response.read().decode()

    status, headers, root = get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert get("/demo")[2] == root
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    for src in re.findall(r'(?:src|href)="([^"]+)"', root):
        assert src.startswith("/demo/") or src.startswith("data:"), src
    for name, kind in [("demo.js", "javascript"), ("resample.js", "javascript"),
                       ("capture-worklet.js", "javascript"), ("demo.css", "css")]:
        status, headers, body = get(f"/demo/{name}")
        assert status == 200 and kind in headers["Content-Type"] and body.strip(), name
        # modules, worklets and styles load only from here
        assert not re.search(r"""(?:\bfrom\s*|\bimport\s*\(?\s*|url\(\s*)["'](?:[a-z]+:)?//""", body), name
    with pytest.raises(urllib.error.HTTPError) as info:
        get("/demo/secret.py")
    assert info.value.code == 404


def test_live_microphone_transcription(tab, server, artifacts):
    """The whole path in Chromium: keyboard only (Tab to Start, Enter; type the key; Space to
    stop), the key refused first and then sent as a subprotocol, the fake microphone through the
    AudioWorklet at 16 kHz, committed text and a pending partial shown while it records, the
    transcript matching the clip, the latency and the server's numbers in the status area, and an
    accessibility smoke check."""
    from playwright.sync_api import expect

    page = tab.page
    # accessibility smoke: every control has an accessible name; a live status region; a language
    controls = page.locator("button, input, select, textarea, a[href], [tabindex]")
    assert controls.count() >= 6
    for i in range(controls.count()):
        expect(controls.nth(i)).to_have_accessible_name(re.compile(r"\w"))
    status = page.locator("[role=status][aria-live=polite]")
    expect(status).to_have_count(1)
    assert tab.js("document.documentElement.lang") == "en"
    tab.wait_text("server", r"ok · 0 sessions")

    # Tab reaches Start first; Enter presses it; without a key the server refuses, clearly
    page.keyboard.press("Tab")
    assert tab.focused() == "toggle"
    expect(page.get_by_role("button", name="Start microphone")).to_be_focused()
    page.keyboard.press("Enter")
    tab.wait_status(r"needs an API key")
    tab.tab_to("api-key")
    page.keyboard.type(KEY)
    tab.tab_to("toggle", key="Shift+Tab")
    page.keyboard.press("Enter")
    tab.wait_status(r"Recording from the microphone")
    started = time.monotonic()
    expect(page.get_by_role("button", name="Stop")).to_be_focused()
    assert tab.text("connection").startswith("connected")

    # while it records: deltas (committed text) and partials arrive; the clip plays once
    text_while_recording, partial_seen, live_shot, server_numbers = "", False, None, ""
    shot_words = 1  # the screenshot shows committed text (5 words or more) and pending text together
    while time.monotonic() - started < clip_seconds(MIC_CLIP) + 2.0:
        committed, partials = "".join(tab.committed()), "".join(tab.partials())
        text_while_recording = committed or text_while_recording
        partial_seen |= bool(partials.strip())
        if partials.strip() and len(committed.split()) >= shot_words + 5:  # the fullest such moment is kept
            live_shot, shot_words = screenshot(page, artifacts, "demo-live.png"), len(committed.split())
        if "1 session" in tab.text("server"):
            server_numbers = tab.text("server")
        time.sleep(0.2)
    assert "Recording" in tab.text("status")
    assert text_while_recording.strip(), "no transcription.delta reached the page before stop"
    assert partial_seen, "no pending (partial) text was shown"
    assert live_shot is not None, "committed and pending text were never on screen together"
    assert re.search(r"ok · 1 session\b", server_numbers), server_numbers  # /health polled live

    page.keyboard.press("Space")  # stop, by keyboard
    tab.wait_status(r"^Done\.$")
    latency = tab.text("latency")
    assert re.search(r"first text \d+\.\d\d s after start · stop → done \d+\.\d\d s", latency), latency
    stop_to_done = float(re.search(r"stop → done (\d+\.\d+) s", latency).group(1))
    assert stop_to_done < 10, latency
    (text,) = tab.committed()
    assert text.startswith(text_while_recording)  # committed text is never revised
    score = assert_matches(MIC_CLIP, text)
    assert tab.partials() == [""]  # done: nothing pending
    expect(page.get_by_role("button", name="Start microphone")).to_be_enabled()
    final_shot = screenshot(page, artifacts, "demo-done.png")
    assert final_shot.stat().st_size > 0
    tab.only_own_origin(server)
    assert not tab.errors, tab.errors
    assert server.proc.health()["compile"]["compilations"] == server.proc.baseline_compilations
    print(f"mic: WER {score:.1f}%, {latency}, live screenshot {live_shot}")


def test_file_picker_streams_at_real_time_and_downloads(tab, server):
    """A recording picked in the file input is decoded, resampled and streamed at real time (one
    utterance); the transcript downloads as txt and as srt with cues timed on the audio sent."""
    page = tab.page
    page.fill("#api-key", KEY)
    seconds = clip_seconds(FILE_CLIP)
    started = time.monotonic()
    page.set_input_files("#file", str(clip_path(FILE_CLIP)))
    tab.wait_status(r"Streaming .* at real time", timeout=20)
    tab.wait_status(r"^Done\.$", timeout=seconds + 30)
    elapsed = time.monotonic() - started
    assert elapsed >= seconds - 0.5, f"{seconds:.1f} s of audio sent in {elapsed:.1f} s: not real time"
    (text,) = tab.committed()
    assert_matches(FILE_CLIP, text)

    with page.expect_download() as info:
        page.click("#download-txt")
    assert info.value.suggested_filename == "transcript.txt"
    assert Path(info.value.path()).read_text().strip() == text.strip()

    with page.expect_download() as info:
        page.click("#download-srt")
    assert info.value.suggested_filename == "transcript.srt"
    srt = Path(info.value.path()).read_text()
    cues = re.findall(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+?)\n(?:\n|$)",
                      srt, flags=re.S)
    assert cues and len(cues) == srt.count(" --> "), srt
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    times = [(3600 * int(h1) + 60 * int(m1) + int(s1) + int(ms1) / 1000, 3600 * int(h2) + 60 * int(m2) + int(s2)
              + int(ms2) / 1000) for _, h1, m1, s1, ms1, h2, m2, s2, ms2, _ in cues]
    assert times[0][0] == 0.0  # relative to the start of the audio sent
    assert all(a < b for a, b in times) and all(times[i][1] <= times[i + 1][0] + 1e-3 for i in range(len(times) - 1))
    assert abs(times[-1][1] - seconds) < 0.5, (times, seconds)  # the last cue ends with the audio
    assert normalize(" ".join(c[-1] for c in cues)) == normalize(text)
    tab.only_own_origin(server)
    assert not tab.errors, tab.errors


def test_server_busy_is_reported(tab, server):
    """With every session taken (max_sessions 2), Start says the server is busy (the server's
    server_busy error and close 1013) and leaves the page ready to try again."""
    page = tab.page
    page.fill("#api-key", KEY)
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_SESSIONS):
            ws = stack.enter_context(ws_connect(server.proc.ws_url,
                                                additional_headers={"Authorization": f"Bearer {KEY}"}))
            assert '"session.created"' in ws.recv(timeout=30)
        page.click("#toggle")
        tab.wait_status(r"Server busy: every session is in use")
        assert tab.text("connection").startswith("disconnected")
        assert page.locator("#toggle").inner_text() == "Start microphone"
    assert not tab.errors, tab.errors


def test_microphone_denied_is_reported(playwright, server):
    """A browser that refuses the microphone (no fake-UI flag: headless Chromium denies it)."""
    denying = launch(playwright, f"--use-file-for-fake-audio-capture={clip_path(MIC_CLIP)}%noloop")
    try:
        tab = Page(denying, server)
        tab.page.fill("#api-key", KEY)
        tab.page.click("#toggle")
        tab.wait_status(r"Microphone access was denied")
        assert tab.page.locator("#toggle").inner_text() == "Start microphone"
        tab.wait_text("connection", r"^disconnected")
        assert tab.errors == [], tab.errors
    finally:
        denying.close()


def test_reconnects_after_a_server_restart(tab, server, artifacts):
    """Runs last (it replaces the server): while the page records, the server shuts down
    gracefully (close 1001): the page says so, shows that it is reconnecting, keeps trying while
    the server is away, and is connected and recording again once a new server is up."""
    page = tab.page
    page.fill("#api-key", KEY)
    page.click("#toggle")
    tab.wait_status(r"Recording from the microphone")
    tab.wait_text("transcript", r"\w{4,}", timeout=20)  # some text, so the drain has an utterance to finish
    port = server.proc.port
    server.proc.stop()
    status = tab.wait_status(r"shutting down.*Reconnecting in \d+ s \(attempt 1\)|"
                             r"does not answer.*Reconnecting", timeout=20)
    assert tab.text("connection").startswith("reconnecting"), status
    assert page.locator(".utterance").count() >= 1
    server.start(port=port)
    tab.wait_text("connection", r"^connected", timeout=40)
    tab.wait_status(r"^Reconnected.*Recording")
    assert page.locator(".utterance").count() >= 2  # a new utterance on the new session
    screenshot(page, artifacts, "demo-reconnected.png")
    page.click("#toggle")
    tab.wait_status(r"^(Done|Stopped)\.$")
    tab.only_own_origin(server)
    assert not tab.errors, tab.errors
