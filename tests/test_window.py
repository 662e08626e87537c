"""The edge's window, shown for real on a virtual X display (Xvfb), and captured from the screen."""

import os
import re
import select
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fer_swarm.samples import sample_clip

from .swarm import BrokerThread, WorkerThread, wait_for, zmq_context

pytestmark = pytest.mark.skipif(not (shutil.which("Xvfb") and shutil.which("xwd")), reason="needs Xvfb and xwd")


def read_xwd(data: bytes) -> np.ndarray:
    """The screen as an (H, W, 4) array from xwd's dump (32-bit ZPixmap, as Xvfb -screen WxHx24 gives)."""
    header = np.frombuffer(data[:100], ">u4")
    header_size, width, height, bytes_per_line, ncolors = header[0], header[4], header[5], header[12], header[19]
    start = header_size + 12 * ncolors
    pixels = np.frombuffer(data[start:start + bytes_per_line * height], np.uint8)
    return pixels.reshape(height, bytes_per_line)[:, : width * 4].reshape(height, width, 4)


@pytest.fixture
def display():
    # Xvfb picks a free display itself and writes its number once it accepts connections (-displayfd):
    # a number chosen here could be another test run's server, whose screen would then be looked at.
    ready, tell = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(tell), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            pass_fds=(tell,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(tell)
    try:
        assert select.select([ready], [], [], 20)[0], "Xvfb did not start"
        num = os.read(ready, 64).decode().strip()
        assert num.isdigit(), f"Xvfb said {num!r}"
        yield f":{num}"
    finally:
        os.close(ready)
        xvfb.terminate()
        xvfb.wait(10)


def screen_shows_labelled_faces(shot: bytes) -> bool:
    """The window shows the 640x480 frame (a large non-black region) with green label boxes in it."""
    screen = read_xwd(shot)
    lit = (screen[..., :3].max(axis=2) > 30)
    green = (screen[..., 1] > 150) & (screen[..., 0] < 120) & (screen[..., 2] < 120)
    return bool(lit.sum() > 0.4 * 640 * 480 and green.sum() > 200)


def test_edge_shows_labelled_frames_in_a_window(display, tmp_path):
    clip = sample_clip(tmp_path / "clip.mp4", frames=600, faces=2, fps=15)  # 40 s played in real time, at most
    with zmq_context() as ctx:
        b = BrokerThread(ctx)
        w = WorkerThread(ctx, b.backend)
        try:
            assert wait_for(lambda: b.scheduler.workers)
            env = dict(os.environ, DISPLAY=display)
            edge = subprocess.Popen([sys.executable, "-m", "fer_swarm", "-q", "edge", "--broker", b.frontend, "--video",
                                     str(clip), "--realtime"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            # Look at the screen until the window plays labelled frames; a loaded machine may take a while to open it.
            shown, deadline = False, time.monotonic() + 40
            while not shown and edge.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                shot = subprocess.run(["xwd", "-root", "-silent", "-display", display], capture_output=True, timeout=20)
                shown = shot.returncode == 0 and screen_shows_labelled_faces(shot.stdout)
            if edge.poll() is None:
                edge.send_signal(signal.SIGINT)  # seen: stop it as a user would (it flushes and prints its summary)
            out, errs = edge.communicate(timeout=60)
        finally:
            w.stop()
            b.stop()
    assert edge.returncode == 0, errs[-2000:]
    assert shown, f"the window never showed the frame with a green label box; the edge said:\n{out}\n{errs[-2000:]}"
    faces, labelled = map(int, re.search(r"faces\D+(\d+) in \d+ track\(s\) \((\d+) labelled\)", out).groups())
    # Stopped once seen, and real time on a loaded machine drops frames: no count of them is asserted, only
    # that the faces shown were labelled (the stop waits for the labels of the frames in hand).
    assert faces >= 2 and labelled >= 0.9 * faces
