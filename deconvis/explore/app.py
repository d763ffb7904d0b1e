"""The explorer's web app: one page (``explore.html`` + ``explore.js``) and a JSON API, as a
Starlette app over a :class:`~deconvis.explore.session.Session`.

=====================================  =========================================================
``GET /``                              the page
``GET /api/info``                      model, layers, images, caps
``GET /api/image/{id}``                the displayed image (resize + centre crop), PNG
``GET /api/maps?image=&layer=``        the layer's sheet of maps: columns, gap, map size, per
                                       channel maximum and its (y, x); ``/api/maps.png`` the sheet
``GET /api/unit?image=&layer=&channel=&y=&x=[&rules=a,b][&raw=1]``
                                       the unit's projections (PNG data URIs; ``raw``: the float
                                       values, base64), window, RF box, activation
``GET /api/channel?layer=&channel=``   the run's top-k of the channel and its unit page
``POST /api/upload?name=``             the request body is an image file; answers its ``id``
``GET /run/{path}``                    a file inside the run folder (sprites, unit pages)
=====================================  =========================================================

Every refusal is JSON ``{"error": "..."}`` with a 4xx status (the page shows it). Files are
served from inside the run folder only: the path is resolved (links followed) and refused
unless it stays inside. Uploads are capped in bytes while they stream in.
"""
from __future__ import annotations

import base64
import contextlib
import os
from typing import Any, AsyncIterator, Dict, List

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from deconvis.errors import DeconvisError
from deconvis.explore.session import RULES, ExploreError, Session, encode_png
from deconvis.mirror.rules import Rule
from deconvis.render.pages import render_page

#: headers of every API answer: computed per request, never cached by the browser
NO_STORE = {"Cache-Control": "no-store"}


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _param(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None or value == "":
        raise ExploreError(f"missing query parameter {name!r}")
    return value


def _rules(text: str) -> List[Rule]:
    try:
        return [Rule.parse(r.strip()) for r in text.split(",") if r.strip()] or list(RULES)
    except (DeconvisError, ValueError) as exc:
        raise ExploreError(f"rules {text!r}: {exc}") from None


def inside(root: str, rel: str) -> str:
    """The real path of ``rel`` under the real folder ``root`` (links followed, ``..`` resolved), or
    '' when that path is not strictly inside ``root`` (or ``rel`` holds a NUL byte)."""
    if "\x00" in rel:
        return ""
    full = os.path.realpath(os.path.join(root, rel))
    return full if os.path.commonpath([full, root]) == root and full != root else ""


def make_app(session: Session, title: str = "deconvis explore") -> Starlette:
    """The app serving ``session``; its shutdown (lifespan end) closes the session, which removes
    the uploads folder."""

    def page(request: Request) -> HTMLResponse:
        html = render_page("explore.html", title=title, tile_px=64, data=info_dict(),
                           model_spec=session.loaded.spec, model_weights=str(session.loaded.weights),
                           input_size=list(session.input_size), run_dir=session.run_dir or "")
        return HTMLResponse(html, headers=NO_STORE)

    def info_dict() -> Dict[str, Any]:
        return {"model": session.loaded.spec, "weights": str(session.loaded.weights),
                "input_size": list(session.input_size), "layers": [l.to_json() for l in session.layers],
                "images": session.image_list(), "images_note": session.source_error,
                "run": session.run_dir is not None, "rules": [r.value for r in RULES],
                "max_upload_bytes": session.max_upload_bytes, "max_upload_pixels": session.max_upload_pixels}

    def info(request: Request) -> JSONResponse:
        return JSONResponse(info_dict(), headers=NO_STORE)

    def image(request: Request) -> Response:
        shown, _ = session.displayed(request.path_params["key"])
        return Response(encode_png(shown), media_type="image/png", headers=NO_STORE)

    def maps(request: Request) -> JSONResponse:
        key, layer = _param(request, "image"), _param(request, "layer")
        sheet = session.maps(key, layer)
        lay = session.layer(layer)
        return JSONResponse({"image": key, "layer": lay.name, "label": lay.label, **sheet.to_json(),
                             "png": f"api/maps.png?image={key}&layer={lay.name}"}, headers=NO_STORE)

    def maps_png(request: Request) -> Response:
        sheet = session.maps(_param(request, "image"), _param(request, "layer"))
        return Response(sheet.png, media_type="image/png", headers=NO_STORE)

    def unit(request: Request) -> JSONResponse:
        q = request.query_params
        rules = _rules(q.get("rules", ""))
        view = session.unit(_param(request, "image"), _param(request, "layer"), _param(request, "channel"),
                            _param(request, "y"), _param(request, "x"), rules)
        out: Dict[str, Any] = {"image": request.query_params["image"], "layer": view.layer,
                               "label": session.layer(view.layer).label, "channel": view.channel, "y": view.y,
                               "x": view.x, "activation": view.activation, "window": list(view.window),
                               "box": list(view.box), "box_clipped": list(view.box_clipped),
                               "input_size": list(session.input_size), "seconds": round(view.seconds, 6),
                               "projections": {r: _png_uri(p) for r, p in view.png.items()}}
        if q.get("raw") in ("1", "true"):
            out["raw"] = {r: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                              "data": base64.b64encode(t.detach().cpu().contiguous().numpy().tobytes()).decode()}
                          for r, t in view.rec.items()}
        return JSONResponse(out, headers=NO_STORE)

    def channel(request: Request) -> JSONResponse:
        lay, c, _, _ = session.check_unit(_param(request, "layer"), _param(request, "channel"), 0, 0)
        top = session.top(lay.name, c)
        if top is not None:
            top["sprite"] = f"run/{top['sprite']}" if top["sprite"] else None
            top["page"] = f"run/{top['page']}" if top["page"] else None
        return JSONResponse({"layer": lay.name, "label": lay.label, "channel": c, "top": top}, headers=NO_STORE)

    async def upload(request: Request) -> JSONResponse:
        name = request.query_params.get("name", "upload")
        cap = session.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise ExploreError(f"upload {name!r} has {declared} bytes, above the cap of {cap} bytes; send a smaller "
                               "image (or raise max_upload_mb)", 413)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise ExploreError(f"upload {name!r} is above the cap of {cap} bytes; send a smaller image "
                                   "(or raise max_upload_mb)", 413)
            chunks.append(chunk)
        key = await run_in_threadpool(session.add_upload, b"".join(chunks), name)
        return JSONResponse({"id": key, "name": session.uploads[key]}, headers=NO_STORE)

    def run_file(request: Request) -> Response:
        if session.run_dir is None:
            raise ExploreError("this explorer has no run folder", 404)
        rel = request.path_params["path"]
        full = inside(session.run_dir, rel)
        if not full:
            raise ExploreError(f"{rel!r} is outside the run folder", 403)
        if not os.path.isfile(full):
            raise ExploreError(f"{rel!r} is not a file of the run", 404)
        return FileResponse(full)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status", 400)
        return JSONResponse({"error": str(exc)}, status_code=status, headers=NO_STORE)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": f"{exc.detail}: {request.url.path}"}, status_code=exc.status_code,
                            headers=NO_STORE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            session.close()

    def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [Route("/", page), Route("/favicon.ico", no_icon), Route("/api/info", info), Route("/api/image/{key}", image),
              Route("/api/maps", maps), Route("/api/maps.png", maps_png), Route("/api/unit", unit),
              Route("/api/channel", channel), Route("/api/upload", upload, methods=["POST"]),
              Route("/run/{path:path}", run_file)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={DeconvisError: refused, HTTPException: http_error})
    app.state.session = session
    return app
