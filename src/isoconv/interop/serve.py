"""`isoconv serve MODEL`: a local web page to drop an image on and see the model's top-k classes.

A Starlette app with two routes, run by uvicorn (the `serve` extra: `pip install 'isoconv[serve]'`):

    GET  /          the page (plain HTML and a few lines of JavaScript, no external resources)
    POST /predict   the raw image bytes as the request body -> {"top": [{"class", "index", "probability"}, ...]}
                    or a 4xx {"error": "..."}: 413 over the size limit, 415 not a readable image, 400 empty

Starlette + uvicorn rather than Gradio: two small, maintained packages (uvicorn is Starlette's own server)
against Gradio's hundreds of megabytes of dependencies and its front end; the page needs one endpoint. The body is
the file itself (not a multipart form), so no form parser is needed. The server binds 127.0.0.1 unless told
otherwise; predictions go through the same preprocessing and model call as `isoconv predict`.
"""
from __future__ import annotations

import errno
import html
import io
import logging
import socket
from pathlib import Path
from typing import Any, Union

from ..data.images import BadImageError, decode_image
from ..errors import UserError
from ..formats import DEFAULT_HOST, DEFAULT_PORT, MAX_UPLOAD_BYTES
from .predict import ReadyModel, ready_model, top_predictions

DRAIN_FACTOR = 4  # an oversize body is read (and dropped) up to this many times the limit, so the client gets the 413
SERVE_HINT = "pip install 'isoconv[serve]'"
log = logging.getLogger(__name__)


def import_web():
    try:
        import uvicorn
        from starlette.applications import Starlette
    except ImportError:
        raise UserError(f"isoconv serve needs starlette and uvicorn: {SERVE_HINT}") from None
    return Starlette, uvicorn


def upload_error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def predict_upload(ready: ReadyModel, data: bytes, top_k: int) -> list[dict[str, Any]]:
    """Top-k of one uploaded image file's bytes (BadImageError when they are not a readable image)."""
    image = decode_image(io.BytesIO(data), ready.preprocess.image_size)
    probs = ready.probabilities(image[None])
    best = top_predictions(["upload"], probs, ready.preprocess.classes, top_k)[0]
    return [{"class": c, "index": i, "probability": p} for c, i, p in zip(best.classes, best.indices,
                                                                           best.probabilities)]


def build_app(ready: ReadyModel, *, top_k: int = 5, max_bytes: int = MAX_UPLOAD_BYTES, title: str = "isoconv"):
    """The Starlette app: the page at / and the endpoint at /predict."""
    Starlette, _ = import_web()
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    limit_mb = max_bytes / 2 ** 20
    too_big = (f"the upload is larger than the {limit_mb:g} MB limit; drop a smaller image (or start the server with "
               f"a larger --max-upload-mb)")
    page = page_html(title, ready.preprocess.classes, top_k)

    async def index(request):
        return HTMLResponse(page)

    async def predict(request):
        declared = request.headers.get("content-length", "")
        body, size = bytearray(), 0
        async for chunk in request.stream():  # read in chunks: an oversize body is never held in memory
            size += len(chunk)
            if size <= max_bytes:
                body += chunk
            elif size > DRAIN_FACTOR * max_bytes:
                break
        if size > max_bytes or (declared.isdigit() and int(declared) > max_bytes):
            return upload_error(413, too_big)
        if not body:
            return upload_error(400, "the upload is empty; drop an image file (PNG, JPEG, GIF, BMP, TIFF or WebP)")
        try:
            top = await run_in_threadpool(predict_upload, ready, bytes(body), top_k)
        except BadImageError:
            return upload_error(415, "the upload is not an image that can be read; drop a PNG, JPEG, GIF, BMP, TIFF "
                                     "or WebP file")
        return JSONResponse({"top": top})

    return Starlette(routes=[Route("/", index, methods=["GET"]), Route("/predict", predict, methods=["POST"])])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a UserError saying what to change."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address this machine can listen on ({e.strerror}); pass "
                        f"127.0.0.1 (the default) or an address of this machine") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pass another --port") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"no permission to listen on port {port}; pass a --port above 1023") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --host or --port") \
            from None
    return sock


def make_server(app, log_level: str = "warning"):
    """A uvicorn server for `app`; run it with `server.run(sockets=[bind(host, port)])`."""
    _, uvicorn = import_web()
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))


def serve(target: Union[str, Path], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, top_k: int = 5,
          device: str = "auto", max_upload_mb: float = MAX_UPLOAD_BYTES / 2 ** 20) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if not 0 < max_upload_mb <= 1024:
        raise UserError(f"--max-upload-mb must be in (0, 1024], got {max_upload_mb:g}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    import_web()  # missing packages and a busy port are found before the model is loaded
    sock = bind(host, port)
    try:
        ready = ready_model(target, device)
    except BaseException:
        sock.close()
        raise
    app = build_app(ready, top_k=top_k, max_bytes=int(max_upload_mb * 2 ** 20), title=f"isoconv: {Path(target).name}")
    shown_host, shown_port = sock.getsockname()[:2]
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    if not is_loopback(host):
        log.warning(f"--host {host} lets other machines on the network use this page")
    log.info(f"serving {target} on http://{shown_host}:{shown_port}/ (Ctrl-C stops it)")
    try:
        make_server(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: a normal way to stop
        pass
    finally:
        sock.close()
    log.info("stopped")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def page_html(title: str, classes, top_k: int) -> str:
    return PAGE.replace("{{title}}", html.escape(title)).replace("{{k}}", str(min(top_k, len(classes)))) \
        .replace("{{n}}", str(len(classes)))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
 body { font-family: sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
 #drop { border: 3px dashed #888; border-radius: 1rem; padding: 2rem; text-align: center; cursor: pointer; }
 #drop.over { border-color: #06c; background: #eef5ff; }
 #preview { max-width: 8rem; image-rendering: pixelated; margin-top: 1rem; }
 #error { color: #b00; } table { border-collapse: collapse; margin-top: 1rem; }
 td { padding: .2rem .6rem; } td.p { text-align: right; font-variant-numeric: tabular-nums; }
</style></head>
<body>
<h1>{{title}}</h1>
<div id="drop" tabindex="0">Drop an image here, or click to choose one
 <input id="file" type="file" accept="image/*" hidden></div>
<img id="preview" alt="" hidden>
<p id="status" role="status"></p>
<p id="error" role="alert"></p>
<table id="result" aria-label="top {{k}} of {{n}} classes"></table>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const statusLine = document.getElementById("status"), errorLine = document.getElementById("error");
const result = document.getElementById("result"), preview = document.getElementById("preview");
async function send(file) {
  result.replaceChildren(); errorLine.textContent = "";
  statusLine.textContent = "classifying " + file.name + " ...";
  if (file.type.startsWith("image/")) { preview.src = URL.createObjectURL(file); preview.hidden = false; }
  else { preview.hidden = true; }
  try {
    const response = await fetch("predict", {method: "POST", body: file,
                                             headers: {"Content-Type": file.type || "application/octet-stream"}});
    const answer = await response.json();
    statusLine.textContent = "";
    if (!response.ok) { errorLine.textContent = answer.error || ("error " + response.status); return; }
    for (const row of answer.top) {
      const tr = result.insertRow(), name = tr.insertCell(), p = tr.insertCell();
      name.textContent = row["class"]; p.className = "p";
      p.textContent = (100 * row.probability).toFixed(1) + "%";
    }
    statusLine.textContent = file.name;
  } catch (e) { statusLine.textContent = ""; errorLine.textContent = "no answer from the server: " + e; }
}
drop.addEventListener("click", () => input.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") input.click(); });
input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""
