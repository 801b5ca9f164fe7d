"""`isoconv serve`: the endpoint answers as `isoconv predict` does and refuses non-images, oversize and empty uploads
with a readable 4xx; a real headless Chromium drops an image on the page and reads the answer.

The server runs in this process (uvicorn in a thread, on a free loopback port) and is stopped by the fixture."""
import base64
import builtins
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from isoconv.cli import build_parser, main
from isoconv.interop.predict import predict_files, ready_model
from isoconv.interop.serve import bind, build_app, make_server
from test_export import make_run

LIMIT = 64 * 1024  # a small upload limit keeps the oversize checks fast
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the environment


def needed(what: str, ok: bool):
    """Browser tests never skip in CI (.ci/run installs chromium and playwright); elsewhere they skip with a reason."""
    if not ok:
        message = f"{what} is missing: apt-get install chromium; pip install 'isoconv[serve,test]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "run", kernel=4)


@pytest.fixture(scope="module")
def server(model_run):
    """(base URL, run) of a live server on 127.0.0.1; stopped (and checked to stop) after the module."""
    app = build_app(ready_model(model_run, "cpu"), top_k=3, max_bytes=LIMIT)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    srv = make_server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # at most 20 s
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.1)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/", model_run
    srv.should_exit = True
    thread.join(timeout=20)
    assert not thread.is_alive(), "the server did not stop"
    sock.close()


def png_bytes(size=32, seed=0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, body: bytes, content_type="image/png"):
    """(status, JSON answer) of POST url with `body`."""
    request = urllib.request.Request(url + "predict", data=body, headers={"Content-Type": content_type})
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def expected_top(run, data: bytes, tmp_path, k=3):
    path = tmp_path / "image.png"
    path.write_bytes(data)
    best = predict_files(run, [path], top_k=k, device="cpu").predictions[0]
    return list(zip(best.classes, best.probabilities))


def test_a_good_image_gets_the_top_k_that_predict_gives(server, tmp_path):
    url, run = server
    data = png_bytes(48, seed=1)  # resized to 32x32 as predict does
    status, answer = post(url, data)
    assert status == 200
    got = [(row["class"], row["probability"]) for row in answer["top"]]
    want = expected_top(run, data, tmp_path)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-6)


def test_non_image_oversize_and_empty_uploads_get_a_readable_4xx(server):
    url, _ = server
    assert post(url, b"name,value\ncat,1\n", "text/csv") == (
        415, {"error": "the upload is not an image that can be read; drop a PNG, JPEG, GIF, BMP, TIFF or WebP file"})
    status, answer = post(url, png_bytes(8) + bytes(LIMIT))  # a PNG, but over the limit
    assert status == 413 and answer["error"].startswith("the upload is larger than the 0.0625 MB limit")
    assert post(url, b"")[0] == 400
    assert post(url, png_bytes(16))[0] == 200  # and the server still answers


def test_loopback_by_default_and_the_page_is_served(server):
    args = build_parser().parse_args(["serve", "run"])
    assert (args.host, args.port, args.top_k) == ("127.0.0.1", 8000, 5)
    with NO_PROXY.open(server[0], timeout=60) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html") and 'id="drop"' in page


def test_serve_without_its_packages_says_how_to_install(model_run, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn" or name.startswith("starlette"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    capsys.readouterr()
    assert main(["serve", str(model_run), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("isoconv: error: isoconv serve needs starlette and uvicorn: pip "
                                               "install 'isoconv[serve]'")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    needed("the playwright package", sync_playwright is not None)
    needed(CHROMIUM, os.path.exists(CHROMIUM))
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


DROP = """([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type}));
  return data;
}"""


def drop_file(page, data: bytes, name: str, mime: str) -> None:
    """What a user's drag and drop does: a `drop` event on the drop zone carrying the file."""
    transfer = page.evaluate_handle(DROP, [base64.b64encode(data).decode(), name, mime])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_browser_drop_an_image_and_read_the_answer(server, browser, tmp_path):
    url, run = server
    page = browser.new_page()
    try:
        page.goto(url)
        assert "Drop an image here" in page.text_content("#drop")
        data = png_bytes(40, seed=2)
        drop_file(page, data, "photo.png", "image/png")
        page.wait_for_selector("#result tr", timeout=30_000)
        rows = [[td.inner_text() for td in tr.query_selector_all("td")] for tr in page.query_selector_all("#result tr")]
        assert rows == [[c, f"{100 * p:.1f}%"] for c, p in expected_top(run, data, tmp_path)]
        assert page.text_content("#error") == ""

        drop_file(page, b"just some text\n", "notes.txt", "text/plain")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert page.text_content("#error").startswith("the upload is not an image that can be read")
        assert page.query_selector_all("#result tr") == []

        drop_file(page, png_bytes(8) + bytes(LIMIT), "huge.png", "image/png")
        page.wait_for_function("document.getElementById('error').textContent.includes('larger')", timeout=30_000)
        assert page.text_content("#error").startswith("the upload is larger than the 0.0625 MB limit")
    finally:
        page.close()
