"""ferry-media-server: the HTTP media streaming server that runs inside the guest.

It does gnump3d's job: browse a media tree, stream files, hand out ``.m3u``
playlists, keep an access log and play statistics.

Decisions:

- Standard library only, and no import from outside this package (relative
  imports within it): the guest runs it on Debian's own ``python3 -I``, and the
  image ships it as one file, a zipapp built by :mod:`ferry.stream.bundle`,
  installed as ``/usr/local/bin/ferry-media-server``.
- One module per job, so each can be read (and tested) on its own: media types,
  settings and client networks, Ogg durations, pacing, byte ranges, paths and
  URLs, statistics, access log, pages, playlists, the request handler, the
  server, the command line.

URL space (everything under ``--root``)::

    /dir/                       directory page (HTML), links to playlists
    /dir/file.ogg               the file; GET and HEAD; single byte ranges
    /dir/file.ogg?m3u           playlist holding that one file
    /dir/?m3u                   playlist of the directory, recursive
    /dir/?m3u=shuffle           the same, shuffled
    /_stats                     statistics page (``?format=json`` for JSON)
    /_search?q=WORD             files and directories whose name contains WORD

Pacing. A live broadcast cannot be downloaded faster than it is played; a file
server can, and then a player holds the whole movie after a second and no outage
of the server is ever visible to it. So media files are sent at their real-time
byte rate (size / duration) times ``--pace``, after an initial burst of
``--burst`` seconds of media that lets a player fill its start-up buffer quickly,
as real streaming servers do. A Range request (a player resuming) starts a new
burst at its offset. The duration comes from the manifest ``<file>.json`` beside
the file (key ``duration``), else from the Ogg file itself (the last granule
position of its Vorbis or Opus stream), else from ``--fallback-kbps``. Data is
written in chunks of at most 8 KiB, about 20 per second, so that a player's
progress is fine-grained. ``--pace 0`` disables pacing.

Concurrency. One thread per connection; a client that sends nothing is dropped
after ``--idle-timeout`` seconds, one whose request head has not arrived whole
within ``--request-deadline`` seconds (however it dribbles) is dropped, one
that reads nothing after ``--send-timeout`` seconds too, and none holds up any
other client. At most ``--max-clients`` connections are served at once, and
``--max-per-client`` from one address; more get a 503.
"""

from __future__ import annotations

from .access import client_allowed, parse_network
from .cli import build_parser, config_from_args, main
from .config import Config
from .duration import DurationCache, manifest_duration, ogg_duration
from .mediatypes import MEDIA_TYPES, is_streamable, media_type
from .pacing import Pacer
from .ranges import Unsatisfiable, parse_range
from .server import MediaServer
from .stats import Stats

__all__ = [
    "MEDIA_TYPES",
    "Config",
    "DurationCache",
    "MediaServer",
    "Pacer",
    "Stats",
    "Unsatisfiable",
    "build_parser",
    "client_allowed",
    "config_from_args",
    "is_streamable",
    "main",
    "manifest_duration",
    "media_type",
    "ogg_duration",
    "parse_network",
    "parse_range",
]
