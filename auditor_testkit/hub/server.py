"""A Hub-compatible HTTP server over a folder of repos (``auditor serve-hub``).

It answers the subset of the Hugging Face Hub API that huggingface_hub 2.4 uses for
listing, metadata, downloads and ranged reads (see /work/shared/hub-api-facts.md), with
the same error headers, so the real client raises its usual exception types. Faults
(429, 5xx, cut connections) can be injected to test clients' retry paths.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from auditor.bounded import loads_json
from auditor.errors import AuditorError
from auditor.hub.card import CardInfo, derive_tags, infer_relation, parse_card
from auditor.hub.repo_folders import (
    FileEntry,
    RepoLookupError,
    RepoStore,
    Snapshot,
    iso,
    safe_relpath,
)
from auditor_testkit.hub.faults import CutResponse, FaultConfig, FaultInjector, error_response
from auditor_testkit.hub.ranges import RANGE_RE, parse_range

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FORM_BYTES = 1_000_000
_STATUS_FOR_CODE = {"RepoNotFound": 404, "RevisionNotFound": 404, "EntryNotFound": 404,
                    "GatedRepo": 401}


class HubApp:
    """The Starlette application and the state it serves."""

    def __init__(self, root: Path, *, tokens: Collection[str] = (),
                 faults: FaultConfig | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 ignore_range: bool = False) -> None:
        self.store = RepoStore(Path(root))
        # Behave like a mirror that ignores Range: every GET answers 200 with the whole body.
        self.ignore_range = ignore_range
        self.tokens = frozenset(tokens)
        self.faults = FaultInjector(faults)
        self.page_size = max(1, min(page_size, MAX_PAGE_SIZE))
        self._cards: dict[tuple[str, str], CardInfo] = {}
        self._model_types: dict[tuple[str, str], str | None] = {}
        routes = [
            Route("/api/models", self.list_models, methods=["GET"]),
            Route("/api/models/{org}/{name}", self.model_info, methods=["GET"]),
            Route("/api/models/{org}/{name}/revision/{rev}", self.model_info, methods=["GET"]),
            Route("/api/models/{org}/{name}/tree/{rev}", self.tree, methods=["GET"]),
            Route("/api/models/{org}/{name}/tree/{rev}/{path:path}", self.tree, methods=["GET"]),
            Route("/api/models/{org}/{name}/paths-info/{rev}", self.paths_info,
                  methods=["POST"]),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", self.resolve,
                  methods=["GET", "HEAD"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        # Unknown routes (including /api/agent-harnesses) get a plain 404.
        return error_response(404, None, "not found")

    # ----- helpers ---------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self.tokens

    def _snapshot(self, request: Request, rev: str = "main", *, for_download: bool = False
                  ) -> Snapshot:
        repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
        snap = self.store.snapshot(repo_id, rev)
        authorized = self._authorized(request)
        if snap.meta.get("private") and not authorized:
            # The Hub hides private repos from anonymous callers.
            raise RepoLookupError("RepoNotFound", "repository not found")
        if for_download and snap.meta.get("gated") and not authorized:
            raise RepoLookupError("GatedRepo", f"access to {repo_id} is restricted")
        return snap

    def _card(self, snap: Snapshot) -> CardInfo:
        key = (snap.repo_id, snap.sha)
        card = self._cards.get(key)
        if card is None:
            entry = snap.files.get("README.md")
            text = b""
            if entry is not None:
                text = self.store.read_range(snap, entry, 0, min(entry.size, 1_000_001))
            card = parse_card(text) if text else CardInfo()
            self._cards[key] = card
        return card

    def _model_type(self, snap: Snapshot) -> str | None:
        key = (snap.repo_id, snap.sha)
        if key not in self._model_types:
            value = None
            entry = snap.files.get("config.json")
            if entry is not None:
                try:
                    cfg = loads_json(self.store.read_range(snap, entry, 0,
                                                           min(entry.size, 1 << 20)),
                                     name="config.json")
                    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
                    value = mt if isinstance(mt, str) and mt.isidentifier() else None
                except (AuditorError, ValueError):
                    value = None
            self._model_types[key] = value
        return self._model_types[key]

    def _tags(self, snap: Snapshot, card: CardInfo) -> list[str]:
        tags = list(card.tags)
        names = snap.files.keys()
        if card.library_name:
            tags.append(card.library_name)
        elif "adapter_config.json" in names:
            tags.append("peft")
        elif "config.json" in names:
            tags.append("transformers")
        model_type = self._model_type(snap)
        if model_type:
            tags.append(model_type)  # the Hub tags a repo with its config's model_type
        if any(n.endswith(".safetensors") for n in names):
            tags.append("safetensors")
        if "mergekit_config.yml" in names:
            tags += ["mergekit", "merge"]
        if card.pipeline_tag:
            tags.append(card.pipeline_tag)
        tags += derive_tags(card, has_adapter="adapter_config.json" in names)
        if card.license:
            tags.append(f"license:{card.license}")
        return list(dict.fromkeys(tags))

    def _info(self, snap: Snapshot, *, full: bool, card_data: bool, blobs: bool = False,
              config: bool = False) -> dict[str, Any]:
        card = self._card(snap)
        gated = snap.meta.get("gated", False)
        if gated not in ("auto", "manual"):
            gated = False
        names = snap.files.keys()
        library = card.library_name or (
            "peft" if "adapter_config.json" in names
            else "transformers" if "config.json" in names else None)
        info: dict[str, Any] = {
            "_id": snap.sha[:24],
            "id": snap.repo_id,
            "modelId": snap.repo_id,
            "author": snap.repo_id.partition("/")[0],
            "sha": snap.sha,
            "createdAt": iso(snap.created_at),
            "lastModified": iso(snap.last_modified),
            "private": bool(snap.meta.get("private", False)),
            "gated": gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": self._tags(snap, card),
            "library_name": library,
            "pipeline_tag": card.pipeline_tag,
        }
        if card.base_models:
            info["baseModels"] = {
                "relation": infer_relation(card, has_adapter="adapter_config.json" in names),
                "models": [{"id": b} for b in card.base_models],
            }
        if card_data or full:
            info["cardData"] = card.data
        if full:
            info["siblings"] = [self._sibling(snap, e, blobs=blobs)
                                for _, e in sorted(snap.files.items())]
            params = self.store.safetensors_parameters(snap)
            if params is not None:
                info["safetensors"] = {"parameters": params, "total": sum(params.values())}
        if config and "config.json" in names:
            entry = snap.files["config.json"]
            try:
                cfg = loads_json(self.store.read_range(snap, entry, 0, min(entry.size, 1 << 20)),
                                 name="config.json")
                info["config"] = cfg if isinstance(cfg, dict) else {}
            except (AuditorError, ValueError):
                info["config"] = {}
        return info

    def _sibling(self, snap: Snapshot, entry: FileEntry, *, blobs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rfilename": entry.path}
        if blobs:
            out["size"] = entry.size
            out["blobId"] = entry.oid
            if entry.lfs:
                out["lfs"] = {"size": entry.size, "sha256": self.store.sha256(snap, entry),
                              "pointerSize": 134}
        return out

    def _tree_entry(self, snap: Snapshot, entry: FileEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size,
                               "path": entry.path}
        if entry.lfs:
            out["lfs"] = {"oid": self.store.sha256(snap, entry), "size": entry.size,
                          "pointerSize": 134}
        return out

    @staticmethod
    def _flag(request: Request, name: str) -> bool:
        return request.query_params.get(name, "").lower() in ("1", "true", "yes")

    def _guard(self, endpoint: str, handler: Callable[[bool], Response]) -> Response:
        """Inject a fault or run ``handler(cut)``; map store errors to Hub error answers."""
        fault = self.faults.pick(endpoint)
        if fault in ("429", "5xx"):
            return self.faults.response(fault)
        try:
            return handler(fault == "cut")
        except RepoLookupError as exc:
            return error_response(_STATUS_FOR_CODE.get(exc.code, 404), exc.code, str(exc))
        except (ValueError, RecursionError, OSError) as exc:
            # A repo whose files break the server answers an error of its own (422: not
            # retried as a transient 5xx would be); other repos are unaffected.
            log.warning("%s: cannot serve: %s: %s", endpoint, type(exc).__name__,
                        str(exc)[:200])
            return error_response(422, None, "repository content cannot be served")

    # ----- endpoints -------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return await asyncio.to_thread(self._guard, "api", lambda _cut: self._list_models(request))

    def _list_models(self, request: Request) -> Response:
        q = request.query_params
        filters = q.getlist("filter")
        author = q.get("author")
        search = (q.get("search") or "").lower()
        sort = q.get("sort")
        full = self._flag(request, "full")
        card_data = self._flag(request, "cardData")
        config = self._flag(request, "config")
        expand = q.getlist("expand")
        try:
            limit = int(q.get("limit") or self.page_size)
            offset = int(base64.urlsafe_b64decode(q.get("cursor", "") + "==").decode() or 0)
        except ValueError:
            return error_response(400, None, "bad limit or cursor")
        page = max(1, min(limit, self.page_size))
        authorized = self._authorized(request)
        rows: list[dict[str, Any]] = []
        for repo_id in self.store.repo_ids():
            if author and repo_id.partition("/")[0] != author:
                continue
            if search and search not in repo_id.lower():
                continue
            try:
                snap = self.store.snapshot(repo_id)
            except RepoLookupError:
                continue
            if snap.meta.get("private") and not authorized:
                continue
            try:
                info = self._info(snap, full=full or bool(expand), card_data=card_data,
                                  config=config)
            except Exception as exc:
                # One hostile repo must not take the listing (and every crawl) down with it.
                log.warning("listing skips %s: %s: %s", repo_id, type(exc).__name__,
                            str(exc)[:200])
                continue
            if any(f not in info["tags"] and f != repo_id for f in filters):
                continue
            rows.append(info)
        if sort in ("createdAt", "created_at"):
            rows.sort(key=lambda r: (r["createdAt"], r["id"]), reverse=True)
        elif sort in ("lastModified", "last_modified"):
            rows.sort(key=lambda r: (r["lastModified"], r["id"]), reverse=True)
        chunk = rows[offset: offset + page]
        if expand:
            keep = set(expand) | {"_id", "id"}
            chunk = [{k: v for k, v in r.items() if k in keep} for r in chunk]
        elif not full:
            drop = {"siblings", "safetensors", "sha", "lastModified", "gated", "disabled",
                    "author"}
            chunk = [{k: v for k, v in r.items() if k not in drop} for r in chunk]
        headers = {}
        if offset + page < len(rows):
            params = [(k, v) for k, v in q.multi_items() if k != "cursor"]
            cursor = base64.urlsafe_b64encode(str(offset + page).encode()).decode().rstrip("=")
            params.append(("cursor", cursor))
            next_url = str(request.url.replace(query=urlencode(params)))
            headers["Link"] = f'<{next_url}>; rel="next"'
        return JSONResponse(chunk, headers=headers)

    async def model_info(self, request: Request) -> Response:
        def handler(_cut: bool) -> Response:
            snap = self._snapshot(request, request.path_params.get("rev", "main"))
            info = self._info(snap, full=True, card_data=True,
                              blobs=self._flag(request, "blobs"))
            expand = request.query_params.getlist("expand")
            if expand:
                keep = set(expand) | {"_id", "id"}
                info = {k: v for k, v in info.items() if k in keep}
            return JSONResponse(info)

        return await asyncio.to_thread(self._guard, "api", handler)

    async def tree(self, request: Request) -> Response:
        def handler(_cut: bool) -> Response:
            snap = self._snapshot(request, request.path_params["rev"])
            raw = request.path_params.get("path", "").strip("/")
            prefix = ""
            if raw:
                rel = safe_relpath(raw)
                if rel is None:
                    raise RepoLookupError("EntryNotFound", "bad path")
                prefix = rel + "/"
                if not any(p.startswith(prefix) for p in snap.files):
                    raise RepoLookupError("EntryNotFound", f"{raw!r} not found")
            recursive = self._flag(request, "recursive")
            out: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for path, entry in sorted(snap.files.items()):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):]
                if "/" in rest:
                    parts = rest.split("/")
                    upto = len(parts) - 1 if recursive else 1
                    for i in range(1, upto + 1):
                        d = prefix + "/".join(parts[:i])
                        if d not in dirs:
                            dirs.add(d)
                            out.append({"type": "directory", "oid": "0" * 40, "size": 0,
                                        "path": d})
                    if not recursive:
                        continue
                out.append(self._tree_entry(snap, entry))
            return JSONResponse(out)

        return await asyncio.to_thread(self._guard, "api", handler)

    async def paths_info(self, request: Request) -> Response:
        # huggingface_hub posts an urlencoded form; parsed here (bounded) rather than with
        # Starlette's form parser, which needs python-multipart.
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return error_response(413, None, "request body too large")
        fields = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True,
                           max_num_fields=10_000) if body else []
        paths = [v for k, v in fields if k == "paths"]

        def handler(_cut: bool) -> Response:
            snap = self._snapshot(request, request.path_params["rev"])
            out: list[dict[str, Any]] = []
            for raw in paths:
                rel = safe_relpath(raw.strip("/"))
                if rel is None:
                    continue
                if rel in snap.files:
                    out.append(self._tree_entry(snap, snap.files[rel]))
                elif any(p.startswith(rel + "/") for p in snap.files):
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
            return JSONResponse(out)

        return await asyncio.to_thread(self._guard, "api", handler)

    async def resolve(self, request: Request) -> Response:
        head = request.method == "HEAD"
        return await asyncio.to_thread(
            self._guard, "resolve-head" if head else "resolve-get",
            lambda cut: self._resolve(request, head=head, cut=cut))

    def _resolve(self, request: Request, *, head: bool, cut: bool) -> Response:
        snap = self._snapshot(request, request.path_params["rev"], for_download=True)
        entry = self.store.entry(snap, request.path_params["path"])
        etag = self.store.sha256(snap, entry) if entry.lfs else entry.oid
        headers = {
            "X-Repo-Commit": snap.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{entry.path.rsplit("/", 1)[-1]}"',
        }
        size = entry.size
        start, end = 0, size - 1
        status = 200
        range_header = None if self.ignore_range else request.headers.get("range")
        if self.ignore_range:
            del headers["Accept-Ranges"]
        if range_header and not head:
            match = RANGE_RE.match(range_header.strip().replace(" ", ""))
            parsed = parse_range(match, size) if match else None
            if parsed is None:
                return error_response(416, None, "range not satisfiable",
                              {"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if head:
            headers["Content-Length"] = str(size)
            return Response(status_code=200, headers=headers)
        chunks = self.store.iter_bytes(snap, entry, start, length)
        if cut and length > 0:
            return CutResponse(chunks, length, max(1, length // 2), headers, status)
        headers["Content-Length"] = str(length)
        return StreamingResponse(chunks, status_code=status, headers=headers)


def create_app(root: Path, *, tokens: Collection[str] = (), faults: FaultConfig | None = None,
               page_size: int = DEFAULT_PAGE_SIZE) -> Any:
    """The ASGI app serving ``root``."""
    return HubApp(root, tokens=tokens, faults=faults, page_size=page_size).app


class HubServer:
    """Run the server in a background thread: ``with HubServer(root) as srv: srv.url``."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0,
                 tokens: Collection[str] = (), faults: FaultConfig | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, ignore_range: bool = False) -> None:
        self.root = Path(root)
        self.ignore_range = ignore_range
        self.host = host
        self.port = port
        self.tokens = tokens
        self.faults = faults
        self.page_size = page_size
        self.hub: HubApp | None = None  # the served app (tests read its fault counters)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        self.hub = HubApp(self.root, tokens=self.tokens, faults=self.faults,
                          page_size=self.page_size, ignore_range=self.ignore_range)
        config = uvicorn.Config(self.hub.app, host=self.host, port=self.port, log_level="critical",
                                lifespan="off", access_log=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, name="hub-server", daemon=True)
        self._thread.start()
        for _ in range(1000):
            if server.started:
                break
            if not self._thread.is_alive():
                raise RuntimeError("hub server failed to start")
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("hub server did not start in time")
        sock = server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(root: Path, *, host: str = "127.0.0.1", port: int = 8000,
                  tokens: Collection[str] = (), faults: FaultConfig | None = None,
                  page_size: int = DEFAULT_PAGE_SIZE, ignore_range: bool = False) -> None:
    """Run in the foreground until interrupted (the CLI entry point)."""
    app = HubApp(root, tokens=tokens, faults=faults, page_size=page_size,
                 ignore_range=ignore_range).app
    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
