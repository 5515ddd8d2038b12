"""The image service over HTTP: one ``bentoml serve`` of the digits CNN (logged as an MLflow
pyfunc, its folder in a BentoML model as ``bentos.build`` puts it) per module. Multipart, raw and
base64 JSON uploads answer label + probabilities per image in order; a table of bad inputs gets
the status and message it should, and the server keeps answering."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import httpx
import numpy as np
import pytest
from image_support import (
    DIGITS,
    digits_setup,
    make_context,
    png_bytes,
    serve_context,
    trained_digits,
)

from pipelines.families.image_classifier import model as mdl

SETTINGS = {"max_images": 4, "max_image_bytes": 16384, "max_pixels": 250_000,
            "max_batch_size": 8, "max_latency_ms": 10000, "workers": 1, "torch_threads": 1,
            "body_timeout_s": 5.0}
#: one test image per digit 0..9
SAMPLES = [sorted((DIGITS / "test" / str(d)).iterdir())[0] for d in range(10)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, expected labels of SAMPLES): the trained digits CNN logged to a fresh store and
    served by ``bentoml serve`` until the module ends."""
    import os

    import mlflow

    work = tmp_path_factory.mktemp("image-serve")
    family, _ = digits_setup()
    model = mdl.load(trained_digits(tmp_path_factory))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "BENTOML_HOME": str(work / "bentoml")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment("image-serving")  # not an experiment id another store left active
        with mlflow.start_run():
            uri = family.log_model(model, "model").model_uri
        make_context(uri, work / "ctx", SETTINGS, "fp32")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    rows = family.read(DIGITS / "test", "test_path")
    rows = rows[rows.path.isin([str(p.resolve()) for p in SAMPLES])]
    probs = family.predict_proba(model, family.inputs(rows))
    by_path = dict(zip(rows.path, np.array(model.labels)[probs.argmax(axis=1)], strict=True))
    expected = [by_path[str(p.resolve())] for p in SAMPLES]
    with serve_context(work / "ctx", work / "bentoml", work / "server.log") as url:
        yield url, expected


def _files(paths):
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _check(answer, expected_labels):
    assert [a["label"] for a in answer] == list(expected_labels)
    for a in answer:
        assert sorted(a["probabilities"]) == [str(i) for i in range(10)]
        assert abs(sum(a["probabilities"].values()) - 1.0) < 1e-4
        assert a["probabilities"][a["label"]] == max(a["probabilities"].values())


def test_multipart_raw_and_json_uploads(server):
    url, expected = server
    order = [7, 2, 9, 0]
    r = httpx.post(f"{url}/classify", files=_files([SAMPLES[i] for i in order]), timeout=30)
    assert r.status_code == 200, r.text
    _check(r.json(), [expected[i] for i in order])
    multipart_probs = r.json()[0]["probabilities"]
    raw = httpx.post(f"{url}/classify", content=SAMPLES[7].read_bytes(),
                     headers={"Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 200, raw.text
    _check(raw.json(), [expected[7]])
    assert raw.json()[0]["probabilities"] == pytest.approx(multipart_probs, abs=1e-6)
    b64 = [base64.b64encode(SAMPLES[i].read_bytes()).decode() for i in (3, 4)]
    js = httpx.post(f"{url}/classify", json={"images": b64}, timeout=30)
    assert js.status_code == 200, js.text
    _check(js.json(), [expected[3], expected[4]])


def test_concurrent_requests_are_batched_and_kept_apart(server):
    url, expected = server

    def call(k):
        idx = [(k + j) % 10 for j in range(3)]
        r = httpx.post(f"{url}/classify", files=_files([SAMPLES[i] for i in idx]), timeout=60)
        return idx, r

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    for idx, r in results:
        assert r.status_code == 200, r.text
        _check(r.json(), [expected[i] for i in idx])


def test_metadata_and_card(server):
    url, _ = server
    meta = httpx.get(f"{url}/metadata", timeout=10).json()
    assert (meta["channels"], meta["image_size"], meta["arch"]) == (1, 8, "cnn")
    assert meta["labels"] == [str(i) for i in range(10)]
    assert (meta["max_images"], meta["max_pixels"], meta["runtime"]) == (4, 250_000, "torch")
    assert meta["batching"] is True and meta["model_name"] == "digits-test"
    assert httpx.get(f"{url}/card", timeout=10).status_code == 404  # built without a card


def _bomb() -> bytes:
    return png_bytes((1000, 1000))  # 1 M pixels from a 1 KB file: over max_pixels=250000


def _one(name, data, ctype="image/png"):
    return {"files": [("images", (name, data, ctype))]}


GOOD = SAMPLES[1].read_bytes()
BAD_INPUTS = [
    # (case, request kwargs, status, text the answer must contain)
    ("truncated png", _one("t.png", GOOD[:len(GOOD) // 2]), 400, "(t.png): corrupt or truncated"),
    ("not an image", _one("n.png", b"hello, not an image"), 400, "(n.png): not a PNG, JPEG"),
    ("gif", _one("g.gif", png_bytes(fmt="GIF"), "image/gif"), 415, "not an image type"),
    ("second of two corrupt", {"files": [("images", ("ok.png", GOOD, "image/png")),
                                          ("images", ("bad.png", b"\x89PNG\r\n\x1a\nxx",
                                                      "image/png"))]},
     400, "image 1 (bad.png)"),
    ("pixel bomb", _one("bomb.png", _bomb()), 400, "over max_pixels=250000"),
    ("image over max_image_bytes", _one("big.bmp", png_bytes((150, 150), fmt="BMP")), 413,
     "max_image_bytes=16384"),
    ("too many images", {"files": [("images", (f"{i}.png", GOOD, "image/png"))
                                   for i in range(5)]}, 413, "max_images=4"),
    ("too many images (json)", {"json": {"images": [base64.b64encode(GOOD).decode()] * 5}},
     400, "max_images=4"),
    ("text part", _one("a.txt", b"abc", "text/plain"), 415, "text/plain is not an image"),
    ("text body", {"content": b"abc", "headers": {"Content-Type": "text/plain"}}, 415,
     "not accepted"),
    ("pickle body", {"content": b"x", "headers": {"Content-Type": "application/x-pickle"}},
     415, "pickle"),
    ("raw corrupt body", {"content": b"\xff\xd8\xff garbage",
                          "headers": {"Content-Type": "image/jpeg"}}, 400, "image body"),
    ("bad base64", {"json": {"images": ["%%%"]}}, 400, "not valid base64"),
    ("empty list", {"json": {"images": []}}, 400, "images is empty"),
    ("wrong form field", {"files": [("pics", ("a.png", GOOD, "image/png"))]}, 400,
     "unexpected form field 'pics'"),
    ("form value not a file", {"data": {"images": "abc"}, "files": [("x", ("", b"", ""))]}, 400,
     "form field"),
]


@pytest.mark.parametrize("case, kwargs, status, text", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(server, case, kwargs, status, text):
    url, expected = server
    try:
        r = httpx.post(f"{url}/classify", timeout=30, **kwargs)
    except httpx.HTTPError as exc:  # the server may close after refusing a body it did not read
        pytest.fail(f"{case}: no answer ({exc!r})")
    assert r.status_code == status, r.text
    assert text in r.text, r.text
    # the server stays up and right
    ok = httpx.post(f"{url}/classify", files=_files([SAMPLES[5]]), timeout=30)
    assert ok.status_code == 200 and ok.json()[0]["label"] == expected[5]


def test_content_length_over_the_limit_is_refused_unread(server):
    """A Content-Length larger than any valid request: 413 before one byte of body is read."""
    import http.client
    from urllib.parse import urlsplit

    url, _ = server
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", "/classify")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", "99999999")
        conn.endheaders()  # no body sent at all
        r = conn.getresponse()
        assert r.status == 413 and b"larger than any valid request" in r.read()
    finally:
        conn.close()
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_streamed_body_over_the_limit_is_cut_off(server):
    url, expected = server

    def chunks():
        for _ in range(200):
            yield b"\0" * 65536  # 13 MB, chunked: no Content-Length to refuse up front

    r = httpx.post(f"{url}/classify", content=chunks(), headers={"Content-Type": "image/png"},
                   timeout=30)
    assert r.status_code == 413 and "larger than" in r.text
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_image_bytes_roundtrip_helper():
    """The bomb really is small on the wire and large in pixels (else the table proves less)."""
    from PIL import Image

    data = _bomb()
    assert len(data) < 16384
    assert Image.open(io.BytesIO(data)).size == (1000, 1000)
