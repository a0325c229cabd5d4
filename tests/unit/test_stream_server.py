"""HTTP conformance, safety and concurrency of the guest's media server."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ferry.stream import mediaserver as srv
from ferry.stream.mediaserver import Config, MediaServer
from ferry.util.wait import wait_until_sync

BODY = bytes(range(256)) * 400  # 102400 bytes, every offset recognisable


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    (media / "sub" / "deeper").mkdir(parents=True)
    (media / "movie.ogg").write_bytes(BODY)
    (media / "sub" / "song.mp3").write_bytes(b"ID3" + b"\0" * 1000)
    (media / "sub" / "deeper" / "track.flac").write_bytes(b"fLaC" + b"\0" * 1000)
    (media / "sub" / "clip.webm").write_bytes(b"\x1a\x45\xdf\xa3" + b"\0" * 100)
    (media / "sub" / "voice.opus").write_bytes(b"OggS" + b"\0" * 100)
    (media / "notes.txt").write_text("not media\n")
    (media / "empty.ogg").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("outside the root\n")
    (media / "escape.ogg").symlink_to(tmp_path / "secret.txt")
    (media / "inside.ogg").symlink_to(media / "movie.ogg")
    return media


@contextmanager
def running(root: Path, **options: Any) -> Iterator[MediaServer]:
    config = Config(root=root, bind="127.0.0.1", port=0, pace=0.0, **options)
    server = MediaServer(config)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server(root: Path) -> Iterator[MediaServer]:
    with running(root) as s:
        yield s


def port_of(server: MediaServer) -> int:
    port: int = server.socket.getsockname()[1]
    return port


def get(
    server: MediaServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def raw(server: MediaServer, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (no client-side normalisation) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def log_lines(log: Path) -> int:
    """Complete lines in the access log so far (0 before it exists)."""
    return log.read_text().count("\n") if log.exists() else 0


# --------------------------------------------------------------------------- ranges

N = len(BODY)


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=0-", 0, N - 1),
        ("bytes=10-19", 10, 19),
        ("bytes=0-0", 0, 0),
        (f"bytes={N - 1}-", N - 1, N - 1),
        ("bytes=-10", N - 10, N - 1),
        (f"bytes=-{N + 500}", 0, N - 1),
        (f"bytes=5-{N + 1000}", 5, N - 1),
        ("bytes = 7 - 9", 7, 9),
    ],
)
def test_satisfiable_ranges_get_206_with_exact_bytes(
    server: MediaServer, spec: str, first: int, last: int
) -> None:
    resp, body = get(server, "/movie.ogg", {"Range": spec})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {first}-{last}/{N}"
    assert resp.getheader("Content-Length") == str(last - first + 1)
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert body == BODY[first : last + 1]


@pytest.mark.parametrize("spec", [f"bytes={N}-", f"bytes={N + 5}-{N + 10}", "bytes=-0"])
def test_unsatisfiable_ranges_get_416(server: MediaServer, spec: str) -> None:
    resp, body = get(server, "/movie.ogg", {"Range": spec})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{N}"
    assert body == b""


def test_any_range_of_an_empty_file_is_unsatisfiable(server: MediaServer) -> None:
    resp, _ = get(server, "/empty.ogg", {"Range": "bytes=0-"})
    assert resp.status == 416
    resp, body = get(server, "/empty.ogg")
    assert (resp.status, resp.getheader("Content-Length"), body) == (200, "0", b"")


@pytest.mark.parametrize("spec", ["bytes=abc", "bytes=9-3", "items=0-5", "bytes=0-1,5-6", "bytes="])
def test_invalid_or_multiple_ranges_are_ignored(server: MediaServer, spec: str) -> None:
    resp, body = get(server, "/movie.ogg", {"Range": spec})
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(N)
    assert body == BODY


def test_stale_if_range_gets_the_whole_file(server: MediaServer) -> None:
    resp, _ = get(server, "/movie.ogg", method="HEAD")
    etag = resp.getheader("ETag")
    assert etag
    resp, body = get(server, "/movie.ogg", {"Range": "bytes=100-", "If-Range": etag})
    assert resp.status == 206 and body == BODY[100:]
    resp, body = get(server, "/movie.ogg", {"Range": "bytes=100-", "If-Range": '"other"'})
    assert resp.status == 200 and body == BODY


def test_head_has_get_headers_and_no_body_on_a_kept_alive_connection(server: MediaServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)
    conn.request("HEAD", "/movie.ogg")
    head = conn.getresponse()
    assert head.read() == b""
    conn.request("GET", "/movie.ogg", headers={"Range": "bytes=0-3"})
    resp = conn.getresponse()
    # If HEAD had leaked a body, this response would be garbage.
    assert resp.status == 206 and resp.read() == BODY[:4]
    conn.close()
    assert head.status == 200
    assert head.getheader("Content-Length") == str(N)
    assert head.getheader("Content-Type") == "video/ogg"
    assert head.getheader("Accept-Ranges") == "bytes"


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        ("/movie.ogg", "video/ogg"),
        ("/sub/song.mp3", "audio/mpeg"),
        ("/sub/deeper/track.flac", "audio/flac"),
        ("/sub/clip.webm", "video/webm"),
        ("/sub/voice.opus", "audio/ogg"),
        ("/notes.txt", "text/plain; charset=utf-8"),
    ],
)
def test_media_types(server: MediaServer, path: str, ctype: str) -> None:
    resp, _ = get(server, path, method="HEAD")
    assert resp.status == 200
    assert resp.getheader("Content-Type") == ctype


# --------------------------------------------------------------------------- pages


def test_directory_page_lists_entries_and_playlist_links(server: MediaServer) -> None:
    resp, body = get(server, "/")
    page = body.decode()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/html")
    assert "href='movie.ogg'" in page and "href='sub/'" in page
    assert "?m3u" in page and "?m3u=shuffle" in page
    resp, _ = get(server, "/sub")
    assert resp.status == 301 and resp.getheader("Location") == "/sub/"


def test_playlists_for_a_file_a_tree_and_shuffled(server: MediaServer) -> None:
    base = f"http://127.0.0.1:{port_of(server)}"
    resp, body = get(server, "/movie.ogg?m3u")
    assert resp.getheader("Content-Type") == "audio/x-mpegurl"
    assert body.decode().splitlines() == ["#EXTM3U", "#EXTINF:-1,movie", f"{base}/movie.ogg"]
    _, body = get(server, "/sub/?m3u")
    urls = [line for line in body.decode().splitlines() if not line.startswith("#")]
    assert urls == [
        f"{base}/sub/clip.webm",
        f"{base}/sub/song.mp3",
        f"{base}/sub/voice.opus",
        f"{base}/sub/deeper/track.flac",
    ]
    _, body = get(server, "/sub/?m3u=shuffle")
    shuffled = [line for line in body.decode().splitlines() if not line.startswith("#")]
    assert sorted(shuffled) == sorted(urls)
    _, body = get(server, "/?m3u")
    everything = body.decode()
    # The symlink that leaves the root is no part of any playlist.
    assert "escape.ogg" not in everything and "notes.txt" not in everything
    assert f"{base}/inside.ogg" in everything


def test_search_by_name(server: MediaServer) -> None:
    _, body = get(server, "/_search?q=TRACK")
    assert "sub/deeper/track.flac" in body.decode()
    _, body = get(server, "/_search?q=nomatch")
    assert "0 matches" in body.decode()


def test_stats_count_plays_and_persist(root: Path, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    with running(root, stats_file=stats_file) as s:
        get(s, "/movie.ogg")
        get(s, "/movie.ogg")
        get(s, "/movie.ogg", {"Range": "bytes=500-"})  # a resume, not a new play
        get(s, "/sub/song.mp3")
        _, body = get(s, "/_stats?format=json")
        stats = json.loads(body)
        assert stats["counts"] == {"/movie.ogg": 2, "/sub/song.mp3": 1}
        assert stats["most_played"][0] == ["/movie.ogg", 2]
        assert stats["recent"][0]["path"] == "/sub/song.mp3"
        _, page = get(s, "/_stats")
        assert b"Most played" in page and b"/movie.ogg: 2" in page
    with running(root, stats_file=stats_file) as s:
        _, body = get(s, "/_stats?format=json")
        assert json.loads(body)["counts"]["/movie.ogg"] == 2


def test_access_log_uses_the_common_log_format(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with running(root, access_log=str(log)) as s:
        get(s, "/movie.ogg", {"Range": "bytes=0-99"})
        # A line is written once its response is complete, on the server's side: the
        # client may have its bytes earlier. Two connections are logged in the order
        # asked only if the second request waits for the first line.
        wait_until_sync(lambda: log_lines(log) >= 1, timeout=5, what="the first access log line")
        get(s, "/nope.ogg")
        wait_until_sync(lambda: log_lines(log) >= 2, timeout=5, what="the second access log line")
    lines = log.read_text().splitlines()
    clf = re.compile(
        r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "(.*)" (\d+) (\d+)$'
    )
    parsed = [clf.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2), m.group(3)) for m in parsed if m] == [
        ("GET /movie.ogg HTTP/1.1", "206", "100"),
        ("GET /nope.ogg HTTP/1.1", "404", "0"),
    ]


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize(
    "target",
    [
        b"/../secret.txt",
        b"/%2e%2e/secret.txt",
        b"/%2E%2E%2Fsecret.txt",
        b"/sub/..%2f..%2fsecret.txt",
        b"/sub/../../secret.txt",
        b"/escape.ogg",
        b"//../secret.txt",
    ],
)
def test_requests_outside_the_root_are_refused(server: MediaServer, target: bytes) -> None:
    answer = raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) in (400, 403, 404)
    assert b"outside the root" not in answer


def test_symlink_inside_the_root_is_served(server: MediaServer) -> None:
    resp, body = get(server, "/inside.ogg", {"Range": "bytes=0-9"})
    assert resp.status == 206 and body == BODY[:10]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /movie.ogg HTTP/9.9\r\n\r\n", 505),
        (b"GET /movie.ogg HTTP/1.1 extra\r\n\r\n", 400),
        (b"POST /movie.ogg HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501),
        (b"GET /%00 HTTP/1.1\r\n\r\n", 400),
        (b"GET /%ff%fe HTTP/1.1\r\n\r\n", 400),
        (b"GET " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),
        (b"GET nope HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_4xx_or_5xx(
    server: MediaServer, request_bytes: bytes, status: int
) -> None:
    assert status_of(raw(server, request_bytes)) == status


def test_absolute_form_request_target(server: MediaServer) -> None:
    answer = raw(
        server, b"GET http://virt_server:8888/movie.ogg HTTP/1.0\r\nRange: bytes=0-1\r\n\r\n"
    )
    assert status_of(answer) == 206 and answer.endswith(BODY[:2])


def test_client_networks(root: Path) -> None:
    cfg = Config(allow=[srv.parse_network("10.0.0.0/8")], deny=[srv.parse_network("10.1.0.0/16")])
    assert srv.client_allowed(cfg, "10.2.3.4")
    assert not srv.client_allowed(cfg, "10.1.2.3")
    assert not srv.client_allowed(cfg, "192.168.1.1")
    assert srv.client_allowed(cfg, "::ffff:10.2.3.4")
    assert srv.client_allowed(Config(), "192.168.1.1")
    with pytest.raises(ValueError, match="not a network in CIDR notation: nonsense"):
        srv.parse_network("nonsense")
    with pytest.raises(SystemExit):
        srv.build_parser().parse_args(["--allow", "nonsense"])
    with running(root, deny=[srv.parse_network("127.0.0.0/8")]) as s:
        assert get(s, "/movie.ogg")[0].status == 403
    with running(root, allow=[srv.parse_network("10.0.0.0/8")]) as s:
        assert get(s, "/")[0].status == 403
    with running(root, allow=[srv.parse_network("127.0.0.1/32")]) as s:
        assert get(s, "/")[0].status == 200


# --------------------------------------------------------------------------- duration


def ogg_page(serial: int, granule: int, packet: bytes) -> bytes:
    segments = [255] * (len(packet) // 255) + [len(packet) % 255]
    header = b"OggS\x00\x00" + struct.pack("<qIII", granule, serial, 0, 0)
    return header + bytes([len(segments)]) + bytes(segments) + packet


def test_ogg_duration_from_the_vorbis_granule(tmp_path: Path) -> None:
    ident = b"\x01vorbis" + struct.pack("<IBI", 0, 1, 44100) + b"\0" * 16
    data = ogg_page(7, 0, b"\x80theora" + b"\0" * 40) + ogg_page(9, 0, ident)
    data += b"".join(ogg_page(9, g, b"\0" * 300) for g in range(0, 44100 * 12, 44100))
    data += ogg_page(9, 44100 * 12 + 22050, b"\0" * 100) + ogg_page(7, 999999, b"\0" * 50)
    path = tmp_path / "a.ogg"
    path.write_bytes(data)
    assert srv.ogg_duration(path) == pytest.approx(12.5)
    path.with_name("a.ogg.json").write_text(json.dumps({"duration": 3.25}))
    st = path.stat()
    assert srv.DurationCache().get(path, st) == 3.25


# --------------------------------------------------------------------------- pacing


def paced_root(tmp_path: Path, size: int, duration: float) -> Path:
    root = tmp_path / "paced"
    root.mkdir()
    (root / "live.ogg").write_bytes(os.urandom(size))
    (root / "live.ogg.json").write_text(json.dumps({"duration": duration, "size": size}))
    return root


def timed_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[float, int]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    n = 0
    while chunk := resp.read1(65536):
        n += len(chunk)
    conn.close()
    return time.monotonic() - start, n


def test_pacer_schedule_on_a_given_clock() -> None:
    # 1000 bytes/s after a 500-byte burst, on a clock that moves only when slept on.
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = srv.Pacer(1000.0, 500.0, clock=lambda: now[0], sleep=sleep)
    assert pacer.chunk_size() == 512  # rate / 20 writes a second, at least 512
    for _ in range(4):
        pacer.wait(250)
        pacer.sent_bytes(250)
    # The first 500 bytes go at once, then each 250 bytes waits a quarter second.
    assert slept == [0.25, 0.25]
    assert now[0] == pytest.approx(100.5)
    unpaced = srv.Pacer(0.0, 0.0, clock=lambda: now[0], sleep=sleep)
    unpaced.wait(10**6)
    assert len(slept) == 2


def test_pacing_follows_real_time_after_the_burst(tmp_path: Path) -> None:
    # 100 kB lasting 2 s: 50 kB/s; a 0.5 s burst leaves 1.5 s of paced sending.
    root = paced_root(tmp_path, 100_000, 2.0)
    with running(root) as s:
        s.config.pace, s.config.burst = 1.0, 0.5
        port = port_of(s)
        elapsed, n = timed_get(port, "/live.ogg")
        assert n == 100_000
        # (Upper bounds with room for a loaded CI machine: the lower ones are the pacing.)
        assert 1.35 <= elapsed <= 2.5
        whole = elapsed
        # A resume from the middle gets a fresh burst, then the same rate: (1.0 - 0.5) s.
        elapsed, n = timed_get(port, "/live.ogg", {"Range": "bytes=50000-"})
        assert n == 50_000
        assert 0.4 <= elapsed <= 1.5
        # Twice the pace, half the time.
        s.config.pace = 2.0
        elapsed, n = timed_get(port, "/live.ogg")
        assert 0.65 <= elapsed <= 0.75 * whole, (elapsed, whole)


def test_paced_data_arrives_in_small_steps(tmp_path: Path) -> None:
    root = paced_root(tmp_path, 40_000, 1.0)
    with running(root) as s:
        s.config.pace, s.config.burst = 1.0, 0.0
        conn = http.client.HTTPConnection("127.0.0.1", port_of(s), timeout=10)
        conn.request("GET", "/live.ogg")
        resp = conn.getresponse()
        arrivals: list[tuple[float, int]] = []
        while chunk := resp.read1(65536):
            arrivals.append((time.monotonic(), len(chunk)))
        conn.close()
    assert sum(n for _, n in arrivals) == 40_000
    assert max(n for _, n in arrivals) <= 8192
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 15 and max(gaps) < 0.2


# --------------------------------------------------------------------------- concurrency


def test_idle_and_non_reading_clients_do_not_hold_up_others(tmp_path: Path, root: Path) -> None:
    big = root / "big.ogg"
    big.write_bytes(b"\0" * (16 << 20))
    with running(root, idle_timeout=1.0, send_timeout=1.0) as s:
        port = port_of(s)
        idle = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /movie.ogg HTTP/1.1\r\nHo")  # never finishes its headers
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big.ogg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        try:
            start = time.monotonic()
            for _ in range(5):
                resp, body = get(s, "/movie.ogg")
                assert resp.status == 200 and body == BODY
            assert time.monotonic() - start < 1.0
            # The silent clients are dropped after their timeouts.
            idle.settimeout(5)
            assert idle.recv(100) == b""
            half.settimeout(5)
            assert half.recv(100) == b""
        finally:
            for sock in (idle, half, stuck):
                sock.close()


def test_a_dribbled_request_head_is_cut_at_the_deadline(root: Path) -> None:
    """Clients sending one header byte at a time cannot hold every slot."""
    with running(root, idle_timeout=5.0, request_deadline=1.0, max_clients=4) as s:
        port = port_of(s)
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        start = time.monotonic()
        try:
            for sock in slow:
                sock.sendall(b"G")
            # Each byte comes well within the idle timeout, never the whole head.
            while time.monotonic() - start < 3.0:
                cut = 0
                for sock in slow:
                    try:
                        sock.sendall(b"E")
                    except OSError:
                        cut += 1
                if cut == len(slow):
                    break
                time.sleep(0.2)
            assert time.monotonic() - start < 3.0, "the slow clients were never cut"
            resp, body = get(s, "/movie.ogg")
            assert resp.status == 200 and body == BODY
        finally:
            for sock in slow:
                sock.close()


def test_one_address_gets_at_most_its_share(root: Path) -> None:
    with running(root, idle_timeout=5.0, max_per_client=2) as s:
        port = port_of(s)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            extra = raw(s, b"GET /movie.ogg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.startswith(b"HTTP/1.1 503"), extra[:80]
        finally:
            for sock in held:
                sock.close()

        # Their slots come back once they are gone.
        def served() -> bool:
            request = b"GET /movie.ogg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            return raw(s, request).startswith(b"HTTP/1.1 200")

        wait_until_sync(served, timeout=5, what="the address to be served again")


def test_fifty_concurrent_paced_clients_each_get_the_paced_rate(tmp_path: Path) -> None:
    # 60 kB lasting 1 s, burst 0.25 s: each client should need 0.75 s.
    root = paced_root(tmp_path, 60_000, 1.0)
    (root / "big.ogg").write_bytes(b"\0" * (16 << 20))
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    go = threading.Event()

    def client(port: int) -> None:
        go.wait(10)
        r = timed_get(port, "/live.ogg")
        with lock:
            results.append(r)

    # Fifty clients from one address: lift the per-client cap for this test.
    with running(root, idle_timeout=5.0, max_per_client=64) as s:
        s.config.pace, s.config.burst = 1.0, 0.25
        port = port_of(s)
        idle = socket.create_connection(("127.0.0.1", port))  # a silent neighbour
        stuck = socket.create_connection(("127.0.0.1", port))  # and one that never reads
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big.ogg HTTP/1.1\r\nHost: x\r\n\r\n")
        threads = [threading.Thread(target=client, args=(port,)) for _ in range(50)]
        for t in threads:
            t.start()
        start = time.monotonic()
        go.set()
        for t in threads:
            t.join(20)
        wall = time.monotonic() - start
        idle.close()
        stuck.close()
    assert len(results) == 50
    assert all(n == 60_000 for _, n in results)
    times = sorted(e for e, _ in results)
    # Everyone gets the paced rate: none is much faster (pacing) or slower (starvation).
    assert times[0] >= 0.65, times
    assert times[-1] <= 1.5, times
    assert wall <= 2.0


# --------------------------------------------------------------------------- standalone


def test_refuses_a_missing_root(tmp_path: Path) -> None:
    assert srv.main(["--root", str(tmp_path / "none"), "--port", "0"]) == 1
