"""`cai view` in a real headless Chromium, and `cai report --html`.

One real tiny pipeline run (a random 2-layer model, every stage) is the data. Onto a copy
of it goes what a rerun under an edited constitution leaves: a changed comparison
principle, a new constitution stamp in every manifest and one label on the other side.
Red-team markup is added to records to check that it shows as text and runs nothing.

The browser tests need Debian's chromium and chromium-driver (`make test` installs them);
they fail, never skip, when the browser is missing.
"""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import HARMLESS, ROOT

CAI = str(Path(sys.executable).parent / "cai")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT = "<script>window.__pwned = 1; document.title = 'pwned';</script>"
IMG = "<img src=x onerror=\"document.title='pwned-img'; window.__pwned = 2\">"
EDITED_PRINCIPLE = "less-harmful"


# --------------------------------------------------------------------------- fixtures


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A real pipeline run of every stage on the tiny model, plus one hostile SL record and
    one hostile label (copies of real ones with markup in their texts)."""
    from cai.pipeline import load_pipeline_config, run_pipeline

    tmp = tmp_path_factory.mktemp("view")
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model=str(tiny_model), feedback_model=f"hf:{tiny_model}?progress=0",
                out=str(tmp / "old"), constitution=str(tmp / "harmless.yaml"))
    (tmp / "harmless.yaml").write_text(HARMLESS.read_text())
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(data))
    run_pipeline(load_pipeline_config(cfg))
    root = tmp / "old"
    sl = _lines(root / "sl" / "data.jsonl")
    bad = copy.deepcopy(sl[0])
    bad.update(id="hostile-sl-record", prompt_id="rt-hostile", category="hostile-category",
               prompt=f"Tell me how {SCRIPT} works", initial=f"Here: {IMG}",
               flags=["bare-refusal"], filters=[])
    bad["rounds"][0]["revision"] = f"Revised {SCRIPT} {IMG}"
    _write_lines(root / "sl" / "data.jsonl", [*sl, bad])
    labels = _lines(root / "label" / "data.jsonl")
    hostile = copy.deepcopy(labels[0])
    hostile.update(id="hostile-label", pair_id="rt-hostile:0-1", prompt=f"Label {SCRIPT}",
                   response_a=IMG, response_b="plain answer")
    _write_lines(root / "label" / "data.jsonl", [*labels, hostile])
    return root


@pytest.fixture(scope="module")
def new_run(tiny_run: Path) -> Path:
    """What a rerun under an edited constitution leaves: one comparison principle reworded,
    version bumped, every stamp updated, and the first label on the other side."""
    from cai.constitution import load

    tmp = tiny_run.parent
    new = tmp / "new"
    shutil.copytree(tiny_run, new, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint*"))
    edited = tmp / "harmless-v2.yaml"
    spec = yaml.safe_load(HARMLESS.read_text())
    for p in spec["rl"]["principles"]:
        if p["id"] == EDITED_PRINCIPLE:
            p["text"] += " Think about who could be hurt."
    spec["version"] = "9.9.9"
    edited.write_text(yaml.safe_dump(spec, sort_keys=False))
    stamp = load(edited).stamp.as_dict()
    for m in new.glob("**/manifest.json"):
        data = json.loads(m.read_text())
        if data.get("constitution"):
            data["constitution"] = stamp
        if isinstance(data.get("config"), dict) and "constitution" in data["config"]:
            data["config"]["constitution"] = str(edited)
        if m.parent.name == "label":
            data["label_stats"] = {**(data.get("label_stats") or {}), "pairs": 99}
        m.write_text(json.dumps(data))
    state = json.loads((new / "pipeline.json").read_text())
    state["config"]["constitution"] = str(edited)
    (new / "pipeline.json").write_text(json.dumps(state))
    labels = _lines(new / "label" / "data.jsonl")
    labels[0]["p_a"] = 1.0 - labels[0]["p_a"] if labels[0]["p_a"] != 0.5 else 0.9
    _write_lines(new / "label" / "data.jsonl", labels)
    return new


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The viewer's app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, roots: list[Path]):
        import uvicorn

        from cai.view import create_app

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(roots), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60  # a hang, not a slow start, on a loaded machine
        while not self.server.started:
            assert time.time() < deadline, "the viewer did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    s = _Server([tiny_run])
    yield s
    s.close()


@pytest.fixture(scope="module")
def server2(tiny_run: Path, new_run: Path):
    s = _Server([tiny_run, new_run])
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through chromedriver; missing browser fails the tests."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail("the browser tests need /usr/bin/chromium and /usr/bin/chromedriver "
                    "(apt-get install chromium chromium-driver; `make test` does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1600",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _count(driver) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.CSS_SELECTOR, "#count b").text)


def _after_navigation(driver, action) -> None:
    """Do `action` (a click that submits a form) and wait until the next page has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    action()
    WebDriverWait(driver, 20).until(ec.staleness_of(old))
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def _no_script_ran(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    assert driver.execute_script("return window.__pwned === undefined")
    assert "pwned" not in driver.title
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is the check
    assert driver.execute_script("return document.querySelectorAll('img[src=x], script').length") == 0


# --------------------------------------------------------------------------- pages


@pytest.mark.slow
def test_view_every_page_opens(server, browser, tiny_run) -> None:
    from selenium.webdriver.common.by import By

    sl_n = len(_lines(tiny_run / "sl" / "data.jsonl"))
    label_n = len(_lines(tiny_run / "label" / "data.jsonl"))
    stamp = json.loads((tiny_run / "sl" / "manifest.json").read_text())["constitution"]

    browser.get(server.url + "/")
    body = _text(browser)
    assert stamp["hash"] in body and f"v{stamp['version']}" in body
    for key in ("sl", "sft", "label", "pm", "rl", "dpo", "eval"):
        assert key in browser.find_element(By.TAG_NAME, "table").text
    figures = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert figures, "the report's figures are shown"
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in figures)

    browser.get(server.url + "/run/0/sl")
    assert _count(browser) == sl_n
    cards = browser.find_elements(By.CSS_SELECTOR, "article.sl-record")
    assert len(cards) == sl_n
    first = _lines(tiny_run / "sl" / "data.jsonl")[0]
    assert first["rounds"][0]["principle"] in cards[0].text
    assert " ".join(first["rounds"][0]["critique"].split()) in " ".join(cards[0].text.split())

    browser.get(server.url + "/run/0/labels")
    assert _count(browser) == label_n
    tables = browser.find_elements(By.CSS_SELECTOR, "article.label-record table.orders")
    assert len(tables) == label_n
    assert "P(a) order ab" in tables[0].text

    browser.get(server.url + "/run/0/training")
    text = _text(browser)
    shown = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "h2 span.muted")}
    assert {"sft", "pm", "rl", "dpo"} <= shown, shown
    assert browser.find_elements(By.CSS_SELECTOR, "table.by-source")
    assert "sqrt_kl" in text
    rl_log = _lines(tiny_run / "rl" / "log.jsonl")
    curve = browser.find_element(By.XPATH, "//figure[contains(@class,'curve')][.//b[text()='reward']]")
    assert f"{len(rl_log)} steps" in curve.text  # the RL reward curve, drawn from log.jsonl
    points = curve.find_element(By.TAG_NAME, "polyline").get_attribute("points").split()
    assert len(points) == len(rl_log)
    pngs = browser.find_elements(By.CSS_SELECTOR, "section.train-stage figure img")
    assert any("rl/plots/reward.png" in i.get_attribute("src") for i in pngs)
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in pngs)

    browser.get(server.url + "/run/0/eval")
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    elo = browser.find_element(By.ID, "elo").text
    for player in report["players"]:
        assert player in elo
    # The grading judge is named, and flagged when it is the labeller (the tiny run's default).
    assert report["judge_is_labeller"] is True
    notes = browser.find_elements(By.ID, "judge-note")
    assert len(notes) == 1 and "trained the PM" in notes[0].text
    sets = browser.find_element(By.ID, "principle-sets").text
    for col, ps in report["principle_sets"].items():
        assert col in sets and ps["set"] in sets
    prompts = browser.find_elements(By.CSS_SELECTOR, "article.eval-prompt")
    assert len(prompts) == len({(g["set"], g["prompt_id"])
                                for g in _lines(tiny_run / "eval" / "games.jsonl")})
    browser.save_screenshot(str(tiny_run.parent / "eval.png"))


@pytest.mark.slow
def test_view_filters_narrow_and_sort(server, browser, tiny_run) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sl = _lines(tiny_run / "sl" / "data.jsonl")
    browser.get(server.url + "/run/0/sl")
    Select(browser.find_element(By.NAME, "flag")).select_by_value("bare-refusal")
    _after_navigation(browser, lambda: browser.find_element(By.CSS_SELECTOR,
                                                            "form.filters button").click())
    want = sum("bare-refusal" in r["flags"] + r["filters"] for r in sl)
    assert 0 < want < len(sl)
    assert _count(browser) == want
    assert "flag=bare-refusal" in browser.current_url

    browser.get(server.url + "/run/0/sl")
    box = browser.find_element(By.NAME, "q")
    box.send_keys(sl[1]["prompt"][:30])
    _after_navigation(browser, box.submit)
    assert _count(browser) == sum(sl[1]["prompt"][:30].lower() in json.dumps(r, ensure_ascii=False)
                                  .lower() for r in sl) < len(sl)

    principle = sl[0]["rounds"][0]["principle"]
    browser.get(server.url + f"/run/0/sl?principle={principle}")
    assert _count(browser) == sum(any(x["principle"] == principle for x in r["rounds"]) for r in sl)
    browser.get(server.url + "/run/0/sl?category=hostile-category")
    assert _count(browser) == 1

    labels = _lines(tiny_run / "label" / "data.jsonl")
    for flag in ("position-inconsistent", "low-mass", "tie"):
        browser.get(server.url + f"/run/0/labels?flag={flag}")
        assert _count(browser) == sum(flag in r["flags"] for r in labels), flag
    browser.get(server.url + "/run/0/labels?sort=disagreement")
    shown = [float(e.text.split("order disagreement")[1].split()[0]) for e in
             browser.find_elements(By.CSS_SELECTOR, "article.label-record > div.muted")]
    assert shown == sorted(shown, reverse=True) and len(shown) == len(labels)
    browser.get(server.url + "/run/0/labels?sort=confidence")
    conf = [float(e.text.split("confidence")[1].split()[0]) for e in
            browser.find_elements(By.CSS_SELECTOR, "article.label-record > div.muted")]
    assert conf == sorted(conf, reverse=True)


@pytest.mark.slow
def test_view_markup_in_records_shows_as_text_and_runs_nothing(server, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/run/0/sl?q=rt-hostile")
    assert _count(browser) == 1
    card = browser.find_element(By.CSS_SELECTOR, "article.sl-record").text
    assert SCRIPT in card and IMG in card
    _no_script_ran(browser)
    browser.get(server.url + "/run/0/labels?q=Label")
    assert SCRIPT in _text(browser) and IMG in _text(browser)
    _no_script_ran(browser)
    # The first guard is escaping, not only the CSP: the raw HTML holds the text escaped.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/run/0/sl?q=rt-hostile")
    resp = conn.getresponse()
    html = resp.read().decode()
    assert "&lt;script&gt;window.__pwned" in html and "<script>window" not in html
    assert "script-src" not in resp.getheader("Content-Security-Policy") and \
        "default-src 'none'" in resp.getheader("Content-Security-Policy")


@pytest.mark.slow
def test_view_two_runs_show_flipped_label_and_constitution_diff(server2, browser, tiny_run,
                                                                 new_run) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server2.url + "/")
    flipped = browser.find_elements(By.CSS_SELECTOR, "article.flipped-label")
    first = _lines(new_run / "label" / "data.jsonl")[0]
    assert len(flipped) == 1 and first["pair_id"] in flipped[0].text
    diff = browser.find_element(By.ID, "cdiff").text
    assert EDITED_PRINCIPLE in diff and "changed" in diff and "who could be hurt" in diff
    old_version = json.loads((tiny_run / "sl" / "manifest.json").read_text())["constitution"]["version"]
    assert f"v{old_version} → harmless v9.9.9" in _text(browser)
    assert "label_stats.pairs" in browser.find_element(By.ID, "counts").text
    pairs = browser.find_elements(By.CSS_SELECTOR, "article.sl-pair")
    assert len(pairs) == len(_lines(new_run / "sl" / "data.jsonl"))
    browser.save_screenshot(str(tiny_run.parent / "compare.png"))
    # Each run's own pages are there too.
    browser.get(server2.url + "/run/1/labels")
    assert _count(browser) == len(_lines(new_run / "label" / "data.jsonl"))


@pytest.mark.slow
def test_view_serves_only_files_inside_the_run(server, browser, tiny_run) -> None:
    outside = tiny_run.parent / "secret.txt"
    outside.write_text("secret")
    (tiny_run / "link-out.txt").symlink_to(outside)
    browser.get(server.url + "/run/0/file/%2e%2e/secret.txt")
    assert "404" in _text(browser) and "secret" not in _text(browser)

    def status(path: str, method: str = "GET") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(method, path)
        return conn.getresponse().status

    assert status("/run/0/file/../secret.txt") == 404
    assert status("/run/0/file/..%2fsecret.txt") == 404
    assert status("/run/0/file/link-out.txt") == 404
    assert status("/run/0/file//etc/passwd") == 404
    assert status("/run/1/") == 404
    assert status("/run/0/file/eval/elo.png") == 200
    assert status("/run/0/file/sl/data.jsonl") == 200
    assert status("/run/0/sl", "POST") == 405  # read-only: nothing but GET is routed
    # Another name for this address (DNS rebinding by a page elsewhere) is refused.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/run/0/sl", headers={"Host": f"attacker.example:{server.port}"})
    assert conn.getresponse().status == 400
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/run/0/sl", headers={"Host": f"localhost:{server.port}"})
    assert conn.getresponse().status == 200


def test_view_pages_large_stage(tmp_path) -> None:
    """Pages of 50: page 3 of 120 records holds the last 20; a filter pages its matches."""
    from starlette.testclient import TestClient

    from cai.view import create_app

    folder = tmp_path / "sl"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"stage": "sl", "counts": {}}))
    rows = [{"id": f"r{i}", "prompt_id": f"p{i:04d}", "prompt": f"prompt number {i}",
             "category": "odd" if i % 2 else "even", "initial": "x", "rounds": [],
             "final": "x", "filters": [], "flags": [], "keep": True} for i in range(120)]
    _write_lines(folder / "data.jsonl", rows)
    client = TestClient(create_app([folder]), base_url="http://127.0.0.1")
    assert client.get("/run/0/sl").text.count('class="card sl-record"') == 50
    page3 = client.get("/run/0/sl?page=3").text
    assert page3.count('class="card sl-record"') == 20 and "p0119" in page3 and "p0099" not in page3
    odd = client.get("/run/0/sl?category=odd&page=2").text
    assert odd.count('class="card sl-record"') == 10 and "p0119" in odd and "p0118" not in odd


@pytest.mark.slow
def test_view_cli_serves_and_rejects_bad_input(tiny_run, tmp_path) -> None:
    r = subprocess.run([CAI, "view", str(tmp_path / "nothing")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not a run folder" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([CAI, "view", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no stage folder" in r.stderr
    port = _free_port()
    proc = subprocess.Popen([CAI, "view", str(tiny_run), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, status = time.time() + 60, None
        while time.time() < deadline and status is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/run/0/labels")
                status = conn.getresponse().status
            except OSError:
                time.sleep(0.2)
        assert status == 200
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        if listening:  # where `ss` exists: bound to loopback only
            local = [line.split()[3] for line in listening.splitlines()]
            assert local == [f"127.0.0.1:{port}"]
        busy = subprocess.run([CAI, "view", str(tiny_run), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- html report


@pytest.mark.slow
def test_view_report_html_is_one_offline_file(tiny_run, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    # The pipeline wrote report.html beside report.md.
    assert (tiny_run / "report.html").is_file() and (tiny_run / "report.md").is_file()
    from typer.testing import CliRunner

    from cai.cli import app

    cli = CliRunner()
    out = tmp_path / "elsewhere" / "r.html"
    r = cli.invoke(app, ["report", str(tiny_run), "--html", "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count('src="data:image/png;base64,') >= 3
    md = (tiny_run / "report.md").read_text()
    assert html.count("<img") == md.count("![")
    # Without --html only the markdown is written.
    (tiny_run / "report.html").unlink()
    r = cli.invoke(app, ["report", str(tiny_run)])
    assert r.exit_code == 0 and not (tiny_run / "report.html").exists()
    r = cli.invoke(app, ["report", str(tiny_run), "--out", str(out)])
    assert r.exit_code == 2 and "add --html" in r.output
    r = cli.invoke(app, ["report", str(tmp_path / "missing"), "--html"])
    assert r.exit_code == 2 and "not a run folder" in r.output
    # Moved away from the run, it still shows every figure (nothing is fetched).
    browser.get(out.as_uri())
    assert "Run report" in browser.title
    imgs = browser.find_elements(By.TAG_NAME, "img")
    assert imgs and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0
                        for i in imgs)
    assert "Elo" in _text(browser)


def test_view_report_html_escapes_markup(tmp_path) -> None:
    from cai.report import render_report_html

    (tmp_path / "a.png").write_bytes((ROOT / "docs" / "demo-elo.png").read_bytes())
    (tmp_path.parent / "outside.png").write_bytes(b"\x89PNG")
    md = (f"# Run report: x\n\n**Prompt:** {SCRIPT} {IMG}\n\n![fig](a.png)\n\n"
          "![out](../outside.png)\n\n![web](https://example.org/x.png)\n")
    html = render_report_html(tmp_path, md)
    assert "&lt;script&gt;" in html and "<script>" not in html and "<img src=x" not in html
    assert html.count('<img src="data:image/png;base64,') == 1
    assert html.count("figure not inlined") == 2 and "example.org" not in html


def test_view_line_index_skips_blank_lines_and_a_torn_tail(tmp_path) -> None:
    from cai.view.runs import LineIndex, page_of

    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"id": "a"}\n\n  \n{"id": "b"}\n{"id": "c"}\n{"id": "d", "tor')
    idx = LineIndex(p)
    assert len(idx) == 4
    assert [r["id"] for _, r in idx.read([0, 1, 2])] == ["a", "b", "c"]
    assert idx.read([3]) == []  # the torn line is skipped, not an error
    first = page_of(p, 1, size=2)
    assert [r["id"] for r in first.rows] == ["a", "b"]
    assert [r["id"] for r in page_of(p, 2, size=2).rows] == ["c"]


def test_view_allowed_hosts_follow_the_bound_address() -> None:
    from cai.view.app import LOCAL_HOSTS, allowed_hosts

    assert allowed_hosts("127.0.0.1") == list(LOCAL_HOSTS)
    assert allowed_hosts("10.1.2.3") == [*LOCAL_HOSTS, "10.1.2.3"]
    every = allowed_hosts("0.0.0.0")
    assert "*" not in every and every[:len(LOCAL_HOSTS)] == list(LOCAL_HOSTS)
    assert "cai.lab.example" in allowed_hosts("0.0.0.0", ("cai.lab.example",))
    assert "cai.lab.example" not in every


# --------------------------------------------------------------------------- the run's bounds


def _sl_rows(n: int, tag: str = "p") -> list[dict]:
    return [{"id": f"r{i}", "prompt_id": f"{tag}{i:04d}", "prompt": f"prompt number {i}",
             "category": "c", "initial": "x", "rounds": [], "final": "x", "filters": [],
             "flags": [], "keep": True} for i in range(n)]


def _one_stage_run(root: Path, rows: list[dict]) -> Path:
    (root / "sl").mkdir(parents=True)
    (root / "sl" / "manifest.json").write_text(json.dumps({"stage": "sl", "counts": {}}))
    _write_lines(root / "sl" / "data.jsonl", rows)
    return root


def _client(roots: list[Path], hosts: list[str] | None = None, base: str = "http://127.0.0.1"):
    from starlette.testclient import TestClient

    from cai.view import create_app

    return TestClient(create_app(roots, hosts), base_url=base)


def test_view_symlink_data_and_manifest_out_of_the_run_are_not_shown(tmp_path) -> None:
    secret = tmp_path / "outside"
    secret.mkdir()
    _write_lines(secret / "data.jsonl", _sl_rows(3, tag="SECRET"))
    (secret / "manifest.json").write_text(json.dumps({"stage": "label", "counts": {},
                                                      "note": "SECRET-MANIFEST"}))
    (secret / "log.jsonl").write_text('{"step": 1, "loss": 0.5, "note": "SECRET-LOG"}\n')
    run = _one_stage_run(tmp_path / "run", _sl_rows(2))
    # data.jsonl of the SL stage is a link out of the run; the label stage's manifest too.
    (run / "sl" / "data.jsonl").unlink()
    (run / "sl" / "data.jsonl").symlink_to(secret / "data.jsonl")
    (run / "label").mkdir()
    (run / "label" / "manifest.json").symlink_to(secret / "manifest.json")
    (run / "label" / "data.jsonl").symlink_to(secret / "data.jsonl")
    # A whole stage folder linked out of the run, and a training log linked out.
    (run / "pm").symlink_to(secret, target_is_directory=True)
    (run / "sft").mkdir()
    (run / "sft" / "manifest.json").write_text(json.dumps({"stage": "sft", "counts": {}}))
    (run / "sft" / "log.jsonl").symlink_to(secret / "log.jsonl")
    client = _client([run])
    pages = {p: client.get(f"/run/0/{p}") for p in ("", "sl", "labels", "training", "eval")}
    for name, r in pages.items():
        assert r.status_code == 200, name
        assert "SECRET" not in r.text, name
    assert "sl/data.jsonl points outside the run folder" in pages["sl"].text
    assert "label/manifest.json points outside the run folder" in pages["labels"].text
    assert "pm/manifest.json points outside the run folder" in pages[""].text
    assert "sft/log.jsonl points outside the run folder" in pages["training"].text
    assert client.get("/run/0/file/sl/data.jsonl").status_code == 404
    # The same files inside the run are shown (the check is on where a path leads).
    inside = _one_stage_run(tmp_path / "run2", [])
    (inside / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sl_rows(2, "IN")))
    (inside / "sl" / "data.jsonl").unlink()
    (inside / "sl" / "data.jsonl").symlink_to(inside / "real.jsonl")
    text = _client([inside]).get("/run/0/sl").text
    assert "IN0001" in text and "outside the run" not in text


def test_view_corrupt_manifest_and_torn_line_are_shown_as_such(tmp_path) -> None:
    run = _one_stage_run(tmp_path / "run", _sl_rows(3))
    (run / "label").mkdir()
    (run / "label" / "manifest.json").write_text('{"stage": "label", "coun')
    client = _client([run])
    labels = client.get("/run/0/labels").text
    assert "label/manifest.json is not a valid manifest" in labels
    assert "This run has no label stage" not in labels and "No readable label stage" in labels
    sl = client.get("/run/0/sl").text
    assert "<b>3</b> of 3 records" in sl and 'id="bad-lines"' not in sl
    # A kill tears the last line: two records shown, two counted, and a warning says why.
    with open(run / "sl" / "data.jsonl", "a") as f:
        f.write('{"id": "r3", "prompt_id": "p0003", "pro')
    for url in ("/run/0/sl", "/run/0/sl?category=c", "/run/0/sl?page=2"):
        page = client.get(url).text
        assert "<b>3</b> of 3 records" in page, url
        assert 'id="bad-lines"' in page and "line 4" in page and "torn" in page, url
    # An invalid line in the middle (edited by hand) is named too.
    lines = (run / "sl" / "data.jsonl").read_text().splitlines()
    (run / "sl" / "data.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:3]]) + "\n")
    page = client.get("/run/0/sl").text
    assert "<b>3</b> of 3 records" in page and "line 2" in page and "torn" not in page


def test_view_host_guard_holds_for_every_bind_address(tmp_path) -> None:
    from cai.view.app import allowed_hosts

    run = _one_stage_run(tmp_path / "run", _sl_rows(1))
    for bound in ("0.0.0.0", "::", "127.0.0.1", "10.1.2.3"):
        hosts = allowed_hosts(bound, ("viewer.lab.example",))
        client = _client([run], hosts)
        foreign = client.get("/run/0/sl", headers={"Host": "attacker.example:8765"})
        assert foreign.status_code == 400, bound
        for ok in ("127.0.0.1:8765", "localhost:8765", "viewer.lab.example:8765"):
            assert client.get("/run/0/sl", headers={"Host": ok}).status_code == 200, (bound, ok)
    import socket

    own = socket.gethostname().lower()
    assert own in allowed_hosts("0.0.0.0") and own not in allowed_hosts("127.0.0.1")

