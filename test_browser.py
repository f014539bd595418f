"""The dashboard in a real browser: headless Chromium against a server holding a small synthetic
census of 127.0.0.0/8 (results written into the store as data; nothing is probed).

Chromium is driven over its DevTools protocol on a pipe (--remote-debugging-pipe: commands on
its fd 3, answers on fd 4, each a JSON message ended by NUL), standard library only. That sets
the viewport exactly (--window-size alone will not go below 500 px headless), taps like a
finger, and reads back what the page reports on <html>: its layout width (scroll width), the
viewport width and every URL it loaded. Skips, saying why, where no Chromium is installed
(.ci/run installs it).
"""

import fcntl
import html
import ipaddress
import json
import os
import random
import select
import shlex
import shutil
import subprocess
import time

import pytest

import views
from conftest import result_string
from test_views import EVIL, Census

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--hide-scrollbars", "--remote-debugging-pipe")
NAMES = ("alice", "bob", EVIL)
DONE = 40
# Resolves once the page has drawn the census: the map loaded, the board filled, layout reported.
READY = """new Promise((resolve) => { const check = () => {
  const root = document.documentElement;
  if (root.dataset.layoutWidth && root.dataset.resources.includes("/map")
      && document.querySelectorAll("#board tr").length && document.getElementById("history-title")
      .textContent.includes("since")) resolve(true); else setTimeout(check, 50); }; check(); })"""


class Browser:
    """One headless Chromium with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, binary, profile):
        command_r, self._commands = os.pipe()
        self._answers, answer_w = os.pipe()
        # the child's ends moved past 9, so that bash's 3<& and 4>& cannot overwrite them
        # (dash takes only one-digit descriptors: bash it is)
        command_r, answer_w = (_moved_up(fd) for fd in (command_r, answer_w))
        argv = [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        shell = f"exec {shlex.join(argv)} 3<&{command_r} 4>&{answer_w}"
        self.process = subprocess.Popen(["bash", "-c", shell], pass_fds=(command_r, answer_w),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(command_r)
        os.close(answer_w)
        self._buffer, self._id, self._events = b"", 0, []

    def call(self, method, session=None, timeout=30.0, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = json.loads(self._message(deadline))
            if answer.get("id") == self._id:
                assert "error" not in answer, (method, answer["error"])
                return answer["result"]
            if "method" in answer:
                self._events.append(answer)

    def wait_event(self, method, session, timeout=30.0):
        """Return once event ``method`` of ``session`` came (perhaps already)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                if event["method"] == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            self._events.append(json.loads(self._message(deadline)))

    def open(self, url, width, height=900):
        """A new tab of ``width`` x ``height`` CSS pixels showing ``url``: its session."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Emulation.setTouchEmulationEnabled", session, enabled=width < 600)
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired", session)
        return session

    def value(self, session, expression, timeout=30.0):
        """The value of a JavaScript expression (a promise is awaited)."""
        result = self.call("Runtime.evaluate", session, timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self._commands)
        os.close(self._answers)

    def _message(self, deadline) -> bytes:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise ConnectionError("Chromium exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return message


def _moved_up(fd) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 127.0.0.0/8 census: DONE blocks done by three names, a few in progress."""
    srv = Census(tmp_path_factory.mktemp("census"), scope="127.0.0.0/8",
                 site=views.Site(contact="ops@census.example",
                                 scope=(ipaddress.IPv4Network("127.0.0.0/8"),)))
    rng = random.Random(13)
    for n in range(DONE):
        handout = srv.store.get_task("127.0.0.1")
        ones = rng.sample(range(65536), rng.randrange(0, 20000))
        srv.store.submit(handout.task, result_string(ones), holder="127.0.0.1",
                         token=handout.lease.token, name=NAMES[n % len(NAMES)])
    for _ in range(3):
        srv.store.get_task("127.0.0.1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    if binary is None:
        pytest.skip("no Chromium here (apt-get install -y chromium; .ci/run does)")
    chromium = Browser(binary, tmp_path_factory.mktemp("profile"))
    yield chromium
    chromium.close()


def page_facts(browser, session) -> dict:
    assert browser.value(session, READY)
    return browser.value(session, """(() => {
      const root = document.documentElement, text = (id) => document.getElementById(id).textContent;
      return {layout: +root.dataset.layoutWidth, viewport: +root.dataset.viewportWidth,
              resources: root.dataset.resources.split(" "), done: text("n-done"),
              busy: text("n-busy"), tagline: text("tagline"), view: text("view-note"),
              contact: text("contact"), names: [...document.querySelectorAll("#board td.name")]
              .map((td) => td.textContent), markup: document.body.innerHTML}; })()""")


def test_the_dashboard_shows_the_census_and_loads_nothing_from_elsewhere(site, browser):
    origin = f"http://127.0.0.1:{site.port}/"
    facts = page_facts(browser, browser.open(origin, 1400))
    assert (facts["done"], facts["busy"]) == (str(DONE), "3")
    assert "127.0.0.0/8" in facts["tagline"]
    assert facts["view"].startswith("zoomed to the scope: 127.0.0.0/8")
    assert "ops@census.example" in facts["contact"]
    assert sorted(set(facts["names"])) == sorted(NAMES)     # the hostile one as text
    assert EVIL not in facts["markup"] and html.escape(EVIL, quote=False) in facts["markup"]
    assert any(url.startswith(origin + "map") for url in facts["resources"])
    assert all(url.startswith(origin) for url in facts["resources"]), facts["resources"]
    assert facts["layout"] <= facts["viewport"] == 1400


@pytest.mark.parametrize("width", [360, 400])
def test_a_phone_sees_it_all_without_sideways_scroll_and_pins_by_tapping(site, browser, width):
    session = browser.open(f"http://127.0.0.1:{site.port}/", width)
    facts = page_facts(browser, session)
    assert facts["viewport"] == width and facts["layout"] <= width
    assert facts["done"] == str(DONE)
    box = browser.value(session, """(() => { const r = document.getElementById("overlay")
      .getBoundingClientRect(); return [r.left, r.top, r.width]; })()""")
    left, top, side = box
    browser.call("Input.synthesizeTapGesture", session, x=left + side * 0.55,
                 y=top + side * 0.45, gestureSourceType="touch")
    pinned = browser.value(session, """new Promise((resolve) => { const check = () => {
      const box = document.getElementById("pinned");
      if (!box.hidden && !box.textContent.includes("loading")) resolve([
        document.getElementById("pinned-body").querySelector(".net").textContent,
        document.getElementById("pinned-link").getAttribute("href"), location.hash]);
      else setTimeout(check, 50); }; check(); })""")
    network, link, fragment = pinned
    first, second = map(int, network.split(".")[:2])
    assert first == 127 and link == f"/details/{first * 256 + second}"
    assert fragment == f"#127.{second}"
