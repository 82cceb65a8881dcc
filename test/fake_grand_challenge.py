"""A small stand-in for grand-challenge.org's REST API, enough for gcapi 0.16.1 to run algorithm jobs.

It serves HTTPS on 127.0.0.1 (gcapi refuses plain http) with a self-signed certificate made by
`openssl`, runs OUR algorithm in-process on each uploaded case (model loaded once), and answers exactly
the requests `training.benchmark.grand_challenge` makes through gcapi's own client code:

    GET   /api/v1/gcapi/                                        version check in gcapi.Client()
    GET   /api/v1/algorithms/?slug=...                          client.algorithms.detail(slug=...)
    GET   /api/v1/components/interfaces/?slug=...               socket lookup in start_algorithm_job
    POST  /api/v1/uploads/                                      multipart user upload: create
    PATCH /api/v1/uploads/<pk>/<s3 id>/generate-presigned-urls/
    PUT   /s3/<pk>/<part>                                       the "presigned" part upload (ETag back)
    PATCH /api/v1/uploads/<pk>/<s3 id>/complete-multipart-upload/   (and abort-multipart-upload/)
    POST  /api/v1/algorithms/jobs/                              job creation from the user upload
    GET   /api/v1/algorithms/jobs/<pk>/                         job status and outputs
    GET   /api/v1/cases/images/<pk>/                            image detail (its files)
    GET   /media/images/<pk>/<name>  -> 302 -> https://localhost:<port>/s3-media/...   the image file,
                                                                redirected to another host like the real site

Jobs go Queued -> Executing Algorithm -> Succeeded or Failed, one at a time on a worker thread (like a
queue with one GPU). The algorithm's outputs are "parsed" the way grand-challenge does it: the .mha under
the mask socket's folder becomes an image, the frame-number JSON a value; a missing output
fails the job. Every request is recorded (method, path, status, whether it carried the token) and faults
can be injected: an HTTP status or a dropped connection on the n-th request matching a path.

What the fake covers: gcapi's request sequence and payloads for these steps, pagination-shaped lookups,
the multipart upload protocol, the redirect on file download, Bearer-token authentication (401
otherwise; no token sent to the "S3" URLs), transient 5xx / dropped connections, failed jobs, the number
of jobs in flight.

What only the real site shows: its queueing and provisioning delays and GPU run time; input validation
and image import by panimg (the .mha is converted, so output bytes differ; arrays match); the output
image re-encoded by grand-challenge; rate limits, credits and per-user job limits; S3 redirects to another
host; the exact error texts of failed jobs; API changes after gcapi 0.16.1.
"""
from __future__ import annotations

import hashlib
import json
import queue
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from algorithm.contract import FRAME_SLUG, INPUT_FOLDER, INPUT_SLUG, MASK_SLUG, OUTPUT_FRAME, OUTPUT_MASK


def _socket(pk: int, slug: str, title: str, kind: str, super_kind: str, relative_path: str) -> dict:
    return {"title": title, "description": None, "slug": slug, "kind": kind, "pk": pk, "default_value": None,
            "super_kind": super_kind, "relative_path": relative_path, "overlay_segments": None,
            "look_up_table": None}


SOCKETS = {
    INPUT_SLUG: _socket(588, INPUT_SLUG, "Stacked Fetal Ultrasound", "Image", "Image",
                        str(INPUT_FOLDER)),
    MASK_SLUG: _socket(589, MASK_SLUG, "Fetal Abdomen Segmentation", "Segmentation", "Image",
                       str(OUTPUT_MASK.parent)),
    FRAME_SLUG: _socket(590, FRAME_SLUG, "Fetal Abdomen Frame Number", "Integer", "Value",
                        str(OUTPUT_FRAME)),
}


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1 and localhost, valid one day; needs the `openssl` command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class Fault:
    """Answer the `nth` request (1-based) whose method matches and whose path contains `path` with an HTTP
    `status` (or drop the connection when status is 0), `times` times in a row."""

    method: str
    path: str
    status: int
    nth: int = 1
    times: int = 1
    seen: int = 0
    fired: int = 0

    def hit(self, method: str, path: str) -> bool:
        if method != self.method or self.path not in path:
            return False
        self.seen += 1
        if self.seen >= self.nth and self.fired < self.times:
            self.fired += 1
            return True
        return False


@dataclass
class Request:
    method: str
    path: str
    status: int
    authorized: bool
    headers: dict = field(default_factory=dict)


class FakeGrandChallenge:
    """Start with `with FakeGrandChallenge(...) as site:`; `site.base_url`, `site.cert` for the client."""

    def __init__(self, folder: Path, token: str, run_algorithm: Callable[[Path, Path], None],
                 algorithm_slug: str = "fetalclipseg-test", faults: list[Fault] | None = None,
                 job_seconds: float = 0.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.run_algorithm = run_algorithm
        self.slug = algorithm_slug
        self.faults = faults or []
        self.job_seconds = job_seconds  # extra time a job stays "Executing" (to see jobs overlap)
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.uploads: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.images: dict[str, dict] = {}
        self.queue: queue.Queue = queue.Queue()
        self.max_active = 0
        self.jobs_created = 0
        self.cert, self.key = self_signed_certificate(self.folder)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.root = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.s3_root = f"https://localhost:{self.server.server_address[1]}"  # another host name, same server
        self.base_url = f"{self.root}/api/v1/"
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ life cycle

    def __enter__(self) -> "FakeGrandChallenge":
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        work = threading.Thread(target=self._worker, daemon=True)
        self._threads = [serve, work]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self.queue.put(None)
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=30)

    # ------------------------------------------------------------------------------ JSON shapes

    def algorithm_json(self) -> dict:
        return {"api_url": f"{self.base_url}algorithms/{self.slug}-pk/", "url": f"{self.root}/algorithms/{self.slug}/",
                "description": "test algorithm", "pk": f"{self.slug}-pk", "title": "FetalCLIPSEG (test)",
                "logo": "", "slug": self.slug, "average_duration": 1.0,
                "interfaces": [{"inputs": [SOCKETS[INPUT_SLUG]], "outputs": [SOCKETS[MASK_SLUG], SOCKETS[FRAME_SLUG]]}]}

    def upload_json(self, upload: dict, **extra) -> dict:
        return {"pk": upload["pk"], "created": "2026-01-01T00:00:00Z", "filename": upload["filename"],
                "key": f"uploads/{upload['pk']}", "s3_upload_id": upload["s3"], "status": upload["status"],
                "api_url": f"{self.base_url}uploads/{upload['pk']}/", **extra}

    def civ_json(self, pk: int, slug: str, value=None, image: str | None = None) -> dict:
        return {"pk": pk, "interface": SOCKETS[slug], "socket": SOCKETS[slug], "value": value, "file": None,
                "image": image}

    def job_json(self, job: dict) -> dict:
        return {"pk": job["pk"], "url": f"{self.root}/algorithms/{self.slug}/jobs/{job['pk']}/",
                "api_url": f"{self.base_url}algorithms/jobs/{job['pk']}/",
                "algorithm_image": f"{self.base_url}algorithms/images/1/",
                "inputs": [self.civ_json(1, INPUT_SLUG, image=f"{self.base_url}cases/images/{job['input_image']}/")],
                "outputs": job["outputs"], "status": job["status"], "hanging_protocol": None,
                "optional_hanging_protocols": [], "view_content": {},
                "exec_duration": job.get("exec_duration"), "invoke_duration": None,
                "algorithm": self.algorithm_json()["api_url"], "error_message": job.get("error_message", "")}

    def image_json(self, image: dict) -> dict:
        pk = image["pk"]
        return {"pk": pk, "name": image["name"], "dicom_image_set": None, "width": image["shape"][2],
                "height": image["shape"][1], "depth": image["shape"][0], "color_space": "GRAY", "modality": None,
                "eye_choice": None, "stereoscopic_choice": None, "field_of_view": None,
                "shape_without_color": image["shape"], "shape": image["shape"], "voxel_width_mm": 0.28,
                "voxel_height_mm": 0.28, "voxel_depth_mm": 0.28, "api_url": f"{self.base_url}cases/images/{pk}/",
                "window_center": None, "window_width": None, "segments": None,
                "files": [{"pk": f"{pk}-file", "image": f"{self.base_url}cases/images/{pk}/",
                           "file": f"{self.root}/media/images/{pk}/{image['name']}", "image_type": "MHD"}]}

    # ------------------------------------------------------------------------------ jobs

    def _active(self) -> int:
        return sum(1 for job in self.jobs.values() if job["status"] not in ("Succeeded", "Failed", "Cancelled"))

    def _worker(self) -> None:
        while not self._stop.is_set():
            pk = self.queue.get()
            if pk is None:
                return
            with self.lock:
                job = self.jobs[pk]
                job["status"] = "Executing Algorithm"
            started = time.perf_counter()
            work = Path(tempfile.mkdtemp(prefix=f"job-{pk}-", dir=self.folder))
            input_dir, output_dir = work / "input", work / "output"
            folder = input_dir / SOCKETS[INPUT_SLUG]["relative_path"]
            folder.mkdir(parents=True)
            output_dir.mkdir()
            upload = self.uploads[job["upload"]]
            (folder / upload["filename"]).write_bytes(upload["content"])
            (input_dir / "inputs.json").write_text(json.dumps([self.civ_json(1, INPUT_SLUG) | {
                "image": {"pk": job["input_image"], "name": upload["filename"]}}]))
            try:
                self.run_algorithm(input_dir, output_dir)
                outputs = self._parse_outputs(output_dir)
                status, error = "Succeeded", ""
            except Exception as failure:  # noqa: BLE001 - the algorithm's failure is the job's
                outputs, status, error = [], "Failed", f"The algorithm failed: {failure}"
            time.sleep(self.job_seconds)
            with self.lock:
                job.update(outputs=outputs, status=status, error_message=error,
                           exec_duration=f"P0DT0H0M{time.perf_counter() - started:.3f}S")
            shutil.rmtree(work, ignore_errors=True)

    def _parse_outputs(self, output_dir: Path) -> list[dict]:
        import SimpleITK as sitk

        masks = sorted((output_dir / SOCKETS[MASK_SLUG]["relative_path"]).glob("*.mha"))
        frame_file = output_dir / SOCKETS[FRAME_SLUG]["relative_path"]
        if len(masks) != 1 or not frame_file.is_file():
            raise RuntimeError("output sockets missing: " + ", ".join(
                slug for slug, ok in ((MASK_SLUG, len(masks) == 1), (FRAME_SLUG, frame_file.is_file())) if not ok))
        frame = json.loads(frame_file.read_text())
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(masks[0]))
        reader.ReadImageInformation()
        width, height, depth = reader.GetSize()
        pk = str(uuidlib.uuid4())
        with self.lock:
            self.images[pk] = {"pk": pk, "name": masks[0].name, "content": masks[0].read_bytes(),
                               "shape": [depth, height, width]}
        return [self.civ_json(2, MASK_SLUG, image=f"{self.base_url}cases/images/{pk}/"),
                self.civ_json(3, FRAME_SLUG, value=frame)]

    # ------------------------------------------------------------------------------ HTTP

    def _handler_class(self):
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *_):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, payload=None, raw: bytes | None = None, headers: dict | None = None):
                body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
                self._status = status

            def _handle(self, method: str) -> None:
                self._status = 0
                path = urlsplit(self.path).path
                authorized = self.headers.get("Authorization", "") == f"BEARER {site.token}"
                try:
                    with site.lock:
                        fault = next((f for f in site.faults if f.hit(method, path)), None)
                    if fault is not None:
                        if fault.status == 0:  # drop the connection without an answer
                            self.close_connection = True
                            self.connection.close()
                            self._status = 0
                            return
                        self._send(fault.status, {"detail": "injected fault"})
                        return
                    self._route(method, path, authorized)
                finally:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
                    with site.lock:
                        site.requests.append(Request(method, path, self._status, authorized, headers))

            def _route(self, method: str, path: str, authorized: bool) -> None:
                query = parse_qs(urlsplit(self.path).query)
                api = path[len("/api/v1/"):] if path.startswith("/api/v1/") else None
                body = self._body() if method in ("POST", "PATCH", "PUT") else b""
                if api == "gcapi/" and method == "GET":
                    from importlib.metadata import version

                    return self._send(200, {"latest_version": version("gcapi"), "lowest_supported_version": "0.1.0"})
                if path.startswith("/s3/") and method == "PUT":  # a presigned URL: no token expected
                    if authorized or "Authorization" in self.headers:
                        return self._send(400, {"detail": "S3 must not receive the API token"})
                    _, upload_pk, part = path.strip("/").split("/")[:3]
                    with site.lock:
                        upload = site.uploads[upload_pk]
                        upload["parts"][int(part)] = body
                    return self._send(200, raw=b"", headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
                if path.startswith("/s3-media/images/") and method == "GET":
                    pk = path.split("/")[3]
                    return self._send(200, raw=site.images[pk]["content"])
                if api is None and path.startswith("/media/images/") and method == "GET":
                    if not authorized:
                        return self._send(401, {"detail": "Authentication credentials were not provided."})
                    pk = path.split("/")[3]
                    # Like the real site: a redirect to another host ("S3"), so httpx drops the token.
                    return self._send(302, None, headers={"Location": f"{site.s3_root}/s3-media/images/{pk}/x.mha"
                                                                      "?X-Amz-Signature=fake"})
                if api is None:
                    return self._send(404, {"detail": "Not found."})
                if not authorized:
                    return self._send(401, {"detail": "Invalid token."})
                return self._api(method, api, query, body)

            def _page(self, results: list) -> None:
                self._send(200, {"count": len(results), "next": None, "previous": None, "results": results})

            def _api(self, method: str, api: str, query: dict, body: bytes) -> None:
                parts = [p for p in api.split("/") if p]
                data = json.loads(body) if body else {}
                if method == "GET" and parts == ["algorithms"]:
                    slug = query.get("slug", [None])[0]
                    return self._page([site.algorithm_json()] if slug in (None, site.slug) else [])
                if method == "GET" and parts == ["components", "interfaces"]:
                    slug = query.get("slug", [None])[0]
                    return self._page([SOCKETS[slug]] if slug in SOCKETS else [])
                if method == "POST" and parts == ["uploads"]:
                    pk = str(uuidlib.uuid4())
                    upload = {"pk": pk, "s3": uuidlib.uuid4().hex, "filename": data["filename"], "status": "Initialized",
                              "parts": {}, "content": b""}
                    with site.lock:
                        site.uploads[pk] = upload
                    return self._send(201, site.upload_json(upload))
                if method == "PATCH" and len(parts) == 4 and parts[0] == "uploads":
                    upload = site.uploads.get(parts[1])
                    if upload is None or upload["s3"] != parts[2]:
                        return self._send(404, {"detail": "Not found."})
                    if parts[3] == "generate-presigned-urls":
                        urls = {str(n): f"{site.root}/s3/{upload['pk']}/{n}?X-Amz-Signature=fake"
                                for n in data["part_numbers"]}
                        return self._send(200, site.upload_json(upload, presigned_urls=urls))
                    if parts[3] == "complete-multipart-upload":
                        listed = sorted(p["PartNumber"] for p in data["parts"])
                        if listed != sorted(upload["parts"]):
                            return self._send(400, {"detail": "parts do not match"})
                        for part in data["parts"]:
                            digest = f'"{hashlib.md5(upload["parts"][part["PartNumber"]]).hexdigest()}"'
                            if part["ETag"] != digest:
                                return self._send(400, {"detail": "ETag mismatch"})
                        upload["content"] = b"".join(upload["parts"][n] for n in listed)
                        upload["status"] = "Completed"
                        return self._send(200, site.upload_json(upload))
                    if parts[3] == "abort-multipart-upload":
                        upload["status"] = "Aborted"
                        return self._send(200, site.upload_json(upload))
                if method == "POST" and parts == ["algorithms", "jobs"]:
                    if data.get("algorithm") != site.algorithm_json()["api_url"]:
                        return self._send(400, {"algorithm": ["unknown algorithm"]})
                    inputs = data.get("inputs") or []
                    if len(inputs) != 1 or inputs[0].get("interface") != INPUT_SLUG:
                        return self._send(400, {"inputs": [f"expected one {INPUT_SLUG} input"]})
                    urls = inputs[0].get("user_uploads") or []
                    upload = site.uploads.get(urls[0].rstrip("/").rsplit("/", 1)[-1]) if len(urls) == 1 else None
                    if upload is None or upload["status"] != "Completed":
                        return self._send(400, {"inputs": ["user upload missing or incomplete"]})
                    pk = str(uuidlib.uuid4())
                    with site.lock:
                        site.jobs[pk] = {"pk": pk, "status": "Queued", "outputs": [], "upload": upload["pk"],
                                         "input_image": str(uuidlib.uuid4())}
                        site.jobs_created += 1
                        site.max_active = max(site.max_active, site._active())
                    site.queue.put(pk)
                    return self._send(201, {"pk": pk, "status": "Queued", "inputs": [
                        {"interface": INPUT_SLUG, "value": None, "file": None, "image": None, "pk": 1,
                         "image_name": None}]})
                if method == "GET" and len(parts) == 3 and parts[:2] == ["algorithms", "jobs"]:
                    with site.lock:
                        job = site.jobs.get(parts[2])
                        payload = site.job_json(job) if job else None
                    return self._send(200, payload) if payload else self._send(404, {"detail": "Not found."})
                if method == "GET" and len(parts) == 3 and parts[:2] == ["cases", "images"]:
                    image = site.images.get(parts[2])
                    return self._send(200, site.image_json(image)) if image else self._send(404, {"detail": "Not found."})
                return self._send(405 if parts else 404, {"detail": f"{method} /api/v1/{api} not implemented"})

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

            def do_PATCH(self):  # noqa: N802
                self._handle("PATCH")

            def do_PUT(self):  # noqa: N802
                self._handle("PUT")

        return Handler


def algorithm_in_process(weights: Path, overrides: dict | None = None) -> Callable[[Path, Path], None]:
    """What the container does for one job, with the model loaded once: /input -> /output."""
    from algorithm.contract import find_input_image, read_stack, write_outputs
    from algorithm.network import load_network
    from algorithm.predict import predict

    network, _ = load_network(weights, overrides or {"device": "cpu"})
    lock = threading.Lock()

    def run(input_dir: Path, output_dir: Path) -> None:
        stack = read_stack(find_input_image(input_dir))
        with lock:
            result = predict(stack.array, network)
        write_outputs(output_dir, stack, result.frame, result.mask)

    return run
