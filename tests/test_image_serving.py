"""The image service over HTTP, end to end: one ``maas run`` of a digits pipeline (validate, tune,
register, promote, build) and one ``bentoml serve`` of the bento it built, per module.
Multipart, raw and base64 JSON uploads answer label + probabilities per image in order; a table
of bad inputs gets the status and message it should, and the server keeps answering."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import httpx
import numpy as np
import pytest
import yaml
from image_support import DIGITS, REPO, png_bytes

pytestmark = pytest.mark.slow  # a full `maas run` and a `bentoml serve` (the module's fixture)

#: the service's default limits (bentos/image_classifier/service.py DEFAULT_SETTINGS)
MAX_IMAGES, MAX_IMAGE_BYTES, MAX_PIXELS = 16, 4 * 1024 * 1024, 4096 * 4096
#: one test image per digit 0..9
SAMPLES = [sorted((DIGITS / "test" / str(d)).iterdir())[0] for d in range(10)]


def _pipeline(work) -> dict:
    return {
        "name": "digits-test", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data": {"path": str(DIGITS / "train"), "test_path": str(DIGITS / "test"),
                 "options": {"image_size": 8, "channels": 1}},
        "validation": {"suite": str(REPO / "pipelines" / "digits-suite.json")},
        "model": {"family": "image_classifier", "eval_batch_size": 256},
        "tuning": {"n_trials": 1, "max_epochs": 5, "search_space": {
            "learning_rate": {"type": "float", "low": 2e-3, "high": 4e-3}},
            "fixed": {"batch_size": 32}},
        "promotion": {"thresholds": {"accuracy": 0.9}},
        "registry": {"model_name": "digits-test"},
        # fp32 only: the bento serves the MLflow pyfunc folder (bentos.build, any flavour)
        "compression": {"variants": []},
        "bento": {"enabled": True, "max_batch_size": 8, "workers": 1, "torch_threads": 1},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, expected labels of SAMPLES, /metadata): the pipeline's bento being served."""
    from bentos.server import serve_bento
    from pipelines.config import PipelineConfig
    from pipelines.families import load_family
    from pipelines.run import run_pipeline

    work = tmp_path_factory.mktemp("image-serve")
    path = work / "digits-test.yaml"
    path.write_text(yaml.safe_dump(_pipeline(work)), "utf-8")
    with pytest.MonkeyPatch.context() as mp:  # BENTOML_HOME put back afterwards
        mp.setenv("BENTOML_HOME", str(work / "bentoml"))
        cfg = PipelineConfig.load(path)
        result = run_pipeline(cfg)
        assert str(result.champion_version) == "1" and result.bento_tag, result
        assert result.test_metrics["accuracy"] >= 0.9, result.test_metrics
        family = load_family(cfg)
        model = family.load_logged("models:/digits-test@champion")
        rows = family.read(DIGITS / "test", "test_path")
    rows = rows[rows.path.isin([str(p.resolve()) for p in SAMPLES])]
    probs = family.predict_proba(model, family.inputs(rows))
    by_path = dict(zip(rows.path, np.array(model.labels)[probs.argmax(axis=1)], strict=True))
    expected = [by_path[str(p.resolve())] for p in SAMPLES]
    with serve_bento(result.bento_tag, bentoml_home=work / "bentoml",
                     log_path=work / "server.log") as running:
        meta = httpx.get(f"{running.url}/metadata", timeout=10).json()
        yield running.url, expected, meta


def _files(paths):
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _check(answer, expected_labels):
    assert [a["label"] for a in answer] == list(expected_labels)
    for a in answer:
        assert sorted(a["probabilities"]) == [str(i) for i in range(10)]
        assert abs(sum(a["probabilities"].values()) - 1.0) < 1e-4
        assert a["probabilities"][a["label"]] == max(a["probabilities"].values())


def test_multipart_raw_and_json_uploads(server):
    url, expected, _ = server
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
    url, expected, _ = server

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
    url, _, meta = server
    assert (meta["channels"], meta["image_size"], meta["arch"]) == (1, 8, "cnn")
    assert meta["labels"] == [str(i) for i in range(10)]
    assert (meta["model_name"], meta["model_version"], meta["alias"]) == (
        "digits-test", "1", "champion")
    assert (meta["variant"], meta["runtime"], meta["batching"]) == ("fp32", "torch", True)
    assert (meta["max_images"], meta["max_image_bytes"], meta["max_pixels"]) == (
        MAX_IMAGES, MAX_IMAGE_BYTES, MAX_PIXELS)
    card = httpx.get(f"{url}/card", timeout=10)
    assert card.status_code == 200 and "digits-test version 1" in card.text
    assert meta["bento_tag"] in card.text


def _bomb() -> bytes:
    return png_bytes((5000, 4000))  # 20 M pixels from a 20 KB file: over max_pixels


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
    ("pixel bomb", _one("bomb.png", _bomb()), 400, f"over max_pixels={MAX_PIXELS}"),
    ("image over max_image_bytes", _one("big.bmp", png_bytes((1200, 1200), "RGB", "BMP")),
     413, f"max_image_bytes={MAX_IMAGE_BYTES}"),
    ("too many images", {"files": [("images", (f"{i}.png", GOOD, "image/png"))
                                   for i in range(MAX_IMAGES + 1)]}, 413,
     f"max_images={MAX_IMAGES}"),
    ("too many images (json)", {"json": {"images": [base64.b64encode(GOOD).decode()]
                                         * (MAX_IMAGES + 1)}}, 400, f"max_images={MAX_IMAGES}"),
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
    url, expected, _ = server
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

    url, _, _ = server
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
    url, _, meta = server

    def chunks():  # chunked: no Content-Length to refuse up front
        for _ in range(meta["max_body_bytes"] // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    r = httpx.post(f"{url}/classify", content=chunks(), headers={"Content-Type": "image/png"},
                   timeout=30)
    assert r.status_code == 413 and "larger than" in r.text
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_image_bytes_roundtrip_helper():
    """The bomb really is small on the wire and large in pixels (else the table proves less)."""
    from PIL import Image

    data = _bomb()
    assert len(data) < 64 * 1024
    with Image.open(io.BytesIO(data)) as img:
        assert img.size[0] * img.size[1] > MAX_PIXELS


def test_mlflow_deployments_predict_sends_images(server, tmp_path):
    """`mlflow deployments predict -t bentoml` follows the served family's API (its /metadata):
    image file paths, bytes and a DataFrame of paths are sent as images, in chunks of
    max_images, and answer in order."""
    import pandas as pd
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    url, expected, meta = server
    assert meta["api"] == {"route": "/classify", "input": "images", "max_items": MAX_IMAGES}
    client = get_deploy_client("bentoml")
    order = [i % 10 for i in range(MAX_IMAGES + 3)]  # more than one request's worth
    out = client.predict(endpoint=url, inputs={"images": [str(SAMPLES[i]) for i in order]})
    _check(out["predictions"], [expected[i] for i in order])
    out = client.predict(endpoint=url, inputs=[SAMPLES[4].read_bytes(), SAMPLES[8]])
    _check(out["predictions"], [expected[4], expected[8]])
    frame = pd.DataFrame({"path": [str(SAMPLES[1]), str(SAMPLES[6])]})
    _check(client.predict(endpoint=url, inputs=frame)["predictions"], [expected[1], expected[6]])
    (tmp_path / "n.png").write_bytes(b"not an image")
    with pytest.raises(MlflowException, match=r"answered 400: .*n\.png|not a PNG"):
        client.predict(endpoint=url, inputs=[str(tmp_path / "n.png")])
