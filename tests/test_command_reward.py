"""The ``command`` reward: a real scorer program in a subprocess and a real HTTP server on loopback,
scoring real files that rewardfl wrote; scores checked against the pixels computed here."""

from __future__ import annotations

import http.server
import json
import sys
import threading

import numpy as np
import pytest
import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import SampleContext
from rewardfl.registry import build_options, load_plugin

# A scorer as users write them: reads the request, opens each video, answers one score per video.
SCORER = r'''
import json, os, sys
import numpy as np
request = json.load(sys.stdin)
mode = sys.argv[1] if len(sys.argv) > 1 else "mean"
if mode == "fail":
    print("model weights not found", file=sys.stderr); sys.exit(3)
if mode == "short":
    print(json.dumps({"scores": [0.5]})); sys.exit(0)
if mode == "flaky":
    marker = sys.argv[2]
    if not os.path.exists(marker):
        open(marker, "w").close(); sys.exit(1)
scores = []
for video in request["videos"]:
    path = video["path"]
    if os.path.isdir(path):
        import cv2
        frames = [cv2.imread(os.path.join(path, f))[:, :, ::-1] for f in sorted(os.listdir(path))]
    else:
        import imageio.v2 as imageio
        frames = list(imageio.mimread(path))
    value = float(np.mean(np.stack(frames)) / 255.0)
    scores.append(None if video["prompt"] == "unscorable" else value)
print(json.dumps({"scores": scores}))
'''


@pytest.fixture
def scorer(tmp_path):
    path = tmp_path / "scorer.py"
    path.write_text(SCORER)
    return path


def _reward(**options):
    cls = load_plugin("reward", "command")
    return cls(None, build_options("reward", "command", cls, options))


def _videos(seed=0, batch=3, frames=3, size=16):
    g = torch.Generator().manual_seed(seed)
    # smooth per-video brightness levels with a little texture: mp4 keeps their means closely
    levels = torch.linspace(-0.6, 0.6, batch).view(batch, 1, 1, 1, 1)
    return (levels + 0.1 * torch.rand(batch, 3, frames, size, size, generator=g)).clamp(-1, 1)


def _means(videos):
    """Each video's mean pixel in [0, 1] units, from the uint8 frames rewardfl writes."""
    u8 = ((videos.clamp(-1, 1) + 1) * 127.5).round()
    return (u8.flatten(1).mean(1) / 255.0).double()


def _contexts(n, prompts=None):
    return [SampleContext(sample_id=f"clip{i}", prompt=(prompts or [""] * n)[i]) for i in range(n)]


def test_a_program_scores_png_frames_exactly(scorer, tmp_path):
    reward = _reward(command=[sys.executable, str(scorer)], video_format="frames", work_dir=str(tmp_path / "w"))
    videos = _videos()
    out = reward(videos, _contexts(3, ["a", "unscorable", "c"]))
    expected = _means(videos)
    assert out.valid.tolist() == [True, False, True]
    torch.testing.assert_close(out.scores[[0, 2]].double(), expected[[0, 2]], rtol=0, atol=1e-6)
    assert out.scores.requires_grad is False and out.metrics["unscored"] == 1.0
    assert list((tmp_path / "w").iterdir()) == []  # the call's videos are removed


def test_a_program_scores_mp4_files(scorer):
    reward = _reward(command=f"{sys.executable} {scorer}", video_format="mp4")
    videos = _videos(batch=2, frames=5, size=32)
    out = reward(videos, _contexts(2))
    torch.testing.assert_close(out.scores.double(), _means(videos), rtol=0, atol=0.02)


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    answers = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.status != 200:
            self.send_error(self.status, "busy")
            return
        import imageio.v2 as imageio

        scores = [float(np.mean(np.stack(imageio.mimread(v["path"]))) / 255.0) for v in body["videos"]]
        data = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_an_http_endpoint_scores_mp4_files(server):
    reward = _reward(url=f"http://127.0.0.1:{server.server_address[1]}/score", timeout=60)
    videos = _videos(batch=2, frames=3, size=32)
    contexts = [SampleContext(sample_id="clipA", prompt="a person", reference_path="/data/a.mp4"),
                SampleContext(sample_id="clipB", prompt="another")]
    out = reward(videos, contexts)
    torch.testing.assert_close(out.scores.double(), _means(videos), rtol=0, atol=0.02)
    (request,) = server.requests
    assert [(v["sample_id"], v["prompt"], v["reference_path"]) for v in request["videos"]] == [
        ("clipA", "a person", "/data/a.mp4"), ("clipB", "another", None)]


def test_an_http_error_is_retried_then_named(server, monkeypatch):
    monkeypatch.setattr(_Handler, "status", 503)
    reward = _reward(url=f"http://127.0.0.1:{server.server_address[1]}/score", retries=2, retry_delay=0,
                     name="vlm-judge")
    with pytest.raises(ValueError, match=r"reward scorer 'vlm-judge' failed 3 times: answered HTTP 503"):
        reward(_videos(batch=1), _contexts(1))
    assert len(server.requests) == 3


def test_an_unreachable_endpoint_is_named():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = _reward(url=f"http://127.0.0.1:{port}/score", retries=0)
    with pytest.raises(ValueError, match=rf"failed 1 time: could not be reached at http://127.0.0.1:{port}/score"):
        reward(_videos(batch=1), _contexts(1))


def test_a_failing_program_is_named_with_its_stderr(scorer):
    reward = _reward(command=[sys.executable, str(scorer), "fail"], retries=1, retry_delay=0, name="my-scorer")
    with pytest.raises(ValueError, match=r"'my-scorer' failed 2 times: exited with code 3: model weights not found"):
        reward(_videos(batch=1), _contexts(1))


def test_the_wrong_count_is_named(scorer):
    reward = _reward(command=[sys.executable, str(scorer), "short"], retries=0)
    with pytest.raises(ValueError, match="returned 1 scores for 3 videos"):
        reward(_videos(batch=3), _contexts(3))


def test_a_timeout_is_named(tmp_path):
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time; time.sleep(30)\n")
    reward = _reward(command=[sys.executable, str(sleeper)], timeout=0.5, retries=0)
    with pytest.raises(ValueError, match=r"timed out after 0.5 s \(reward.timeout\)"):
        reward(_videos(batch=1), _contexts(1))


def test_a_flaky_program_succeeds_on_retry(scorer, tmp_path):
    reward = _reward(command=[sys.executable, str(scorer), "flaky", str(tmp_path / "marker")], retries=1,
                     retry_delay=0, video_format="frames")
    videos = _videos(batch=2)
    out = reward(videos, _contexts(2))
    torch.testing.assert_close(out.scores.double(), _means(videos), rtol=0, atol=1e-6)


@pytest.mark.parametrize("options, key", [
    ({}, "reward.command/reward.url"),
    ({"command": "x", "url": "http://h/"}, "reward.command/reward.url"),
    ({"url": "ftp://host/x"}, "reward.url"),
    ({"command": "x", "timeout": 0}, "reward.timeout"),
    ({"command": "x", "retries": -1}, "reward.retries"),
])
def test_bad_options_name_the_key(options, key):
    cls = load_plugin("reward", "command")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("/", "/")):
        build_options("reward", "command", cls, options)


def test_check_finds_the_program_or_names_it():
    cls = load_plugin("reward", "command")
    ok = build_options("reward", "command", cls, {"command": [sys.executable, "score.py"]})
    assert cls.check(None, ok) == [f"scorer  command {sys.executable} score.py"]
    missing = build_options("reward", "command", cls, {"command": "no-such-scorer-xyz --fast"})
    with pytest.raises(ConfigError, match="reward.command: program 'no-such-scorer-xyz' not found"):
        cls.check(None, missing)
